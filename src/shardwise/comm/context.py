"""Process group, device and backend, chosen once and passed explicitly.

[Note: one place for the device]
CUDA + NCCL when a GPU is present, CPU + gloo otherwise. Nothing else in shardwise looks at
``torch.cuda.is_available()`` or at the backend name; components read ``ctx.device`` and the
collective choices recorded here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

from shardwise.errors import DistributedSetupError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


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

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(local_rank: int) -> tuple[torch.device, Literal["gloo", "nccl"]]:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count()), "nccl"
    return torch.device("cpu"), "gloo"


def _context_from_group(allow_reduce_scatter: bool) -> CommContext:
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
    return CommContext(rank, world, local_rank, device, kind, None, via_all_reduce)


def init_context(timeout_s: float | None = None, allow_reduce_scatter: bool = True) -> CommContext:
    """Join (or create) the default process group and describe it.

    - A process group already initialised by the caller is used as it is.
    - Under torchrun (``RANK``/``WORLD_SIZE`` set) the group is created from the environment.
    - Otherwise this is a plain single process: world size 1, no process group.
    """
    if dist.is_available() and dist.is_initialized():
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
    kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    try:
        dist.init_process_group(backend=backend, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised as a named error with the cause
        raise DistributedSetupError(
            f"could not initialise torch.distributed ({backend}) for rank "
            f"{os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}: {exc}"
        ) from exc
    return _context_from_group(allow_reduce_scatter)
