"""The training engine: counts micro-steps and delegates to the strategy picked at init.

DeepSpeed's names and meaning: ``engine(batch)`` runs the forward, ``backward(loss)`` scales the
loss by ``loss_scale / (gradient_accumulation_steps * dp_size)`` and runs autograd (reductions overlap it),
``step()`` acts only at the accumulation boundary: optimizer step, LR-scheduler step, zeroed
gradients. ``loss.backward()`` on the engine's output works too ([Note: direct backward]), and
so do several backward passes per step. Observers (monitors, profilers, timers) are called at
fixed points ([Note: observers]); the engine tests no config flag.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.nn as nn

from shardwise.comm.context import ParallelContext
from shardwise.config.plan import Plan
from shardwise.comm.collectives import all_gather_object
from shardwise.direct_backward import DirectBackward
from shardwise.errors import NonFiniteError, UsageError
from shardwise.observers import Observers, StepRecord
from shardwise.precision.policy import prepare_inputs
from shardwise.strategy import Strategy

log = logging.getLogger("shardwise")


class Engine:
    def __init__(
        self,
        module: nn.Module,
        strategy: Strategy,
        plan: Plan,
        ctx: ParallelContext,
        lr_scheduler: Any = None,
        observers: Observers | None = None,
    ):
        self.module = module
        self.strategy = strategy
        self.optimizer = strategy.optimizer
        self.lr_scheduler = lr_scheduler
        self.plan = plan
        self.ctx = ctx  # the strategy's own context (engine.ctx is engine.strategy.ctx)
        self.device = ctx.device
        self.observers = observers if observers is not None else Observers([])
        # DeepSpeed's names: global_rank / world_size are the job's, local_rank this node's
        self.global_rank, self.world_size, self.local_rank = ctx.rank, ctx.world_size, ctx.local_rank
        self.dp_world_size = ctx.dp.size
        self.micro_steps = 0
        self.global_steps = 0
        self.global_samples = 0
        self.skipped_steps = 0
        self._step_applied = False
        self._grad_norm: float | None = None
        self._loss_finite: torch.Tensor | None = None  # this rank's losses since the last step
        self._backward_since_step = False  # a backward ran since the last engine.step()
        self._boundary_override: bool | None = None  # set_gradient_accumulation_boundary
        self._no_sync = False
        self._direct = DirectBackward(self._direct_begin, self._direct_end)
        self._direct_sync = False
        self.training_dataloader = None  # set by initialize(training_data=...); checkpointed

    def __getattr__(self, name: str) -> Any:
        # DeepSpeed passes unknown attributes to the module (engine.generate, engine.config)
        module = self.__dict__.get("module")
        if module is None or name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(module, name)
        except AttributeError:
            raise AttributeError(f"neither the shardwise Engine nor its {type(module).__name__} module has an "
                                 f"attribute {name!r}") from None

    # -- batch triangle -------------------------------------------------------------------
    def train_batch_size(self) -> int:
        return self.plan.batch.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.plan.batch.micro_batch_size

    def gradient_accumulation_steps(self) -> int:
        return self.plan.batch.gradient_accumulation_steps

    def is_gradient_accumulation_boundary(self) -> bool:
        if self._boundary_override is not None:
            return self._boundary_override
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        """DeepSpeed's manual override: the next ``step()`` steps the optimizer if and only if
        ``is_boundary`` (until set again; ``None`` goes back to counting micro-steps)."""
        self._boundary_override = None if is_boundary is None else bool(is_boundary)

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside skip the gradient reduction (DeepSpeed / DDP's ``no_sync``);
        the next ``step()`` at a boundary reduces everything. Stages 0-1 only: at stages 2-3
        gradients are partitioned as they are produced, so there is nothing to defer."""
        if self.strategy.stage >= 2:
            raise UsageError(f"engine.no_sync() is not possible at ZeRO stage {self.strategy.stage}: gradients "
                             "are reduced to their owners as backward produces them. Use "
                             "gradient_accumulation_steps to accumulate micro-batches instead.")
        self._no_sync = True
        try:
            yield
        finally:
            self._no_sync = False

    def _sync(self) -> bool:
        return self.is_gradient_accumulation_boundary() and not self._no_sync

    # -- the training step ----------------------------------------------------------------
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        inputs = prepare_inputs(inputs, self.device, self.strategy.dtype)
        kwargs = prepare_inputs(kwargs, self.device, self.strategy.dtype)
        self.observers.forward_begin(inputs, kwargs)
        out = self.module(*inputs, **kwargs)
        self.observers.forward_end(out)
        return self._direct.watch(out)

    __call__ = forward

    def _factor(self, scale_wrt_gas: bool = True) -> float:
        return self.strategy.backward_scale / (self.gradient_accumulation_steps() if scale_wrt_gas else 1)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> torch.Tensor:
        """Scale ``loss`` and run autograd with the reductions overlapped. ``scale_wrt_gas``
        (DeepSpeed's): divide by ``gradient_accumulation_steps``; false leaves that to the
        caller (the Hugging Face Trainer divides its loss itself). May be called several
        times per step: gradients add up, as with ``loss.backward()``."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise UsageError(
                "engine.backward(loss) needs a scalar loss tensor; got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}."
            )
        sync = self._sync()
        self.observers.backward_begin(loss)
        self.strategy.before_backward(sync)
        # [Note: non-finite loss] a NaN/inf loss on one rank must stop (or skip) the step on
        # every rank even when its gradients are finite (e.g. `loss + nan`): the loss is then
        # multiplied by NaN instead of the scale, so this rank's gradients become NaN, the
        # reduction spreads them, and the step's agreed gradient norm is not finite. No host
        # sync: the choice is a torch.where on the device.
        loss32 = loss.float()
        finite = torch.isfinite(loss32.detach())
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        factor = torch.where(finite, torch.tensor(self._factor(scale_wrt_gas), dtype=torch.float32,
                                                  device=loss32.device),
                             torch.tensor(float("nan"), dtype=torch.float32, device=loss32.device))
        self._direct.managed = True
        try:
            (loss32 * factor).backward(retain_graph=retain_graph)
        finally:
            self._direct.managed = False
        self.strategy.after_backward(sync)
        self._backward_since_step = True
        self.observers.backward_end()
        return loss

    def _direct_begin(self) -> float:  # [Note: direct backward]
        self._direct_sync = self._sync()
        self.observers.backward_begin(None)
        self.strategy.before_backward(self._direct_sync)
        return self._factor()

    def _direct_end(self) -> None:
        self.strategy.after_backward(self._direct_sync)
        self._backward_since_step = True
        self.observers.backward_end()

    def step(self, lr_kwargs: dict | None = None) -> None:
        """At the accumulation boundary: the optimizer step, then the LR scheduler's
        (``lr_kwargs`` are passed to its ``step``, as DeepSpeed does); otherwise count the
        micro-step."""
        if self._no_sync and self.is_gradient_accumulation_boundary():
            raise UsageError("engine.step() at an accumulation boundary inside engine.no_sync(): leave the "
                             "no_sync() block first, so that the gradients are reduced before the step")
        if not self._backward_since_step:
            # a backward outside the engine's forward (engine.module(x).backward()) would train
            # silently wrong: no loss scale or 1/world averaging, and reductions still pending
            # (every rank runs the same code, so every rank gets here and discards alike)
            self.strategy.discard_gradients()
            self._loss_finite = None
            raise UsageError(
                f"engine.step() at micro-step {self.micro_steps} without a backward since the previous "
                "step. Call engine.backward(loss), or loss.backward() on a loss computed from the "
                "engine's output (engine(batch), not engine.module(batch)): either scales and "
                "averages the gradients and completes their reductions. The gradients gathered "
                "so far were discarded and no step was taken.")
        self._backward_since_step = False
        if not self.is_gradient_accumulation_boundary():
            self.micro_steps += 1
            return
        self.observers.step_begin()
        try:
            result = self.strategy.step(self.global_steps)
        except NonFiniteError as exc:  # raised on every rank together: safe to gather
            raise NonFiniteError(f"{exc} {self._nonfinite_ranks()}") from None
        finally:
            losses_finite, self._loss_finite = self._loss_finite, None
        self._step_applied = result.applied
        self._grad_norm = result.grad_norm
        lr = tuple(self.get_lr())
        if result.applied:
            if self.lr_scheduler is not None:
                self.lr_scheduler.step(**(lr_kwargs or {}))
        else:
            self.skipped_steps += 1
            if losses_finite is not None and not bool(losses_finite):
                log.warning("rank %d: step %d skipped: this rank's loss was NaN/inf (skipped "
                            "so far: %d)", self.ctx.rank, self.global_steps, self.skipped_steps)
        self.global_steps += 1
        self.global_samples += self.train_batch_size()
        self.micro_steps += 1
        self.observers.step_end(StepRecord(
            step=self.global_steps, samples=self.global_samples, micro_steps=self.micro_steps, lr=lr,
            loss_scale=self.strategy.loss_scale, grad_norm=result.grad_norm, applied=result.applied,
            skipped_steps=self.skipped_steps, train_batch_size=self.train_batch_size(),
            memory_report=self.memory_report))
        self._report()
        if self.global_steps == 1 and self.ctx.rank == 0:
            from shardwise.compile import log_first_step

            log_first_step(self.module)
        self._autosave()

    def _nonfinite_ranks(self) -> str:
        # raised together on the ranks of one data-parallel group (their norm is agreed over it)
        dp = self.ctx.dp
        flags = all_gather_object(self._loss_finite is None or bool(self._loss_finite), dp)
        bad = [dp.global_rank(r) for r, ok in enumerate(flags) if not ok]
        if bad:
            return f"The loss was NaN/inf on rank(s) {bad}."
        return "The loss was finite on every rank: the gradients overflowed."

    def _autosave(self) -> None:
        ck = self.plan.checkpoint
        if ck.save_interval and ck.dir and self.global_steps % ck.save_interval == 0:
            self.save_checkpoint(ck.dir)

    def zero_grad(self) -> None:
        """Drop the gradients of this step (DeepSpeed's ``engine.zero_grad()``), including any a
        backward started but this engine never stepped (finished first, on every rank)."""
        if self._backward_since_step:
            self.strategy.discard_gradients()
            self._backward_since_step = False
            self._loss_finite = None
        else:
            self.strategy.zero_grad()

    def _report(self) -> None:
        every = self.plan.steps_per_print
        if self.ctx.rank != 0 or every <= 0 or self.global_steps % every != 0:
            return
        msg = f"step={self.global_steps} skipped={self.skipped_steps} lr={self.get_lr()} grad_norm={self._grad_norm:.4g}"
        if self.strategy.scaler.scale != 1.0:
            msg += f" loss_scale={self.loss_scale():g}"
        log.info(msg)

    # -- torch.compile (shardwise/compile.py) -------------------------------------------------
    def compile(self, backend: Any = None, compile_kwargs: dict | None = None, schedule: Any = None,
                compiled_autograd_enabled: bool = False) -> None:
        """DeepSpeed's call: torch.compile the model's repeated blocks (or the whole model when
        it has none), with the ZeRO hooks running around each ([Note: what is compiled]).
        ``backend`` (default: the config's ``compile.backend``): a backend name, a
        ``"module:function"`` or a callable; ``compile_kwargs``: torch.compile's ``fullgraph``,
        ``dynamic``, ``mode``, ``options``, ``disable`` (default: the config's ``compile.kwargs``
        and ``compile.mode``). DeepSpeed's DeepCompile ``schedule`` and compiled autograd are
        refused. Once per engine; tracing happens at the next forward."""
        if schedule is not None:
            raise UsageError("engine.compile(schedule=...) is DeepSpeed's DeepCompile pass schedule, which "
                             "shardwise does not implement; call engine.compile() without it")
        if compiled_autograd_enabled:
            raise UsageError("engine.compile(compiled_autograd_enabled=True): compiled autograd is not supported "
                             "in shardwise yet (ZeRO's gradient hooks run in the eager autograd engine); "
                             "leave it False")
        from shardwise.compile import compile_engine_model, policy_arguments

        cfg_backend, mode, kwargs = policy_arguments(self.plan.compile)
        if compile_kwargs is not None:
            kwargs, mode = dict(compile_kwargs), None
        compile_engine_model(self.module, self.plan, cfg_backend if backend is None else backend, mode, kwargs)

    @property
    def is_compiled(self) -> bool:
        """Whether the model's blocks were compiled (``engine.compile()`` or ``compile.enabled``)."""
        from shardwise.compile import compile_state

        return compile_state(self.module) is not None

    def compile_report(self) -> dict | None:
        """What was compiled and what dynamo made of it so far: per region (block) its calls, the
        runs of compiled graphs, graphs compiled and graph breaks; each break's reason and place;
        at stage 3 what runs eagerly between the regions. None if not compiled."""
        from shardwise.compile import compile_state

        state = compile_state(self.module)
        return None if state is None else state.report.as_dict()

    # -- state ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "Engine":
        self.module.train(mode)
        return self

    def eval(self) -> "Engine":
        self.module.eval()
        return self

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm

    def was_step_applied(self) -> bool:
        return self._step_applied

    def loss_scale(self) -> float:
        """The current loss scale (1.0 unless fp16); a method, as in DeepSpeed."""
        return self.strategy.loss_scale

    def zero_optimization_stage(self) -> int:
        return self.strategy.stage

    def zero_optimization(self) -> bool:
        return self.strategy.stage > 0

    def fp16_enabled(self) -> bool:
        return self.plan.precision.compute == "fp16"

    def bfloat16_enabled(self) -> bool:
        return self.plan.precision.compute == "bf16"

    def memory_report(self) -> dict[str, int]:
        return self.strategy.memory_report(self.module)

    def destroy(self) -> None:
        """Release what the engine holds outside Python objects (DeepSpeed's name): observers'
        files, offload's swap files and I/O threads. Also done at interpreter exit; the engine
        is unusable after."""
        self.observers.close()
        self.strategy.close()

    def parameters(self, recurse: bool = True):
        return self.module.parameters(recurse)

    def named_parameters(self, *args, **kwargs):
        return self.module.named_parameters(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    # -- checkpoints (shardwise.checkpoint) ---------------------------------------------------
    def save_checkpoint(self, save_dir, tag: str | int | None = None, client_state: Any = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> str:
        """DeepSpeed's call: save everything needed to resume under ``<save_dir>/<tag>`` (default
        ``global_step{N}``; an integer tag is stored as its string); call on every rank. Atomic;
        loads at any world size / ZeRO stage. ``client_state`` may hold tensors, numpy arrays,
        tuples and RNG states (stored without pickle); ``exclude_frozen_parameters`` leaves out
        the parameters outside every param group. Returns the committed directory."""
        from shardwise.checkpoint import save_checkpoint

        return save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters)

    def save_16bit_model(self, save_dir, save_filename: str = "pytorch_model.bin",
                         exclude_frozen_parameters: bool = False) -> bool:
        """DeepSpeed's call: the module's whole state dict in its own dtype, written by rank 0 to
        ``<save_dir>/<save_filename>`` (``.safetensors``: that format). Call on every rank; works
        at every stage (stage 3 gathers one module at a time). Not a resumable checkpoint."""
        from shardwise.checkpoint.model_file import save_model_file

        save_model_file(self.module, self.ctx, save_dir, save_filename, exclude_frozen_parameters)
        return True

    def load_checkpoint(self, load_dir, tag: str | int | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn=None):
        """DeepSpeed's call: load ``<load_dir>/<tag>`` (``tag=None``: the one ``latest`` names);
        call on every rank. Returns ``(path, client_state)``; ``(None, None)`` with a warning when
        ``tag`` is None and ``load_dir`` holds no checkpoint at all. ``load_module_strict=False``
        skips tensors only the checkpoint has and keeps the current values of those only the model
        has; ``custom_load_fn`` is refused (a ``UsageError`` naming the alternatives)."""
        from shardwise.checkpoint import load_checkpoint

        return load_checkpoint(self, load_dir, tag, load_module_strict, load_optimizer_states,
                               load_lr_scheduler_states, load_module_only, custom_load_fn)
