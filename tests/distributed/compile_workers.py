"""Rank functions for the torch.compile tests (importable in spawned ranks).

Each run trains two fresh copies of the tiny GPT (examples/gpt/model.py: 2 blocks, d 32) from
the same seed on the same batches in the same process: one eager engine, one compiled
(``compile.enabled`` in the config, or ``engine.compile()``), and returns both runs' losses and
parameters and the compile report."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

import shardwise
import shardwise.zero
from parity_workers import _snapshot, batches, make_model

GLOBAL_BATCH = 4


def config(stage: int, compile_section: dict | None = None, **extra) -> dict:
    cfg = {"train_batch_size": GLOBAL_BATCH,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000}, "gradient_clipping": 0.0,
           "steps_per_print": 1000, **extra}
    if compile_section is not None:
        cfg["compile"] = compile_section
    return cfg


def _train(model: nn.Module, cfg: dict, steps: int, call_compile: dict | None = None) -> tuple[dict, object]:
    engine, *_ = shardwise.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    if call_compile is not None:
        engine.compile(**call_compile)
    rank, world = dist.get_rank(), dist.get_world_size()
    per = GLOBAL_BATCH // world
    losses = []
    for x in batches(GLOBAL_BATCH, steps):
        mine = x[rank * per:(rank + 1) * per]
        loss = engine(mine[:, :-1], mine[:, 1:])
        engine.backward(loss)
        engine.step()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / world)
    return {"losses": losses, "params": _snapshot(engine.module), "is_compiled": engine.is_compiled,
            "report": engine.compile_report()}, engine


def eager_vs_compiled(stage: int, backend: str, steps: int, ac: bool = False, via_call: bool = False) -> dict:
    """Losses and parameters of an eager and a compiled run (same seed and batches)."""
    extra = {"activation_checkpointing": {"modules": "blocks"}} if ac else {}
    eager, _ = _train(make_model(), config(stage, **extra), steps)
    if via_call:
        compiled, _ = _train(make_model(), config(stage, {"backend": backend}, **extra), steps, call_compile={})
    else:
        compiled, _ = _train(make_model(), config(stage, {"enabled": True, "backend": backend}, **extra), steps)
    return {"eager": eager, "compiled": compiled}


class BreakingBlock(nn.Module):
    """A block whose forward breaks dynamo's graph on purpose (a data-dependent Python branch)."""

    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        if h.sum().item() > -1e30:  # .item() on a tensor: dynamo must leave the graph here
            h = h * 1.0
        return x + self.out(h)


class Breaking(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList([BreakingBlock(d) for _ in range(2)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x.pow(2).mean()


class Flat(nn.Module):
    """No repeated blocks: the whole model is one region."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).pow(2).mean()


def break_report(kind: str, stage: int, steps: int = 2) -> dict:
    torch.manual_seed(0)
    model = Breaking() if kind == "breaking" else Flat()
    cfg = config(stage, {"enabled": True, "backend": "aot_eager"})
    engine, *_ = shardwise.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        loss = engine(torch.randn(GLOBAL_BATCH // dist.get_world_size(), 8, generator=g))
        engine.backward(loss)
        engine.step()
    return engine.compile_report()


def misuse() -> list[str]:
    """Named errors of engine.compile()."""
    out = []
    model = make_model()
    engine, *_ = shardwise.initialize(model=model, model_parameters=model.parameters(),
                                      config=config(0, {"enabled": True, "backend": "aot_eager"}))
    for kwargs in ({}, {"schedule": []}, {"compiled_autograd_enabled": True}):
        try:
            engine.compile(**kwargs)
            out.append("no error")
        except shardwise.errors.UsageError as exc:
            out.append(str(exc))
    model = make_model()
    engine, *_ = shardwise.initialize(model=model, model_parameters=model.parameters(), config=config(0))
    for kwargs in ({"compile_kwargs": {"fulgraph": True}}, {"backend": "aot_eager", "compile_kwargs": {"mode": "max-autotune"}}):
        try:
            engine.compile(**kwargs)
            out.append("no error")
        except shardwise.errors.UsageError as exc:
            out.append(str(exc))
    return out


def checkpoint_roundtrip(stage: int, directory: str) -> tuple[float, float, int]:
    """A compiled engine's checkpoint loads into a fresh compiled engine: (loss of the first,
    loss of the second on the next batch, compiled runs of the second's first block)."""
    section = {"enabled": True, "backend": "aot_eager"}
    model = make_model()
    engine, *_ = shardwise.initialize(model=model, model_parameters=model.parameters(), config=config(stage, section))
    for x in batches(GLOBAL_BATCH, 2):
        loss = engine(x[:, :-1], x[:, 1:])
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(directory)
    other = make_model(seed=5)
    again, *_ = shardwise.initialize(model=other, model_parameters=other.parameters(), config=config(stage, section))
    again.load_checkpoint(directory)
    x = batches(GLOBAL_BATCH, 3)[2]
    a, b = engine(x[:, :-1], x[:, 1:]).item(), again(x[:, :-1], x[:, 1:]).item()
    return a, b, again.compile_report()["regions"][0]["compiled_runs"]


CASES = {"eager_vs_compiled": eager_vs_compiled, "break_report": break_report, "misuse": misuse,
         "checkpoint_roundtrip": checkpoint_roundtrip}


def run_cases(cases: list[tuple[str, str, tuple, dict]]) -> dict:
    """Several cases in one process (one spawn and one dynamo start-up for all of them: the
    suite's time budget); ``(name, function, args, kwargs)`` -> {name: result, or the error's text}."""
    import time
    import traceback

    out: dict = {"_seconds": {}}
    for name, fn, args, kwargs in cases:
        t0 = time.perf_counter()
        try:
            out[name] = CASES[fn](*args, **kwargs)
        except Exception:  # noqa: BLE001 - reported to the test by name
            out[name] = "ERROR " + traceback.format_exc()
        out["_seconds"][name] = round(time.perf_counter() - t0, 2)
    return out
