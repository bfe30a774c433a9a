"""The training engine: counts micro-steps and delegates to the strategy picked at init.

DeepSpeed's names and meaning: ``engine(batch)`` runs the forward, ``backward(loss)`` scales the
loss by ``loss_scale / (gradient_accumulation_steps * dp_size)`` and runs autograd (reductions overlap it),
``step()`` acts only at the accumulation boundary: optimizer step, LR-scheduler step, zeroed
gradients.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn as nn

from shardwise.comm.context import ParallelContext
from shardwise.config.plan import Plan
from shardwise.comm.collectives import all_gather_object
from shardwise.errors import NonFiniteError, UsageError
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
    ):
        self.module = module
        self.strategy = strategy
        self.optimizer = strategy.optimizer
        self.lr_scheduler = lr_scheduler
        self.plan = plan
        self.ctx = ctx  # the strategy's own context (engine.ctx is engine.strategy.ctx)
        self.device = ctx.device
        self.micro_steps = 0
        self.global_steps = 0
        self.global_samples = 0
        self.skipped_steps = 0
        self._step_applied = False
        self._grad_norm: float | None = None
        self._timings: dict[str, float] = {"forward": 0.0, "backward": 0.0, "step": 0.0}
        self._time = plan.wall_clock_breakdown
        self._loss_finite: torch.Tensor | None = None  # this rank's losses since the last step
        self._backward_since_step = False  # engine.backward() ran since the last engine.step()
        self.training_dataloader = None  # set by initialize(training_data=...); checkpointed

    # -- batch triangle -------------------------------------------------------------------
    def train_batch_size(self) -> int:
        return self.plan.batch.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.plan.batch.micro_batch_size

    def gradient_accumulation_steps(self) -> int:
        return self.plan.batch.gradient_accumulation_steps

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    # -- the training step ----------------------------------------------------------------
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        inputs = prepare_inputs(inputs, self.device, self.strategy.dtype)
        kwargs = prepare_inputs(kwargs, self.device, self.strategy.dtype)
        out = self.module(*inputs, **kwargs)
        if self._time:
            self._timings["forward"] += time.perf_counter() - t0
        return out

    __call__ = forward

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise UsageError(
                "engine.backward(loss) needs a scalar loss tensor; got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}."
            )
        if self._backward_since_step:
            # the reductions of this micro-step were launched by the first backward; a second
            # one would add gradients to buckets already sent (stages 0-2) or reduced (stage 3)
            raise UsageError(
                f"engine.backward() called twice in micro-step {self.micro_steps} without engine.step() "
                "between them. Add the losses and call engine.backward(loss_a + loss_b) once, or call "
                "engine.step() after each backward (with gradient_accumulation_steps set to the number "
                "of backward calls per optimizer step). Nothing was changed: the first backward's "
                "gradients are intact, and engine.step() applies them.")
        t0 = time.perf_counter()
        sync = self.is_gradient_accumulation_boundary()
        scale = self.strategy.backward_scale / self.gradient_accumulation_steps()
        self.strategy.before_backward(sync)
        # [Note: non-finite loss] a NaN/inf loss on one rank must stop (or skip) the step on
        # every rank even when its gradients are finite (e.g. `loss + nan`): the loss is then
        # multiplied by NaN instead of the scale, so this rank's gradients become NaN, the
        # reduction spreads them, and the step's agreed gradient norm is not finite. No host
        # sync: the choice is a torch.where on the device.
        loss32 = loss.float()
        finite = torch.isfinite(loss32.detach())
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        factor = torch.where(finite, torch.tensor(scale, dtype=torch.float32, device=loss32.device),
                             torch.tensor(float("nan"), dtype=torch.float32, device=loss32.device))
        (loss32 * factor).backward(retain_graph=retain_graph)
        self.strategy.after_backward(sync)
        self._backward_since_step = True
        if self._time:
            self._timings["backward"] += time.perf_counter() - t0
        return loss

    def step(self) -> None:
        if not self._backward_since_step:
            # loss.backward() instead of engine.backward(loss) would train silently wrong: no loss
            # scale or 1/world averaging, and reductions still pending (every rank runs the same
            # code, so every rank gets here and discards alike)
            self.strategy.discard_gradients()
            self._loss_finite = None
            raise UsageError(
                f"engine.step() at micro-step {self.micro_steps} without engine.backward(loss) since the "
                "previous step. Call engine.backward(loss) instead of loss.backward(): it scales and "
                "averages the loss and completes the gradient reductions; then engine.step(). The "
                "gradients gathered so far were discarded and no step was taken.")
        self._backward_since_step = False
        if self.is_gradient_accumulation_boundary():
            t0 = time.perf_counter()
            try:
                result = self.strategy.step(self.global_steps)
            except NonFiniteError as exc:  # raised on every rank together: safe to gather
                raise NonFiniteError(f"{exc} {self._nonfinite_ranks()}") from None
            finally:
                losses_finite, self._loss_finite = self._loss_finite, None
            self._step_applied = result.applied
            self._grad_norm = result.grad_norm
            if result.applied:
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step()
            else:
                self.skipped_steps += 1
                if losses_finite is not None and not bool(losses_finite):
                    log.warning("rank %d: step %d skipped: this rank's loss was NaN/inf (skipped "
                                "so far: %d)", self.ctx.rank, self.global_steps, self.skipped_steps)
            self.global_steps += 1
            self.global_samples += self.train_batch_size()
            if self._time:
                self._timings["step"] += time.perf_counter() - t0
            self._report()
            self.micro_steps += 1
            self._autosave()
            return
        self.micro_steps += 1

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
        self.strategy.zero_grad()

    def _report(self) -> None:
        every = self.plan.steps_per_print
        if self.ctx.rank != 0 or every <= 0 or self.global_steps % every != 0:
            return
        msg = f"step={self.global_steps} skipped={self.skipped_steps} lr={self.get_lr()} grad_norm={self._grad_norm:.4g}"
        if self.strategy.scaler.scale != 1.0:
            msg += f" loss_scale={self.loss_scale:g}"
        if self._time:
            n = every
            msg += " | ms/step " + " ".join(f"{k}={1000 * v / n:.1f}" for k, v in self._timings.items())
            self._timings = dict.fromkeys(self._timings, 0.0)
        log.info(msg)

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

    @property
    def loss_scale(self) -> float:
        return self.strategy.loss_scale

    @property
    def zero_optimization_stage(self) -> int:
        return self.strategy.stage

    def memory_report(self) -> dict[str, int]:
        return self.strategy.memory_report(self.module)

    def destroy(self) -> None:
        """Release what the engine holds outside Python objects (DeepSpeed's name): offload's
        swap files and I/O threads. Also done at interpreter exit; the engine is unusable after."""
        self.strategy.close()

    def parameters(self, recurse: bool = True):
        return self.module.parameters(recurse)

    def named_parameters(self, *args, **kwargs):
        return self.module.named_parameters(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    # -- checkpoints (shardwise.checkpoint) ---------------------------------------------------
    def save_checkpoint(self, save_dir, tag: str | None = None, client_state: Any = None,
                        save_latest: bool = True) -> str:
        """Save everything needed to resume under ``<save_dir>/<tag>`` (default
        ``global_step{N}``); call on every rank. Atomic; loads at any world size / ZeRO stage.
        Returns the committed directory."""
        from shardwise.checkpoint import save_checkpoint

        return save_checkpoint(self, save_dir, tag, client_state, save_latest)

    def save_16bit_model(self, save_dir, save_filename: str = "pytorch_model.bin",
                         exclude_frozen_parameters: bool = False) -> bool:
        """DeepSpeed's call: the module's whole state dict in its own dtype, written by rank 0 to
        ``<save_dir>/<save_filename>`` (``.safetensors``: that format). Call on every rank; works
        at every stage (stage 3 gathers one module at a time). Not a resumable checkpoint."""
        from shardwise.checkpoint.model_file import save_model_file

        save_model_file(self.module, self.ctx, save_dir, save_filename, exclude_frozen_parameters)
        return True

    def load_checkpoint(self, load_dir, tag: str | None = None, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True, load_module_only: bool = False):
        """Load ``<load_dir>/<tag>`` (``tag=None``: the one ``latest`` names); call on every rank.
        Returns ``(path, client_state)``."""
        from shardwise.checkpoint import load_checkpoint

        return load_checkpoint(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states,
                               load_module_only)
