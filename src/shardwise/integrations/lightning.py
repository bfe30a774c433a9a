"""Lightning on shardwise: ``Trainer(strategy="shardwise_stage_3", devices=2, accelerator="cpu")``.

Tested with lightning 2.6.6 (``TESTED``). ``import shardwise.integrations.lightning`` registers the
strategy names ``"shardwise"``, ``"shardwise_stage_1"``, ``"shardwise_stage_2"`` and
``"shardwise_stage_3"`` in Lightning's ``StrategyRegistry``; pass :class:`ShardwiseStrategy` itself
for a config: ``Trainer(strategy=ShardwiseStrategy(stage=3, config="ds.json"))``.

[Note: the Lightning seam]
Lightning's documented plug-in point is a ``Strategy`` subclass; ``ShardwiseStrategy`` subclasses
``DDPStrategy`` (as Lightning's own ``DeepSpeedStrategy`` does) and so keeps what DDP already does
right: the launcher (one process per device), the process group (``shardwise.initialize`` uses
the one Lightning made), the distributed sampler, ``reduce``/``broadcast``/``barrier``. Overridden:

- ``setup``: ``configure_optimizers`` runs through ``Strategy.setup_optimizers`` (or not at all
  when the config has an ``optimizer`` section), the Trainer's settings are written into the
  config dict (:func:`fill_config`), and ``shardwise.initialize(model=lightning_module,
  optimizer=..., config=...)`` builds the engine, which becomes ``strategy.model``. Lightning's
  ``_ForwardRedirection`` then routes ``training_step`` / ``validation_step`` through
  ``engine(...)``, so stage 3 gathers parameters as the step runs.
- accumulation: Lightning decides which batch steps (its ``accumulate_grad_batches`` and its
  rule of stepping on an epoch's last batch), and announces the others through
  ``block_backward_sync`` (its hook for DDP's ``no_sync``). ``backward`` tells the engine with
  ``engine.set_gradient_accumulation_boundary`` and calls ``engine.backward(loss,
  scale_wrt_gas=False)`` (Lightning has already divided the loss by ``accumulate_grad_batches``)
  and, off the boundary, ``engine.step()`` to count the micro-step; ``optimizer_step`` runs the
  closure (``training_step`` + ``backward``) and ``engine.step()``. The engine clips
  (``gradient_clipping``) and zeroes; Lightning's own clipping and ``zero_grad`` are no-ops
  (:class:`_ShardwisePrecision`, :class:`_EngineOptimizer`). Lightning steps its LR schedulers
  itself (they hold the user's optimizer, whose groups now hold the engine's chunks).
- precision: the Trainer's ``precision`` becomes the config's ``bf16`` / ``fp16`` section and
  the precision plugin is replaced by one without autocast (the engine casts).
- checkpoints: ``trainer.save_checkpoint(path)`` makes ``path`` a shardwise checkpoint directory
  (every rank calls ``engine.save_checkpoint(path, tag="checkpoint")``); Lightning's own state
  (loops, callbacks, LR schedulers, hyper-parameters) goes in as the ``client_state``, which
  shardwise stores without pickle. ``fit(ckpt_path=path)`` loads it after ``setup``
  (``restore_checkpoint_after_setup``) and hands Lightning its state back; model and optimizer
  come from the engine (``load_model_state_dict`` / ``load_optimizer_state_dict`` are no-ops).

Lightning's private APIs used: ``trainer.fit_loop._data_source`` to read the train loader's batch
size (as Lightning's DeepSpeedStrategy does; guarded, falling back to 1), and
``Precision._after_closure`` from the precision subclass (the callbacks and clipping hook before
an optimizer step). Refused by name: ``Trainer.validate/test/predict`` outside ``fit``, manual
optimization, several optimizers, clipping by value, ``sync_batchnorm``, the ``"*-true"`` and
64-bit precisions, and the arguments of Lightning's DeepSpeed / FSDP / DDP strategies.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import Any, Callable, Mapping

import torch

import shardwise
from shardwise.errors import CheckpointError, ConfigError, ConfigProblem, UsageError

try:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision
    from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities.model_helpers import is_overridden
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn
except ImportError as exc:  # pragma: no cover - exercised only without lightning
    raise ImportError("shardwise.integrations.lightning needs Lightning: pip install lightning") from exc

TESTED = {"lightning": "2.6.6"}
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
TAG = "checkpoint"  # the tag under a checkpoint directory (Lightning's DeepSpeedStrategy uses it too)

# arguments of Lightning's DeepSpeedStrategy -> where the setting lives in a DeepSpeed config
_DEEPSPEED_ARGS = {
    "remote_device": "zero_optimization.offload_param.device", "offload_optimizer": "zero_optimization.offload_optimizer",
    "offload_parameters": "zero_optimization.offload_param", "offload_params_device": "zero_optimization.offload_param.device",
    "offload_optimizer_device": "zero_optimization.offload_optimizer.device", "nvme_path": "zero_optimization.offload_*.nvme_path",
    "params_buffer_count": "zero_optimization.offload_param.buffer_count",
    "params_buffer_size": "zero_optimization.offload_param.buffer_size", "max_in_cpu": "zero_optimization.offload_param.max_in_cpu",
    "optimizer_buffer_count": "zero_optimization.offload_optimizer.buffer_count", "pin_memory": "zero_optimization.offload_*.pin_memory",
    "sub_group_size": "zero_optimization.sub_group_size", "contiguous_gradients": "zero_optimization.contiguous_gradients",
    "overlap_comm": "zero_optimization.overlap_comm", "allgather_partitions": "zero_optimization.allgather_partitions",
    "reduce_scatter": "zero_optimization.reduce_scatter", "allgather_bucket_size": "zero_optimization.allgather_bucket_size",
    "reduce_bucket_size": "zero_optimization.reduce_bucket_size", "block_size": "aio.block_size", "queue_depth": "aio.queue_depth",
    "single_submit": "aio.single_submit", "overlap_events": "aio.overlap_events", "thread_count": "aio.thread_count",
    "logging_batch_size_per_gpu": "train_micro_batch_size_per_gpu", "partition_activations": "activation_checkpointing",
    "cpu_checkpointing": "activation_checkpointing", "contiguous_memory_optimization": "activation_checkpointing",
    "synchronize_checkpoint_boundary": "activation_checkpointing", "loss_scale": "fp16.loss_scale",
    "initial_scale_power": "fp16.initial_scale_power", "loss_scale_window": "fp16.loss_scale_window",
    "hysteresis": "fp16.hysteresis", "min_loss_scale": "fp16.min_loss_scale",
    "zero_allow_untested_optimizer": None, "logging_level": None, "load_full_weights": None,
    "exclude_frozen_parameters": None,
}
_FSDP_ARGS = ("sharding_strategy", "auto_wrap_policy", "cpu_offload", "mixed_precision", "activation_checkpointing_policy",
              "state_dict_type", "use_orig_params", "limit_all_gathers", "sync_module_states", "device_mesh")
_DDP_ARGS = ("find_unused_parameters", "static_graph", "ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper",
             "model_averaging_period", "gradient_as_bucket_view", "bucket_cap_mb", "broadcast_buffers")
_OWN_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size")


def _refuse_foreign(overrides: Mapping[str, Any]) -> None:
    for name, value in overrides.items():
        if name in _DEEPSPEED_ARGS:
            where = _DEEPSPEED_ARGS[name]
            hint = (f"set `{where}` in the config (config= or the `{where.split('.')[0]}=` override)" if where
                    else "it has no shardwise equivalent; remove it")
            raise UsageError(f"ShardwiseStrategy({name}=...) is an argument of Lightning's DeepSpeedStrategy; "
                             f"ShardwiseStrategy takes DeepSpeed config keys instead: {hint}.")
        if name in _FSDP_ARGS or (name == "activation_checkpointing" and not isinstance(value, dict)):
            raise UsageError(f"ShardwiseStrategy({name}=...) is an argument of Lightning's FSDPStrategy, not "
                             "supported here: shard with zero_optimization.stage and offload with "
                             "zero_optimization.offload_* in the DeepSpeed config.")
        if name in _DDP_ARGS or name in ("checkpoint_io", "precision_plugin"):
            raise UsageError(f"ShardwiseStrategy({name}=...) is not supported: the shardwise engine does the gradient "
                             "reduction, precision (Trainer(precision=...)) and checkpoint format itself.")
        if name == "zero_optimization" and not isinstance(value, dict):
            raise UsageError("ShardwiseStrategy(zero_optimization=...) must be a dict of DeepSpeed zero_optimization "
                             "keys (e.g. {'overlap_comm': True}); pick the stage with stage=.")


def _merge(base: dict, extra: Mapping[str, Any]) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def read_config(config: Any) -> dict:
    """``config=`` as a dict (a copy): ``None`` -> ``{}``, a path -> its JSON, a dict -> a deep copy."""
    if config is None:
        return {}
    if isinstance(config, (str, os.PathLike)):
        if not os.path.isfile(config):
            raise ConfigError(f"ShardwiseStrategy(config={str(config)!r}): no such file; pass a path to a DeepSpeed "
                              "JSON config or a dict")
        with open(config) as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{config}: not valid JSON ({exc})") from None
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    raise ConfigError(f"ShardwiseStrategy(config=...) must be a path or a dict; got {type(config).__name__}")


def _auto(value: Any) -> bool:
    return isinstance(value, str) and value == "auto"


def _set(cfg: dict, key: str, value: Any, what: str) -> None:
    """Fill ``cfg[key]`` with the Trainer's ``value`` unless the config says otherwise (a conflict)."""
    have = cfg.get(key)
    if have is None or _auto(have):
        cfg[key] = value
    elif have != value:
        raise ConfigError([ConfigProblem(key, f"the config says {have!r} but {what} gives {value!r}; remove it from "
                                         "the config (it is filled from the Trainer) or make the two agree")])


def _precision_section(cfg: dict, precision: str) -> None:
    want = {"32-true": None, "bf16-mixed": "bf16", "16-mixed": "fp16"}[precision]
    for section in ("bf16", "fp16"):
        sec = cfg.get(section)
        if sec is None:
            if section == want:
                cfg[section] = {"enabled": True}
            continue
        if not isinstance(sec, dict):
            continue  # shardwise's config check names the bad type
        enabled = sec.get("enabled", False)
        if _auto(enabled):
            sec["enabled"] = section == want
        elif bool(enabled) != (section == want):
            state = "enables" if enabled else "disables"
            raise ConfigError([ConfigProblem(
                f"{section}.enabled", f"the config {state} {section} but Trainer(precision={precision!r}) "
                f"{'asks for it' if section == want else 'does not'}; set Trainer(precision=...) to "
                f"{'bf16-mixed' if section == 'bf16' else '16-mixed'} for {section}, '32-true' for fp32, and leave "
                "the section out of the config (it is filled from the Trainer)")])


def fill_config(base: dict, *, stage: int | None, precision: str, accumulate: int, clip_val: float | None,
                micro_batch: int, world_size: int) -> dict:
    """The config ``shardwise.initialize`` gets: ``base`` with the Trainer's settings filled in.

    Unset or ``"auto"`` keys take the Trainer's value; a value the config sets differently is a
    :class:`ConfigError` (``gradient_clipping`` set in the config is kept when the Trainer has no
    ``gradient_clip_val``; unset in both, there is no clipping, as in Lightning).
    """
    cfg = copy.deepcopy(base)
    zero = cfg.setdefault("zero_optimization", {})
    if isinstance(zero, dict):
        have = zero.get("stage")
        if stage is not None and have is not None and have != stage:
            raise ConfigError([ConfigProblem("zero_optimization.stage", f"the config says {have} but the strategy "
                                             f"asks for stage {stage}; drop one of them")])
        zero["stage"] = stage if stage is not None else (2 if have is None else have)
    _set(cfg, "gradient_accumulation_steps", int(accumulate), f"Trainer(accumulate_grad_batches={accumulate})")
    _set(cfg, "train_micro_batch_size_per_gpu", int(micro_batch), "the train DataLoader's batch_size")
    if clip_val is not None and clip_val > 0:
        _set(cfg, "gradient_clipping", float(clip_val), f"Trainer(gradient_clip_val={clip_val})")
    elif cfg.get("gradient_clipping") is None or _auto(cfg.get("gradient_clipping")):
        cfg["gradient_clipping"] = 0.0
    _set(cfg, "train_batch_size", cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * world_size,
         f"micro batch x accumulation x {world_size} ranks")
    _precision_section(cfg, precision)
    return cfg


def precision_name(plugin: Any) -> str:
    """The Trainer's precision from the plugin Lightning built; anything shardwise cannot map is refused."""
    if plugin is None:
        return "32-true"
    if type(plugin) in (Precision, MixedPrecision, _ShardwisePrecision) and plugin.precision in PRECISIONS:
        return plugin.precision
    name = getattr(plugin, "precision", type(plugin).__name__)
    raise UsageError(f"ShardwiseStrategy does not support Trainer(precision={name!r}) / the {type(plugin).__name__} "
                     f"plugin: use one of {', '.join(PRECISIONS)}. The engine does mixed precision itself "
                     "(fp32 master weights), from the config's bf16 / fp16 section filled from the precision.")


class _ShardwisePrecision(Precision):
    """Lightning's precision plugin for the engine: no autocast or module conversion (the engine
    casts), backward and the optimizer step go to the engine, clipping is the engine's."""

    def __init__(self, precision: str = "32-true") -> None:
        self.precision = precision

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        if kwargs:
            raise UsageError(f"optimizer.step() arguments {sorted(kwargs)} are not supported by ShardwiseStrategy")
        result = closure()  # training_step + backward at the accumulation boundary
        self._after_closure(model, optimizer)  # on_before_optimizer_step hooks, configure_gradient_clipping
        if result is None:
            raise UsageError("training_step returned None (skip the batch) under ShardwiseStrategy: every rank must "
                             "run a backward before the step; return a loss (e.g. loss * 0 to skip its effect)")
        model.trainer.strategy.engine.step()

    def clip_gradients(self, optimizer: Any, clip_val: Any = 0.0, gradient_clip_algorithm: Any = None) -> None:
        """The engine clips by the config's ``gradient_clipping`` (filled from ``gradient_clip_val``)."""


class _EngineOptimizer(torch.optim.Optimizer):
    """What Lightning holds as the optimizer: the engine's optimizer's groups (for LR monitors and
    ``lr_schedulers``), ``zero_grad`` a no-op (the engine zeroes at its step), ``step`` refused
    (steps go through the strategy)."""

    def __init__(self, engine: Any) -> None:  # no super().__init__: nothing of its own to hold
        self._engine = engine
        self.defaults = dict(getattr(engine.optimizer, "defaults", {}))

    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return self._engine.optimizer.param_groups

    @property
    def state(self) -> dict:  # type: ignore[override]
        return {}  # the engine's (sharded, maybe offloaded) state is not for Lightning to move

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        raise UsageError("the optimizer is the shardwise engine's: call self.optimizers().step() only through "
                         "Lightning's automatic optimization (optimizer_step), which calls engine.step()")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"EngineOptimizer({type(self._engine.optimizer).__name__})"


def _loader_batch_size(trainer: "pl.Trainer") -> int:
    """The train DataLoader's batch size (1 if it cannot be told), read as Lightning's
    DeepSpeedStrategy reads it (a private attribute, guarded)."""
    try:
        source = trainer.fit_loop._data_source
        if source.is_defined():
            loader = source.dataloader()
            size = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
            if isinstance(size, int) and size > 0:
                return size
    except Exception:  # noqa: BLE001 - the batch size is only for the batch triangle's bookkeeping
        pass
    return 1


class ShardwiseStrategy(DDPStrategy):
    """Train a LightningModule with shardwise's ZeRO engine.

    ``stage``: ZeRO stage 0-3 (default: the config's ``zero_optimization.stage``, else 2).
    ``config``: a DeepSpeed JSON config (path or dict). ``**overrides``: top-level DeepSpeed config
    keys merged into it, e.g. ``zero_optimization={"offload_optimizer": {"device": "cpu"}}``.
    The launch arguments of ``DDPStrategy`` are accepted (``accelerator``, ``parallel_devices``,
    ``cluster_environment``, ``process_group_backend``, ``timeout``, ``start_method``).

    ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``, ``gradient_clipping``,
    ``train_batch_size`` and the ``bf16``/``fp16`` sections come from the Trainer (the loader's
    batch size, ``accumulate_grad_batches``, ``gradient_clip_val``, ``precision``); a config that
    sets them differently is a ``ConfigError``. ``strategy.engine`` is the shardwise engine after
    ``setup``.
    """

    strategy_name = "shardwise"

    def __init__(self, stage: int | None = None, config: Any = None, *, accelerator: Any = None,
                 parallel_devices: Any = None, cluster_environment: Any = None, process_group_backend: str | None = None,
                 timeout: Any = None, start_method: str = "popen", **overrides: Any) -> None:
        _refuse_foreign(overrides)
        if stage is not None and stage not in (0, 1, 2, 3):
            raise ConfigError(f"ShardwiseStrategy(stage={stage!r}): ZeRO stage must be 0, 1, 2 or 3")
        extra: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, process_group_backend=process_group_backend,
                         start_method=start_method, **extra)
        self.stage = stage
        self.config = _merge(read_config(config), overrides)
        self._check_early()
        self.engine: Any = None
        self._accumulating = False
        self._engine_setup: tuple | None = None  # (optimizers, lr_scheduler_configs) of the engine

    def _check_early(self) -> None:
        """The config's own problems (unknown keys, bad values) before any process starts."""
        from shardwise.config import parse_config

        probe = copy.deepcopy(self.config)
        for key in _OWN_KEYS:
            if _auto(probe.get(key)):
                del probe[key]
        for section in ("bf16", "fp16"):
            if isinstance(probe.get(section), dict) and _auto(probe[section].get("enabled")):
                probe[section]["enabled"] = False
        if self.stage is not None and isinstance(probe.get("zero_optimization"), dict):
            probe["zero_optimization"].setdefault("stage", self.stage)
        parse_config(probe)

    # -- precision: Lightning's plugin becomes the engine's -----------------------------------
    @property
    def precision_plugin(self) -> Precision:  # type: ignore[override]
        return self.__dict__.get("_sw_precision") or _ShardwisePrecision()

    @precision_plugin.setter
    def precision_plugin(self, plugin: Any) -> None:
        self.__dict__["_sw_precision"] = _ShardwisePrecision(precision_name(plugin))

    # -- setup -------------------------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer") -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        lm = self.lightning_module
        if trainer.state.fn != TrainerFn.FITTING:
            raise UsageError(f"Trainer.{trainer.state.fn.value}() is not supported by ShardwiseStrategy yet (only fit(); "
                             "validation inside fit() works). Export the weights (engine.save_16bit_model) and "
                             "run it with strategy='ddp' or on one device.")
        if self.engine is not None and self.engine.module is lm:  # a second fit() with the same module
            self.model = self.engine
            self.optimizers, self.lr_scheduler_configs = self._engine_setup
            return
        self._refuse_unsupported(trainer, lm)
        cfg = fill_config(self.config, stage=self.stage, precision=self.precision_plugin.precision,
                          accumulate=trainer.accumulate_grad_batches, clip_val=trainer.gradient_clip_val,
                          micro_batch=_loader_batch_size(trainer), world_size=self.world_size)
        optimizer = None
        if cfg.get("optimizer") is None:
            super(DDPStrategy, self).setup_optimizers(trainer)  # Strategy's: configure_optimizers, validated
            if len(self.optimizers) != 1:
                raise UsageError(f"configure_optimizers returned {len(self.optimizers)} optimizers; ShardwiseStrategy "
                                 "trains with one (or add an `optimizer` section to the config)")
            optimizer = self.optimizers[0]
            if type(optimizer).__name__ == "_MockOptimizer":
                raise ConfigError("no optimizer: configure_optimizers returned None and the config has no "
                                  "`optimizer` section; return an optimizer or add the section")
        else:
            self.lr_scheduler_configs = []
        self._check_device()
        engine, _, _, _ = shardwise.initialize(model=lm, optimizer=optimizer, config=cfg)
        self.engine = engine
        self.model = engine
        self.optimizers = [_EngineOptimizer(engine)]
        self._engine_setup = (self.optimizers, self.lr_scheduler_configs)

    def setup_optimizers(self, trainer: "pl.Trainer") -> None:
        """Done in ``setup`` (the engine takes the optimizer)."""

    def _refuse_unsupported(self, trainer: "pl.Trainer", lm: Any) -> None:
        if not lm.automatic_optimization:
            raise UsageError("manual optimization (automatic_optimization = False) is not supported by "
                             "ShardwiseStrategy: the engine must see every backward and step; use automatic "
                             "optimization (return the loss from training_step)")
        if trainer.gradient_clip_algorithm is not None and str(trainer.gradient_clip_algorithm).lower().endswith("value") \
                and trainer.gradient_clip_val:
            raise ConfigError("Trainer(gradient_clip_algorithm='value') is not supported: shardwise clips by the global "
                              "gradient norm (gradient_clipping); use gradient_clip_algorithm='norm'")
        if self._layer_sync is not None:
            raise UsageError("Trainer(sync_batchnorm=True) is not supported by ShardwiseStrategy")
        if is_overridden("backward", lm, pl.LightningModule):
            rank_zero_warn("LightningModule.backward is overridden but ShardwiseStrategy ignores it: the engine runs "
                           "the backward (engine.backward)")
        if is_overridden("configure_gradient_clipping", lm, pl.LightningModule):
            rank_zero_warn("LightningModule.configure_gradient_clipping is overridden but clipping is the engine's "
                           "(Trainer(gradient_clip_val=...) -> gradient_clipping); the hook runs without effect")

    def _check_device(self) -> None:
        import torch.distributed as dist

        from shardwise.comm.context import pick_device

        if not dist.is_initialized():
            return
        device, _ = pick_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())), backend=str(dist.get_backend()))
        if device != self.root_device and not (device.type == self.root_device.type == "cpu"):
            raise UsageError(f"Lightning placed this rank on {self.root_device} but shardwise uses {device} (local rank "
                             "-> device, as torchrun does). Select GPUs with CUDA_VISIBLE_DEVICES and "
                             "Trainer(devices=N) instead of a list of device indices.")

    def model_to_device(self) -> None:
        if self.engine is None:
            super().model_to_device()

    # -- the training step ---------------------------------------------------------------------
    @contextlib.contextmanager
    def block_backward_sync(self):
        """Lightning runs an accumulating (non-stepping) micro-batch inside this."""
        self._accumulating = True
        try:
            yield None
        finally:
            self._accumulating = False

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        engine = self.engine
        if engine is None:
            raise UsageError("ShardwiseStrategy.backward before setup(): the engine is built in Trainer.fit()")
        if args or set(kwargs) - {"retain_graph"}:
            raise UsageError(f"backward arguments {list(args) + sorted(kwargs)} are not supported by ShardwiseStrategy "
                             "(only retain_graph)")
        lm = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, lm)
        boundary = not self._accumulating
        engine.set_gradient_accumulation_boundary(boundary)
        # Lightning divided the loss by accumulate_grad_batches already
        engine.backward(closure_loss, retain_graph=bool(kwargs.get("retain_graph", False)), scale_wrt_gas=False)
        if not boundary:
            engine.step()  # counts the micro-step; the optimizer steps at the boundary (optimizer_step)
        return self.precision_plugin.post_backward(closure_loss, lm)

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        model = model or self.lightning_module
        return self.precision_plugin.optimizer_step(optimizer, model=model, closure=closure, **kwargs)

    # -- checkpoints -----------------------------------------------------------------------------
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the engine must exist to load into

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # the engine's checkpoint holds the optimizer

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Empty: the weights are saved by the engine (sharded at stages 1-3), not in Lightning's dict."""
        return {}

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        return {}

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
        """``filepath`` becomes a shardwise checkpoint directory (``<filepath>/checkpoint``, ``latest``);
        Lightning's state without the weights and optimizer is its ``client_state``. Every rank."""
        if storage_options is not None:
            raise UsageError("Trainer.save_checkpoint(storage_options=...) is not supported by ShardwiseStrategy "
                             "(checkpoints are shardwise directories, not CheckpointIO files)")
        engine = self._require_engine("save_checkpoint")
        filepath = self.broadcast(os.fspath(filepath))
        client = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        engine.save_checkpoint(filepath, tag=TAG, client_state=client)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        engine = self._require_engine("load_checkpoint")
        from shardwise.checkpoint import manifest as M

        path = os.fspath(checkpoint_path)
        if not os.path.isdir(path):
            raise CheckpointError(f"{path} is not a shardwise checkpoint directory (one written by "
                                  "trainer.save_checkpoint under ShardwiseStrategy). To start from a Lightning .ckpt "
                                  "file, load its ['state_dict'] into the module before fit() and leave ckpt_path unset.")
        tag = None
        if not os.path.exists(os.path.join(path, M.LATEST)) and os.path.exists(os.path.join(path, M.MANIFEST)):
            path, tag = os.path.split(os.path.normpath(path))  # the tag directory itself was given
        lm = self.lightning_module
        _, client = engine.load_checkpoint(path, tag=tag, load_module_strict=bool(getattr(lm, "strict_loading", True)))
        if client is None:
            raise CheckpointError(f"{path} holds no shardwise checkpoint (no `{M.LATEST}` file and no tag directory)")
        if not isinstance(client, dict) or "loops" not in client:
            raise CheckpointError(f"{path} is a shardwise checkpoint but not one written through Lightning (its "
                                  "client_state has no Lightning loop state); load it with engine.load_checkpoint")
        return dict(client)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """No-op: ``load_checkpoint`` loaded the weights into the engine."""

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """No-op: ``load_checkpoint`` loaded the optimizer into the engine."""

    def _require_engine(self, what: str) -> Any:
        if self.engine is None:
            raise UsageError(f"ShardwiseStrategy.{what} needs the engine, which Trainer.fit() builds; call it during "
                             "or after fit()")
        return self.engine

    # -- teardown --------------------------------------------------------------------------------
    def teardown(self) -> None:
        """Lightning's teardown without moving the module or optimizer to the CPU (their storage is
        the engine's). The engine stays alive: ``trainer.save_checkpoint`` after ``fit`` works;
        ``engine.destroy()`` runs at interpreter exit (or call it yourself)."""
        self.precision_plugin.teardown()
        if self.accelerator is not None:
            self.accelerator.teardown()
        self.checkpoint_io.teardown()
        if self.cluster_environment is not None:
            self.cluster_environment.teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        entries = [("shardwise", None, "shardwise ZeRO (stage from the config, default 2)")]
        entries += [(f"shardwise_stage_{s}", s, f"shardwise ZeRO stage {s}") for s in (1, 2, 3)]
        for name, stage, description in entries:
            params = {} if stage is None else {"stage": stage}
            # override: a re-import (importlib.reload) registers the same names again
            strategy_registry.register(name, cls, description=description, override=True, **params)


ShardwiseStrategy.register_strategies(StrategyRegistry)

__all__ = ["ShardwiseStrategy", "fill_config", "read_config", "precision_name", "TESTED", "PRECISIONS"]
