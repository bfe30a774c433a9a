"""``wall_clock_breakdown``: how long forward, backward and the optimizer step take, and how
much of each this rank spent blocked in collectives.

[Note: wall-clock breakdown]
Each phase is bracketed by the engine's events ([Note: observers]) and timed with
``time.perf_counter`` after synchronising the device (``torch.cuda.synchronize`` on CUDA;
nothing to wait for on CPU), so a phase's time includes the kernels it launched (see
[Note: device-synchronised timers]). The sums of
one optimizer step (all its micro-batches: with ``gradient_accumulation_steps`` = 4, forward is
four forwards) are averaged over the ``steps_per_print`` steps of an interval and logged on
rank 0 as ``time (ms) | forward: ... | backward: ... | step: ... | comm wait: ...``; every rank
keeps the last interval for monitors (:meth:`WallClockBreakdown.last_interval_ms`).

*comm wait* (DeepSpeed's ``bwd_allreduce`` and friends) is the time this rank was blocked
in a collective, reported by the collective recorder ([Note: collective recorder]) and charged
to the phase it was blocked in: stage-3 gathers in forward, the gradient reductions that
backward did not hide (stage 2-3: at the end of backward; stages 0-1: in ``step``, where the
boundary's reductions are awaited), the grad-norm all-reduce and parameter all-gather in
step. On NCCL a wait only orders streams, so the host is not blocked there: the time shows in
the phase total (after the synchronisation), not as comm wait.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from shardwise.observers import Observer

log = logging.getLogger("shardwise")

PHASES = ("forward", "backward", "step")
KEYS = PHASES + tuple(f"{p}_comm_wait" for p in PHASES)


# [Note: device-synchronised timers]
# On CUDA a Python call returns once its kernels are queued, so a clock read around forward
# alone would time the launches. Each phase boundary therefore waits for the device
# (``torch.cuda.synchronize``) before reading ``time.perf_counter``: the phase's time is the
# wall time until its kernels finished, the previous phase's tail is not charged to it. CUDA
# events would avoid the host stall, but a phase's time also holds host work (hooks, Python,
# the offloaded optimizer step on the CPU) that events do not see, and this observer is a
# profiling mode (DeepSpeed's timers synchronise too). On the CPU ops run as they are called:
# nothing to wait for, no call. ``_cuda_synchronize`` is the one place the wait happens (tests
# replace it to see it called on a CUDA device and not on the CPU).
def _cuda_synchronize(device: torch.device) -> None:
    torch.cuda.synchronize(device)


def device_sync(device: "torch.device | str") -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU (see [Note: device-synchronised timers])."""
    if torch.device(device).type == "cuda":
        _cuda_synchronize(device)


class WallClockBreakdown(Observer):
    """Observer for ``wall_clock_breakdown: true``."""

    def __init__(self, steps_per_print: int, ctx: Any):
        from shardwise.profiling.comms import subscribe

        self.every = int(steps_per_print)
        self.rank = ctx.rank
        self.device = ctx.device
        self._phase: str | None = None
        self._t0 = 0.0
        self._sums = dict.fromkeys(KEYS, 0.0)
        self._steps = 0  # optimizer steps in the current interval
        self._first_step: int | None = None
        self._last: dict[str, float] | None = None
        self.last_interval: tuple[int, int] | None = None  # (first, last) step of the last interval
        self._closed = False
        subscribe(self)

    # -- phases
    def _start(self, phase: str) -> None:
        device_sync(self.device)
        self._phase = phase
        self._t0 = time.perf_counter()

    def _stop(self, phase: str) -> None:
        if self._phase != phase:
            return  # e.g. forward_end after a failed forward_begin: nothing was started
        device_sync(self.device)
        self._sums[phase] += time.perf_counter() - self._t0
        self._phase = None

    def forward_begin(self, inputs: tuple, kwargs: dict) -> None:
        self._start("forward")

    def forward_end(self, output: Any) -> None:
        self._stop("forward")

    def backward_begin(self, loss: Any) -> None:
        self._start("backward")

    def backward_end(self) -> None:
        self._stop("backward")

    def step_begin(self) -> None:
        self._start("step")

    def step_end(self, record: Any) -> None:
        self._stop("step")
        if self._first_step is None:
            self._first_step = record.step
        self._steps += 1
        if self.every > 0 and record.step % self.every == 0:
            n = self._steps
            self._last = {k: v * 1e3 / n for k, v in self._sums.items()}
            self.last_interval = (self._first_step, record.step)
            self._sums = dict.fromkeys(KEYS, 0.0)
            self._steps, self._first_step = 0, None
            if self.rank == 0:
                log.info("%s", self.format(self._last, self.last_interval))

    # -- the collective recorder's events ([Note: collective recorder])
    def begin(self, op: str, group: Any, impl: str) -> None:
        return None

    def end(self, token: None, nbytes: int, waited_s: float) -> None:
        if self._phase is not None:
            self._sums[f"{self._phase}_comm_wait"] += waited_s

    def close(self) -> None:
        if not self._closed:
            from shardwise.profiling.comms import unsubscribe

            unsubscribe(self)
            self._closed = True

    # -- results
    def last_interval_ms(self) -> dict[str, float] | None:
        """Mean milliseconds per optimizer step over the last reported interval: ``forward``,
        ``backward``, ``step`` and ``{phase}_comm_wait``; None before the first report."""
        return None if self._last is None else dict(self._last)

    @staticmethod
    def format(ms: dict[str, float], steps: tuple[int, int] | None = None) -> str:
        text = (f"time (ms) | forward: {ms['forward']:.2f} | backward: {ms['backward']:.2f} | "
                f"step: {ms['step']:.2f} | comm wait: forward {ms['forward_comm_wait']:.2f}, "
                f"backward {ms['backward_comm_wait']:.2f}, step {ms['step_comm_wait']:.2f}")
        if steps is not None:
            text += f" (mean of steps {steps[0]}-{steps[1]})"
        return text
