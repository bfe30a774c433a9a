"""Turning one rank's failure into the same error on every rank (see [Note: checkpoint commit
protocol] and [Note: load in two phases])."""
from __future__ import annotations

from typing import Any, Callable

from shardwise.errors import CheckpointError


def outcome(fn: Callable[[], Any]) -> tuple[bool, Any]:
    """``(True, fn())``, or ``(False, message)`` if it raised: kept until every rank has spoken."""
    try:
        return True, fn()
    except CheckpointError as exc:
        return False, str(exc)
    except Exception as exc:  # noqa: BLE001 - reported collectively by the caller
        return False, f"{type(exc).__name__}: {exc}"


def raise_failed(results: list[tuple[bool, Any]], what: str, consequence: str) -> None:
    """Raise one :class:`CheckpointError` naming every failed rank, if any failed."""
    failed = [(r, msg) for r, (ok, msg) in enumerate(results) if not ok]
    if failed:
        lines = "\n".join(f"  rank {r}: {msg}" for r, msg in failed)
        raise CheckpointError(f"{what} failed on rank(s) {[r for r, _ in failed]}; {consequence}:\n{lines}")
