"""The start-up fingerprint check: every rank must run the same resolved config and model.

[Note: start-up fingerprint]
Each rank describes its resolved :class:`~shardwise.config.plan.Plan` as ``{dotted key: value}``
(``zero.stage``, ``batch.micro_batch_size``, ...), adds the process-group timeout it resolved and
a digest of its model's parameter names, shapes, dtypes and ``requires_grad`` flags, and all
ranks all-gather these small dicts once, before any training collective. A difference raises
the same :class:`~shardwise.errors.MismatchError` on every rank, listing each differing key with
its value per rank, instead of a silent wrong result or a hang in mismatched collectives later.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch.nn as nn

from shardwise.comm.collectives import all_gather_object
from shardwise.comm.context import ParallelContext
from shardwise.config.plan import Plan
from shardwise.errors import MismatchError

_SHOW = 60  # characters of a value shown per rank


def _flatten(value: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = repr(value)


def fingerprint(plan: Plan, model: nn.Module, timeout_s: float | None) -> dict[str, str]:
    """``{key: value}`` describing this rank's plan and model (small; sent to every rank)."""
    out: dict[str, str] = {}
    _flatten(dataclasses.asdict(plan), "", out)
    out["comms_timeout (resolved, SHARDWISE_TIMEOUT included)"] = repr(timeout_s)
    params = [(n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in model.named_parameters()]
    digest = hashlib.sha256(repr(params).encode()).hexdigest()[:12]
    out["model.parameters"] = f"{len(params)} tensors, {sum(p.numel() for p in model.parameters())} elements, " \
                              f"names/shapes digest {digest}"
    return out


MODEL_KEY = "model.parameters"


def check_same_everywhere(plan: Plan, model: nn.Module, ctx: ParallelContext, timeout_s: float | None) -> None:
    """Raise :class:`MismatchError` on every rank if any rank's fingerprint differs: the config
    over the whole world, the model among the ranks of one pipeline stage (each stage builds
    only its own layers; across tp the model is still whole here, before it is sharded)."""
    if not ctx.is_distributed:
        return
    mine = fingerprint(plan, model, timeout_s)
    mine["_where"] = ctx.where()
    mine["_stage"] = str(ctx.pp.rank)
    prints = all_gather_object(mine, ctx.world)
    where = [p.pop("_where") for p in prints]
    stage = [p.pop("_stage") for p in prints]
    keys = sorted(set().union(*prints))
    lines = []
    for key in keys:
        values = [p.get(key, "<absent>") for p in prints]
        if key == MODEL_KEY and len(set(stage)) > 1:  # pipeline: compare within each stage
            values = [f"stage {s}: {v}" for s, v in zip(stage, values)]
            if all(len({v for v, s2 in zip(values, stage) if s2 == s}) == 1 for s in set(stage)):
                continue
        if len(set(values)) > 1:
            by_value: dict[str, list] = {}
            for r, v in enumerate(values):  # a rank is named with its mesh coordinates, if any
                by_value.setdefault(v, []).append(where[r].removeprefix("rank ") if ctx.model_parallel else r)
            shown = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {rs if len(rs) > 1 else rs[0]}: "
                              f"{v if len(v) <= _SHOW else v[:_SHOW] + '...'}" for v, rs in by_value.items())
            lines.append(f"  {key}: {shown}")
    if lines:
        raise MismatchError(
            f"the ranks started with different configs or models (start-up check on rank {ctx.rank}; "
            f"{len(lines)} key(s) differ across the {ctx.world_size} ranks):\n" + "\n".join(lines)
            + "\nEvery rank must load the same config (file and SHARDWISE_TIMEOUT) and build the same model.")
