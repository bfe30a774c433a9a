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

[Note: freezing after initialize]
``p.requires_grad_(False)`` after ``shardwise.initialize`` (a GAN's discriminator while the
generator trains, a mid-training freeze) must leave ``p`` exactly as plain PyTorch does:
autograd computes no gradient, so ``p.grad`` stays None (``zero_grad`` sets it to None) and
every torch optimizer skips ``p`` entirely -- no weight decay, no momentum, no step count.
The optimizer here steps one tensor per bucket, so a bucket is skipped (its ``opt_param.grad``
is None during ``optimizer.step()``) when none of its parameters required grad at any
``engine.backward`` since the last step (sampled when each backward ends, so unfreezing
between backward and step keeps the step frozen, as in torch), and no gradient is reduced for
it. A bucket where some parameters are frozen and others not cannot be honoured exactly (Adam
keeps one step count per tensor, torch one per parameter): that is a
:class:`PartiallyFrozenBucketError` naming the parameters and how to freeze them as a whole
(their own param group; at stage 3 also their own fetch unit). Parameters frozen *before*
``initialize`` get no optimizer state and stay frozen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
import torch.nn as nn

from shardwise.comm.buckets import BucketLayout
from shardwise.comm.collectives import all_gather_shard, all_reduce_scalar
from shardwise.comm.context import GroupContext
from shardwise.errors import UsageError
from shardwise.precision.loss_scaler import LossScaler


class OptimizerChunk(Protocol):
    """What the optimizer steps for one flat buffer on this rank: ``FlatBucket`` (stages 0-2)
    and ``FlatShard`` (stage 3) both are one. :class:`ShardedStep` and ``checkpoint/`` read
    only these names (the checkpoint also reads the full buffer, ``param_flat``, where
    ``holds_full``, and this rank's chunk, ``shard``, where not)."""

    index: int  # unique among the strategy's chunks (the checkpoint keys buckets by it)
    layout: BucketLayout  # the flat buffer: slots (offset, numel per parameter), padding, group key
    params: list  # per slot: the tensor the module registers
    lo: int  # this rank's range [lo, hi) of the flat buffer that opt_param covers
    hi: int
    opt_param: nn.Parameter | None  # what the optimizer steps (None: not trainable)
    mixed: bool  # opt_param is a separate fp32 master (bf16/fp16 compute), not the parameters
    holds_full: bool  # every rank keeps the whole flat buffer
    trainable: bool

    @property
    def numel(self) -> int: ...

    def own(self, flat: torch.Tensor) -> torch.Tensor: ...

    def copy_master_to_params(self) -> None: ...

    # [Note: freezing after initialize]
    def note_backward(self) -> None: ...

    def step_mask(self) -> bytearray | None: ...

    def reset_step_mask(self) -> None: ...

    def param_names(self) -> list[str]: ...


class PartiallyFrozenBucketError(UsageError):
    """Some parameters of one optimizer bucket were frozen after initialize, others were not."""


def frozen_buckets(buckets: Sequence[OptimizerChunk]) -> list[bool]:
    """Per bucket: skipped by this step (see [Note: freezing after initialize])."""
    out = []
    for b in buckets:
        mask = b.step_mask()
        if mask is None or all(mask):
            out.append(False)
        elif not any(mask):
            out.append(True)
        else:
            names = b.param_names()
            frozen = [n for n, m in zip(names, mask) if not m]
            live = [n for n, m in zip(names, mask) if m]
            raise PartiallyFrozenBucketError(
                f"parameters {frozen[:6]}{' ...' if len(frozen) > 6 else ''} were frozen "
                f"(requires_grad=False) after shardwise.initialize, but they share an optimizer "
                f"bucket with trainable ones ({live[:3]}{' ...' if len(live) > 3 else ''}): the "
                "optimizer steps a bucket as one tensor, so it cannot skip part of it the way "
                "torch skips a parameter whose .grad is None. Pass the parameters you freeze and "
                "unfreeze together as their own param group (shardwise.initialize(model_parameters="
                "[{'params': gen.parameters()}, {'params': disc.parameters()}])), or, at stage 3, "
                "make them their own fetch unit (shardwise.zero.set_fetch_units); parameters that "
                "stay frozen can be frozen before shardwise.initialize instead.")
    return out


@dataclass(frozen=True)
class StepResult:
    applied: bool
    grad_norm: float  # global, unscaled, before clipping (nan/inf when the step overflowed)


class ShardedStep:
    """Runs the optimizer on this rank's chunks and makes the updated parameters whole again.

    ``norm_needs_all_reduce``: each rank holds the gradients of its own chunk only, so the
    squared norm is summed over the group. ``gather_after_step``: full flat buffers whose
    chunks the step updated on their owners, all-gathered after a step that was applied.
    """

    def __init__(
        self,
        buckets: Sequence[OptimizerChunk],
        optimizer: torch.optim.Optimizer,
        dp: GroupContext,
        scaler: LossScaler,
        grads: Sequence[torch.Tensor],
        *,
        norm_needs_all_reduce: bool,
        gather_after_step: Sequence[torch.Tensor] = (),
        clip: float,
        tier: Any = None,
        post_divide: float = 1.0,
        norm_weights: Sequence[float] | None = None,
        model_parallel: Sequence[GroupContext] = (),
    ):
        self.buckets = list(buckets)
        # [Note: norm over the mesh] in shardwise/parallel_norm.py: per bucket 1.0, or 0.0 where
        # another rank of the model-parallel groups counts the same gradient
        self.norm_weights = list(norm_weights) if norm_weights is not None else [1.0] * len(self.buckets)
        if len(self.norm_weights) != len(self.buckets):
            raise UsageError(f"ShardedStep: {len(self.norm_weights)} norm weights for {len(self.buckets)} buckets")
        self.model_parallel = tuple(g for g in model_parallel if g.is_distributed)
        self.post_divide = post_divide  # dp / gradient_predivide_factor; 1.0 by default
        if tier is None:
            from shardwise.offload.tiers import ResidentTier

            tier = ResidentTier(self.buckets)
        self.tier = tier  # where masters and optimizer state live ([Note: offload tiers])
        self.optimizer = optimizer
        self.dp = dp  # the data-parallel group the chunks are split over
        self.scaler = scaler
        self.norm_needs_all_reduce = norm_needs_all_reduce
        self.gather_after_step = list(gather_after_step)
        self.clip = clip
        self._grads = list(grads)  # per bucket: the gradient of its opt_param, in the gradient dtype

    def _squared_norm(self) -> float:
        counted = [g for g, w in zip(self._grads, self.norm_weights) if w != 0.0]
        if not counted:
            local = 0.0
        else:
            norms = torch._foreach_norm(counted, 2.0, dtype=torch.float32)
            local = float(torch.stack(norms).double().pow(2).sum())
        if self.norm_needs_all_reduce:
            local = all_reduce_scalar(local, self.dp)
        for group in self.model_parallel:  # tp, pp: each rank holds a different part of the model
            local = all_reduce_scalar(local, group)
        return local

    def step(self, step_index: int) -> StepResult:
        frozen = frozen_buckets(self.buckets)  # before any collective: every rank raises alike
        sumsq = self._squared_norm()
        denom = self.scaler.scale * self.post_divide
        norm = math.sqrt(sumsq) / denom if math.isfinite(sumsq) else float("nan")
        if not self.scaler.update(math.isfinite(sumsq), step_index):
            return StepResult(False, norm)
        coef = 1.0 / denom
        if self.clip > 0:
            coef *= min(1.0, self.clip / (norm + 1e-6))
        # [Note: 16-bit gradients]; same dtype: the buffer itself (re-attached in case someone
        # called optimizer.zero_grad(set_to_none=True))
        # (the master may live elsewhere: [Note: offload tiers] in offload/tiers.py)
        opt_grads = [g if (g.dtype, g.device) == (b.opt_param.dtype, b.opt_param.device)
                     else g.to(device=b.opt_param.device, dtype=b.opt_param.dtype)
                     for b, g in zip(self.buckets, self._grads)]
        if coef != 1.0 and opt_grads:
            torch._foreach_mul_(opt_grads, coef)
        # None for a frozen bucket: torch's optimizers skip it entirely; the tier steps the
        # buckets (all at once, or tile by tile through its buffers) and copies the masters back
        self.tier.step_chunks(self.optimizer, self.buckets, opt_grads, frozen)
        handles = [all_gather_shard(flat, self.dp, async_op=True) for flat in self.gather_after_step]
        for h in handles:
            h.wait()
        return StepResult(True, norm)
