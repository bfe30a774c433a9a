"""``shardwise.initialize``: config -> plan -> context -> strategy -> engine, in one place."""
from __future__ import annotations

import logging
import os
import warnings
import weakref
from typing import Any, Callable

import torch
import torch.nn as nn

from shardwise.checkpointing import apply_activation_checkpointing
from shardwise.comm.collectives import broadcast_object
from shardwise.comm.context import init_context, mesh_dp_size, resolve_timeout
from shardwise.consistency import check_same_everywhere
from shardwise.data import ResumableDataLoader, ResumableDistributedSampler
import shardwise.config as _config
from shardwise.engine import Engine
from shardwise.observers import make_observers
from shardwise.errors import ConfigError, UsageError
from shardwise.strategy import ParamGroups, create_strategy


def _optimizer_factory(plan, optimizer: Any) -> Callable[[list[dict]], torch.optim.Optimizer] | None:
    if optimizer is not None and plan.optimizer is not None:
        # DeepSpeed's documented rule: the client optimizer wins over the config's section
        warnings.warn(f"both an optimizer= argument and the config's `optimizer` section "
                      f"({plan.optimizer.type}) were given: the optimizer= argument is used, as in DeepSpeed; "
                      "remove one of them to silence this", UserWarning, stacklevel=3)
    if optimizer is None and plan.optimizer is not None:
        from shardwise.optim import build_optimizer

        return lambda groups: build_optimizer(plan.optimizer, groups)
    if isinstance(optimizer, torch.optim.Optimizer):

        def rebind(groups: list[dict]) -> torch.optim.Optimizer:
            # [Note: client optimizer] the user's optimizer object is kept (so schedulers built
            # on it still work); its groups now hold this rank's flat chunks instead.
            if len(groups) != len(optimizer.param_groups):
                raise UsageError(
                    f"the optimizer has {len(optimizer.param_groups)} param groups but "
                    f"model_parameters describe {len(groups)}; pass model_parameters=None to use "
                    "the optimizer's own groups"
                )
            if any(optimizer.state.values()):
                raise UsageError("pass an optimizer that has not stepped yet (its state is not empty)")
            for mine, theirs in zip(groups, optimizer.param_groups):
                theirs["params"] = mine["params"]
            return optimizer

        return rebind
    if callable(optimizer):
        return optimizer
    if optimizer is None:
        return None
    raise UsageError(f"optimizer= must be a torch optimizer or a callable(params); got {type(optimizer).__name__}")


def _build_scheduler(plan, lr_scheduler: Any, optimizer: torch.optim.Optimizer | None):
    if lr_scheduler is not None and plan.scheduler is not None:
        warnings.warn(f"both an lr_scheduler= argument and the config's `scheduler` section "
                      f"({plan.scheduler.type}) were given: the lr_scheduler= argument is used, as in "
                      "DeepSpeed; remove one of them to silence this", UserWarning, stacklevel=3)
    if lr_scheduler is None and plan.scheduler is not None:
        from shardwise.optim import build_scheduler

        return build_scheduler(plan.scheduler, optimizer)
    if lr_scheduler is None or hasattr(lr_scheduler, "step") and not isinstance(lr_scheduler, type):
        return lr_scheduler
    if callable(lr_scheduler):
        return lr_scheduler(optimizer)
    raise UsageError(f"lr_scheduler= must be a scheduler or a callable(optimizer); got {type(lr_scheduler).__name__}")


# modules an engine owns (weakly: a module that is garbage-collected drops out). Its parameters
# were re-laid into the engine's buffers and carry its hooks, so a second engine over the same
# module would train it twice over.
_OWNED: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def check_model(model: Any) -> None:
    """Named errors for models ``initialize`` cannot train (before any communication)."""
    if model is None:
        raise UsageError("initialize() needs model=")
    if not isinstance(model, nn.Module):
        raise UsageError(f"initialize(model=...) must be a torch.nn.Module; got {type(model).__name__}. "
                         "Wrap a function in an nn.Module whose forward calls it.")
    if model in _OWNED:
        raise UsageError(
            f"this {type(model).__name__} was already passed to shardwise.initialize() ({_OWNED[model]}); its "
            "parameters now live in that engine's buffers. Keep using the engine it returned, or build a "
            "fresh model for a second engine.")
    from shardwise.zero.sharded_params import ShardedParameter

    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t is not None and t.is_meta and not isinstance(t, ShardedParameter):
                raise UsageError(
                    f"{kind} '{name}' of the model is on the meta device (it has a shape but no values). "
                    "Materialise the model first (model.to_empty(device='cpu') and initialise its "
                    "weights, or load a state dict with assign=True), or build it under "
                    "`with shardwise.zero.Init():` to create it sharded.")


def _check_trainable(groups: ParamGroups, model: nn.Module) -> None:
    if not any(p.requires_grad for plist in groups.params for p in plist):
        n = sum(1 for _ in model.parameters())
        raise UsageError(
            f"no parameter given to initialize() requires grad ({n} parameters in the model, all frozen or "
            "none passed): there is nothing to train. Unfreeze the parameters to train "
            "(p.requires_grad_(True)) before initialize(), or pass them as model_parameters=.")


def compose(model: nn.Module, groups: ParamGroups, plan, ctx, make_optimizer):
    """Apply the features to the plain model, in this fixed order; returns ``(strategy, pipe)``.

    [Note: composition order]
    Each step is a function of the model, its policy (a frozen part of the plan) and the
    context; a later step sees the model the earlier ones left:

    0. the pipeline split happened before: a ``PipelineModule`` builds only this rank's stage
       (``shardwise/pipe``), so what follows sees one stage's layers.
    1. ``apply_tensor_parallel`` (``shardwise/tensor_parallel``): DTensor ``parallelize_module``
       over ``ctx.mesh["tp"]``; sharded parameters become DTensor parameters (the param groups
       are remapped to them), so the ZeRO strategy sees this rank's local shards.
    2. ``apply_activation_checkpointing`` (``shardwise/checkpointing.py``): wraps the chosen
       modules' ``forward``; names, parameters and modules are unchanged, so what follows
       sees the same structure (stage 3 still finds its fetch units).
    3. ``apply_compile`` (``shardwise/compile.py``, with ``compile.enabled``): each repeated
       block's ``forward`` becomes a ``torch.compile`` of it (of the checkpointed forward, so
       the recomputation is compiled too). Tracing is lazy (at the first forward, after the
       strategy below), the module structure is unchanged, and ZeRO's module hooks run
       around each compiled block ([Note: what is compiled]).
    4. the ZeRO strategy (``create_strategy``, ``shardwise/strategy.py``) over ``ctx.dp``: moves
       the model to the device and dtype, broadcasts the starting state over dp, lays
       parameters into flat buckets or stage-3 shards and builds the optimizer over them. It
       owns the storage, so it comes after every step that changes parameters.
    5. ``build_pipeline`` (``shardwise/pipe``): the torch ``PipelineStage`` and schedule over the
       stage the strategy now holds (None unless the model is a ``PipelineModule``).
    """
    from shardwise.compile import apply_compile
    from shardwise.pipe import build_pipeline
    from shardwise.tensor_parallel import apply_tensor_parallel

    before = dict(model.named_parameters(remove_duplicate=False))
    apply_tensor_parallel(model, plan.parallel.tensor, ctx)
    after = dict(model.named_parameters(remove_duplicate=False))
    groups = groups.remapped({id(p): after[n] for n, p in before.items() if n in after and after[n] is not p})
    apply_activation_checkpointing(model, plan.activation_checkpointing, ctx)
    apply_compile(model, plan.compile, plan, ctx)
    strategy = create_strategy(model, groups, plan, ctx, make_optimizer)
    return strategy, build_pipeline(model, strategy, plan, ctx)


def _default_logging(rank: int) -> None:
    """Like DeepSpeed, show shardwise's INFO lines unless the application configured logging."""
    log = logging.getLogger("shardwise")
    if log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[shardwise rank {rank}] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def initialize(
    args: Any = None,
    model: nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    collate_fn: Callable | None = None,
    config: str | os.PathLike | dict | None = None,
    config_params: dict | None = None,
    dist_init_required: bool | None = None,
    mesh: Any = None,
    mpu: Any = None,
    **unsupported: Any,
):
    """Set up distributed training. Returns ``(engine, optimizer, training_dataloader, lr_scheduler)``;
    items that are not configured are ``None``.

    ``mesh``: a ``torch.distributed.device_mesh.DeviceMesh`` with a ``"dp"`` dimension; ZeRO
    shards and reduces over it, and every other dimension replicates (independent data-parallel
    groups). Default: a 1-D mesh named ``("dp",)`` over the whole world. See [Note: parallel
    context] in ``shardwise/comm/context.py``. ``mpu``: DeepSpeed's model-parallel unit (Megatron's
    ``mpu``); accepted when its model-parallel size is 1 (the data-parallel group is then the
    world), refused otherwise until tensor parallelism lands.

    When both ``optimizer=`` and the config's ``optimizer`` section are given, the argument is
    used (DeepSpeed's rule), with a warning; likewise ``lr_scheduler=`` and ``scheduler``."""
    if unsupported:
        raise UsageError(f"initialize() got arguments shardwise does not support: {sorted(unsupported)}")
    check_model(model)
    _check_mpu(mpu)
    if config is None:
        config = config_params if config_params is not None else getattr(args, "deepspeed_config", None)
    if config is None:
        raise ConfigError("no config given: pass config= (a path to a DeepSpeed-style JSON file or a dict)")
    # the config is checked before any communication (a ConfigError never leaves other ranks
    # waiting in a collective); its comms_timeout then bounds every wait from the join on
    _default_logging(int(os.environ.get("RANK", "0") or 0))
    # the batch triangle is for the data-parallel size: the ranks one replica spans (the world
    # size on the default mesh) over pipeline stages x tensor parallel
    plan = _config.load_config(config, world_size=mesh_dp_size(mesh), pipeline_stages=_pipeline_stages(model))
    timeout_s = resolve_timeout(plan.comms_timeout_s)
    ctx = init_context(timeout_s=timeout_s, allow_reduce_scatter=plan.zero.reduce_scatter, mesh=mesh,
                       pp=plan.parallel.pp, tp=plan.parallel.tp)
    check_same_everywhere(plan, model, ctx, timeout_s)
    if ctx.dp_replicas > 1 and (plan.checkpoint.auto_resume or plan.checkpoint.save_interval):
        from shardwise.checkpoint import require_one_replica

        require_one_replica(ctx, "checkpoint.auto_resume / checkpoint.save_interval")
    groups = ParamGroups.from_user(
        model_parameters if not isinstance(optimizer, torch.optim.Optimizer) else optimizer.param_groups,
        model,
    )
    _check_trainable(groups, model)
    make_optimizer = _optimizer_factory(plan, optimizer)
    if make_optimizer is None:
        raise ConfigError(
            "no optimizer: add an `optimizer` section to the config or pass optimizer= to initialize()"
        )
    strategy, pipe = compose(model, groups, plan, ctx, make_optimizer)
    scheduler = _build_scheduler(plan, lr_scheduler, strategy.optimizer)
    if pipe is None:
        engine = Engine(model, strategy, plan, ctx, scheduler, make_observers(plan, model, ctx))
    else:
        from shardwise.pipe.engine import PipelineEngine

        engine = PipelineEngine(model, strategy, plan, ctx, scheduler, make_observers(plan, model, ctx), pipe)
    _OWNED[model] = f"ZeRO stage {plan.zero.stage}, engine {id(engine):#x}"
    loader = None
    if training_data is not None:
        # each data-parallel group reads the whole data set, split over its ranks
        sampler = ResumableDistributedSampler(training_data, num_replicas=ctx.dp.size, rank=ctx.dp.rank)
        loader = ResumableDataLoader(
            training_data, batch_size=plan.batch.micro_batch_size, sampler=sampler, collate_fn=collate_fn
        )
        engine.training_dataloader = loader  # its position is saved with checkpoints
    if plan.checkpoint.auto_resume:
        _auto_resume(engine, plan.checkpoint.dir)
    return engine, strategy.optimizer, loader, scheduler


def _pipeline_stages(model: nn.Module) -> int | None:
    """A ``PipelineModule``'s ``num_stages`` (the config's ``pipeline.stages`` must agree), else None."""
    import shardwise.pipe as pipe

    cls = getattr(pipe, "PipelineModule", None)
    return int(model.num_stages) if cls is not None and isinstance(model, cls) else None


def _check_mpu(mpu: Any) -> None:
    if mpu is None:
        return
    size = getattr(mpu, "get_model_parallel_world_size", None) or getattr(mpu, "get_tensor_model_parallel_world_size", None)
    if size is None:
        raise UsageError("initialize(mpu=...) needs an object with get_model_parallel_world_size() (Megatron's mpu)")
    if size() != 1:
        raise UsageError(f"initialize(mpu=...) has model-parallel size {size()}: shardwise does not take Megatron's "
                         "tensor-parallel layers through mpu. Give the plain model and the config's "
                         '"tensor_parallel": {"autotp_size": N} (DTensor tensor parallelism; see the README\'s '
                         "Parallelism section), or a mesh= with 'dp' and 'tp' dimensions.")


def _auto_resume(engine: Engine, directory: str) -> None:
    """``checkpoint.auto_resume``: load the latest commit in ``directory`` if it holds any (after
    a restart by ``shardwise run --max-restarts``); a broken one is an error, never a silent
    fresh start."""
    from shardwise.checkpoint import committed_tags
    from shardwise.checkpoint import manifest as M

    def present() -> bool:
        return os.path.exists(os.path.join(directory, M.LATEST)) or bool(
            os.path.isdir(directory) and committed_tags(directory))

    if not broadcast_object(present() if engine.ctx.rank == 0 else None, engine.ctx.world):
        logging.getLogger("shardwise").info("auto_resume: no checkpoint in %s yet; starting fresh", directory)
        return
    path, _ = engine.load_checkpoint(directory)
    logging.getLogger("shardwise").info("auto_resume: resumed from %s at step %d", path, engine.global_steps)
