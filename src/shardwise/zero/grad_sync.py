"""Backward hooks -> bucketed gradient reductions that start while backward is still running.

Two ways of holding gradients, picked once by the strategy:

- :class:`FullGradSync` (stages 0 and 1): each bucket has a persistent gradient buffer the
  size of the bucket, in the gradient dtype (the compute dtype, or fp32 when the config's
  ``data_types.grad_accum_dtype`` says so). When it equals the parameters' dtype ``p.grad``
  *is* a view into it, so autograd accumulates in place across micro-steps (nothing to copy);
  otherwise (bf16/fp16 parameters, fp32 gradients) the hook adds ``p.grad`` into it and frees
  ``p.grad``. Reductions run only on the accumulation-boundary micro-step: stage 0
  all-reduces the bucket, stage 1 reduces it to its owner's chunk.
- :class:`ShardGradSync` (stage 2): a rank keeps only the gradient of its own chunk. The
  hook adds ``p.grad`` into a pooled staging buffer and frees it; a full bucket is reduced to
  its owner's chunk on *every* micro-step and accumulated into the persistent shard.

[Note: reduction order]
Collectives must be issued in the same order on every rank. A bucket's reduction is launched
when all its parameters have produced gradients *and* every earlier bucket has been launched,
so the order is always bucket 0, 1, 2, ... whatever order hooks fire in. Buckets whose
parameters got no gradient (unused in this forward) are launched at the end of backward with
zeros for those parameters, on every rank alike.

[Note: DTensor gradients]
A tensor-parallel (DTensor) parameter's gradient is a DTensor; what goes into the buffers is
its LOCAL tensor, laid out like the parameter (``tensor_parallel.local_grad``: a ``Partial``
gradient, which DTensor gives a replicated parameter used on sequence-sharded activations, is
summed over tp first). Where ``.grad`` is a view of the buffer, it is a DTensor wrapping the
view (``FlatBucket.grad_view``) and autograd's in-place accumulation does the same
redistribution. Reductions then run over dp only: the tp ranks of a dp group hold different
shards, and equal replicated gradients.
"""
from __future__ import annotations

from collections import deque
from functools import partial
from typing import Callable, Sequence

import torch

from shardwise.comm.collectives import Handle, all_reduce, reduce_to_shard
from shardwise.comm.context import GroupContext
from shardwise.errors import UsageError
from shardwise.tensor_parallel import local_grad
from shardwise.zero.flat_bucket import FlatBucket

ReduceFn = Callable[[torch.Tensor, GroupContext], Handle]


def all_reduce_async(t: torch.Tensor, dp: GroupContext) -> Handle:
    return all_reduce(t, dp, async_op=True)


def reduce_to_shard_async(t: torch.Tensor, dp: GroupContext) -> Handle:
    return reduce_to_shard(t, dp, async_op=True)


class _GradSyncBase:
    """Readiness counting and in-order launching shared by both gradient layouts."""

    def __init__(self, buckets: Sequence[FlatBucket], dp: GroupContext, *, overlap: bool):
        self.buckets = list(buckets)
        self.dp = dp  # the data-parallel group gradients are reduced over
        self.overlap = overlap
        self._expected = [len(b.params) for b in self.buckets]
        self._pending = list(self._expected)
        self._fired = [bytearray(len(b.params)) for b in self.buckets]  # per slot: gradient seen this backward
        self._launched = 0  # buckets 0.._launched-1 have been launched this backward
        self._sync = True
        self._hooks = []
        for bucket in self.buckets:
            for i, p in enumerate(bucket.params):
                self._hooks.append(p.register_post_accumulate_grad_hook(partial(self._on_grad, bucket, i)))

    # -- hooks ---------------------------------------------------------------------------
    def _on_grad(self, bucket: FlatBucket, slot_index: int, param: torch.Tensor) -> None:
        raise NotImplementedError

    def _mark_ready(self, bucket: FlatBucket, slot_index: int) -> None:
        b = bucket.index
        if b < self._launched:
            shape = tuple(bucket.params[slot_index].shape)
            raise UsageError(
                f"a parameter of shape {shape} (gradient bucket {b}) produced a gradient after its "
                "bucket was already sent for reduction in this backward pass. This happens when "
                "one parameter receives gradients from two separate autograd passes (e.g. "
                "reentrant activation checkpointing around a shared parameter). Use "
                "torch.utils.checkpoint(..., use_reentrant=False)."
            )
        if self._fired[b][slot_index]:
            return  # a second gradient before the launch: it was accumulated, nothing to count
        self._fired[b][slot_index] = 1
        self._pending[b] -= 1
        if self.overlap:
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._launched < len(self.buckets) and self._pending[self._launched] == 0:
            self._launch(self.buckets[self._launched])
            self._launched += 1

    def _launch_all(self) -> None:
        while self._launched < len(self.buckets):
            self._launch(self.buckets[self._launched])
            self._launched += 1

    def _reset(self) -> None:
        self._pending = list(self._expected)
        self._fired = [bytearray(len(b.params)) for b in self.buckets]
        self._launched = 0

    def _count_trainable(self) -> None:
        """At the start of a backward: a bucket waits only for the parameters that require grad
        now (frozen after initialize ones never fire; see [Note: freezing after initialize] in
        sharded_optimizer.py). Before any gradient of the window, so counts stay consistent."""
        if self._launched or any(any(f) for f in self._fired):
            return
        self._expected = [sum(1 for p in b.params if p.requires_grad) for b in self.buckets]
        self._pending = list(self._expected)

    def _note_backward(self) -> None:
        for b in self.buckets:
            b.note_backward()

    def _reset_step_masks(self) -> None:
        for b in self.buckets:
            b.reset_step_mask()

    def _launch(self, bucket: FlatBucket) -> None:
        raise NotImplementedError

    def _frozen(self, bucket: FlatBucket) -> bool:
        """No parameter of ``bucket`` requires grad in this backward nor did in an earlier one
        of this step: there is nothing to reduce (every rank decides alike)."""
        return self._expected[bucket.index] == 0 and not any(bucket.active)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


class FullGradSync(_GradSyncBase):
    """Stages 0 and 1: a full gradient buffer per bucket, reduced at the boundary."""

    def __init__(self, buckets: Sequence[FlatBucket], dp: GroupContext, *, overlap: bool, reduce_fn: ReduceFn,
                 grad_dtype: torch.dtype = torch.float32):
        self.grad_flats = [torch.zeros(b.layout.padded_numel, dtype=grad_dtype, device=b.param_flat.device)
                           for b in buckets]
        self._reduce_fn = reduce_fn
        self._handles: list[Handle] = []
        self._carry: list[torch.Tensor] | None = None  # reduced by an earlier backward of this step
        self._views = [b.param_flat.dtype == grad_dtype for b in buckets]  # p.grad is a view
        super().__init__(buckets, dp, overlap=overlap)
        self.attach_grad_views()

    def opt_grads(self) -> list[torch.Tensor]:
        """Per bucket, the gradient of what the optimizer steps (this rank's chunk at stage 1)."""
        return [bucket.own(flat) for bucket, flat in zip(self.buckets, self.grad_flats)]

    def attach_grad_views(self) -> None:
        """(Re)point ``.grad`` at the bucket buffer where the dtypes match (idempotent)."""
        for bucket, flat, is_view in zip(self.buckets, self.grad_flats, self._views):
            if is_view:
                for i, p in enumerate(bucket.params):
                    p.grad = bucket.grad_view(i, flat)

    def _on_grad(self, bucket: FlatBucket, slot_index: int, param: torch.Tensor) -> None:
        if self._sync and bucket.index < self._launched:
            self._mark_ready(bucket, slot_index)  # too late for this bucket: raises the named error
        if not self._views[bucket.index]:
            bucket.param_view(slot_index, self.grad_flats[bucket.index]).add_(local_grad(param, param.grad))
            param.grad = None
        if self._sync:
            self._mark_ready(bucket, slot_index)

    def _launch(self, bucket: FlatBucket) -> None:
        if self._frozen(bucket):
            return
        self._handles.append(self._reduce_fn(self.grad_flats[bucket.index], self.dp))

    def before_backward(self, sync: bool) -> None:
        if self._launched or self._handles:
            self._carry_reduced()
        self._sync = sync
        self._count_trainable()
        if any(self._views):
            # cheap check: a user may have set grads to None (optimizer.zero_grad())
            p0 = self.buckets[self._views.index(True)].params[0]
            if p0.grad is None:
                self.attach_grad_views()

    def after_backward(self, sync: bool) -> None:
        self._note_backward()
        if sync:
            self._launch_all()

    def _carry_reduced(self) -> None:
        """[Note: several backward passes per step]
        A backward at the boundary launches its buckets' reductions as they fill. Another
        backward before the step would add its gradients to buffers already (being) reduced:
        so the reduced result is set aside (this rank's chunk, or the whole buffer at stage
        0), the buffers are zeroed, and the new backward reduces afresh; ``wait`` adds the
        carried part back. Reductions are linear, so the step sees the reduced sum of both
        passes, as plain PyTorch's accumulated ``.grad`` would be (tested at stages 0-1)."""
        for h in self._handles:
            h.wait()
        self._handles.clear()
        self._launch_all()  # what the earlier pass did not launch (it ended without sync)
        for h in self._handles:
            h.wait()
        self._handles.clear()
        reduced = [own.clone() for own in self.opt_grads()]
        if self._carry is None:
            self._carry = reduced
        else:
            for c, r in zip(self._carry, reduced):
                c.add_(r)
        for flat in self.grad_flats:
            flat.zero_()
        self._reset()

    def wait(self) -> None:
        """Make every bucket's reduced gradient available (call at the boundary step)."""
        self._launch_all()
        for h in self._handles:
            h.wait()
        self._handles.clear()
        if self._carry is not None:
            for own, c in zip(self.opt_grads(), self._carry):
                own.add_(c)
            self._carry = None
        self._reset()

    def zero_grads(self) -> None:
        for flat in self.grad_flats:
            flat.zero_()
        self._carry = None
        self._reset_step_masks()

    def tensors(self) -> list[torch.Tensor]:
        return list(self.grad_flats)


class ShardGradSync(_GradSyncBase):
    """Stage 2: only this rank's gradient chunk persists; buckets reduce every micro-step.

    [Note: transient staging]
    Full-bucket staging buffers exist only during backward: at most ``POOL_SIZE`` are reused
    while reductions are in flight (more only if hooks fire far out of bucket order), and all
    are released when backward ends. Between steps a rank holds just its gradient chunk.
    """

    POOL_SIZE = 4

    def __init__(self, buckets: Sequence[FlatBucket], dp: GroupContext, *, overlap: bool,
                 grad_dtype: torch.dtype = torch.float32):
        self.grad_dtype = grad_dtype
        self.grad_shards = [torch.zeros(b.numel, dtype=grad_dtype, device=b.param_flat.device) for b in buckets]
        self._pool: list[torch.Tensor] = []
        self._allocated = 0  # staging buffers alive in this backward
        self._gaps = [self._uncovered(b) for b in buckets]
        self._staging: dict[int, torch.Tensor] = {}  # bucket index -> staging buffer in use
        self._in_flight: deque[tuple[FlatBucket, torch.Tensor, Handle]] = deque()
        super().__init__(buckets, dp, overlap=overlap)

    def opt_grads(self) -> list[torch.Tensor]:
        return list(self.grad_shards)

    @staticmethod
    def _uncovered(bucket: FlatBucket) -> list[tuple[int, int]]:
        """Element ranges of the bucket no parameter occupies (alignment gaps, padding)."""
        gaps, pos = [], 0
        for slot in sorted(bucket.layout.slots, key=lambda s: s.offset):
            if slot.offset > pos:
                gaps.append((pos, slot.offset))
            pos = slot.offset + slot.numel
        if pos < bucket.layout.padded_numel:
            gaps.append((pos, bucket.layout.padded_numel))
        return gaps

    def _staging_for(self, bucket: FlatBucket) -> torch.Tensor:
        """This bucket's staging view, taken from the pool on first use per backward.

        Only the gaps are zeroed here; each parameter's slot is overwritten by its gradient
        (``copy_``) or, if it gets none, zeroed at launch.
        """
        buf = self._staging.get(bucket.index)
        if buf is None:
            need = bucket.layout.padded_numel
            if not self._pool and self._in_flight and self._allocated >= self.POOL_SIZE:
                self._drain_one()
            fits = [i for i, b in enumerate(self._pool) if b.numel() >= need]
            if fits:
                buf = self._pool.pop(fits[0])
            else:
                self._allocated += 1
                buf = torch.empty(need, dtype=self.grad_dtype, device=bucket.param_flat.device)
            for a, z in self._gaps[bucket.index]:
                buf[a:z].zero_()
            self._staging[bucket.index] = buf
        return buf[: bucket.layout.padded_numel]

    def _on_grad(self, bucket: FlatBucket, slot_index: int, param: torch.Tensor) -> None:
        if bucket.index < self._launched:
            self._mark_ready(bucket, slot_index)  # too late for this bucket: raises the named error
        staging = self._staging_for(bucket)
        view = bucket.param_view(slot_index, staging)
        grad = local_grad(param, param.grad)  # [Note: DTensor gradients]
        if self._fired[bucket.index][slot_index]:
            view.add_(grad)  # a second gradient in the same backward (before launch)
        else:
            view.copy_(grad)
        param.grad = None
        self._mark_ready(bucket, slot_index)

    def _launch(self, bucket: FlatBucket) -> None:
        if self._frozen(bucket):
            return
        view = self._staging_for(bucket)
        fired = self._fired[bucket.index]
        for i in range(len(bucket.params)):
            if not fired[i]:  # no gradient this backward (unused parameter): contributes zeros
                bucket.param_view(i, view).zero_()
        full = self._staging.pop(bucket.index)
        self._in_flight.append((bucket, full, reduce_to_shard(view, self.dp, async_op=True)))

    def _drain_one(self) -> None:
        bucket, full, handle = self._in_flight.popleft()
        handle.wait()
        self.grad_shards[bucket.index].add_(bucket.own(full[: bucket.layout.padded_numel]))
        self._pool.append(full)

    def before_backward(self, sync: bool) -> None:
        self._sync = sync
        self._count_trainable()

    def after_backward(self, sync: bool) -> None:
        self._note_backward()
        self._launch_all()
        while self._in_flight:
            self._drain_one()
        self._pool.clear()
        self._allocated = 0
        self._reset()

    def wait(self) -> None:
        """Gradients are already accumulated into shards at the end of each backward."""
        while self._in_flight:
            self._drain_one()

    def zero_grads(self) -> None:
        for shard in self.grad_shards:
            shard.zero_()
        self._reset_step_masks()

    def tensors(self) -> list[torch.Tensor]:
        return list(self.grad_shards)
