"""Data-parallel strategies, picked once from a registry keyed by ZeRO stage.

Each runs over the context's data-parallel group (``ctx.dp``; [Note: parallel context]): "rank"
and "size" below are the dp rank and dp size, which equal the global ones on a 1-D mesh.

| stage | optimizer sees         | gradients kept per rank  | reduction                   | after step |
|-------|------------------------|--------------------------|-----------------------------|------------|
| 0     | whole buckets          | full                     | all-reduce at the boundary  | -          |
| 1     | this rank's chunk      | full                     | reduce-to-shard at boundary | all-gather |
| 2     | this rank's chunk      | own chunk + pool         | reduce-to-shard per micro   | all-gather |
| 3     | this rank's chunk      | own chunk                | reduce-to-shard per unit    | -          |

Gradients are kept and reduced in the gradient dtype (``plan.precision.grads``: the compute
dtype unless the config asks for fp32).

The engine calls ``before_backward`` / ``after_backward`` / ``step`` / ``zero_grad`` and never
looks at the stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from shardwise.comm.buckets import assign_buckets
from shardwise.comm.context import ParallelContext
from shardwise.comm.replicate import broadcast_module_state
from shardwise.config.plan import Plan
from shardwise.errors import UsageError
from shardwise.precision.loss_scaler import make_loss_scaler
from shardwise.precision.policy import compute_dtype, grad_dtype
from shardwise.zero.flat_bucket import FlatBucket
from shardwise.zero.grad_sync import FullGradSync, ShardGradSync, all_reduce_async, reduce_to_shard_async
from shardwise.zero.sharded_optimizer import ShardedStep, StepResult
from shardwise.zero.sharded_params import ShardedParameter
from shardwise.zero.stage3 import apply_stage3

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


@dataclass(frozen=True)
class ParamGroups:
    """The user's parameter groups: hyper-parameters and the (deduplicated) parameters of each."""

    params: tuple[tuple[nn.Parameter, ...], ...]
    options: tuple[dict[str, Any], ...]

    @staticmethod
    def from_user(model_parameters: Any, module: nn.Module) -> "ParamGroups":
        if model_parameters is None:
            model_parameters = module.parameters()
        items = list(model_parameters)
        if not items:
            return ParamGroups(((),), ({},))
        groups = items if isinstance(items[0], dict) else [{"params": items}]
        seen: set[int] = set()
        params, options = [], []
        for g in groups:
            plist = g["params"]
            plist = [plist] if isinstance(plist, torch.Tensor) else list(plist)
            unique = []
            for p in plist:
                if id(p) not in seen:
                    seen.add(id(p))
                    unique.append(p)
            params.append(tuple(unique))
            options.append({k: v for k, v in g.items() if k != "params"})
        return ParamGroups(tuple(params), tuple(options))


class DataParallelStrategy:
    """Shared machinery; subclasses fix how gradients and parameters are partitioned."""

    stage: int = -1
    params_sharded: bool = False  # optimizer sees this rank's chunk; parameters all-gathered

    def __init__(
        self,
        module: nn.Module,
        groups: ParamGroups,
        plan: Plan,
        ctx: ParallelContext,
        make_optimizer: OptimizerFactory,
    ):
        self._setup(module, plan, ctx)
        dp = ctx.dp

        trainable: list[nn.Parameter] = []
        keys: list[tuple] = []
        for gi, plist in enumerate(groups.params):
            for p in plist:
                if p.requires_grad:
                    trainable.append(p)
                    keys.append((gi, p.dtype, p.device))
        layouts = assign_buckets(
            [p.numel() for p in trainable], keys, plan.zero.reduce_bucket_size, dp.size
        )
        sharded = self.params_sharded
        self.buckets = [
            FlatBucket(i, lay, [trainable[s.param_index] for s in lay.slots], dp, sharded=sharded)
            for i, lay in enumerate(layouts)
        ]
        self.grad_sync = self._make_grad_sync(plan)
        opt_groups = [
            {**opts, "params": [b.opt_param for b in self.buckets if b.layout.group_key[0] == gi]}
            for gi, opts in enumerate(groups.options)
        ]
        self.optimizer = make_optimizer(opt_groups)
        self._step = ShardedStep(
            self.buckets,
            self.optimizer,
            dp,
            self.scaler,
            self.grad_sync.opt_grads(),
            grads_sharded=sharded,
            params_sharded=sharded,
            clip=plan.gradient_clipping,
        )

    def _setup(self, module: nn.Module, plan: Plan, ctx: ParallelContext) -> None:
        """Context, compute dtype, loss scaler; the module moved to the device and dtype, with
        rank 0's parameters and buffers on every rank."""
        if not plan.zero.reduce_scatter and not ctx.policy.reduce_scatter_via_all_reduce:
            # the CommPolicy is decided once, where the context is built (init_context)
            raise UsageError("the config sets zero_optimization.reduce_scatter=false but the context's "
                             "CommPolicy uses reduce-scatter; build the context with "
                             "init_context(allow_reduce_scatter=plan.zero.reduce_scatter)")
        self.ctx = ctx
        self.dtype = compute_dtype(plan.precision)
        self.grad_dtype = grad_dtype(plan.precision)
        self.scaler = make_loss_scaler(plan.precision)
        if not any(isinstance(p, ShardedParameter) for p in module.parameters()):  # zero.Init: stage 3 casts
            module.to(device=ctx.device, dtype=self.dtype) if self.dtype != torch.float32 else module.to(ctx.device)
        broadcast_module_state(module, ctx)  # [Note: one starting point]

    @staticmethod
    def _report(params: int, grads: int, master: int, state: int, **extra: int) -> dict[str, int]:
        return {"params": params, "grads": grads, "master_params": master, "optimizer_state": state,
                "total": params + grads + master + state, **extra}

    def _make_grad_sync(self, plan: Plan):
        raise NotImplementedError

    # -- the engine's interface -------------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        return self.scaler.scale

    @property
    def backward_scale(self) -> float:
        """What the loss is multiplied by before backward (per micro-step, before 1/gas).

        [Note: averaging in the loss] ``1 / dp_size`` is folded in here, so summed reductions
        over the data-parallel group yield the mean gradient without a pass over the gradients;
        exact when the dp size is a power of two.
        """
        return self.scaler.scale / self.ctx.dp.size

    def before_backward(self, sync: bool) -> None:
        self.grad_sync.before_backward(sync)

    def after_backward(self, sync: bool) -> None:
        self.grad_sync.after_backward(sync)

    def step(self, step_index: int) -> StepResult:
        self.grad_sync.wait()
        result = self._step.step(step_index)
        self.grad_sync.zero_grads()
        return result

    def zero_grad(self) -> None:
        self.grad_sync.zero_grads()

    def discard_gradients(self) -> None:
        """Finish whatever reductions a backward outside ``engine.backward`` started (every rank
        ran the same code) and drop all gradients, so that training can go on."""
        self.grad_sync.after_backward(True)
        self.grad_sync.wait()
        self.grad_sync.zero_grads()

    def after_load(self) -> None:
        """A checkpoint was written into the parameters / master weights."""

    def memory_report(self, module: nn.Module) -> dict[str, int]:
        seen: set[int] = set()

        def nbytes(tensors) -> int:
            total = 0
            for t in tensors:
                if not isinstance(t, torch.Tensor):
                    continue
                s = t.untyped_storage()
                if s.data_ptr() not in seen and s.nbytes() > 0:
                    seen.add(s.data_ptr())
                    total += s.nbytes()
            return total

        params = nbytes(module.parameters())
        grads = nbytes(self.grad_sync.tensors())
        master = nbytes(b.opt_param for b in self.buckets)  # 0 when aliased to params (fp32)
        state = nbytes(v for st in self.optimizer.state.values() for v in st.values())
        return self._report(params, grads, master, state)


class ReplicatedStrategy(DataParallelStrategy):
    """ZeRO stage 0: plain data parallelism with bucketed, overlapped all-reduce."""

    stage = 0

    def _make_grad_sync(self, plan: Plan):
        return FullGradSync(self.buckets, self.ctx.dp, overlap=plan.zero.overlap_comm, reduce_fn=all_reduce_async,
                            grad_dtype=self.grad_dtype)


class OptimizerShardedStrategy(DataParallelStrategy):
    """ZeRO stage 1: optimizer state and fp32 master weights partitioned."""

    stage = 1
    params_sharded = True

    def _make_grad_sync(self, plan: Plan):
        return FullGradSync(self.buckets, self.ctx.dp, overlap=plan.zero.overlap_comm, reduce_fn=reduce_to_shard_async,
                            grad_dtype=self.grad_dtype)


class GradientShardedStrategy(DataParallelStrategy):
    """ZeRO stage 2: gradients partitioned too."""

    stage = 2
    params_sharded = True

    def _make_grad_sync(self, plan: Plan):
        return ShardGradSync(self.buckets, self.ctx.dp, overlap=plan.zero.overlap_comm, grad_dtype=self.grad_dtype)


class ParamShardedStrategy(DataParallelStrategy):
    """ZeRO stage 3: parameters partitioned too, gathered per fetch unit (``zero/stage3.py``).

    The optimizer sees one flat chunk per (fetch unit, param group, dtype); gradients are
    reduced to their owners as soon as a unit's backward completes; no parameter all-gather
    after the step except for the small persistent ones.
    """

    stage = 3
    params_sharded = True

    def __init__(self, module: nn.Module, groups: ParamGroups, plan: Plan, ctx: ParallelContext,
                 make_optimizer: OptimizerFactory):
        self._setup(module, plan, ctx)
        self.runtime = apply_stage3(module, groups.params, plan.zero.stage3, ctx.dp, self.dtype, self.grad_dtype)
        self.buckets = [s for s in self.runtime.shards() if s.trainable]
        opt_groups = [{**opts, "params": [s.opt_param for s in self.buckets if s.group == gi]}
                      for gi, opts in enumerate(groups.options)]
        self.optimizer = make_optimizer(opt_groups)
        self._step = ShardedStep(self.buckets, self.optimizer, ctx.dp, self.scaler, [s.grad for s in self.buckets],
                                 grads_sharded=True,
                                 params_sharded=False, clip=plan.gradient_clipping)

    def before_backward(self, sync: bool) -> None:
        pass

    def after_backward(self, sync: bool) -> None:
        self.runtime.finish_backward()

    def step(self, step_index: int) -> StepResult:
        result = self._step.step(step_index)
        if result.applied:
            self.runtime.after_step()
        self.runtime.zero_grads()
        return result

    def zero_grad(self) -> None:
        self.runtime.zero_grads()

    def discard_gradients(self) -> None:
        self.runtime.finish_backward()
        self.runtime.zero_grads()

    def after_load(self) -> None:
        self.runtime.after_step()  # persistent parameters: every rank loaded only its chunk

    def memory_report(self, module: nn.Module) -> dict[str, int]:
        """As for stages 0-2; ``params`` counts this rank's shards plus the persistent
        (whole) parameters, ``gathered_peak`` the high-water mark of gathered buffers."""

        def nbytes(tensors) -> int:
            return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

        shards = self.runtime.shards()
        params = nbytes(s.full_flat if s.full_flat is not None else s.shard for s in shards)
        grads = nbytes(s.grad for s in shards)
        master = nbytes(s.opt_param for s in shards if s.mixed and s.opt_param is not None)
        state = nbytes(v for st in self.optimizer.state.values() for v in st.values())
        return self._report(params, grads, master, state, gathered_peak=self.runtime.gathered_peak)


STRATEGIES: dict[int, type[DataParallelStrategy]] = {
    0: ReplicatedStrategy,
    1: OptimizerShardedStrategy,
    2: GradientShardedStrategy,
    3: ParamShardedStrategy,
}


def create_strategy(
    module: nn.Module, groups: ParamGroups, plan: Plan, ctx: ParallelContext, make_optimizer: OptimizerFactory
) -> DataParallelStrategy:
    return STRATEGIES[plan.zero.stage](module, groups, plan, ctx, make_optimizer)


__all__: Sequence[str] = ["ParamGroups", "DataParallelStrategy", "STRATEGIES", "create_strategy"]
