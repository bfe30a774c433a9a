"""The optimizer step over flat buckets: global norm, unscale + clip, step, write back, gather.

[Note: one pass over gradients]
Reduced gradients hold the sum over ranks of gradients of ``loss * scale / world`` (see
[Note: averaging in the loss] in strategy.py), i.e. the loss-scaled mean. The step computes the
squared norm of what this rank owns (all-reduced when gradients are sharded), derives the true
global norm ``sqrt(sumsq) / scale``, and then multiplies the gradients once by
``clip_coef / scale`` -- a pass that is skipped when that factor is exactly 1 (fp32 or bf16,
clipping inactive).
The clip coefficient follows ``torch.nn.utils.clip_grad_norm_``:
``min(1, max_norm / (norm + 1e-6))``.

[Note: 16-bit gradients]
When gradients are kept in bf16/fp16 (the default for mixed precision) and the master weights
are fp32, the optimizer needs fp32 gradients: each chunk is upcast for the step only (a
transient 4 bytes per element this rank owns) and the unscale/clip multiply runs on the fp32
copy. The norm is always accumulated in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from shardwise.comm.collectives import all_gather_shard, all_reduce_scalar
from shardwise.comm.context import CommContext
from shardwise.precision.loss_scaler import LossScaler
from shardwise.zero.flat_bucket import FlatBucket


@dataclass(frozen=True)
class StepResult:
    applied: bool
    grad_norm: float  # global, unscaled, before clipping (nan/inf when the step overflowed)


class ShardedStep:
    """Runs the optimizer on this rank's chunks and makes the updated parameters whole again."""

    def __init__(
        self,
        buckets: Sequence[FlatBucket],
        optimizer: torch.optim.Optimizer,
        ctx: CommContext,
        scaler: LossScaler,
        grads: Sequence[torch.Tensor],
        *,
        grads_sharded: bool,
        params_sharded: bool,
        clip: float,
    ):
        self.buckets = list(buckets)
        self.optimizer = optimizer
        self.ctx = ctx
        self.scaler = scaler
        self.grads_sharded = grads_sharded
        self.params_sharded = params_sharded
        self.clip = clip
        self._grads = list(grads)  # per bucket: the gradient of its opt_param, in the gradient dtype

    def _squared_norm(self) -> float:
        if not self._grads:
            local = 0.0
        else:
            norms = torch._foreach_norm(self._grads, 2.0, dtype=torch.float32)
            local = float(torch.stack(norms).double().pow(2).sum())
        return all_reduce_scalar(local, self.ctx) if self.grads_sharded else local

    def step(self, step_index: int) -> StepResult:
        sumsq = self._squared_norm()
        denom = self.scaler.scale
        norm = math.sqrt(sumsq) / denom if math.isfinite(sumsq) else float("nan")
        if not self.scaler.update(math.isfinite(sumsq), step_index):
            return StepResult(False, norm)
        coef = 1.0 / denom
        if self.clip > 0:
            coef *= min(1.0, self.clip / (norm + 1e-6))
        # [Note: 16-bit gradients]; same dtype: the buffer itself (re-attached in case someone
        # called optimizer.zero_grad(set_to_none=True))
        opt_grads = [g if g.dtype == b.opt_param.dtype else g.to(b.opt_param.dtype)
                     for b, g in zip(self.buckets, self._grads)]
        if coef != 1.0 and opt_grads:
            torch._foreach_mul_(opt_grads, coef)
        for b, g in zip(self.buckets, opt_grads):
            b.opt_param.grad = g
        self.optimizer.step()
        for b, g, own in zip(self.buckets, opt_grads, self._grads):
            if g is not own:
                b.opt_param.grad = None  # the transient fp32 copy
        for b in self.buckets:
            b.copy_master_to_params()
        if self.params_sharded:
            handles = [all_gather_shard(b.param_flat, self.ctx, async_op=True) for b in self.buckets]
            for h in handles:
                h.wait()
        return StepResult(True, norm)
