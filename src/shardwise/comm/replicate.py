"""Rank 0's module state on every rank: the start-up broadcast of parameters and buffers.

[Note: one starting point]
Data parallelism assumes every rank starts from the same weights. Scripts break that without
noticing: a per-rank seed, a checkpoint loaded on rank 0 only before ``initialize``, a
``torch.manual_seed(rank)`` for data augmentation that also seeds the model. Without a fix,
stage 0 trains N different models and stages 1-3 end with each rank holding a mix of every
rank's chunks. So ``initialize`` copies rank 0's parameters and buffers to every rank before
any strategy looks at them, as DeepSpeed and DDP do.

Every tensor is sent bitwise: all of them are packed as raw bytes (each slot aligned to 16
bytes so a slot can be viewed back as its dtype) into buffers of at most ``chunk_bytes`` and
broadcast one buffer at a time, so the transient memory is one buffer whatever the model size
and any dtype gloo cannot reduce (bool, bf16 on old builds) travels the same way. Stage-3
placeholders (``zero.Init``) hold no values here: ``zero/init.py`` makes their values agree
as they are split.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.nn as nn

from shardwise.comm.collectives import broadcast
from shardwise.comm.context import GroupContext, ParallelContext

_ALIGN = 16
CHUNK_BYTES = 64 << 20


def _padded(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers of ``module`` that hold values, each storage's tensor once."""
    from shardwise.zero.sharded_params import ShardedParameter

    from torch.distributed.tensor import DTensor

    seen: set[int] = set()
    out = []
    for t in [*module.parameters(), *module.buffers()]:
        if t is None or isinstance(t, ShardedParameter) or t.is_meta or id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, DTensor):  # a tensor-parallel shard: this rank's block
            t = t.to_local()
        if t.numel():
            out.append(t)
    return out


def _chunks(tensors: Iterable[torch.Tensor], chunk_bytes: int) -> Iterator[list[torch.Tensor]]:
    batch: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        n = _padded(t.numel() * t.element_size())
        if batch and size + n > chunk_bytes:
            yield batch
            batch, size = [], 0
        batch.append(t)
        size += n
    if batch:
        yield batch


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[torch.Tensor], group: GroupContext, *, src: int = 0,
                      chunk_bytes: int = CHUNK_BYTES) -> None:
    """Overwrite each tensor, in place, with group rank ``src``'s bytes (call on every rank of
    the group with the same tensors in the same order: shapes and dtypes are checked at start-up)."""
    if not group.is_distributed:
        return
    for batch in _chunks(tensors, chunk_bytes):
        total = sum(_padded(t.numel() * t.element_size()) for t in batch)
        buf = torch.empty(total, dtype=torch.uint8, device=group.device)
        offsets = []
        at = 0
        for t in batch:
            offsets.append(at)
            at += _padded(t.numel() * t.element_size())
        if group.rank == src:
            for t, o in zip(batch, offsets):
                n = t.numel() * t.element_size()
                buf[o:o + n].copy_(t.detach().contiguous().view(-1).view(torch.uint8).to(group.device))
        broadcast(buf, group, src=src)
        if group.rank != src:
            for t, o in zip(batch, offsets):
                n = t.numel() * t.element_size()
                t.copy_(buf[o:o + n].view(t.dtype).view(t.shape))


def broadcast_module_state(module: nn.Module, ctx: ParallelContext, *, src: int = 0) -> None:
    """Every rank's parameters and buffers become ``src``'s, bitwise (see [Note: one starting
    point]). Over the whole world when every mesh dimension replicates the model (dp, and the
    dims that index independent dp groups); over dp (``src`` its group rank) when tensor or
    pipeline parallelism gives ranks different parts of it (over tp the start agrees already:
    ``parallelize_module`` distributes tp rank 0's full tensor into the DTensor shards, and
    ``apply_tensor_parallel`` broadcasts the plain parameters and buffers from tp rank 0)."""
    group = ctx.dp if ctx.model_parallel else ctx.world
    broadcast_tensors(module_tensors(module), group, src=src)
