"""``flops_profiler``: parameters, MACs, FLOPs and forward latency per module for one
optimizer step (DeepSpeed's ``flops_profiler`` section), as a table and as data.

[Note: flops profiler]
At optimizer step ``profile_step`` (1-based, counted from this engine's first step) every
forward and backward the engine runs is counted with ``torch.utils.flop_counter``'s
``FlopCounterMode``: a dispatch mode that sees each aten op with its real operand shapes and
charges its FLOPs to every module whose forward (or backward) is running. Forward and backward
FLOPs are the counts between ``forward_begin``/``forward_end`` and ``backward_begin``/
``backward_end``; the backward is *measured* (not DeepSpeed's 2 x forward estimate), so it
includes what activation checkpointing recomputes; DeepSpeed's estimate ``fwd x (3 +
recompute_fwd_factor)`` is printed beside it. Counted ops are torch's flop registry (matmul,
conv, attention kernels; elementwise ops, norms and softmax count 0) plus CPU flash attention
(:data:`CUSTOM_FLOPS`). MACs are FLOPs / 2. FLOPs are per rank (its micro-batches).

Forward latency per module comes from forward pre/post hooks (device synchronised on CUDA),
summed over the module's calls; phase latencies from the engine's events. The profiled step
runs slower than the others (the counter's dispatch overhead, the synchronisations), as with
DeepSpeed.

ZeRO stage 3: outside forward a module holds ``ShardedParameter`` placeholders with the full
shape, so parameter counts use ``numel()`` of the full shape, never the local shard; inside
forward the module computes with the gathered full tensors, which the counter sees, so the
table is the same as at stage 0 (tested on 2 ranks).
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from shardwise.observers import Observer
from shardwise.profiling.timers import device_sync

log = logging.getLogger("shardwise")

_aten = torch.ops.aten


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# ops torch's registry lacks, counted as their CUDA counterparts are (non-causal: the full
# s x s score matrix; the backward recomputes the scores: 2.5 x the forward)
CUSTOM_FLOPS = {}
if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu"):
    CUSTOM_FLOPS[_aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa
    CUSTOM_FLOPS[_aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward

# dense bf16/fp16 tensor-core peaks (TFLOPS) of known CUDA devices, matched by name
_PEAKS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
          ("A10G", 125.0), ("A10", 125.0), ("L4", 121.0), ("V100", 125.0), ("RTX 4090", 165.0),
          ("A6000", 155.0))


def known_peak_tflops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """One device's dense 16-bit peak for a known CUDA device computing in bf16/fp16; else None
    (set ``peak_tflops`` in the config)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAKS if key in name), None)


@dataclass
class ModuleProfile:
    name: str  # the module's FQN in the model ("" for the model itself)
    type: str
    depth: int  # 0: the model
    params: int  # full shapes, shared parameters counted once per module
    fwd_flops: int = 0
    bwd_flops: int = 0
    fwd_latency_s: float = 0.0  # summed over calls
    calls: int = 0

    @property
    def macs(self) -> int:
        return self.fwd_flops // 2

    @property
    def flops(self) -> int:
        return self.fwd_flops + self.bwd_flops


@dataclass
class FlopsProfile:
    """What one profiled step measured on this rank."""

    step: int
    micro_batches: int  # forwards counted
    params: int  # the model's, full shapes, each parameter once
    fwd_flops: int  # everything counted in the forwards (also outside any module)
    bwd_flops: int
    fwd_latency_s: float
    bwd_latency_s: float
    step_latency_s: float  # the optimizer step
    world_size: int = 1
    dp_size: int = 1
    peak_tflops: float | None = None
    recompute_fwd_factor: float = 0.0
    modules: dict[str, ModuleProfile] = field(default_factory=dict)  # by FQN, in module order

    @property
    def macs(self) -> int:
        return self.fwd_flops // 2

    @property
    def total_flops(self) -> int:
        return self.fwd_flops + self.bwd_flops

    @property
    def deepspeed_estimate_flops(self) -> float:
        """DeepSpeed's fwd+bwd figure: the forward times (3 + recompute_fwd_factor)."""
        return self.fwd_flops * (3 + self.recompute_fwd_factor)

    @property
    def iter_latency_s(self) -> float:
        return self.fwd_latency_s + self.bwd_latency_s + self.step_latency_s

    @property
    def tflops(self) -> float:
        """Achieved TFLOPS of this rank: fwd+bwd FLOPs over the iteration's latency."""
        t = self.iter_latency_s
        return self.total_flops / t / 1e12 if t > 0 else 0.0

    @property
    def mfu(self) -> float | None:
        return self.tflops / self.peak_tflops if self.peak_tflops else None


def _unique_numel(params) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


_WARM = False


def _warm_up() -> None:
    """The first ``FlopCounterMode`` of a process spends ~0.7 s setting itself up: done once,
    before any timer of the profiled step starts."""
    global _WARM
    if not _WARM:
        with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS):
            a = torch.ones(2, 2, requires_grad=True)
            (a @ a).sum().backward()
        _WARM = True


class _Session:
    """One counting window: a FlopCounterMode plus latency hooks on every module of ``module``."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.module, self.device = module, device
        self.mods = list(module.named_modules())  # duplicates removed, in module order
        self.fwd: dict[str, int] = defaultdict(int)  # tracker name -> FLOPs
        self.bwd: dict[str, int] = defaultdict(int)
        self.phase_s = {"forward": 0.0, "backward": 0.0}
        self.micro_batches = 0
        self.latency: dict[int, float] = defaultdict(float)
        self.calls: dict[int, int] = defaultdict(int)
        self._starts: dict[int, list[float]] = defaultdict(list)
        self._phase: str | None = None
        self._snap: dict[str, int] = {}
        self._t0 = 0.0
        _warm_up()
        self.counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS)
        self._hooks = []
        for _, m in self.mods:
            self._hooks.append(m.register_forward_pre_hook(self._pre))
            self._hooks.append(m.register_forward_hook(self._post, always_call=True))
        self.counter.__enter__()
        self.open = True

    def _pre(self, m: nn.Module, args) -> None:
        device_sync(self.device)
        self._starts[id(m)].append(time.perf_counter())

    def _post(self, m: nn.Module, args, out) -> None:
        stack = self._starts.get(id(m))
        if stack:
            device_sync(self.device)
            self.latency[id(m)] += time.perf_counter() - stack.pop()
            self.calls[id(m)] += 1

    def _totals(self) -> dict[str, int]:
        return {k: sum(v.values()) for k, v in self.counter.flop_counts.items()}

    def begin(self, phase: str) -> None:
        device_sync(self.device)
        self._phase, self._snap, self._t0 = phase, self._totals(), time.perf_counter()

    def end(self, phase: str) -> None:
        if self._phase != phase:
            return
        device_sync(self.device)
        self.phase_s[phase] += time.perf_counter() - self._t0
        into = self.fwd if phase == "forward" else self.bwd
        for k, v in self._totals().items():
            if v != self._snap.get(k, 0):
                into[k] += v - self._snap.get(k, 0)
        self.micro_batches += phase == "forward"
        self._phase = None

    def close(self) -> dict[int, str]:
        """Stop counting; the counter's name for each module (by id)."""
        if not self.open:
            return self._names
        self.open = False
        self.counter.__exit__(None, None, None)
        for h in self._hooks:
            h.remove()
        root = type(self.module).__name__
        names = {id(m): (f"{root}.{fqn}" if fqn else root) for fqn, m in self.mods}
        known = getattr(self.counter.mod_tracker, "_known_modules", None)  # the tracker's own names
        if known is not None:
            for _, m in self.mods:
                if m in known:
                    names[id(m)] = known[m]
        self._names = names
        return names

    def profile(self, step: int, step_latency_s: float = 0.0, **kw: Any) -> FlopsProfile:
        names = self.close()
        modules = {}
        for fqn, m in self.mods:
            key = names[id(m)]
            modules[fqn] = ModuleProfile(fqn, type(m).__name__, fqn.count(".") + 1 if fqn else 0,
                                         _unique_numel(m.parameters()), self.fwd.get(key, 0), self.bwd.get(key, 0),
                                         self.latency.get(id(m), 0.0), self.calls.get(id(m), 0))
        # a container never called (ModuleList, ModuleDict) shows the sum of its children
        fqn_of = {id(m): fqn for fqn, m in self.mods}
        for fqn, m in reversed(self.mods):  # children before parents
            mp = modules[fqn]
            if fqn and mp.calls == 0 and not mp.flops:
                kids = [modules[fqn_of[id(c)]] for c in m.children() if id(c) in fqn_of]
                mp.fwd_flops = sum(k.fwd_flops for k in kids)
                mp.bwd_flops = sum(k.bwd_flops for k in kids)
                mp.fwd_latency_s = sum(k.fwd_latency_s for k in kids)
        # the engine's forward is the model's forward, and its backward the model's backward
        # (the counter cannot enter the model's own backward: its output is autograd's root)
        if "" in modules:
            modules[""].fwd_flops, modules[""].bwd_flops = self.fwd.get("Global", 0), self.bwd.get("Global", 0)
        return FlopsProfile(step, self.micro_batches, _unique_numel(self.module.parameters()),
                            self.fwd.get("Global", 0), self.bwd.get("Global", 0), self.phase_s["forward"],
                            self.phase_s["backward"], step_latency_s, modules=modules, **kw)


# -- the table --------------------------------------------------------------------------------


def _num(x: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.2f} {suffix}{unit}"
    return f"{x:.0f} {unit}".rstrip() if float(x).is_integer() else f"{x:.2f} {unit}".rstrip()


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms"


def format_profile(p: FlopsProfile, module_depth: int = -1, top_modules: int = 1, detailed: bool = True) -> str:
    """The text the profiler prints: a summary, the top modules per depth and (``detailed``) the
    per-module tree down to ``module_depth`` (-1: every depth)."""
    rows = [("profile step", f"{p.step} ({p.micro_batches} forward(s) on this rank)"),
            ("world size / data parallel size", f"{p.world_size} / {p.dp_size}"),
            ("params (full shapes)", _num(p.params)),
            ("fwd MACs per rank", _num(p.macs, "MACs")),
            ("fwd FLOPs per rank", _num(p.fwd_flops)),
            ("bwd FLOPs per rank (measured)", _num(p.bwd_flops)),
            ("fwd+bwd FLOPs per rank", _num(p.total_flops)),
            (f"fwd+bwd FLOPs, DeepSpeed's estimate fwd x (3 + {p.recompute_fwd_factor:g})",
             _num(p.deepspeed_estimate_flops)),
            ("fwd / bwd / step latency", f"{_ms(p.fwd_latency_s)} / {_ms(p.bwd_latency_s)} / {_ms(p.step_latency_s)}"),
            ("iter latency", _ms(p.iter_latency_s)),
            ("achieved FLOPS per rank (fwd+bwd / iter)", _num(p.tflops * 1e12, "FLOPS")),
            ("MFU", f"{p.mfu:.2%} of {p.peak_tflops:g} TFLOPS" if p.mfu is not None
             else "n/a (peak unknown: set peak_tflops)")]
    width = max(len(k) for k, _ in rows) + 2
    out = ["-------------------------- shardwise flops profiler --------------------------",
           f"Profile summary at step {p.step} (FLOPs: torch.utils.flop_counter; MACs = FLOPs / 2; this "
           "step's latencies include the profiler's overhead)"]
    out += [f"{k + ':':<{width}}{v}" for k, v in rows]
    mods = [m for m in p.modules.values() if module_depth < 0 or m.depth <= module_depth]
    depths = sorted({m.depth for m in mods})
    if top_modules > 0 and depths:
        out.append(f"----------------------- top {top_modules} module(s) per depth -----------------------")
        for d in depths:
            at = [m for m in mods if m.depth == d]

            def top(key, fmt):
                best = sorted(at, key=key, reverse=True)[:top_modules]
                return ", ".join(f"{m.name or m.type} {fmt(key(m))}" for m in best)

            out.append(f"depth {d}: params: {top(lambda m: m.params, _num)} | MACs: "
                       f"{top(lambda m: m.macs, _num)} | fwd latency: {top(lambda m: m.fwd_latency_s, _ms)}")
    if detailed and mods:
        out.append("------------------------------ per-module profile ------------------------------")
        labels = [("  " * m.depth) + (m.name.rsplit(".", 1)[-1] if m.name else "(model)") + f" ({m.type})"
                  for m in mods]
        lw = max(len(s) for s in labels + ["module"]) + 2
        cols = ("params", "MACs", "fwd FLOPs", "fwd+bwd FLOPs", "fwd latency", "% step FLOPs")
        out.append(f"{'module':<{lw}}" + "".join(f"{c:>15}" for c in cols))
        total = p.total_flops or 1
        for label, m in zip(labels, mods):
            vals = (_num(m.params), _num(m.macs), _num(m.fwd_flops), _num(m.flops), _ms(m.fwd_latency_s),
                    f"{m.flops / total:.2%}")
            out.append(f"{label:<{lw}}" + "".join(f"{v:>15}" for v in vals))
    out.append("-" * 78)
    return "\n".join(out)


class FlopsProfiler(Observer):
    """Observer for ``flops_profiler``: profiles step ``policy.profile_step``; the outcome is
    :attr:`result` (a :class:`FlopsProfile`, on every rank) and its table (rank 0: the log,
    or ``policy.output_file``)."""

    def __init__(self, policy: Any, module: nn.Module, ctx: Any, peak_tflops: float | None = None):
        self.policy, self.module = policy, module
        self.rank, self.device = ctx.rank, ctx.device
        self.world_size, self.dp_size = ctx.world_size, ctx.dp.size
        if peak_tflops is None:
            dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
            peak_tflops = known_peak_tflops(ctx.device, dtype)
        self.peak_tflops = peak_tflops
        self.result: FlopsProfile | None = None
        self.text: str | None = None
        self._steps = 0  # optimizer steps completed
        self._session: _Session | None = None
        self._step_t0: float | None = None

    def _session_for(self, phase: str) -> _Session | None:
        if self._session is None and self.result is None and phase == "forward" \
                and self._steps + 1 == self.policy.profile_step:
            self._session = _Session(self.module, self.device)
        s = self._session
        return s if s is not None and s.open else None

    def forward_begin(self, inputs: tuple, kwargs: dict) -> None:
        s = self._session_for("forward")
        if s is not None:
            s.begin("forward")

    def forward_end(self, output: Any) -> None:
        if self._session is not None and self._session.open:
            self._session.end("forward")

    def backward_begin(self, loss: Any) -> None:
        if self._session is not None and self._session.open:
            self._session.begin("backward")

    def backward_end(self) -> None:
        if self._session is not None and self._session.open:
            self._session.end("backward")

    def step_begin(self) -> None:
        if self._session is not None and self._session.open:
            self._session.close()  # the optimizer step itself is not counted
            device_sync(self.device)
            self._step_t0 = time.perf_counter()

    def step_end(self, record: Any) -> None:
        self._steps = record.step
        s, self._session = self._session, None
        if s is None or self._step_t0 is None:
            return
        device_sync(self.device)
        step_s, self._step_t0 = time.perf_counter() - self._step_t0, None
        self.result = s.profile(record.step, step_s, world_size=self.world_size, dp_size=self.dp_size,
                                peak_tflops=self.peak_tflops,
                                recompute_fwd_factor=self.policy.recompute_fwd_factor)
        pol = self.policy
        self.text = format_profile(self.result, pol.module_depth, pol.top_modules, pol.detailed)
        if self.rank == 0:
            if pol.output_file:
                with open(pol.output_file, "w") as f:
                    f.write(self.text + "\n")
                log.info("flops profile of step %d written to %s", record.step, pol.output_file)
            else:
                log.info("%s", self.text)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


def get_model_profile(model: nn.Module, args: tuple = (), kwargs: dict | None = None, *, backward: bool = False,
                      loss_fn=None) -> FlopsProfile:
    """Profile one call ``model(*args, **kwargs)`` outside an engine (DeepSpeed's
    ``get_model_profile``); ``backward``: also ``loss_fn(output).backward()`` (default: the
    output's sum). Latencies are wall-clock on this process's device."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    s = _Session(model, device)
    try:
        s.begin("forward")
        out = model(*args, **(kwargs or {}))
        s.end("forward")
        if backward:
            s.begin("backward")
            loss = loss_fn(out) if loss_fn is not None else out.sum()
            loss.backward()
            s.end("backward")
    finally:
        s.close()
    return s.profile(0)
