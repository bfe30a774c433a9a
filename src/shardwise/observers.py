"""What watches a run without changing it: monitors (TensorBoard, CSV, W&B, Comet), the flops
profiler, the comms logger and the wall-clock breakdown, behind one interface.

[Note: observers]
The engine calls one :class:`Observers` object at fixed points of the step and tests no config
flag: ``make_observers`` builds the list from ``plan.observe`` (an empty list when nothing is
switched on, so a plain run pays one method call per event). Every rank runs every observer:
an observer that needs a collective (the mean loss over ranks, memory per rank) does it at
the same step on every rank; only rank 0 writes. An observer never synchronises with the
device on a step it does not report: losses are kept as device tensors and read at the print
interval.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn


@dataclass(frozen=True)
class StepRecord:
    """What the engine knows after an optimizer-step boundary."""

    step: int  # engine.global_steps after this step (1 for the first)
    samples: int  # engine.global_samples after this step (the x-axis of DeepSpeed's tags)
    micro_steps: int  # micro-batches run so far on this rank
    lr: tuple[float, ...]  # per param group, as used by this step
    loss_scale: float  # 1.0 unless fp16
    grad_norm: float | None  # the clipped-before norm; None when not computed
    applied: bool  # False: skipped (overflow / non-finite)
    skipped_steps: int  # so far
    train_batch_size: int  # samples per optimizer step, all ranks
    memory_report: Callable[[], dict[str, int]]  # this rank's model-state bytes (engine.memory_report)


class Observer:
    """The events; every method is a no-op here. ``inputs``/``kwargs`` are what the engine's
    forward received (already on the device); ``loss`` is the unscaled loss of one micro-batch,
    still attached to the graph (observers must ``detach()`` what they keep), or ``None`` for a
    ``loss.backward()`` the engine did not see the loss of ([Note: direct backward])."""

    def forward_begin(self, inputs: tuple, kwargs: dict) -> None:
        pass

    def forward_end(self, output: Any) -> None:
        pass

    def backward_begin(self, loss: torch.Tensor) -> None:
        pass

    def backward_end(self) -> None:
        pass

    def step_begin(self) -> None:
        pass

    def step_end(self, record: StepRecord) -> None:
        pass

    def close(self) -> None:
        """Flush and release (idempotent, no collective: other ranks may be gone); called by
        ``engine.destroy()`` and at exit."""


class Observers(Observer):
    """Calls each observer in turn, in the order given."""

    def __init__(self, observers: list[Observer]):
        self.items = list(observers)

    def forward_begin(self, inputs: tuple, kwargs: dict) -> None:
        for o in self.items:
            o.forward_begin(inputs, kwargs)

    def forward_end(self, output: Any) -> None:
        for o in self.items:
            o.forward_end(output)

    def backward_begin(self, loss: torch.Tensor) -> None:
        for o in self.items:
            o.backward_begin(loss)

    def backward_end(self) -> None:
        for o in self.items:
            o.backward_end()

    def step_begin(self) -> None:
        for o in self.items:
            o.step_begin()

    def step_end(self, record: StepRecord) -> None:
        for o in self.items:
            o.step_end(record)

    def close(self) -> None:
        for o in self.items:
            o.close()

    def find(self, cls: type) -> Any:
        """The first observer of class ``cls`` (for tests and ``engine.flops_profiler``), or None."""
        return next((o for o in self.items if isinstance(o, cls)), None)


def make_observers(plan: Any, module: nn.Module, ctx: Any) -> Observers:
    """The observers ``plan`` switches on, in a fixed order: timers first (they bracket the
    others' work least), then the profiler, the comms logger, the monitors."""
    obs = plan.observe
    items: list[Observer] = []
    if plan.wall_clock_breakdown:
        from shardwise.profiling.timers import WallClockBreakdown

        items.append(WallClockBreakdown(plan.steps_per_print, ctx))
    if obs.flops_profiler is not None:
        from shardwise.profiling.flops import FlopsProfiler

        items.append(FlopsProfiler(obs.flops_profiler, module, ctx, obs.peak_tflops))
    if obs.comms_logger is not None:
        from shardwise.profiling.comms import CommsLogger

        items.append(CommsLogger(obs.comms_logger, ctx))
    if obs.monitors:
        from shardwise.monitor import make_monitor

        items.append(make_monitor(obs, plan.steps_per_print, module, ctx))
    observers = Observers(items)
    if items:  # files flushed and summaries printed at exit too (close is idempotent, local only)
        import atexit

        atexit.register(observers.close)
    return observers
