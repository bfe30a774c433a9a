"""Rank functions for the profiling tests (flops profiler at stages 0 and 3, comms logger and
wall-clock breakdown at stage 2)."""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn as nn

import shardwise
from model import GPT, GPTConfig
from shardwise.profiling.comms import CommsLogger
from shardwise.profiling.flops import FlopsProfiler, format_profile
from shardwise.profiling.timers import WallClockBreakdown
from shardwise.zero.sharded_params import ShardedParameter

MICRO = 2  # samples per rank


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _capture() -> _Lines:
    h = _Lines()
    lg = logging.getLogger("shardwise")
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    return h


def _batch(cfg: GPTConfig, rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, cfg.vocab_size, (MICRO, cfg.seq_len), generator=g)


def flops_at_stages(stages=(0, 3)) -> dict:
    """Per stage: the profile of step 1 as data, its table with latencies zeroed, and how many
    parameters the module held as stage-3 placeholders."""
    rank = torch.distributed.get_rank()
    out = {}
    for stage in stages:
        torch.manual_seed(0)
        cfg = GPTConfig.preset("tiny")
        model = GPT(cfg)
        conf = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0}
                                                         if stage == 3 else {})},
                "steps_per_print": 1000, "wall_clock_breakdown": True, "comms_logger": {"enabled": True},
                "flops_profiler": {"enabled": True, "profile_step": 1, "module_depth": -1, "top_modules": 2}}
        engine, _, _, _ = shardwise.initialize(model=model, model_parameters=model.parameters(), config=conf)
        for step in range(2):
            x = _batch(cfg, rank, step)
            loss = engine(x, x)
            engine.backward(loss)
            engine.step()
        prof = engine.observers.find(FlopsProfiler).result
        placeholders = sum(isinstance(p, ShardedParameter) for p in engine.module.parameters())
        still = dataclasses.replace(prof, fwd_latency_s=0.0, bwd_latency_s=0.0, step_latency_s=0.0, modules={
            k: dataclasses.replace(m, fwd_latency_s=0.0) for k, m in prof.modules.items()})
        out[stage] = {
            "modules": {k: (m.params, m.fwd_flops, m.bwd_flops, m.calls) for k, m in prof.modules.items()},
            "totals": (prof.params, prof.fwd_flops, prof.bwd_flops, prof.micro_batches, prof.step),
            "table": format_profile(still, -1, 2, True),
            "placeholders": placeholders,
            "comms": {op: v["count"] for op, v in engine.observers.find(CommsLogger).summary().items()},
        }
        engine.destroy()
    return out


class TwoLinear(nn.Module):
    """220 + 105 parameters: with reduce_bucket_size 250 at 2 ranks, two buckets (see the test)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(10, 20)
        self.b = nn.Linear(20, 5)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).pow(2).mean()


def comms_stage2(steps: int = 2, gas: int = 1, verbose: bool = True, prof_all: bool = True,
                 prof_ops: tuple = ()) -> dict:
    """The comms logger's summary of ``steps`` optimizer steps at stage 2 (collectives of
    initialize excluded), what rank 0 logged, and the wall-clock breakdown's last interval."""
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    model = TwoLinear()
    conf = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": 2, "reduce_bucket_size": 250},
            "steps_per_print": steps, "wall_clock_breakdown": True,
            "comms_logger": {"enabled": True, "verbose": verbose, "prof_all": prof_all,
                             "prof_ops": list(prof_ops)}}
    engine, _, _, _ = shardwise.initialize(model=model, model_parameters=model.parameters(), config=conf)
    logger = engine.observers.find(CommsLogger)
    logger.reset()  # count the training steps only
    lines = _capture()
    g = torch.Generator().manual_seed(rank)
    for _ in range(steps * gas):
        loss = engine(torch.randn(4, 10, generator=g))
        engine.backward(loss)
        engine.step()
    summary = logger.summary()
    timer = engine.observers.find(WallClockBreakdown).last_interval_ms()
    # composite ops are reported once, not as their inner gathers / broadcasts
    from shardwise.comm.collectives import all_gather_object, barrier, broadcast_object

    logger.reset()
    dp = engine.ctx.dp
    assert all_gather_object({"rank": rank}, dp) == [{"rank": 0}, {"rank": 1}]
    assert broadcast_object("x" * 100, dp) == "x" * 100
    barrier(dp)
    barrier(dp, timeout_s=30)
    objects = {op: v["count"] for op, v in logger.summary().items()}
    layouts = [(b.layout.numel, b.layout.padded_numel) for b in engine.strategy.buckets]
    engine.destroy()
    logger.close()  # a second close: no second summary
    from shardwise.comm import collectives
    return {"summary": summary, "objects": objects, "lines": lines.lines, "timer": timer, "layouts": layouts,
            "recorder_after": collectives._RECORDER is None}
