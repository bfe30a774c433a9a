"""The Hugging Face ``Trainer`` on shardwise: ``ShardwiseTrainer(..., shardwise_config="ds.json")``.

Tested with transformers 5.24.0 and accelerate 1.15.0 (see ``TESTED``).

[Note: the Trainer seam]
transformers drives DeepSpeed through Accelerate: ``TrainingArguments(deepspeed=...)`` makes
Accelerate's state a DeepSpeed one (it imports ``deepspeed`` while the arguments are built),
and ``accelerator.prepare`` / ``accelerator.backward`` then call into the DeepSpeed engine. An
Accelerate hook for shardwise would have to impersonate that whole DeepSpeed state
(``DistributedType.DEEPSPEED``, its plugin, ``deepspeed`` imports), so this module uses a
``Trainer`` subclass instead and leaves Accelerate in its ordinary multi-process mode, where it
still shards the data loader and counts tokens across ranks. ``ShardwiseTrainer`` overrides:

- ``_prepare_for_training`` (private: the one place where the Trainer builds its optimizer
  and scheduler and hands the model to ``accelerator.prepare``, which would wrap it in DDP):
  here the ``"auto"`` values are filled (hf_config.py), and ``shardwise.initialize`` gets the
  model, the Trainer's optimizer and scheduler (when the config has no such section) and the
  config; it returns an engine, and the training loop gets a view of it (``_EngineModel``);
- ``training_step`` (public override point): the loss the Trainer computes (already scaled
  for gradient accumulation, as the Trainer does for DeepSpeed) goes to ``engine.backward``
  without a second 1/accumulation scaling, then ``engine.step()`` (which steps only at the
  accumulation boundary, clipping by ``gradient_clipping``);
- the loop's own ``optimizer.step()``, ``lr_scheduler.step()``, ``model.zero_grad()`` and
  gradient clipping become no-ops (``_EngineOptimizer``, ``_EngineScheduler``, ``_clip_grad_norm``);
  the logged learning rate and grad norm are the engine's;
- saving and resuming: ``save_model`` gathers the whole state dict (every rank) and rank 0
  writes it with ``save_pretrained``; ``checkpoint-N/`` holds a shardwise checkpoint
  (``engine.save_checkpoint``) next to the Trainer's files, and ``train(resume_from_checkpoint=)``
  loads it into the engine (``engine.load_checkpoint``).

The private method is the fragile part: ``__init__`` checks that it exists with the expected
parameters, and ``training_step`` refuses to run without an engine, so a transformers release
that routes around it fails loudly instead of training with plain DDP.

Build a stage-3 model sharded from the start with :func:`from_pretrained` (or ``with
shardwise.zero.Init(): AutoModel...from_pretrained(...)``) and pass it as ``model=``.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Iterator

import torch
import torch.nn as nn

import shardwise
import shardwise.zero
from shardwise.errors import ConfigError, UsageError
from shardwise.integrations.hf_config import fill_from_trainer, read_config, zero_stage

try:  # a clear message instead of a bare ModuleNotFoundError
    import transformers
    from transformers import Trainer, TrainingArguments
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("shardwise.integrations.hf needs transformers and accelerate: "
                      "pip install 'shardwise[hf]'") from exc

from dataclasses import dataclass, field

TESTED = {"transformers": "5.24.0", "accelerate": "1.15.0"}


@dataclass
class ShardwiseTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus ``shardwise_config``, so that a command line with
    ``HfArgumentParser`` takes ``--shardwise_config ds.json`` where it took ``--deepspeed``."""

    shardwise_config: str | None = field(
        default=None, metadata={"help": "a DeepSpeed-format JSON config for shardwise (path)"})


# -- what the training loop sees instead of the model / optimizer / scheduler ---------------------


class _EngineModel:
    """The Trainer loop's ``model``: calls run the engine's forward; ``zero_grad`` is a no-op
    (the engine zeroes at its step); other attributes are the module's. Deliberately not an
    ``nn.Module`` and without ``no_sync`` (Accelerate then uses no DDP context)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.module = engine.module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def train(self, mode: bool = True) -> "_EngineModel":
        self.engine.train(mode)
        return self

    def eval(self) -> "_EngineModel":
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self.module.parameters(recurse)

    def named_parameters(self, *args: Any, **kwargs: Any):
        return self.module.named_parameters(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in ("engine", "module", "no_sync"):
            raise AttributeError(name)
        return getattr(self.module, name)


class _EngineOptimizer:
    """``trainer.optimizer``: the engine's optimizer, except that ``step``/``zero_grad`` are
    no-ops (``engine.step()`` already did them at the boundary)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.optimizer = engine.optimizer

    def step(self, closure: Any = None) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def __getattr__(self, name: str) -> Any:
        if name in ("engine", "optimizer"):
            raise AttributeError(name)
        return getattr(self.optimizer, name)


class _EngineScheduler:
    """``trainer.lr_scheduler``: the engine steps the real one; ``step`` here is a no-op."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.scheduler = engine.lr_scheduler

    def step(self, *args: Any, **kwargs: Any) -> None:
        pass

    def get_last_lr(self) -> list[float]:
        return list(self.engine.get_lr())

    def __getattr__(self, name: str) -> Any:
        if name in ("engine", "scheduler") or self.scheduler is None:
            raise AttributeError(name)
        return getattr(self.scheduler, name)


# -- refusals ----------------------------------------------------------------------------------------


def _refusals(args: TrainingArguments) -> list[str]:
    """Trainer features that cannot work with a shardwise engine: what, and the alternative."""
    out = []

    def no(flag: str, alternative: str) -> None:
        out.append(f"TrainingArguments.{flag}: {alternative}")

    if getattr(args, "deepspeed", None):
        no("deepspeed", "pass the config as ShardwiseTrainer(shardwise_config=...) instead (transformers "
                        "would start DeepSpeed itself)")
    if getattr(args, "fsdp", None):
        no("fsdp", "shardwise shards with ZeRO from the config; remove fsdp/fsdp_config (stage 3 is FSDP's "
                   "full sharding)")
    if getattr(args, "torch_compile", False):
        no("torch_compile", 'set torch_compile=False and use the config\'s "compile": {"enabled": true} section '
           "(it compiles each block with ZeRO's hooks in place; torch_compile_backend/mode are its "
           "backend/mode keys)")
    if getattr(args, "auto_find_batch_size", False):
        no("auto_find_batch_size", "shardwise fixes the batch at initialize(); set per_device_train_batch_size")
    for flag in ("gradient_checkpointing", "activation_checkpointing"):
        if getattr(args, flag, False):
            no(flag, 'use the config\'s "activation_checkpointing": {"modules": "blocks"} section instead (it '
                     "composes with ZeRO stage 3)")
    if getattr(args, "save_on_each_node", False):
        no("save_on_each_node", "shardwise checkpoints and save_model assume storage every rank can see; "
                                "set save_on_each_node=False")
    if getattr(args, "parallelism_config", None) is not None:
        no("parallelism_config", "tensor/context/sequence parallelism are not supported by shardwise yet")
    for flag in ("fp16_full_eval", "bf16_full_eval"):
        if getattr(args, flag, False):
            no(flag, "evaluation runs in the engine's dtype; enable fp16/bf16 in the config instead")
    if getattr(args, "n_gpu", 1) > 1:
        no("n_gpu", "DataParallel over several GPUs in one process is not supported; launch one process "
                    "per device (torchrun or `shardwise run`)")
    return out


def _check_trainer_version() -> None:
    prepare = getattr(Trainer, "_prepare_for_training", None)
    params = list(inspect.signature(prepare).parameters) if prepare is not None else []
    if params[:4] != ["self", "max_steps", "train_dataloader", "resume_from_checkpoint"]:
        raise UsageError(
            f"shardwise.integrations.hf does not support transformers {transformers.__version__}: its Trainer "
            "has no _prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint), the method "
            f"ShardwiseTrainer replaces. Install the tested version: pip install "
            f"'transformers=={TESTED['transformers']}' 'accelerate=={TESTED['accelerate']}'")


# -- the trainer --------------------------------------------------------------------------------------


class ShardwiseTrainer(Trainer):
    """``transformers.Trainer`` that trains through a shardwise engine (ZeRO stages 0-3, offload).

    ``shardwise_config``: a DeepSpeed-format config, path or dict (default:
    ``args.shardwise_config`` of :class:`ShardwiseTrainingArguments`). ``"auto"`` values are
    filled from the ``TrainingArguments`` (see hf_config.py). Without an ``optimizer`` section
    the Trainer's own optimizer (``args.optim``, AdamW by default, or ``optimizers=``) is used;
    without a ``scheduler`` section, the Trainer's (``args.lr_scheduler_type``). Every other
    argument is the Trainer's. After ``train()``, ``trainer.engine`` is the engine.
    """

    def __init__(self, *args: Any, shardwise_config: Any = None, **kwargs: Any):
        _check_trainer_version()
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if shardwise_config is None:
            shardwise_config = getattr(targs, "shardwise_config", None)
        if shardwise_config is None:
            raise UsageError("ShardwiseTrainer needs shardwise_config= (a path to a DeepSpeed-format JSON "
                             "config or a dict), or ShardwiseTrainingArguments(shardwise_config=...)")
        if targs is not None:
            refused = _refusals(targs)
            if refused:
                raise UsageError("ShardwiseTrainer cannot honour these TrainingArguments:\n  - "
                                 + "\n  - ".join(refused))
        self.shardwise_config: dict = read_config(shardwise_config)
        self.engine: Any = None
        self._lr_of_last_step: float | None = None
        super().__init__(*args, **kwargs)

    # -- the model stays where it is: shardwise.initialize places (and shards) it -------------------
    def _move_model_to_device(self, model: nn.Module, device: torch.device) -> None:
        pass

    # -- building the engine ------------------------------------------------------------------------
    def resolved_config(self, num_training_steps: int) -> dict:
        """The config with every ``"auto"`` filled for a run of ``num_training_steps`` steps."""
        return fill_from_trainer(self.shardwise_config, self.args, world_size=self.args.world_size,
                                 model=self.model, num_training_steps=num_training_steps)

    def _build_engine(self, max_steps: int) -> Any:
        if self.engine is not None and self.engine.module is self.model:
            raise UsageError(
                "train() was already called on this ShardwiseTrainer with this model: its parameters now "
                "live in the first engine. Create a new ShardwiseTrainer with a freshly built model (and "
                "resume_from_checkpoint= to continue), or pass model_init= so train() builds a new one.")
        if self._created_lr_scheduler:  # as Trainer: a scheduler it made belongs to one run
            self.lr_scheduler, self._created_lr_scheduler = None, False
        config = self.resolved_config(max_steps)
        optimizer = None if "optimizer" in config else self.create_optimizer()
        if "scheduler" in config or self.lr_scheduler is not None:
            scheduler = self.lr_scheduler  # None: the config's; given: initialize names the clash
        else:
            def scheduler(opt: torch.optim.Optimizer) -> Any:
                return self.create_scheduler(num_training_steps=max_steps, optimizer=opt)
        engine, _, _, _ = shardwise.initialize(model=self.model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=config)
        self.engine = engine
        self.optimizer = _EngineOptimizer(engine)
        self.lr_scheduler = _EngineScheduler(engine)
        return engine

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: Any):
        """Replaces the Trainer's (see [Note: the Trainer seam]): engine instead of accelerate.prepare."""
        engine = self._build_engine(max_steps)
        model = _EngineModel(engine)
        self.model_wrapped = model
        if resume_from_checkpoint is not None:
            self._load_engine_checkpoint(resume_from_checkpoint)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        self.callback_handler.train_dataloader = train_dataloader
        return model, train_dataloader

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader: Any = None) -> Any:
        """Evaluation and prediction run through the engine once there is one (at stage 3 the
        forward gathers the shards); before ``train()`` a sharded model cannot run."""
        if self.engine is not None:
            return self.model_wrapped
        from shardwise.zero.sharded_params import ShardedParameter

        if any(isinstance(p, ShardedParameter) for p in model.parameters()):
            raise UsageError("this model was built sharded (shardwise.zero.Init); ShardwiseTrainer builds the "
                             "engine that runs it in train(). Call train() before evaluate()/predict().")
        return super()._wrap_model(model, training, dataloader)

    # -- one micro-step -----------------------------------------------------------------------------
    def _loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def _align_boundary(self, engine: Any) -> None:
        """The Trainer's boundary is the engine's: it ends a window early at the end of an epoch
        whose batch count is not a multiple of the accumulation (as Accelerate does for DeepSpeed)."""
        engine.set_gradient_accumulation_boundary(bool(self.accelerator.gradient_state.sync_gradients))

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        engine = self.engine
        if engine is None or not isinstance(model, _EngineModel):
            raise UsageError("ShardwiseTrainer.training_step ran without its shardwise engine: this transformers "
                             f"version ({transformers.__version__}) did not call _prepare_for_training. Tested: "
                             f"transformers=={TESTED['transformers']}.")
        self._align_boundary(engine)  # before the forward, as DeepSpeed asks
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        del inputs
        if not self._loss_scaled_for_ga(num_items_in_batch):
            loss = loss / self.current_gradient_accumulation_steps
        at_boundary = engine.is_gradient_accumulation_boundary()
        lr = engine.get_lr()[0]  # the rate this step applies (the engine steps the scheduler after)
        # the Trainer's loss is already scaled for accumulation: no second 1/gas
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        if at_boundary:
            self._lr_of_last_step = lr
        return loss.detach()

    def _clip_grad_norm(self, model: Any) -> Any:
        return self._get_grad_norm(model)  # clipped by the engine (gradient_clipping)

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        return self.engine.get_global_grad_norm() if self.engine is not None else grad_norm

    def _get_learning_rate(self) -> float:
        if self.engine is None:
            return super()._get_learning_rate()
        return self._lr_of_last_step if self._lr_of_last_step is not None else self.engine.get_lr()[0]

    # -- saving ---------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The whole model in Hugging Face layout (``save_pretrained``: config.json and safetensors,
        tied weights once), gathered from the shards; call on every rank (the Trainer does)."""
        if self.engine is None:
            return super().save_model(output_dir, _internal_call)
        from shardwise.checkpoint.model_file import whole_state_dict
        from shardwise.comm.collectives import barrier

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state = whole_state_dict(self.engine.module, self.engine.ctx)  # collective; rank 0 holds it
        if self.args.should_save:
            self._save(output_dir, state_dict=state)
        barrier(self.engine.ctx.world)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """A shardwise checkpoint (model, optimizer, scheduler, counters) under ``output_dir``."""
        self.engine.save_checkpoint(output_dir)

    def _save_scaler(self, output_dir: str) -> None:
        pass  # the loss scaler is in the shardwise checkpoint

    # -- resuming --------------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        pass  # the weights come with the shardwise checkpoint, after initialize (_prepare_for_training)

    def _load_engine_checkpoint(self, checkpoint: str) -> None:
        from shardwise.checkpoint import committed_tags
        from shardwise.checkpoint import manifest as M

        if not (os.path.isfile(os.path.join(checkpoint, M.LATEST)) or committed_tags(checkpoint)):
            raise UsageError(
                f"{checkpoint} holds no shardwise checkpoint (no '{M.LATEST}' file): it was written by a plain "
                "Trainer or with save_only_model=True. To start from its weights, load them into the model "
                "(from_pretrained) and train without resume_from_checkpoint.")
        self.engine.load_checkpoint(checkpoint)
        if self.engine.global_steps != self.state.global_step:
            raise UsageError(
                f"{checkpoint}: the shardwise checkpoint is at step {self.engine.global_steps} but "
                f"trainer_state.json at step {self.state.global_step}; the directory mixes two runs.")

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if self.engine is None or best is None:
            return super()._load_best_model()
        self.engine.load_checkpoint(best, load_module_only=True)


# -- building a model ---------------------------------------------------------------------------------


def from_pretrained(name_or_path: str | os.PathLike, shardwise_config: Any, *, auto_class: Any = None,
                    **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` (or ``auto_class``), built under
    ``shardwise.zero.Init`` when the config is ZeRO stage 3: every rank loads only its shards,
    none holds the whole model. Call on every rank; pass the result as ``ShardwiseTrainer(model=...)``."""
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class
    stage = zero_stage(read_config(shardwise_config))
    if stage == 3 and kwargs.get("device_map") is not None:
        raise ConfigError("from_pretrained(device_map=...) cannot be combined with ZeRO stage 3: shardwise places "
                          "the shards; remove device_map")
    with shardwise.zero.Init(enabled=stage == 3):
        return auto_class.from_pretrained(name_or_path, **kwargs)


__all__ = ["ShardwiseTrainer", "ShardwiseTrainingArguments", "from_pretrained", "TESTED"]
