"""Process group, device and backend, chosen once and passed explicitly.

[Note: one place for the device]
CUDA + NCCL when a GPU is present, CPU + gloo otherwise. Nothing else in shardwise looks at
``torch.cuda.is_available()`` or at the backend name; components read ``ctx.device`` and the
collective choices recorded here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

from shardwise.comm.health import RankHealth
from shardwise.errors import DistributedSetupError, JoinError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_ENV = "SHARDWISE_TIMEOUT"


@dataclass(frozen=True)
class CommContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Literal["gloo", "nccl", "none"]
    group: "dist.ProcessGroup | None" = None
    # [Note: reduce-to-shard implementation]
    # gloo's reduce_scatter is about twice as slow as its all_reduce of the same buffer
    # (peers.md; benchmarks/collectives.py re-measures it), so on gloo a rank all-reduces the
    # bucket and keeps its chunk. NCCL's reduce-scatter moves half the data and wins there.
    reduce_scatter_via_all_reduce: bool = True
    # join check, heartbeats, naming the rank behind a failed collective ([Note: rank health]);
    # None when the caller built the process group itself
    health: "RankHealth | None" = field(default=None, compare=False, repr=False)
    # [Note: all-gather implementation]
    # gloo's all_gather is 2-3x slower than every rank broadcasting its own chunk (async, all
    # at once) into the same flat buffer at 2 ranks (240k-4.8M fp32 elements: 1.2 vs 0.55 ms,
    # 4.8 vs 1.65 ms, 15.4 vs 6.2 ms), and still 1.3-1.8x slower at 3-4 ranks for >= 1M
    # elements (benchmarks/collectives.py). NCCL's all-gather is the right tool there.
    all_gather_via_broadcast: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(local_rank: int) -> tuple[torch.device, Literal["gloo", "nccl"]]:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count()), "nccl"
    return torch.device("cpu"), "gloo"


def expected_world_size() -> int:
    """The world size ``init_context`` will see, known before any communication."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def resolve_timeout(config_s: float | None, env: "os._Environ[str] | dict[str, str] | None" = None) -> float | None:
    """The process-group timeout in seconds: ``SHARDWISE_TIMEOUT`` if set (it overrides the
    config, so a job can be given a longer or shorter timeout without editing the config),
    else the config's ``comms_timeout``, else None (torch's default)."""
    env = os.environ if env is None else env
    raw = env.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return config_s
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise DistributedSetupError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds; "
                                    f"unset it or set e.g. {TIMEOUT_ENV}=600")
    return value


def _context_from_group(allow_reduce_scatter: bool, health: RankHealth | None = None) -> CommContext:
    backend = str(dist.get_backend()).lower()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if "nccl" in backend:
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
        kind: Literal["gloo", "nccl"] = "nccl"
    else:
        device, kind = torch.device("cpu"), "gloo"
    via_all_reduce = kind == "gloo" or not allow_reduce_scatter
    return CommContext(rank, world, local_rank, device, kind, None, via_all_reduce, health,
                       all_gather_via_broadcast=kind == "gloo")


_QUIESCE_REGISTERED = False


def _register_quiesce() -> None:
    """Once per process: before interpreter shutdown, give gloo's worker threads a moment to
    drop finished works (see [Note: tensors outlive gloo's works] in collectives.py)."""
    global _QUIESCE_REGISTERED
    if not _QUIESCE_REGISTERED:
        import atexit

        from shardwise.comm.collectives import quiesce

        atexit.register(quiesce)
        _QUIESCE_REGISTERED = True


def init_context(timeout_s: float | None = None, allow_reduce_scatter: bool = True) -> CommContext:
    """Join (or create) the default process group and describe it.

    - A process group already initialised by the caller is used as it is.
    - Under torchrun (``RANK``/``WORLD_SIZE`` set) the group is created from the environment.
    - Otherwise this is a plain single process: world size 1, no process group.
    """
    if dist.is_available() and dist.is_initialized():
        _register_quiesce()
        return _context_from_group(allow_reduce_scatter)
    env_set = [v for v in _TORCHRUN_VARS if v in os.environ]
    if env_set and len(env_set) < len(_TORCHRUN_VARS):
        missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
        raise DistributedSetupError(
            f"torch.distributed environment is incomplete: {', '.join(env_set)} set but "
            f"{', '.join(missing)} missing. Launch with `shardwise run` (torchrun), or unset them "
            "to run as a single process."
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device, backend = _pick_device(local_rank)
    if not env_set:
        return CommContext(0, 1, 0, device, "none", None, True)
    if backend == "nccl":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s) if timeout_s else dist.default_pg_timeout
    where = f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}"
    # [Note: rank health] the store comes from torch's own env:// rendezvous (under torchrun: a
    # client of the agent's store), so that shardwise can check who joined before gloo/NCCL
    # wires the ranks together, and can ask the store about peers after a failure.
    try:
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        store.set_timeout(timeout)
    except Exception as exc:  # noqa: BLE001 - re-raised as a named error with the cause
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        import re

        m = re.search(r"(\d+)/(\d+) clients joined", text)
        if m:  # rank 0 hosts the store (no torchrun agent) and not everyone connected
            raise JoinError(f"{where}: {m.group(1)} of {m.group(2)} ranks joined within "
                            f"{timeout.total_seconds():g} s; missing ranks: unknown (they never "
                            f"connected to the store at {os.environ.get('MASTER_ADDR')}:"
                            f"{os.environ.get('MASTER_PORT')}). ({text})") from exc
        raise DistributedSetupError(
            f"could not reach the rendezvous store for {where} at {os.environ.get('MASTER_ADDR')}:"
            f"{os.environ.get('MASTER_PORT')} within {timeout.total_seconds():g} s: {text}") from exc
    health = RankHealth(store, rank, world, timeout.total_seconds())
    health.join()
    try:
        # torchrun's agent keeps one store across restarts: a per-attempt prefix keeps a
        # restarted group from reading the addresses its previous attempt published
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"default_pg/{attempt}", store),
                                rank=rank, world_size=world, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - re-raised as a named error with the cause
        raise DistributedSetupError(
            f"could not initialise torch.distributed ({backend}) for {where}: {exc}"
        ) from exc
    _register_quiesce()
    # [Note: heartbeat only across hosts] same-host peers are diagnosed through /proc; the
    # heartbeat thread (a cloned store client) is started only when ranks span several hosts.
    # (It was switched off on one host after exit aborts; their cause turned out to be gloo
    # worker threads freeing Python tensors during shutdown: [Note: tensors outlive gloo's
    # works] in collectives.py.)
    if any(info.get("host") != health.host for info in health.peers.values()):
        health.start_heartbeat()
    return _context_from_group(allow_reduce_scatter, health)
