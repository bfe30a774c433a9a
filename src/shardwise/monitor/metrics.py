"""What the monitor measures, interval by interval ([Note: monitor metrics]).

[Note: monitor metrics]
An *interval* is the optimizer steps between two writes (``steps_per_print`` of them; the last
one, written by ``close``, may be shorter). Per micro-batch nothing leaves the device:

- the loss ``backward_begin`` receives is ``detach()``-ed and added in place into a 0-d fp32
  tensor on the loss's device (:attr:`Interval.loss_sum`); the count of losses is a host int;
- tokens are counted in ``forward_begin`` from the *shape* of the first integer tensor of
  two or more dimensions among the inputs (``input_ids``: samples x sequence), a host int; a
  forward is counted when a backward follows it (evaluation forwards are not training tokens).
  A 1-d integer tensor (class labels) is not tokens; without one, no tokens, TFLOPS or MFU.

At the interval's last step every rank calls :meth:`IntervalMetrics.collect`, which does two
collectives: one ``all_reduce`` over ``ctx.dp`` of ``[loss_sum, losses, tokens]`` (fp64; the
only device read of the interval) and one ``all_gather_object`` over ``ctx.world`` of each
rank's memory. The logged ``train_loss`` is the mean over every micro-batch loss of the
interval on every data-parallel rank (equal micro-batch counts: the mean of the per-rank means).

Throughput is measured between the two reads (each read waits for the device), so on CUDA the
time is the device's, not the host's queueing. ``tokens_per_s`` counts rank 0's data-parallel
group; ``tflops`` is per device: 6 x N x tokens / (seconds x dp ranks), N the trainable
parameters of the whole model (at ZeRO stage 3 the placeholders carry the full shape), the
usual "model FLOPs" convention (no attention term, no recomputation); ``mfu`` divides by the
device's peak (``peak_tflops``, or a known CUDA device computing in 16-bit; never on CPU).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from shardwise.comm.collectives import all_gather_object, all_reduce

# DeepSpeed's tags ...
LOSS, LR, LOSS_SCALE = "Train/Samples/train_loss", "Train/Samples/lr", "Train/Samples/loss_scale"
# ... and shardwise's
SAMPLES_PER_S, TOKENS_PER_S = "Train/Samples/samples_per_s", "Train/Samples/tokens_per_s"
TFLOPS, MFU = "Train/Samples/tflops", "Train/Samples/mfu"
SKIPPED, GRAD_NORM = "Train/Samples/skipped_steps", "Train/Samples/grad_norm"
MEMORY_KEYS = ("total_bytes", "rss_bytes", "max_allocated_bytes")


def memory_tag(rank: int, key: str) -> str:
    return f"Memory/rank{rank}/{key}"


def trainable_parameters(module: nn.Module) -> int:
    """Trainable parameters of the whole model; a stage-3 ``ShardedParameter`` reports its full
    shape, so this is the same number at every stage and world size."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _first_token_tensor(obj: Any, depth: int = 0) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        if obj.dim() >= 2 and not obj.is_floating_point() and not obj.is_complex() and obj.dtype != torch.bool:
            return obj
        return None
    if depth > 3:
        return None
    if isinstance(obj, dict):
        items = list(obj.values())
        if "input_ids" in obj:
            items.insert(0, obj["input_ids"])
        obj = items
    if isinstance(obj, (tuple, list)):
        for item in obj:
            t = _first_token_tensor(item, depth + 1)
            if t is not None:
                return t
    return None


def count_tokens(inputs: tuple, kwargs: dict) -> int | None:
    """Tokens of one micro-batch from the shape of its first >= 2-d integer tensor (positional
    inputs first, then ``input_ids``, then the other keyword arguments); None when there is none."""
    t = _first_token_tensor(inputs)
    if t is None:
        t = _first_token_tensor(kwargs)
    return None if t is None else int(t.numel())


def process_rss_bytes() -> int:
    """This process's resident set size now (Linux ``/proc``; elsewhere the peak RSS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


def rank_memory(memory_report: Any, device: torch.device) -> dict[str, int]:
    """This rank's ``total_bytes`` (model state, ``engine.memory_report()``), ``rss_bytes`` and,
    on CUDA, ``max_allocated_bytes``."""
    out = {"total_bytes": int(memory_report().get("total", 0)) if memory_report is not None else 0,
           "rss_bytes": process_rss_bytes()}
    if device.type == "cuda":
        out["max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


@dataclass
class Interval:
    """What one rank accumulated since the last write."""

    loss_sum: torch.Tensor | None = None  # 0-d fp32 on the loss's device; never read per step
    losses: int = 0
    tokens: int = 0
    any_tokens: bool = False
    steps: int = 0
    last: Any = None  # the StepRecord of the interval's last step


class IntervalMetrics:
    """Accumulates the observer events of one rank and turns an interval into
    ``(tag, value, samples)`` events (:meth:`collect`, a collective: every rank calls it)."""

    def __init__(self, module: nn.Module, ctx: Any, peak_tflops: float | None = None):
        self.ctx = ctx
        self.device = ctx.device
        self.parameters = trainable_parameters(module)
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
        if peak_tflops is None:
            from shardwise.profiling.flops import known_peak_tflops

            peak_tflops = known_peak_tflops(ctx.device, dtype)
        self.peak_tflops = peak_tflops
        self.fp16 = dtype == torch.float16
        self.cur = Interval()
        self._pending_tokens: int | None = None
        self._t0: float | None = None  # the interval's start (the previous read, or the first forward)
        self.start_samples: int | None = None  # global_samples before this engine's first step
        self.steps_seen = 0

    # -- events
    def forward_begin(self, inputs: tuple, kwargs: dict) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        self._pending_tokens = count_tokens(inputs, kwargs) if torch.is_grad_enabled() else None

    def backward_begin(self, loss: torch.Tensor | None) -> None:
        if self._pending_tokens is not None:
            self.cur.tokens += self._pending_tokens
            self.cur.any_tokens = True
            self._pending_tokens = None
        if loss is None:
            return  # a loss.backward() the engine did not see the loss of ([Note: direct backward])
        value = loss.detach().reshape(()).float()
        if self.cur.loss_sum is None:
            self.cur.loss_sum = torch.zeros((), dtype=torch.float32, device=value.device)
        self.cur.loss_sum.add_(value)  # on the device: no host sync
        self.cur.losses += 1

    def step_end(self, record: Any) -> None:
        if self.start_samples is None:
            self.start_samples = record.samples - record.train_batch_size
        self.steps_seen += 1
        self.cur.steps += 1
        self.cur.last = record
        if record.loss_scale != 1.0:
            self.fp16 = True

    @property
    def pending(self) -> bool:
        """Steps taken since the last write."""
        return self.cur.steps > 0

    # -- the interval (every rank, same step)
    def collect(self) -> tuple[list[tuple[str, float, int]], dict[str, Any]]:
        """The interval's events and a summary for ``run.jsonl``; resets the interval."""
        cur, ctx = self.cur, self.ctx
        rec = cur.last
        loss_sum = cur.loss_sum if cur.loss_sum is not None else torch.zeros((), device=self.device)
        packet = torch.stack([loss_sum.to(self.device, torch.float64),
                              torch.tensor(float(cur.losses), dtype=torch.float64, device=self.device),
                              torch.tensor(float(cur.tokens), dtype=torch.float64, device=self.device)])
        all_reduce(packet, ctx.dp)
        total_loss, n_losses, tokens = packet.tolist()  # the interval's one device read
        memory = all_gather_object(rank_memory(rec.memory_report, self.device), ctx.world)
        now = time.perf_counter()
        seconds = now - self._t0 if self._t0 is not None else float("nan")
        self._t0 = now
        any_tokens = cur.any_tokens
        self.cur = Interval()

        x = rec.samples
        events: list[tuple[str, float, int]] = []
        if n_losses > 0:
            events.append((LOSS, total_loss / n_losses, x))
        events.append((LR, float(rec.lr[0]) if rec.lr else float("nan"), x))
        if self.fp16:
            events.append((LOSS_SCALE, float(rec.loss_scale), x))
        ok = seconds > 0 and math.isfinite(seconds)
        if ok:
            events.append((SAMPLES_PER_S, cur.steps * rec.train_batch_size / seconds, x))
        if ok and any_tokens and tokens > 0:
            events.append((TOKENS_PER_S, tokens / seconds, x))
            tflops = 6.0 * self.parameters * tokens / seconds / ctx.dp.size / 1e12
            events.append((TFLOPS, tflops, x))
            if self.peak_tflops:
                events.append((MFU, tflops / self.peak_tflops, x))
        events.append((SKIPPED, float(rec.skipped_steps), x))
        if rec.grad_norm is not None:
            events.append((GRAD_NORM, float(rec.grad_norm), x))
        for r, mem in enumerate(memory):
            for key in MEMORY_KEYS:
                if key in mem:
                    events.append((memory_tag(r, key), float(mem[key]), x))
        summary = {"step": rec.step, "samples": x, "steps": cur.steps, "seconds": seconds,
                   "tokens": int(tokens) if any_tokens else None}
        return events, summary
