"""torch.compile for shardwise models: the config's ``compile`` section and ``engine.compile()``.

[Note: what is compiled]
The model's repeated blocks, one compiled region each (torchtitan's per-block compile):

1. the blocks: stage 3's fetch-unit rule (``zero/units.py``: the children of the model's
   ``nn.ModuleList`` / ``nn.Sequential`` that hold two or more children with parameters, or the
   outermost modules of the classes declared with ``set_fetch_units``); when
   ``activation_checkpointing.modules`` names module classes, the outermost modules of those
   classes instead. Either way every checkpointed module is one region (its recomputation is
   compiled with it; with ``every: k`` the others are regions too, not checkpointed);
2. else (no repeated blocks) the whole model.

What is compiled is each region's ``forward`` (an instance attribute, as activation
checkpointing sets it), not the module's ``__call__``: the module's own hooks run eagerly
around the compiled code. That is where ZeRO's hooks are: stage 3's all-gather of a block's
flat shards (forward pre-hook) and their release (forward post-hook) are collectives and
storage swaps that dynamo could only run by breaking the graph; here they sit between the
compiled regions by construction, so a block compiles to one graph at every stage. Stage 2's
gradient hooks (post-accumulate-grad, on the parameters) run in autograd's engine after the
compiled backward produced each gradient, as in eager. The code outside the regions (the
embedding, the loss, the head) stays eager.

All regions share one dynamo backend object per (backend, options) in the process: blocks of one
class then share one graph (dynamo treats their parameters as graph inputs), so a 48-layer model
compiles once, and a later engine over the same model class reuses it instead of adding a cache
entry per engine until dynamo's recompile limit (8) leaves its blocks eager. A thin wrapper around each region's compiled forward records, per
region, how often its compiled graphs ran and which graphs and graph breaks its calls
produced (:class:`CompileReport`); a test can tell a compiled block from a silently eager one.

[Note: compose order]
TP -> (pipeline split) -> activation checkpointing -> compile -> ZeRO (``api.compose``).
Compile comes after checkpointing so that a region's recomputation is compiled with it, and
before ZeRO only nominally: torch.compile traces at the first call, when the ZeRO strategy
already holds the parameters (flat buckets, or stage-3 shards gathered by the hooks); nothing
the strategy does replaces a ``forward``. ``engine.compile()`` after ``initialize`` does the
same on the finished engine.
"""
from __future__ import annotations

import functools
import importlib
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from shardwise.errors import UsageError

log = logging.getLogger("shardwise")

# torch.compile's keyword arguments a ``compile.kwargs`` may hold (``backend`` has its own key)
COMPILE_KWARGS = ("fullgraph", "dynamic", "mode", "options", "disable")
# torch.compile's ``mode`` values (torch._inductor.list_mode_options(); inductor only)
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def known_backends() -> list[str]:
    """Every backend name torch.compile accepts here, debug backends (``aot_eager``) included."""
    import torch._dynamo

    return sorted(torch._dynamo.list_backends(exclude_tags=()))


def load_custom_backend(spec: str) -> Callable:
    """``"package.module:function"`` -> the function (a dynamo backend: ``fn(gm, example_inputs)``)."""
    module, _, name = spec.partition(":")
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise TypeError(f"{spec} is a {type(fn).__name__}, not a callable")
    return fn


# --- the report -------------------------------------------------------------------------------


@dataclass
class GraphBreak:
    region: str  # the compiled region whose call broke ("" : the whole model)
    reason: str  # dynamo's words
    where: str  # file:line in the user's code, where dynamo knows it


@dataclass
class RegionStats:
    name: str
    cls: str
    calls: int = 0  # calls of the region's forward
    compiled_runs: int = 0  # runs of a compiled graph during those calls
    graphs: int = 0  # graphs compiled during its calls (0 when it reuses another block's or engine's)
    breaks: int = 0  # graph breaks dynamo met while compiling its calls (counted once per compile)
    first_call_s: float = 0.0  # trace + forward compile + run of its first call


@dataclass
class CompileReport:
    """What ``engine.compile_report()`` returns: per region and in total."""

    backend: str
    mode: str | None
    stage: int
    regions: list[RegionStats]
    breaks: list[GraphBreak] = field(default_factory=list)
    eager_boundaries: list[str] = field(default_factory=list)  # stage 3: what runs between the regions

    @property
    def graphs(self) -> int:
        return sum(r.graphs for r in self.regions)

    @property
    def graph_breaks(self) -> int:
        return sum(r.breaks for r in self.regions)

    def as_dict(self) -> dict:
        return {"backend": self.backend, "mode": self.mode, "stage": self.stage, "graphs": self.graphs,
                "graph_breaks": self.graph_breaks,
                "regions": [vars(r).copy() for r in self.regions],
                "breaks": [vars(b).copy() for b in self.breaks],
                "eager_boundaries": list(self.eager_boundaries)}

    def summary(self) -> str:
        names = [r.name or "<model>" for r in self.regions]
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        text = (f"torch.compile ({self.backend}{', mode ' + self.mode if self.mode else ''}): "
                f"{len(self.regions)} regions ({shown}), {self.graphs} graphs, {self.graph_breaks} graph breaks")
        if self.breaks:
            b = self.breaks[0]
            text += f"; first break in {b.region or '<model>'} at {b.where}: {b.reason}"
        return text


# --- compiling ------------------------------------------------------------------------------


class _Recorder:
    """The one backend object every region is compiled with, per (backend, options, torch.compile
    arguments) in the process ([Note: what is compiled]): dynamo then reuses one graph for every
    block of a class and for every later engine over the same class, instead of adding a cache
    entry per engine until its recompile limit. It attributes each graph, break and compiled run to the region
    whose call is in progress (``current``, set by the region's wrapper)."""

    def __init__(self, backend: Any, options: dict):
        self.backend, self.options = backend, options
        self.current: tuple[RegionStats, list[GraphBreak]] | None = None

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._dynamo.backends.registry import lookup_backend

        current = self.current
        if current is not None:
            current[0].graphs += 1
        why = getattr(gm, "compile_subgraph_reason", None)
        if why is not None and getattr(why, "graph_break", False) and current is not None:
            stack = getattr(why, "user_stack", None) or []
            where = f"{stack[-1].filename}:{stack[-1].lineno}" if stack else "?"
            reason = str(why.reason).strip().splitlines()[0] if str(why.reason).strip() else "?"
            current[1].append(GraphBreak(current[0].name, reason, where))
        inner = self.backend
        if isinstance(inner, str):
            if inner == "inductor":
                from torch._inductor.compile_fx import compile_fx

                compiled = compile_fx(gm, example_inputs, config_patches=self.options or None)
            else:
                compiled = lookup_backend(inner)(gm, example_inputs)
        else:
            compiled = inner(gm, example_inputs)

        def run(*args: Any) -> Any:
            if self.current is not None:
                self.current[0].compiled_runs += 1
            return compiled(*args)

        return run


_RECORDERS: dict[tuple, _Recorder] = {}


def _recorder(backend: Any, options: dict, kwargs: dict) -> _Recorder:
    key = (backend if isinstance(backend, str) else id(backend), repr(sorted(options.items())),
           repr(sorted(kwargs.items())))
    if key not in _RECORDERS:
        _RECORDERS[key] = _Recorder(backend, options)
    return _RECORDERS[key]


def _break_count() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _wrap(stats: RegionStats, breaks: list[GraphBreak], recorder: _Recorder, compiled: Callable,
          original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # traced by an outer torch.compile: just the code
            return compiled(*args, **kwargs)
        outer, recorder.current = recorder.current, (stats, breaks)
        stats.calls += 1
        before, t0 = _break_count(), time.perf_counter()
        try:
            return compiled(*args, **kwargs)
        finally:
            if stats.calls == 1:
                stats.first_call_s = time.perf_counter() - t0
            stats.breaks += _break_count() - before
            recorder.current = outer

    return forward


@dataclass
class CompileState:
    report: CompileReport
    recorder: _Recorder
    reported: bool = False  # the first-step log line was written


_STATE: "weakref.WeakKeyDictionary[nn.Module, CompileState]" = weakref.WeakKeyDictionary()


def compile_state(model: nn.Module) -> CompileState | None:
    return _STATE.get(model)


def compile_regions(model: nn.Module, checkpointed: Any = None) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of what is compiled ([Note: what is compiled]); ``("", model)`` alone
    when the model has no repeated blocks. ``checkpointed``: ``activation_checkpointing.modules``."""
    from shardwise.zero.units import block_modules, declared_unit_classes

    if checkpointed is not None and checkpointed != "blocks":
        found = block_modules(model, list(checkpointed))
    else:
        found = block_modules(model, declared_unit_classes(model))
    return found or [("", model)]


def compile_model(model: nn.Module, backend: Any, mode: str | None = None, kwargs: dict | None = None,
                  stage: int = 0, checkpointed: Any = None) -> CompileReport:
    """Compile ``model``'s regions in place (see [Note: what is compiled]); returns the live
    report (its counts grow as the model runs). ``backend``: a name, ``"module:function"`` or a
    callable; ``kwargs``: torch.compile's other arguments."""
    if model in _STATE:
        raise UsageError(f"this {type(model).__name__} is already compiled (engine.compile() or compile.enabled "
                         "in the config, once per model); see engine.compile_report()")
    kwargs = dict(kwargs or {})
    for key in kwargs:
        if key not in COMPILE_KWARGS:
            raise UsageError(f"compile_kwargs has {key!r}, which torch.compile does not take; it takes "
                             f"{list(COMPILE_KWARGS)} (and backend=, given on its own)")
    mode = kwargs.pop("mode", None) or mode
    options = dict(kwargs.pop("options", None) or {})
    name = backend if isinstance(backend, str) else getattr(backend, "__name__", type(backend).__name__)
    if isinstance(backend, str) and ":" in backend:
        backend = load_custom_backend(backend)
    if options and backend != "inductor":
        raise UsageError(f"compile options {sorted(options)} are inductor config names; backend {name!r} takes "
                         'none. Use backend "inductor" or remove "options"')
    if mode not in (None, "default"):
        if backend != "inductor":
            raise UsageError(f"compile mode {mode!r} is an inductor setting; backend {name!r} has no modes. "
                             'Use backend "inductor" or leave mode unset')
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode), **options}
    recorder = _recorder(backend, options, kwargs)
    regions, breaks = [], []
    for path, module in compile_regions(model, checkpointed):
        stats = RegionStats(path, type(module).__name__)
        compiled = torch.compile(module.forward, backend=recorder, **kwargs)
        module.forward = _wrap(stats, breaks, recorder, compiled, module.forward)
        regions.append(stats)
    report = CompileReport(backend=name, mode=mode, stage=stage, regions=regions, breaks=breaks)
    if stage == 3:
        report.eager_boundaries = [
            f"{r.name or '<model>'}: ZeRO-3 all-gather of its flat shards before the compiled forward and "
            "release after it (a collective and a storage swap: run eagerly by the module's forward hooks, "
            "outside the graph, instead of as a graph break)" for r in regions]
    _STATE[model] = CompileState(report, recorder)
    log.debug("torch.compile: %d regions with backend %s", len(regions), name)
    return report


def policy_arguments(policy: Any) -> tuple[str, str | None, dict]:
    """``(backend, mode, kwargs)`` of a ``plan.CompilePolicy`` (its frozen pairs as dicts again)."""
    kwargs = {k: dict(v) if k == "options" else v for k, v in policy.kwargs}
    return policy.backend, policy.mode, kwargs


def apply_compile(model: nn.Module, policy: Any, plan: Any, ctx: Any = None) -> CompileReport | None:
    """Composition step ``compile`` of ``initialize`` ([Note: compose order]): compiles the
    model's regions when ``compile.enabled``; else nothing (``engine.compile()`` can later)."""
    if not policy.enabled:
        return None
    backend, mode, kwargs = policy_arguments(policy)
    return compile_engine_model(model, plan, backend, mode, kwargs)


def compile_engine_model(model: nn.Module, plan: Any, backend: Any, mode: str | None, kwargs: dict) -> CompileReport:
    """``compile_model`` with what the plan says: the ZeRO stage and the checkpointed modules;
    refuses what is not tested yet (pipeline and tensor parallelism)."""
    par = plan.parallel
    if par.pp > 1 or par.tp > 1:
        raise UsageError(f"torch.compile with {'pipeline' if par.pp > 1 else 'tensor'} parallelism "
                         f"(pp={par.pp}, tp={par.tp}) is not tested in shardwise yet; switch compile off "
                         "(compile.enabled false / no engine.compile()) or run with pp = tp = 1")
    return compile_model(model, backend, mode, kwargs, stage=plan.zero.stage,
                         checkpointed=plan.activation_checkpointing.modules)


def log_first_step(model: nn.Module) -> None:
    """The one log line after the first step of a compiled model (rank 0 filters by the caller)."""
    state = _STATE.get(model)
    if state is None or state.reported:
        return
    state.reported = True
    log.info(state.report.summary())
    eager = [r.name or "<model>" for r in state.report.regions if r.calls and not r.compiled_runs]
    if eager:  # dynamo gave up on them (e.g. its recompile limit: torch._dynamo.config.recompile_limit)
        log.warning("torch.compile: %d regions ran eagerly, no compiled graph (%s); dynamo's own log says why "
                    "(TORCH_LOGS=recompiles,graph_breaks)", len(eager), ", ".join(eager[:4]))
