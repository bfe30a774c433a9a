"""``PipelineEngine``: DeepSpeed's pipeline engine (``train_batch`` / ``eval_batch``) over torch's
schedules, on the plain engine's strategy and step bookkeeping.

One ``train_batch`` is one optimizer step: it pulls ``gradient_accumulation_steps`` micro-batches
(first and last stage only), runs the schedule over them ([Note: pipeline gradients] in
runtime.py), sums tied gradients over their tie groups, launches the data-parallel reductions
of the accumulated buffers once, and steps through ``Engine.step`` (counters, LR scheduler,
observers, autosave). The returned loss is the mean over the micro-batches and the data-parallel
ranks, on every rank.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist

from shardwise.comm.collectives import all_reduce, broadcast
from shardwise.engine import Engine
from shardwise.errors import CollectiveError, UsageError
from shardwise.precision.policy import prepare_inputs


def _cat(items: list[Any]) -> Any:
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(items, dim=0)
    if isinstance(first, (tuple, list)):
        return tuple(_cat([it[i] for it in items]) for i in range(len(first)))
    raise UsageError(f"a pipeline micro-batch must hold tensors or tuples of tensors; got {type(first).__name__}")


def _is_comm_failure(exc: BaseException) -> bool:
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return any(s in text for s in ("gloo", "Connection closed", "Connection reset", "NCCL", "Timed out",
                                   "timed out", "Broken pipe"))


class PipelineEngine(Engine):
    """The engine ``initialize`` returns for a ``PipelineModule`` (see the module docstring)."""

    def __init__(self, module, strategy, plan, ctx, lr_scheduler=None, observers=None, pipe=None):
        super().__init__(module, strategy, plan, ctx, lr_scheduler, observers)
        if pipe is None:
            raise UsageError("PipelineEngine needs the runtime build_pipeline returned")
        self.pipe = pipe
        self.num_stages = module.num_stages
        self.stage_id = module.stage_id
        self.micro_batches = self.gradient_accumulation_steps()
        self.data_iterator: Iterator | None = None
        self.batch_fn = None
        self.agg_train_loss: torch.Tensor | None = None
        self.agg_eval_loss: Any = None

    # -- DeepSpeed's pipeline surface ------------------------------------------------------------
    def is_first_stage(self) -> bool:
        return self.pipe.first_stage

    def is_last_stage(self) -> bool:
        return self.pipe.last_stage

    def set_dataiterator(self, iterator: Iterator) -> None:
        """The iterator ``train_batch()`` pulls from when called without one."""
        self.data_iterator = iterator

    def set_batch_fn(self, fn) -> None:
        """``fn(batch) -> (inputs, labels)``, applied to every micro-batch pulled (DeepSpeed's)."""
        self.batch_fn = fn

    def _refuse(self, what: str):
        raise UsageError(f"engine.{what}() is not available on a pipeline engine (as in DeepSpeed): the schedule "
                         "runs forward, backward and the step together. Call engine.train_batch(data_iter) for "
                         "one optimizer step, engine.eval_batch(data_iter) to evaluate.")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse("forward")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse("forward")

    def backward(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse("backward")

    def step(self, *args: Any, **kwargs: Any) -> None:
        self._refuse("step")

    # -- data ----------------------------------------------------------------------------------
    def _needs_data(self) -> bool:
        return self.pipe.first_stage or self.pipe.last_stage

    def _load(self, data_iter: Iterator | None, n: int, call: str) -> tuple[Any, Any]:
        """``n`` micro-batches ``(inputs, labels)`` joined along the batch dimension: inputs for the
        first stage, labels for the last (None where the stage does not use them)."""
        if not self._needs_data():
            return None, None
        it = data_iter if data_iter is not None else self.data_iterator
        if it is None and self.training_dataloader is not None:
            # initialize(training_data=...): DeepSpeed's pipeline engine cycles that loader
            from shardwise.data import RepeatingLoader

            it = self.data_iterator = RepeatingLoader(self.training_dataloader)
        if it is None:
            raise UsageError(f"engine.{call}() on {self.ctx.where()} (pipeline stage {self.stage_id}, a first or last "
                             "stage) needs a data iterator: pass one, or engine.set_dataiterator(it) (each item an "
                             "(inputs, labels) pair)")
        if not hasattr(it, "__next__"):  # a fresh iter() per call would repeat the first batches
            raise UsageError(f"engine.{call}() needs an iterator (each item an (inputs, labels) pair); got a "
                             f"{type(it).__name__}: pass iter(loader), or shardwise.utils.RepeatingLoader(loader)")
        items = []
        for i in range(n):
            try:
                batch = next(it)
            except StopIteration:
                raise UsageError(f"engine.{call}(): the data iterator ran out after {i} of {n} micro-batches "
                                 "(wrap the loader in shardwise.utils.RepeatingLoader to cycle it)") from None
            if self.batch_fn is not None:
                batch = self.batch_fn(batch)
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise UsageError(f"engine.{call}(): each micro-batch must be an (inputs, labels) pair; got "
                                 f"{type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else f' of {len(batch)}'}")
            items.append(batch)
        inputs = labels = None
        if self.pipe.first_stage:
            inputs = prepare_inputs(_cat([b[0] for b in items]), self.device, self.strategy.dtype)
        if self.pipe.last_stage:
            labels = prepare_inputs(_cat([b[1] for b in items]), self.device, torch.float32)  # no cast
        return inputs, labels

    @contextmanager
    def _guard(self, call: str):
        """A peer that died or stopped while this rank waits in the schedule's sends / receives:
        a CollectiveError naming it (the ranks' health), as for any other collective."""
        try:
            yield
        except CollectiveError:
            raise
        except RuntimeError as exc:
            if not _is_comm_failure(exc):
                raise
            pp = self.pipe.pp
            op = f"{call}: the pipeline schedule's sends/receives (stage {self.stage_id})"
            if pp.health is not None:
                raise pp.health.collective_error(op, exc, among=None if pp.is_world else pp.global_ranks) from exc
            raise CollectiveError(f"{op} failed: {exc}") from exc

    # -- training ------------------------------------------------------------------------------
    def train_batch(self, data_iter: Iterator | None = None) -> torch.Tensor:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns the mean
        loss (over the micro-batches and the data-parallel ranks) on every rank."""
        if not torch.is_grad_enabled():
            raise UsageError("engine.train_batch() was called under torch.no_grad(); use engine.eval_batch()")
        self.module.train()
        n = self.micro_batches
        inputs, labels = self._load(data_iter, n, "train_batch")
        st = self.strategy
        if self.pipe.local:  # one stage, no schedule: the plain engine's micro-steps (any ZeRO stage)
            losses, _ = self.pipe.run(inputs, labels, st.backward_scale / n, train=True,
                                      around=(st.before_backward, st.after_backward))
        else:
            st.before_backward(False)  # accumulate only: every micro-batch's backward runs inside the schedule
            with self._guard("train_batch"):
                losses, _ = self.pipe.run(inputs, labels, st.backward_scale / n, train=True)
            st.pipeline_absorb_grads()
            self._reduce_tied_grads()
            st.before_backward(True)
            st.after_backward(True)  # the data-parallel reductions of the accumulated buffers
        self._backward_since_step = True
        if losses:
            finite = torch.isfinite(torch.stack(losses)).all()
            self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self.micro_steps += n - 1  # Engine.step counts the last one
        previous, self._boundary_override = self._boundary_override, True
        try:
            Engine.step(self)
        finally:
            self._boundary_override = previous
        self.agg_train_loss = self._mean_loss(losses, bcast=True)
        return self.agg_train_loss

    def _reduce_tied_grads(self) -> None:
        """[Note: tied layers]: each tied weight's gradient summed over its tie group (sorted keys:
        every rank issues them in the same order)."""
        for key, group in sorted(self.module.tie_groups().items()):
            grads = [self.strategy.param_grad(p) for p in self.module.tied_parameters(key)]
            with self._guard("train_batch (tied gradients)"):
                for g in grads:
                    if g is not None:
                        all_reduce(g, group)

    def _mean_loss(self, losses: list[torch.Tensor], *, bcast: bool) -> torch.Tensor | None:
        """The mean of the last stage's micro-batch losses over dp, broadcast over pp."""
        t = torch.zeros(1, dtype=torch.float32, device=self.device)
        if self.pipe.last_stage and losses:
            t = torch.stack(losses).mean().reshape(1).to(self.device)
            all_reduce(t, self.ctx.dp)
            t = t / self.ctx.dp.size
        if bcast:
            broadcast(t, self.pipe.pp, src=self.pipe.last_pp_rank)
        elif not self.pipe.last_stage:
            return None
        return t[0].clone()

    # -- evaluation ------------------------------------------------------------------------------
    def eval_batch(self, data_iter: Iterator, return_logits: bool = False, compute_loss: bool = True,
                   reduce_output: str | None = "avg", bcast_loss: bool = True,
                   num_micro_batches: int | None = None) -> Any:
        """Forward only over ``num_micro_batches`` (default: gradient_accumulation_steps)
        micro-batches. ``reduce_output="avg"``: the mean loss (over micro-batches and dp), on every
        rank when ``bcast_loss`` (else on the last stage, None elsewhere); ``None``: the list of
        this data-parallel rank's micro-batch losses on the last stage. ``return_logits``: also the
        last stage's outputs, ``(loss, logits)`` (None on other stages)."""
        if reduce_output not in ("avg", None):
            raise UsageError(f"eval_batch(reduce_output={reduce_output!r}) must be 'avg' or None")
        n = int(num_micro_batches or self.micro_batches)
        was_training = self.module.training
        self.module.eval()
        try:
            inputs, labels = self._load(data_iter, n, "eval_batch")
            with torch.no_grad(), self._guard("eval_batch"):
                losses, outputs = self.pipe.run(inputs, labels, 1.0, train=False, n=n)
        finally:
            self.module.train(was_training)
        logits = outputs if self.pipe.last_stage else None
        if not compute_loss:
            result: Any = logits
        elif reduce_output == "avg":
            result = self._mean_loss(losses, bcast=bcast_loss)
        else:
            result = losses if self.pipe.last_stage else None
        self.agg_eval_loss = result
        if return_logits and compute_loss:
            return result, logits
        return result
