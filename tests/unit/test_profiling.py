"""flops_profiler, comms_logger and wall_clock_breakdown in one process (multi-rank behaviour:
tests/distributed/test_profiling.py).

FLOPs of the GPT example (examples/gpt/model.py), per token of a sequence of length T, with
N = 12 * L * d^2 + V * d matmul weights (q, k, v, attention proj, fc, mlp proj per layer; the tied
LM head; no embeddings lookups, biases, norms):

- matmuls: 2N forward, 4N backward: 6N (exact);
- attention (scores and weighted sum, the full T x T matrix as torch counts it): forward
  4 * L * T * d, backward 10 * L * T * d (torch counts flash attention's recomputed scores),
  so 14 * L * T * d; the analytic textbook figure is 12 * L * T * d.

The measured fwd+bwd total equals (6N + 14 L T d) * tokens exactly, and is within 5% of the
analytic 6N + 12 L T d.
"""
from __future__ import annotations

import logging
import types

import pytest
import torch

import shardwise
from model import GPT, GPTConfig, count_parameters
from shardwise.comm import collectives
from shardwise.profiling import comms as comms_mod
from shardwise.profiling.comms import CommsLogger, bus_factor, canonical_op
from shardwise.profiling.flops import FlopsProfiler, format_profile, get_model_profile
from shardwise.profiling.timers import WallClockBreakdown

CFG = GPTConfig.preset("tiny")  # V=64, T=16, L=2, d=32
B = 4


def _engine(**extra):
    torch.manual_seed(0)
    model = GPT(CFG)
    conf = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": extra.pop("gas", 1),
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "steps_per_print": 1000, **extra}
    engine, _, _, _ = shardwise.initialize(model=model, model_parameters=model.parameters(), config=conf)
    return engine


def _train(engine, micro_batches: int):
    g = torch.Generator().manual_seed(0)
    for _ in range(micro_batches):
        x = torch.randint(0, CFG.vocab_size, (B, CFG.seq_len), generator=g)
        loss = engine(x, x)
        engine.backward(loss)
        engine.step()


def _analytic():
    L, d, V, T = CFG.n_layer, CFG.d_model, CFG.vocab_size, CFG.seq_len
    n = 12 * L * d * d + V * d
    return n, L * T * d, B * T


def test_gpt_flops_match_6NT():
    engine = _engine(flops_profiler={"enabled": True, "profile_step": 1})
    _train(engine, 2)
    p = engine.observers.find(FlopsProfiler).result
    n, ltd, tokens = _analytic()
    assert n == 26624 and tokens == 64
    assert p.fwd_flops == (2 * n + 4 * ltd) * tokens
    assert p.total_flops == (6 * n + 14 * ltd) * tokens == 11_141_120
    analytic = (6 * n + 12 * ltd) * tokens  # 10_223_616 + 786_432
    assert abs(p.total_flops - analytic) / analytic < 0.05  # 1.19%
    linears = [(name, m) for name, m in p.modules.items() if m.type == "Linear"]
    assert sum(m.fwd_flops for _, m in linears) == 2 * n * tokens  # 2 N T exactly
    # a Linear's backward is twice its forward: exact per module, except that torch's module
    # tracker charges part of the attention backward to k and v (separate projections since
    # issue 15: their backward windows overlap scaled_dot_product_attention's)
    for name, m in linears:
        if not name.endswith(("attn.k", "attn.v")):
            assert m.flops == 3 * m.fwd_flops, name
    assert p.params == count_parameters(engine.module)
    assert p.modules[""].flops == p.total_flops
    assert p.modules["blocks"].flops == p.modules["blocks.0"].flops + p.modules["blocks.1"].flops  # container
    for name in ("q", "k", "v"):  # three separate projections (tensor parallelism shards each by heads)
        assert p.modules[f"blocks.0.attn.{name}"].params == 32 * 32 + 32
    assert p.macs == p.fwd_flops // 2
    assert p.deepspeed_estimate_flops == 3 * p.fwd_flops
    assert p.fwd_latency_s > 0 and p.bwd_latency_s > 0 and p.step_latency_s > 0
    assert p.mfu is None  # CPU: no known peak
    engine.destroy()


def test_profile_step_counts_every_micro_batch_of_that_step():
    engine = _engine(gas=2, flops_profiler={"enabled": True, "profile_step": 2}, peak_tflops=1.0)
    prof = engine.observers.find(FlopsProfiler)
    _train(engine, 2)
    assert prof.result is None  # step 1 is not profiled
    _train(engine, 2)
    p = prof.result
    n, ltd, tokens = _analytic()
    assert (p.step, p.micro_batches) == (2, 2)
    assert p.fwd_flops == 2 * (2 * n + 4 * ltd) * tokens
    assert p.modules["head"].calls == 2
    assert p.mfu == pytest.approx(p.tflops / 1.0)
    _train(engine, 2)
    assert prof.result is p  # profiled once
    engine.destroy()


def test_table_depth_top_modules_detailed_and_output_file(tmp_path, caplog):
    out = tmp_path / "flops.txt"
    engine = _engine(flops_profiler={"enabled": True, "module_depth": 1, "top_modules": 2,
                                     "output_file": str(out)})
    with caplog.at_level(logging.INFO, logger="shardwise"):
        _train(engine, 1)
    text = out.read_text()
    assert f"written to {out}" in caplog.text and "per-module profile" not in caplog.text
    assert "params (full shapes):" in text and "fwd+bwd FLOPs per rank:" in text
    assert "depth 1: params: blocks 25.41 K, tok_emb 2.05 K" in text
    assert "depth 2" not in text
    table = text.split("per-module profile")[1]
    assert "  head (Linear)" in table and "(model) (GPT)" in table and "ln1" not in table
    p = engine.observers.find(FlopsProfiler).result
    brief = format_profile(p, module_depth=-1, top_modules=1, detailed=False)
    assert "per-module profile" not in brief and "depth 4:" in brief
    full = format_profile(p, module_depth=-1, detailed=True)
    assert "        q (Linear)" in full and "        v (Linear)" in full  # depth 4, indented
    engine.destroy()


def test_get_model_profile_forward_only():
    torch.manual_seed(0)
    model = GPT(CFG)
    x = torch.randint(0, CFG.vocab_size, (B, CFG.seq_len))
    p = get_model_profile(model, (x,))
    n, ltd, tokens = _analytic()
    assert p.fwd_flops == (2 * n + 4 * ltd) * tokens and p.bwd_flops == 0
    assert p.modules["head"].fwd_flops == 2 * CFG.vocab_size * CFG.d_model * tokens


# -- wall_clock_breakdown -----------------------------------------------------------------------


def _ctx(rank: int = 0):
    return types.SimpleNamespace(rank=rank, device=torch.device("cpu"))


def _step(timer, step: int, backward_wait: float = 0.0):
    timer.forward_begin((), {})
    timer.forward_end(None)
    timer.backward_begin(None)
    if backward_wait:
        collectives._RECORDER.end(collectives._RECORDER.begin("all_reduce", None, "all_reduce"), 8, backward_wait)
    timer.backward_end()
    timer.step_begin()
    timer.step_end(types.SimpleNamespace(step=step))


def test_wall_clock_breakdown_reports_interval_means(caplog):
    timer = WallClockBreakdown(2, _ctx())
    try:
        assert timer.last_interval_ms() is None
        with caplog.at_level(logging.INFO, logger="shardwise"):
            _step(timer, 1, backward_wait=0.004)
            assert timer.last_interval_ms() is None and "time (ms)" not in caplog.text
            _step(timer, 2, backward_wait=0.002)
        ms = timer.last_interval_ms()
        assert ms["backward_comm_wait"] == pytest.approx(3.0)  # (4 + 2) / 2 steps
        assert ms["forward_comm_wait"] == ms["step_comm_wait"] == 0.0
        assert all(ms[k] >= 0 for k in ("forward", "backward", "step"))
        assert timer.last_interval == (1, 2)
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("time (ms)"))
        assert line.startswith("time (ms) | forward: ") and "| backward: " in line and "| step: " in line
        assert "backward 3.00" in line and "(mean of steps 1-2)" in line
        _step(timer, 3)
        _step(timer, 4)
        assert timer.last_interval == (3, 4) and timer.last_interval_ms()["backward_comm_wait"] == 0.0
    finally:
        timer.close()
    assert collectives._RECORDER is None


def test_wall_clock_breakdown_logs_on_rank_0_only(caplog):
    timer = WallClockBreakdown(1, _ctx(rank=1))
    with caplog.at_level(logging.INFO, logger="shardwise"):
        _step(timer, 1)
    timer.close()
    assert "time (ms)" not in caplog.text and timer.last_interval_ms() is not None


# -- comms_logger --------------------------------------------------------------------------------


def _policy(**kw):
    return types.SimpleNamespace(**{"verbose": False, "prof_all": True, "prof_ops": (), **kw})


def test_op_names_and_bus_factors():
    assert canonical_op("all_gather_into_tensor") == canonical_op("_all_gather_base") == "all_gather"
    assert canonical_op("reduce_scatter_tensor") == canonical_op("reduce_to_shard") == "reduce_scatter"
    assert canonical_op("monitored_barrier") == "barrier"
    assert canonical_op("all_to_all_single") is None
    assert bus_factor("all_reduce", "all_reduce", 4) == 1.5
    assert bus_factor("reduce_scatter", "all_reduce", 4) == 1.5  # gloo: reduce-scatter by all-reduce
    assert bus_factor("reduce_scatter", "reduce_scatter", 4) == 0.75
    assert bus_factor("all_gather", "broadcast", 4) == 0.75
    assert bus_factor("broadcast", "broadcast", 4) == 1.0
    assert bus_factor("barrier", "barrier", 4) == 0.0


def test_comms_logger_summary_verbose_and_one_summary(monkeypatch, caplog):
    clock = iter([0.0, 0.002, 1.0, 1.004, 2.0, 2.001]).__next__
    monkeypatch.setattr(comms_mod, "_clock", clock)
    group = types.SimpleNamespace(size=4)
    with caplog.at_level(logging.INFO, logger="shardwise"):
        logger = CommsLogger(_policy(verbose=True), _ctx())
        rec = collectives._RECORDER
        for op, impl, nbytes in (("all_reduce", "all_reduce", 4000), ("all_reduce", "all_reduce", 4000),
                                 ("all_gather", "all_gather", 1000)):
            rec.end(rec.begin(op, group, impl), nbytes, 0.0)
        s = logger.summary()
        assert s["all_reduce"]["count"] == 2 and s["all_reduce"]["bytes"] == 8000
        assert s["all_reduce"]["time_s"] == pytest.approx(0.006)
        assert s["all_reduce"]["algbw_GBps"] == pytest.approx(8000 / 0.006 / 1e9)
        assert s["all_reduce"]["busbw_GBps"] == pytest.approx(8000 / 0.006 / 1e9 * 1.5)
        assert s["all_gather"]["sizes"][1000]["busbw_GBps"] == pytest.approx(1000 / 0.001 / 1e9 * 0.75)
        logger.close()
        logger.close()
    msgs = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("comm op: all_reduce | time (ms): ") for m in msgs) == 2
    assert sum("Comms summary" in m for m in msgs) == 1
    summary = next(m for m in msgs if "Comms summary" in m)
    assert "all_reduce" in summary and "3.91 KB" in summary
    assert collectives._RECORDER is None


def test_comms_logger_prof_ops_and_shared_recorder(caplog):
    with caplog.at_level(logging.WARNING, logger="shardwise"):
        logger = CommsLogger(_policy(prof_all=False, prof_ops=("all_gather_into_tensor", "all_to_all_single")),
                             _ctx())
    assert "all_to_all_single" in caplog.text
    timer = WallClockBreakdown(1, _ctx())
    group = types.SimpleNamespace(size=2)
    rec = collectives._RECORDER
    timer.backward_begin(None)
    rec.end(rec.begin("all_reduce", group, "all_reduce"), 8, 0.001)
    rec.end(rec.begin("all_gather", group, "broadcast"), 64, 0.001)
    timer.backward_end()
    assert set(logger.summary()) == {"all_gather"}
    logger.close()
    assert collectives._RECORDER is rec  # the timer still listens
    timer.close()
    assert collectives._RECORDER is None


def test_set_recorder_returns_previous():
    assert collectives._RECORDER is None
    sentinel = object()
    assert collectives.set_recorder(sentinel) is None
    assert collectives.set_recorder(None) is sentinel
