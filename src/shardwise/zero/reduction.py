"""Stage-3 gradient reduction: each shard's gradients staged flat and reduced to their owners.

[Note: gradient completion]
Each trainable full parameter has a post-accumulate-grad hook that copies its gradient into
the flat staging buffer (gradient dtype) of its shard and drops it. When every parameter of a shard has
reported, the staging buffer is reduced to its owners (async) and the unit is freed; autograd
runs each parameter's accumulation once per backward, after all of its uses, so this is exact
for reused modules and tied weights. What is still partial at the end of backward (parameters
that got no gradient, re-entrant checkpoint regions) is reduced then, in unit order, and
summed into the same owner shard: reduction is linear. Every rank must build the same autograd
graph so that collectives are issued in the same order (as with FSDP and DeepSpeed).
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterable

import torch
import torch.nn as nn

from shardwise.comm.collectives import Handle, reduce_to_shard
from shardwise.comm.context import GroupContext
from shardwise.config.plan import Stage3Policy
from shardwise.zero.sharded_params import FlatShard, ShardedUnit


class GradReduction:
    """Stages gradients per shard and reduces complete shards, at most
    ``max_pending_reductions`` in flight (with ``overlap_comm``; else each one waits)."""

    def __init__(self, dp: GroupContext, policy: Stage3Policy, release: Callable[[ShardedUnit], None]):
        self.dp = dp  # the data-parallel group parameters are sharded over
        self.limit = policy.max_pending_reductions if policy.overlap_comm else 0
        self._release = release  # frees a unit whose gradients are all launched
        self._pending: deque[tuple[FlatShard, torch.Tensor, Handle]] = deque()

    def on_grad(self, unit: ShardedUnit, ri: int, full: nn.Parameter) -> None:
        """Post-accumulate-grad hook of ``unit``'s parameter ``ri`` (see [Note: gradient completion])."""
        g = full.grad
        if g is None:
            return
        full.grad = None
        r = unit.records[ri]
        shard = unit.shards[r.shard]
        if shard.n_fired == 0:  # the slots that require grad in this backward (the others never fire)
            shard.expected = sum(1 for f in shard.full_params if f.requires_grad) or len(shard.layout.slots)
        if shard.staging is None:
            shard.staging = torch.empty(shard.layout.padded_numel, dtype=shard.grad.dtype, device=g.device)
        view = shard.slot_view(shard.staging, r.slot, r.shape)
        if shard.fired[r.slot]:
            view.add_(g)
        else:
            view.copy_(g)
            shard.fired[r.slot] = 1
            shard.n_fired += 1
        if shard.n_fired == shard.expected:
            self._launch(shard)
            if unit.users == 0 and all(s.staging is None for s in unit.shards):
                self._release(unit)

    def _launch(self, shard: FlatShard) -> None:
        staging, shard.staging = shard.staging, None
        for a, b in shard.gaps:
            staging[a:b].zero_()
        if shard.n_fired < len(shard.layout.slots):  # parameters without a gradient this backward
            for i, slot in enumerate(shard.layout.slots):
                if not shard.fired[i]:
                    staging[slot.offset:slot.offset + slot.numel].zero_()
        shard.fired = bytearray(len(shard.layout.slots))
        shard.n_fired = 0
        handle = reduce_to_shard(staging, self.dp, async_op=True)
        self._pending.append((shard, staging, handle))
        while len(self._pending) > self.limit:
            self._complete_one()

    def _complete_one(self) -> None:
        shard, staging, handle = self._pending.popleft()
        handle.wait()
        shard.grad.add_(shard.own(staging))

    def finish(self, units: Iterable[ShardedUnit]) -> None:
        """End of backward: reduce what is still partial, in unit order, and wait for all."""
        for unit in units:
            for shard in unit.shards:
                if shard.staging is not None:
                    self._launch(shard)
        while self._pending:
            self._complete_one()


__all__ = ["GradReduction"]
