"""Data-parallel strategies, picked once from a registry keyed by ZeRO stage.

:class:`Strategy` is the engine's interface (a protocol), with two implementations:
:class:`FlatBucketStrategy` (stages 0-2: parameters live in flat buckets; the stage picks the
kind of gradient sync and whether the optimizer sees this rank's chunk, :class:`FlatStage`)
and :class:`Stage3Strategy` (parameters sharded per fetch unit, ``zero/stage3.py``). Both
compose a :class:`ShardedStep` and the loss scaler; what they share is plain functions
(:func:`prepare_module`, :func:`scaled_backward`, :func:`memory_totals`), not a base class.

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
from functools import partial
from typing import Any, Callable, Literal, Protocol, Sequence

import torch
import torch.nn as nn

from shardwise.comm.buckets import assign_buckets
from shardwise.comm.context import ParallelContext
from shardwise.comm.replicate import broadcast_module_state
from shardwise.config.plan import Plan
from shardwise.errors import UsageError
from shardwise.precision.loss_scaler import LossScaler, make_loss_scaler
from shardwise.precision.policy import compute_dtype, grad_dtype
from shardwise.zero.flat_bucket import FlatBucket
from shardwise.zero.grad_sync import FullGradSync, ShardGradSync, all_reduce_async, reduce_to_shard_async
from shardwise.zero.sharded_optimizer import OptimizerChunk, ShardedStep, StepResult
from shardwise.zero.sharded_params import ShardedParameter
from shardwise.offload.params import make_param_tier
from shardwise.parallel_norm import duplicate_params, norm_weight
from shardwise.tensor_parallel import local_tensor
from shardwise.zero.stage3 import Stage3Runtime, apply_stage3

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

    def remapped(self, replaced: dict[int, nn.Parameter]) -> "ParamGroups":
        """The same groups after a step that replaced parameters (``{id(old): new}``: tensor
        parallelism re-registers each sharded parameter as a DTensor parameter)."""
        if not replaced:
            return self
        return ParamGroups(tuple(tuple(replaced.get(id(p), p) for p in plist) for plist in self.params),
                           self.options)


class Strategy(Protocol):
    """What the engine (and ``checkpoint/``) calls; it never looks at the stage otherwise."""

    stage: int
    ctx: ParallelContext
    dtype: torch.dtype  # compute dtype
    grad_dtype: torch.dtype
    scaler: LossScaler
    optimizer: torch.optim.Optimizer
    buckets: Sequence[OptimizerChunk]  # what the optimizer steps (FlatBucket / FlatShard)

    @property
    def loss_scale(self) -> float: ...

    @property
    def backward_scale(self) -> float: ...

    def before_backward(self, sync: bool) -> None: ...

    def after_backward(self, sync: bool) -> None: ...

    def step(self, step_index: int) -> StepResult: ...

    def zero_grad(self) -> None: ...

    def discard_gradients(self) -> None:
        """Finish whatever reductions a backward outside ``engine.backward`` started (every rank
        ran the same code) and drop all gradients, so that training can go on."""

    def after_load(self) -> None:
        """A checkpoint was written into the parameters / master weights."""

    def memory_report(self, module: nn.Module) -> dict[str, int]: ...

    def close(self) -> None:
        """Release what outlives the Python objects: swap files and I/O threads (offload)."""

    # the checkpoint seam ([Note: state pieces] in zero/pieces.py): checkpoint/ calls only these
    def state_pieces(self, module: nn.Module) -> list:
        """The ``StatePiece`` list this rank writes (every rank calls it)."""

    def scalar_state(self) -> dict:
        """The loss scaler's state (JSON)."""

    def load_pieces(self, module: nn.Module, source: Any, *, optimizer: bool = True,
                    scalar_state: dict | None = None) -> Callable[[], None]:
        """Phase 1 of a load from a ``PieceSource`` (checked, nothing touched); returns phase 2."""


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare_module` decided: the compute and gradient dtypes and the loss scaler."""

    dtype: torch.dtype
    grad_dtype: torch.dtype
    scaler: LossScaler


def prepare_module(module: nn.Module, plan: Plan, ctx: ParallelContext) -> Prepared:
    """The setup every strategy shares: the dtypes and loss scaler; the module moved to the device
    and dtype, with rank 0's parameters and buffers on every rank."""
    if not plan.zero.reduce_scatter and not ctx.policy.reduce_scatter_via_all_reduce:
        # the CommPolicy is decided once, where the context is built (init_context)
        raise UsageError("the config sets zero_optimization.reduce_scatter=false but the context's "
                         "CommPolicy uses reduce-scatter; build the context with "
                         "init_context(allow_reduce_scatter=plan.zero.reduce_scatter)")
    dtype = compute_dtype(plan.precision)
    prepared = Prepared(dtype, grad_dtype(plan.precision), make_loss_scaler(plan.precision))
    if not any(isinstance(p, ShardedParameter) for p in module.parameters()):  # zero.Init: stage 3 casts
        module.to(device=ctx.device, dtype=dtype) if dtype != torch.float32 else module.to(ctx.device)
    broadcast_module_state(module, ctx)  # [Note: one starting point]
    return prepared


def scaled_backward(scaler: LossScaler, ctx: ParallelContext, predivide: float | None = None) -> float:
    """What the loss is multiplied by before backward (per micro-step, before 1/gas).

    [Note: averaging in the loss] ``1 / dp_size`` is folded in here, so summed reductions
    over the data-parallel group yield the mean gradient without a pass over the gradients;
    exact when the dp size is a power of two. With DeepSpeed's ``gradient_predivide_factor``
    f (``predivide``) the loss is divided by f instead, and the step divides by ``dp / f``
    (:func:`post_divide`).
    """
    return scaler.scale / (predivide if predivide is not None else ctx.dp.size)


def post_divide(plan: Plan, ctx: ParallelContext) -> float:
    """What reduced gradients are still to be divided by at the step (1.0 unless predivide)."""
    f = plan.zero.grad_predivide
    return 1.0 if f is None else ctx.dp.size / f


def bind_layouts(optimizer: torch.optim.Optimizer, chunks: Sequence, dp, plan: Plan) -> None:
    """Tell a per-tensor optimizer (``shardwise.optim.Lamb``: one trust ratio per model tensor)
    where each parameter lies in the flat chunks it steps ([Note: LAMB over flat buffers]);
    ``dp`` given: the chunks are parts of buckets, and partial norms are summed over it. A
    no-op for every other optimizer. Before ``tier.attach``; every rank binds in bucket order."""
    from shardwise.comm.collectives import all_reduce
    from shardwise.optim.lamb import Lamb, bind_flat_chunks

    if isinstance(optimizer, Lamb) and plan.offload.optimizer.device != "none":
        raise UsageError("Lamb with zero_optimization.offload_optimizer is not supported yet: the offloaded "
                         "step walks the state tile by tile, and Lamb's per-tensor norms span tiles. Use "
                         "AdamW with offload, or Lamb without it")
    if isinstance(optimizer, Lamb) and plan.parallel.tp > 1:
        raise UsageError("Lamb with tensor parallelism (tensor_parallel.autotp_size > 1) is not supported yet: its "
                         "trust ratio is per model tensor, and a tensor-parallel tensor's norm would have to be "
                         "summed over tp as well. Use AdamW with tensor parallelism, or Lamb without it")
    reduce = (lambda t: all_reduce(t, dp)) if dp is not None and dp.size > 1 else None
    bind_flat_chunks(optimizer, chunks, reduce)


def memory_totals(params: int, grads: int, master: int, state: int, **extra: int) -> dict[str, int]:
    """A ``memory_report``: bytes per kind and their total (``extra`` is not counted in it)."""
    return {"params": params, "grads": grads, "master_params": master, "optimizer_state": state,
            "total": params + grads + master + state, **extra}


@dataclass(frozen=True)
class FlatStage:
    """How one of stages 0-2 uses its flat buckets (see the table above)."""

    stage: int
    grad_sync: Literal["all_reduce", "reduce_to_shard", "own_chunk"]  # full buffers reduced how, or own chunk only
    optimizer_sees_chunk: bool  # the optimizer steps this rank's chunk; parameters all-gathered after


FLAT_STAGES = {
    0: FlatStage(0, "all_reduce", optimizer_sees_chunk=False),  # plain data parallelism
    1: FlatStage(1, "reduce_to_shard", optimizer_sees_chunk=True),  # optimizer state, fp32 masters split
    2: FlatStage(2, "own_chunk", optimizer_sees_chunk=True),  # gradients split too
}


class FlatBucketStrategy:
    """ZeRO stages 0-2: every trainable parameter a view into a flat bucket
    ([Note: flat bucket storage]), gradients reduced per bucket by ``zero/grad_sync.py``."""

    def __init__(
        self,
        flat_stage: FlatStage,
        module: nn.Module,
        groups: ParamGroups,
        plan: Plan,
        ctx: ParallelContext,
        make_optimizer: OptimizerFactory,
    ):
        from shardwise.tensor_parallel import local_numel

        prepared = prepare_module(module, plan, ctx)
        self.stage = flat_stage.stage
        self.ctx = ctx
        self.dtype, self.grad_dtype, self.scaler = prepared.dtype, prepared.grad_dtype, prepared.scaler
        dp = ctx.dp

        trainable: list[nn.Parameter] = []
        keys: list[tuple] = []
        duplicates = duplicate_params(module, ctx)  # [Note: norm over the mesh]
        for gi, plist in enumerate(groups.params):
            for p in plist:
                if p.requires_grad:
                    trainable.append(p)
                    keys.append((gi, p.dtype, p.device, norm_weight(p, duplicates)))
        layouts = assign_buckets(
            # this rank's elements: a tensor-parallel (DTensor) parameter's local shard
            # ([Note: DTensor parameters in flat buckets] in zero/flat_bucket.py)
            [local_numel(p) for p in trainable], keys, plan.zero.reduce_bucket_size, dp.size
        )
        chunk = flat_stage.optimizer_sees_chunk
        self.buckets: list[FlatBucket] = [
            FlatBucket(i, lay, [trainable[s.param_index] for s in lay.slots], dp, optimizer_sees_chunk=chunk)
            for i, lay in enumerate(layouts)
        ]
        self.grad_sync = _make_grad_sync(flat_stage, self.buckets, plan, dp, self.grad_dtype)
        self.tier = offload_tier(plan, self.buckets, ctx)  # [Note: offload tiers]: before the optimizer
        opt_groups = [
            {**opts, "params": [b.opt_param for b in self.buckets if b.layout.group_key[0] == gi]}
            for gi, opts in enumerate(groups.options)
        ]
        self.optimizer = make_optimizer(opt_groups)
        bind_layouts(self.optimizer, self.buckets, dp if chunk else None, plan)
        self.tier.attach(self.optimizer)
        self._step = ShardedStep(
            self.buckets,
            self.optimizer,
            dp,
            self.scaler,
            self.grad_sync.opt_grads(),
            norm_needs_all_reduce=chunk,  # each rank's opt grads cover its own chunk only
            gather_after_step=[b.param_flat for b in self.buckets] if chunk else (),
            clip=plan.gradient_clipping,
            tier=self.tier,
            post_divide=post_divide(plan, ctx),
            norm_weights=[b.layout.group_key[3] for b in self.buckets],
            model_parallel=ctx.model_parallel,
        )
        self._predivide = plan.zero.grad_predivide

    # -- the engine's interface -------------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        return self.scaler.scale

    @property
    def backward_scale(self) -> float:
        return scaled_backward(self.scaler, self.ctx, self._predivide)

    def before_backward(self, sync: bool) -> None:
        self.grad_sync.before_backward(sync)
        if sync:
            self.tier.prefetch()  # the last backward of the step: the first tiles' reads start

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
        self.tier.absorb()  # offloaded state goes back to its tier

    def close(self) -> None:
        self.tier.close()

    def memory_report(self, module: nn.Module) -> dict[str, int]:
        seen: set[int] = self.tier.excluded()  # host-tier tensors are not device memory

        def nbytes(tensors) -> int:
            total = 0
            for t in tensors:
                if not isinstance(t, torch.Tensor):
                    continue
                s = local_tensor(t).untyped_storage()  # a tp shard: its local block
                if s.data_ptr() not in seen and s.nbytes() > 0:
                    seen.add(s.data_ptr())
                    total += s.nbytes()
            return total

        params = nbytes(module.parameters())
        grads = nbytes(self.grad_sync.tensors())
        master = nbytes(b.opt_param for b in self.buckets)  # 0 when aliased to params (fp32)
        state = nbytes(v for st in self.optimizer.state.values() for v in st.values())
        return memory_totals(params, grads, master, state, **self.tier.report())

    # -- the checkpoint seam ([Note: state pieces] in zero/pieces.py) ---------------------------
    def state_pieces(self, module: nn.Module) -> list:
        """The ``StatePiece`` list this rank writes: its chunk of every parameter (fp32 masters)
        and optimizer state, frozen parameters and buffers on rank 0."""
        from shardwise.zero.pieces import flat_state_pieces

        with self.tier.materialized():  # offloaded state read back for the save (files unchanged)
            return flat_state_pieces(self, module)

    def scalar_state(self) -> dict:
        """The loss scaler's state (JSON)."""
        return self.scaler.state_dict()

    def load_pieces(self, module: nn.Module, source: Any, *, optimizer: bool = True,
                    scalar_state: dict | None = None) -> Callable[[], None]:
        """Read whole parameters and this rank's optimizer state from ``source`` (a
        ``PieceSource``), checked, into new buffers; returns the call that installs them."""
        from shardwise.zero.pieces import load_flat_pieces

        return load_flat_pieces(self, module, source, whole=True, optimizer=optimizer, scalar_state=scalar_state)

    # -- pipeline parallelism (shardwise/pipe: [Note: pipeline gradients] in pipe/runtime.py) -------
    def _pipeline_slots(self) -> dict[int, tuple[FlatBucket, int]]:
        slots = self.__dict__.get("_pipe_slots")
        if slots is None:
            slots = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)}
            self._pipe_slots = slots
        return slots

    def _pipeline_full_grads(self) -> FullGradSync:
        if not isinstance(self.grad_sync, FullGradSync):
            raise UsageError(f"pipeline parallelism needs ZeRO stage 0 or 1 (a full gradient buffer per bucket, "
                             f"reduced once per step); this strategy is stage {self.stage}")
        return self.grad_sync

    def param_grad(self, param: nn.Parameter) -> torch.Tensor | None:
        """The accumulated gradient of ``param`` (a view into its bucket's gradient buffer, in the
        gradient dtype), None for a parameter outside the buckets (frozen at initialize)."""
        sync = self._pipeline_full_grads()
        loc = self._pipeline_slots().get(id(param))
        if loc is None:
            return None
        bucket, slot = loc
        return bucket.param_view(slot, sync.grad_flats[bucket.index])

    @torch.no_grad()
    def pipeline_absorb_grads(self) -> None:
        """Fold gradients that autograd left in ``p.grad`` outside the bucket buffers into them.
        The zero-bubble schedules compute weight gradients with ``torch.autograd.grad`` and assign
        ``p.grad`` themselves, so the accumulate hooks do not fire: where ``p.grad`` is a view of
        the buffer (same dtype) it was accumulated in place already; otherwise (fp32 gradients of
        16-bit parameters) it is added here and released."""
        from shardwise.tensor_parallel import local_grad, local_tensor

        sync = self._pipeline_full_grads()
        for bucket in self.buckets:
            flat = sync.grad_flats[bucket.index]
            for i, p in enumerate(bucket.params):
                g = p.grad
                if g is None:
                    continue
                view = bucket.param_view(i, flat)
                if local_tensor(g).data_ptr() == view.data_ptr():
                    continue
                view.add_(local_grad(p, g).to(view.dtype))  # [Note: DTensor gradients] in grad_sync.py
                p.grad = bucket.grad_view(i, flat) if sync._views[bucket.index] else None


def _make_grad_sync(flat_stage: FlatStage, buckets: list[FlatBucket], plan: Plan, dp, grad_dtype: torch.dtype):
    """Stages 0-1 keep a full gradient buffer per bucket and all-reduce it (0) or reduce it to
    its owner (1); stage 2 keeps only this rank's chunk."""
    overlap = plan.zero.overlap_comm
    if flat_stage.grad_sync == "own_chunk":
        return ShardGradSync(buckets, dp, overlap=overlap, grad_dtype=grad_dtype)
    reduce_fn = all_reduce_async if flat_stage.grad_sync == "all_reduce" else reduce_to_shard_async
    return FullGradSync(buckets, dp, overlap=overlap, reduce_fn=reduce_fn, grad_dtype=grad_dtype)


class Stage3Strategy:
    """ZeRO stage 3: parameters partitioned too, gathered per fetch unit (``zero/stage3.py``).

    The optimizer sees one flat chunk per (fetch unit, param group, dtype); gradients are
    reduced to their owners as soon as a unit's backward completes; no parameter all-gather
    after the step except for the small persistent ones.
    """

    stage = 3

    def __init__(self, module: nn.Module, groups: ParamGroups, plan: Plan, ctx: ParallelContext,
                 make_optimizer: OptimizerFactory):
        prepared = prepare_module(module, plan, ctx)
        self.ctx = ctx
        self.dtype, self.grad_dtype, self.scaler = prepared.dtype, prepared.grad_dtype, prepared.scaler
        if ctx.tp.size > 1 and any(isinstance(p, ShardedParameter) for p in module.parameters()):
            raise UsageError("zero.Init with tensor parallelism (tensor_parallel.autotp_size > 1) is not supported: "
                             "zero.Init splits each parameter over dp before parallelize_module could shard it over "
                             "tp. Build the model without shardwise.zero.Init (ZeRO stage 3 still shards every "
                             "tensor-parallel block over dp at initialize), or build it on the meta device")
        io: dict = {}  # one swap directory + I/O engine per nvme_path
        # offload_param: each shard leaves device memory as soon as it is built
        self.param_tier = make_param_tier(plan.offload, ctx.rank, ctx.device, io)
        # DTensor (tensor-parallel) parameters are sharded over dp as their local blocks
        # ([Note: tensor-parallel parameters at stage 3]); shards are homogeneous in norm weight
        self.runtime: Stage3Runtime = apply_stage3(module, groups.params, plan.zero.stage3, ctx.dp, self.dtype,
                                                   self.grad_dtype,
                                                   on_shard=self.param_tier.adopt if self.param_tier else None,
                                                   duplicates=duplicate_params(module, ctx))
        self.buckets = [s for s in self.runtime.shards() if s.trainable]
        self.tier = offload_tier(plan, self.buckets, ctx, io, self.param_tier)  # [Note: offload tiers]
        opt_groups = [{**opts, "params": [s.opt_param for s in self.buckets if s.group == gi]}
                      for gi, opts in enumerate(groups.options)]
        self.optimizer = make_optimizer(opt_groups)
        bind_layouts(self.optimizer, self.buckets, ctx.dp, plan)
        self.tier.attach(self.optimizer)
        # the persistent parameters are gathered by runtime.after_step
        self._step = ShardedStep(self.buckets, self.optimizer, ctx.dp, self.scaler, [s.grad for s in self.buckets],
                                 norm_needs_all_reduce=True, clip=plan.gradient_clipping, tier=self.tier,
                                 post_divide=post_divide(plan, ctx),
                                 norm_weights=[s.norm_weight for s in self.buckets],
                                 model_parallel=ctx.model_parallel)  # [Note: norm over the mesh]
        self._predivide = plan.zero.grad_predivide

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale

    @property
    def backward_scale(self) -> float:
        return scaled_backward(self.scaler, self.ctx, self._predivide)

    def before_backward(self, sync: bool) -> None:
        if sync:
            self.tier.prefetch()  # the last backward of the step: the first tiles' reads start

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
        self.tier.absorb()  # offloaded state goes back to its tier

    def close(self) -> None:
        self.tier.close()
        if self.param_tier is not None:
            self.param_tier.close()

    def memory_report(self, module: nn.Module) -> dict[str, int]:
        """As for stages 0-2; ``params`` counts this rank's shards plus the persistent
        (whole) parameters, ``gathered_peak`` the high-water mark of gathered buffers."""

        host = self.tier.excluded() | (self.param_tier.excluded() if self.param_tier else set())

        def nbytes(tensors) -> int:
            return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)
                       and not (t.numel() and t.untyped_storage().data_ptr() in host))

        shards = self.runtime.shards()
        params = nbytes(s.full_flat if s.full_flat is not None else s.shard for s in shards)
        grads = nbytes(s.grad for s in shards)
        master = nbytes(s.opt_param for s in shards if s.mixed and s.opt_param is not None)
        state = nbytes(v for st in self.optimizer.state.values() for v in st.values())
        tiers = dict(self.tier.report())
        for k, v in (self.param_tier.report() if self.param_tier is not None else {}).items():
            tiers[k] = tiers.get(k, 0) + v
        return memory_totals(params, grads, master, state, gathered_peak=self.runtime.gathered_peak, **tiers)

    # -- the checkpoint seam ([Note: state pieces] in zero/pieces.py) ---------------------------
    def state_pieces(self, module: nn.Module) -> list:
        """The ``StatePiece`` list this rank writes: its range of every parameter (fp32 masters)
        and optimizer state, frozen parameters (gathered: every rank calls) and buffers on rank 0."""
        from shardwise.zero.pieces import flat_state_pieces

        with self.tier.materialized():  # offloaded state read back for the save (files unchanged)
            return flat_state_pieces(self, module)

    def scalar_state(self) -> dict:
        """The loss scaler's state (JSON)."""
        return self.scaler.state_dict()

    def load_pieces(self, module: nn.Module, source: Any, *, optimizer: bool = True,
                    scalar_state: dict | None = None) -> Callable[[], None]:
        """Read only this rank's range of every parameter and its optimizer state from
        ``source`` (a ``PieceSource``), checked, into new buffers; returns the call that
        installs them (collective: frozen parameters are gathered)."""
        from shardwise.zero.pieces import load_flat_pieces

        return load_flat_pieces(self, module, source, whole=False, optimizer=optimizer, scalar_state=scalar_state)


def offload_tier(plan: Plan, chunks: Sequence[OptimizerChunk], ctx: ParallelContext, io: dict | None = None,
                 params: Any = None):
    """The tier the optimizer's masters and state live in ([Note: offload tiers]), prepared
    (host masters made, swapped masters written) before the optimizer is built over them."""
    from shardwise.offload.tiers import make_tier

    tier = make_tier(plan.offload, chunks, ctx.device, ctx.rank, io, params)
    tier.prepare()
    return tier


StrategyFactory = Callable[[nn.Module, ParamGroups, Plan, ParallelContext, OptimizerFactory], Strategy]

STRATEGIES: dict[int, StrategyFactory] = {
    0: partial(FlatBucketStrategy, FLAT_STAGES[0]),
    1: partial(FlatBucketStrategy, FLAT_STAGES[1]),
    2: partial(FlatBucketStrategy, FLAT_STAGES[2]),
    3: Stage3Strategy,
}


def create_strategy(
    module: nn.Module, groups: ParamGroups, plan: Plan, ctx: ParallelContext, make_optimizer: OptimizerFactory
) -> Strategy:
    return STRATEGIES[plan.zero.stage](module, groups, plan, ctx, make_optimizer)


__all__: Sequence[str] = ["ParamGroups", "Strategy", "FlatStage", "FLAT_STAGES", "FlatBucketStrategy",
                          "Stage3Strategy", "STRATEGIES", "create_strategy", "prepare_module"]
