"""Which elements of which tensor this rank holds, as seen by the checkpoint.

[Note: checkpoint pieces]
A trainable parameter lives in one bucket's flat buffer at ``[offset, offset + numel)``. The
optimizer steps ``opt_param``, this rank's range ``[lo, hi)`` of that buffer (the whole bucket
at stage 0, one rank's chunk at stages 1-2). Saving, rank r writes the part of every
parameter that falls in *its chunk* ``chunk_range(r, world)`` (at stage 0 every rank holds
everything, so the writes are spread the same way), read from ``opt_param`` (fp32 master for
bf16/fp16) and from the optimizer state of ``opt_param``. Loading, a rank needs every
parameter whole (stages 0-2 keep full parameters) and the optimizer state of its own
``[lo, hi)``. At stage 3 (``bucket.holds_full`` false) a rank reads only its own ``[lo, hi)``
of both; frozen stage-3 parameters are gathered around saving and loading (``whole_others``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from shardwise.errors import CheckpointError
from shardwise.zero.flat_bucket import FlatBucket


@dataclass(frozen=True)
class Region:
    """One trainable parameter's place in a bucket on this rank."""

    name: str
    bucket: FlatBucket
    slot_index: int
    offset: int  # in the bucket's flat buffer
    numel: int
    shape: tuple[int, ...]
    group: int  # optimizer param group

    def clip(self, lo: int, hi: int) -> tuple[int, int]:
        """The element range ``[a, b)`` of this parameter inside bucket range ``[lo, hi)``."""
        a = max(lo, self.offset) - self.offset
        b = min(hi, self.offset + self.numel) - self.offset
        return (a, b) if a < b else (0, 0)

    def opt_slice(self, tensor: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Elements ``[a, b)`` of this parameter in a tensor shaped like ``opt_param``."""
        start = self.offset + a - self.bucket.lo
        return tensor[start:start + (b - a)]


def state_names(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``model.state_dict()`` as ``{canonical name: tensor}`` plus ``{alias: canonical}`` for
    tensors reachable under two names (tied weights)."""
    canonical: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
            canonical[name] = t
    return canonical, aliases


def regions(module: nn.Module, buckets: list[FlatBucket]) -> list[Region]:
    canonical, _ = state_names(module)
    by_id = {id(t): n for n, t in canonical.items()}
    out = []
    for bucket in buckets:
        group = bucket.layout.group_key[0]
        for i, (slot, p) in enumerate(zip(bucket.layout.slots, bucket.params)):
            name = by_id.get(id(p))
            if name is None:
                raise CheckpointError(
                    f"a trainable parameter of shape {tuple(p.shape)} is not in model.state_dict(); "
                    "checkpoints cover the engine's module only")
            out.append(Region(name, bucket, i, slot.offset, slot.numel, tuple(p.shape), group))
    return out


@contextmanager
def whole_others(module: nn.Module, trainable: set[str], modifier_rank: int | None = None):
    """Frozen parameters that ZeRO stage 3 shards, gathered for the duration (every rank must
    enter; a no-op at stages 0-2). Inside, :func:`other_tensors` sees whole tensors."""
    from shardwise.zero.gathered import GatheredParameters
    from shardwise.zero.sharded_params import ShardedParameter

    canonical, _ = state_names(module)
    sharded = [t for n, t in canonical.items() if n not in trainable and isinstance(t, ShardedParameter)]
    if not sharded:
        yield
        return
    with GatheredParameters(sharded, modifier_rank=modifier_rank):
        yield


def other_tensors(module: nn.Module, trainable: set[str]) -> dict[str, torch.Tensor]:
    """Frozen parameters and persistent buffers (saved whole by rank 0)."""
    canonical, _ = state_names(module)
    return {n: t for n, t in canonical.items() if n not in trainable}


def split_state(optimizer: torch.optim.Optimizer, bucket: FlatBucket) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer state of ``bucket.opt_param``: per-element tensors and scalars."""
    elementwise: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    n = bucket.opt_param.numel()
    for key, value in optimizer.state.get(bucket.opt_param, {}).items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.numel() == n:
            elementwise[key] = value.detach().reshape(-1)
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            scalars[key] = {"tensor": True, "dtype": str(value.dtype).removeprefix("torch."),
                            "shape": list(value.shape), "value": value.item()}
        elif isinstance(value, (bool, int, float)) and not (isinstance(value, float) and not math.isfinite(value)):
            scalars[key] = {"tensor": False, "value": value}
        else:
            what = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(
                f"optimizer state {key!r} of {type(optimizer).__name__} is {what}; shardwise checkpoints "
                f"optimizer state that has one value per parameter element (shape ({n},)) or is a scalar")
    return elementwise, scalars


def scalar_value(spec: dict, device: torch.device) -> Any:
    if not spec["tensor"]:
        return spec["value"]
    dtype = getattr(torch, spec["dtype"])
    return torch.tensor(spec["value"], dtype=dtype, device=device).reshape(spec["shape"])
