"""The torch side of a pipeline: ``PipelineStage``s over this rank's stages and the schedule.

[Note: pipeline gradients]
torch's schedules run every micro-batch's forward and backward inside ``schedule.step()``;
gradients accumulate into ``p.grad``, which at ZeRO stages 0-1 is a view into the strategy's
flat gradient buffers (``FullGradSync``), so nothing is reduced per micro-batch. The schedule
gets ``scale_grads=False`` and a loss function that multiplies each micro-batch's loss by the
plain engine's backward factor, ``backward_scale / gas`` (loss scale / dp, over the number of
micro-batches), or by NaN when the loss is not finite ([Note: non-finite loss] in engine.py):
the gradients are then exactly those ``engine.backward`` would produce for the same
micro-batches. The engine then sums tied gradients over their tie groups and launches the
data-parallel reductions once ([Note: tied layers] in module.py).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from shardwise.errors import UsageError

SINGLE = {"1F1B": "Schedule1F1B", "GPipe": "ScheduleGPipe"}
MULTI = {"Interleaved1F1B": "ScheduleInterleaved1F1B", "LoopedBFS": "ScheduleLoopedBFS",
         "InterleavedZeroBubble": "ScheduleInterleavedZeroBubble", "ZBVZeroBubble": "ScheduleZBVZeroBubble"}
V_SCHEDULES = ("ZBVZeroBubble",)


def schedule_placement(name: str) -> str:
    return "v" if name in V_SCHEDULES else "loop"


class _Loss:
    """The loss function handed to torch (see [Note: pipeline gradients]). It records each
    call's raw loss; torch calls it once more on the first step (shape inference, on dummy
    tensors), so the step's losses are the last ``n`` recorded."""

    def __init__(self, user_loss: Callable):
        self.user_loss = user_loss
        self.factor = 1.0  # set by the engine before each step (the loss scale changes)
        self.training = True
        self.recorded: list[torch.Tensor] = []

    def __call__(self, output: Any, target: Any) -> torch.Tensor:
        loss = self.user_loss(output, target)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise UsageError(f"the PipelineModule's loss_fn must return a scalar tensor; got "
                             f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        loss32 = loss.float()
        self.recorded.append(loss32.detach())
        if not self.training:
            return loss32
        finite = torch.isfinite(loss32.detach())
        factor = torch.where(finite, torch.tensor(self.factor, dtype=torch.float32, device=loss32.device),
                             torch.tensor(float("nan"), dtype=torch.float32, device=loss32.device))
        return loss32 * factor

    def take(self, n: int) -> list[torch.Tensor]:
        out = self.recorded[-n:] if n else []
        self.recorded = []
        return out


class PipeRuntime:
    """This rank's stages and schedules (what ``build_pipeline`` returns; the engine drives it)."""

    def __init__(self, module: Any, plan: Any, ctx: Any, pp: Any):
        from torch.distributed.pipelining import PipelineStage

        pipe_plan = plan.parallel.pipeline
        self.module = module
        self.ctx = ctx
        self.pp = pp  # the pipeline GroupContext
        self.schedule_name = pipe_plan.schedule
        self.n_microbatches = plan.batch.gradient_accumulation_steps
        if module.loss_fn is None:
            raise UsageError("the PipelineModule has no loss_fn: train_batch needs one (PipelineModule(..., "
                             "loss_fn=torch.nn.CrossEntropyLoss()) gets (last stage output, labels))")
        self.loss = _Loss(module.loss_fn)
        nv = module.num_virtual_stages
        # one stage on one pipeline rank (a plain process, or data parallelism only): the
        # micro-batches run here in order, without torch's stages (they need a process group)
        self.local = nv == 1
        self.stages = [] if self.local else [PipelineStage(module.stage_module(v), v, nv, ctx.device, group=pp.group)
                                             for v in module.local_stages]
        self.first_stage = 0 in module.local_stages
        self.last_stage = (nv - 1) in module.local_stages
        self.last_pp_rank = module.rank_of_stage(nv - 1)
        self._schedules: dict[tuple[str, int], Any] = {}
        self._current: tuple[str, int] | None = None
        self.schedule = None if self.local else self._schedule(self.n_microbatches)

    def _schedule(self, n: int, train: bool = True):
        """The schedule for ``n`` micro-batches. Evaluation runs forward only, on GPipe (one
        stage per rank; 1F1B needs at least as many micro-batches as stages) or LoopedBFS
        (looped placement) or the V schedule itself; torch's schedules re-initialise the stages
        when switching between training and eval, and are told to here when the count or the
        schedule object changes."""
        import torch.distributed.pipelining as pl

        name = self.schedule_name
        if not train:
            name = "GPipe" if name in SINGLE else ("LoopedBFS" if name not in V_SCHEDULES else name)
        key = (name, n)
        sched = self._schedules.get(key)
        if sched is None:
            cls = getattr(pl, SINGLE.get(name) or MULTI[name])
            arg = self.stages[0] if name in SINGLE else self.stages
            try:
                sched = cls(arg, n_microbatches=n, loss_fn=self.loss, scale_grads=False)
            except ValueError as exc:
                raise UsageError(f"pipeline schedule {name} with {n} micro-batches over "
                                 f"{self.module.num_virtual_stages} stages: {exc}") from None
            self._schedules[key] = sched
        if self._current is not None and self._current != key:
            for attr in ("_stage_forward_initialized", "_stage_backward_initialized",
                         "_stages_forward_initialized", "_stages_backward_initialized"):
                if hasattr(sched, attr):
                    setattr(sched, attr, False)
        self._current = key
        return sched

    # -- one step ----------------------------------------------------------------------------
    def run(self, inputs: Any, labels: Any, factor: float, *, train: bool = True, n: int | None = None,
            return_outputs: bool = False, around: Any = None) -> tuple[list[torch.Tensor], Any]:
        """Run the schedule over the whole batch (``inputs`` on the first stage, ``labels`` on
        the last, None elsewhere); returns (the raw loss of each micro-batch on the last stage,
        the merged outputs when asked)."""
        n = self.n_microbatches if n is None else n
        if self.local:
            return _run_local(self, inputs, labels, factor, train, n, return_outputs, around)
        sched = self._schedule(n, train)
        self.loss.factor = factor
        self.loss.training = train
        args = () if inputs is None else (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,))
        kwargs: dict[str, Any] = {}
        if self.last_stage and labels is not None:
            kwargs["target"] = labels
            kwargs["losses"] = []
        self.loss.recorded = []
        if train:
            out = sched.step(*args, return_outputs=return_outputs, **kwargs)
        else:
            out = sched.eval(*args, **kwargs)
        losses = self.loss.take(n) if self.last_stage and labels is not None else []
        return losses, out


def _split(x: Any, n: int) -> list[Any]:
    if isinstance(x, torch.Tensor):
        return list(torch.tensor_split(x, n, dim=0))
    parts = [_split(t, n) for t in x]
    return [tuple(p[i] for p in parts) for i in range(n)]


def _merge(outs: list[Any]) -> Any:
    if isinstance(outs[0], torch.Tensor):
        return torch.cat(outs, dim=0)
    return tuple(_merge([o[i] for o in outs]) for i in range(len(outs[0])))


def _run_local(self, inputs, labels, factor, train, n, return_outputs, around=None):
    """One stage on one pipeline rank: each micro-batch's forward, loss and backward in turn, as
    the plain engine's loop would (``around(last)``: the strategy's before/after-backward pair
    of each micro-batch, so every ZeRO stage works here)."""
    stage = self.module  # its forward runs the one stage (and ZeRO-3's hooks on the module fire)
    self.loss.factor = factor
    self.loss.training = train
    self.loss.recorded = []
    xs = _split(inputs if isinstance(inputs, (tuple, list)) else (inputs,), n)
    ys = _split(labels, n) if labels is not None else [None] * n
    outs = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        out = stage(*x)
        if y is not None:
            loss = self.loss(out, y)
            if train:
                if around is not None:
                    around[0](i == n - 1)
                loss.backward()
                if around is not None:
                    around[1](i == n - 1)
        if return_outputs or not train:
            outs.append(out.detach() if isinstance(out, torch.Tensor) else out)
    return self.loss.take(n) if labels is not None else [], (_merge(outs) if outs else None)


def check_plan(module: Any, plan: Any, pp: Any) -> None:
    """The config's schedule and the module's stage layout agree ([Note: virtual stages])."""
    pipe_plan = plan.parallel.pipeline
    name = pipe_plan.schedule
    if name not in SINGLE and name not in MULTI:
        raise UsageError(f"pipeline.schedule {name!r} is not one of {sorted({**SINGLE, **MULTI})}")
    if pp.size != module.num_stages:
        raise UsageError(f"the PipelineModule has num_stages={module.num_stages} but the mesh's pipeline "
                         f"dimension has {pp.size} ranks")
    spr = pipe_plan.stages_per_rank
    placement = schedule_placement(name)
    if name in SINGLE:
        if module.stages_per_rank != 1:
            raise UsageError(f"pipeline.schedule {name!r} runs one stage per rank but the PipelineModule was built "
                             f"with stages_per_rank={module.stages_per_rank}; build it with stages_per_rank=1 or "
                             "pick a looped schedule (Interleaved1F1B, LoopedBFS, InterleavedZeroBubble)")
        return
    if module.stages_per_rank != spr or module.placement != placement:
        raise UsageError(
            f"pipeline.schedule {name!r} with pipeline.stages_per_rank={spr} needs the PipelineModule built for "
            f"that layout (each rank builds its stages' layers when the module is made): pass "
            f"PipelineModule(..., stages_per_rank={spr}, placement={placement!r}); it was built with "
            f"stages_per_rank={module.stages_per_rank}, placement={module.placement!r}")
    if name in V_SCHEDULES and spr != 2:
        raise UsageError(f"{name} needs exactly 2 stages per rank (a V); got {spr}")


__all__ = ["PipeRuntime", "check_plan", "schedule_placement", "SINGLE", "MULTI"]
