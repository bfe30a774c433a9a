"""One bucket of parameters living in one flat buffer, and this rank's optimizer view of it.

[Note: flat bucket storage]
Every trainable parameter's ``.data`` is re-pointed to a view into its bucket's flat
``param_flat`` buffer (compute dtype). The optimizer never sees model parameters: it sees
one ``opt_param`` per bucket, covering this rank's chunk (stages 1-2) or the whole bucket
(stage 0). With fp32 compute ``opt_param`` *aliases* ``param_flat`` (the parameters are the
master weights; no second fp32 copy). With bf16/fp16 compute it is a separate fp32 master
tensor, copied back into ``param_flat`` after each step.

[Note: DTensor parameters in flat buckets]
Under tensor parallelism (shardwise/tensor_parallel) a sharded parameter is a DTensor whose
local tensor is this rank's shard. A bucket holds LOCAL tensors: its slots are sized by the
local numel (what this rank stores; the strategy lays buckets out with it), ``param_view``
gives the local-shaped view, and the parameter is re-pointed at its slot by swapping in a
DTensor built on the view (``tensor_parallel.rebind_local``: ``.data`` does not reach a
DTensor's local tensor; the swap keeps the Python object, so ties, param groups and hooks
still refer to it). ``grad_view`` wraps a gradient slot the same way, so that autograd
accumulates a DTensor gradient (summing a ``Partial`` one over tp) straight into the buffer.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from shardwise.comm.buckets import BucketLayout
from shardwise.comm.context import GroupContext
from shardwise.tensor_parallel import is_dtensor, local_shape, local_tensor, rebind_local, wrap_local


class FlatBucket:
    """Storage and views for one bucket. Holds no policy: strategies decide what to keep.

    An :class:`~shardwise.zero.sharded_optimizer.OptimizerChunk`: ``opt_param`` covers
    ``[lo, hi)``, this rank's chunk when ``optimizer_sees_chunk`` (stages 1-2), else the whole
    bucket (stage 0)."""

    def __init__(
        self,
        index: int,
        layout: BucketLayout,
        params: Sequence[nn.Parameter],
        dp: GroupContext,
        *,
        optimizer_sees_chunk: bool,
        master_dtype: torch.dtype = torch.float32,
    ):
        self.index = index
        self.layout = layout
        self.params = list(params)  # in slot order
        dtype = self.params[0].dtype
        device = self.params[0].device
        self.param_flat = torch.zeros(layout.padded_numel, dtype=dtype, device=device)
        # per slot: the shape this rank stores (a DTensor's local shard; see the Note above)
        self.local_shapes = [local_shape(p) for p in self.params]
        self.distributed = [is_dtensor(p) for p in self.params]
        with torch.no_grad():
            for slot, p, shape in zip(layout.slots, self.params, self.local_shapes):
                view = self.param_flat[slot.offset : slot.offset + slot.numel]
                view.copy_(local_tensor(p).detach().reshape(-1))
                rebind_local(p, view.view(shape))
        self.lo, self.hi = layout.chunk_range(dp.rank, dp.size) if optimizer_sees_chunk else (0, layout.padded_numel)
        self.mixed = dtype != master_dtype
        own = self.param_flat[self.lo : self.hi]
        master = own.detach().to(master_dtype).clone() if self.mixed else own
        self.opt_param = nn.Parameter(master, requires_grad=True)
        # [Note: freezing after initialize] in sharded_optimizer.py
        self.active = bytearray(len(self.params))
        self.backwards = 0

    holds_full = True  # every rank keeps the whole flat buffer (param_flat)
    trainable = True  # only parameters that require grad at initialize are bucketed

    @property
    def numel(self) -> int:
        return self.hi - self.lo

    def param_view(self, slot_index: int, flat: torch.Tensor) -> torch.Tensor:
        """The view of ``flat`` (a full-bucket buffer) where parameter ``slot_index`` lives."""
        slot = self.layout.slots[slot_index]
        return flat[slot.offset : slot.offset + slot.numel].view(self.local_shapes[slot_index])

    def grad_view(self, slot_index: int, flat: torch.Tensor) -> torch.Tensor:
        """``param_view`` as the parameter's ``.grad`` (a DTensor laid out like the parameter for
        a tensor-parallel one; the view itself otherwise)."""
        view = self.param_view(slot_index, flat)
        return wrap_local(self.params[slot_index], view) if self.distributed[slot_index] else view

    def own(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's chunk of a full-bucket buffer."""
        return flat[self.lo : self.hi]

    @torch.no_grad()
    def copy_master_to_params(self) -> None:
        """After an optimizer step with a separate fp32 master: write back in compute dtype."""
        if self.mixed:
            self.param_flat[self.lo : self.hi].copy_(self.opt_param.detach())

    # -- freezing ([Note: freezing after initialize] in sharded_optimizer.py) -----------------
    def note_backward(self) -> None:
        """A backward ended: parameters that require grad now take part in the next step."""
        for i, p in enumerate(self.params):
            if p.requires_grad:
                self.active[i] = 1
        self.backwards += 1

    def step_mask(self) -> bytearray | None:
        """Which slots the next optimizer step updates; None: all of them."""
        return self.active if self.backwards else None

    def reset_step_mask(self) -> None:
        self.active = bytearray(len(self.params))
        self.backwards = 0

    def param_names(self) -> list[str]:
        return [f"<{tuple(p.shape)}>" for p in self.params]
