"""Accumulation, clipping, mixed precision, fp16 overflow, overlap and memory accounting."""
from __future__ import annotations

import pytest
import torch

from parity_workers import (fp16_overflow_run, misuse_run, overlap_probe, partly_used_run, reference_run,
                            shardwise_run)
from shardwise.testing import run_distributed
from test_parity import STEPS, config


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_accumulation_equals_big_micro_batch(stage):
    # gas=4 x micro 2 (world 1) == gas=1 x micro 8 (world 1), and == world 2 x gas 2 x micro 2
    base = {**config(stage), "train_batch_size": 8}
    one = run_distributed(shardwise_run, 1, {**base, "gradient_accumulation_steps": 1}, 6)[0]
    four = run_distributed(shardwise_run, 1, {**base, "gradient_accumulation_steps": 4}, 6)[0]
    two_by_two = run_distributed(shardwise_run, 2, {**base, "gradient_accumulation_steps": 2}, 6)[0]
    assert four["global_steps"] == 6
    for other in (four, two_by_two):
        torch.testing.assert_close(other["losses"], one["losses"], rtol=1e-6, atol=0)
        for k in one["params"]:
            torch.testing.assert_close(other["params"][k], one["params"][k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("stage,world", [(0, 2), (1, 3), (2, 2), (2, 3)])
def test_clipping_uses_the_global_norm(stage, world):
    ref = reference_run(6, STEPS, clip=0.05)
    out = run_distributed(shardwise_run, world, config(stage, clip=0.05), STEPS)[0]
    # clipping is active (the norm exceeds the threshold), so parity proves the coefficient
    assert min(ref["norms"]) > 0.05
    torch.testing.assert_close(out["norms"], ref["norms"], rtol=1e-6, atol=0)
    torch.testing.assert_close(out["losses"], ref["losses"], rtol=1e-6, atol=0)
    for k in ref["params"]:
        torch.testing.assert_close(out["params"][k], ref["params"][k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("compute", ["bf16", "fp16"])
@pytest.mark.parametrize("stage,world", [(0, 1), (1, 2), (2, 2)])
def test_mixed_precision_matches_reference(compute, stage, world):
    ref = reference_run(6 if world != 4 else 8, STEPS, compute=compute)
    extra = {"bf16": {"enabled": True}} if compute == "bf16" else {"fp16": {"enabled": True, "initial_scale_power": 8}}
    out = run_distributed(shardwise_run, world, config(stage, **extra), STEPS)[0]
    assert all(out["applied"])
    assert out["memory"]["master_params"] > 0  # a separate fp32 master copy exists
    torch.testing.assert_close(out["losses"], ref["losses"], rtol=2e-2, atol=0)
    for k in ref["params"]:
        torch.testing.assert_close(out["params"][k], ref["params"][k], rtol=0, atol=2e-2)


def test_bf16_with_fp32_gradients_matches_reference():
    """data_types.grad_accum_dtype "fp32": gradients reduced and kept in fp32 (twice the bytes
    of the default bf16 gradients), same training within the mixed-precision tolerance."""
    ref = reference_run(6, STEPS, compute="bf16")
    runs = {grads: run_distributed(shardwise_run, 2, config(2, bf16={"enabled": True}, **extra), STEPS)[0]
            for grads, extra in (("bf16", {}), ("fp32", {"data_types": {"grad_accum_dtype": "fp32"}}))}
    assert runs["fp32"]["memory"]["grads"] == 2 * runs["bf16"]["memory"]["grads"]
    for out in runs.values():
        assert all(out["applied"])
        torch.testing.assert_close(out["losses"], ref["losses"], rtol=2e-2, atol=0)
        for k in ref["params"]:
            torch.testing.assert_close(out["params"][k], ref["params"][k], rtol=0, atol=2e-2)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_fp16_overflow_on_one_rank_skips_everywhere(stage):
    cfg = config(stage, fp16={"enabled": True, "initial_scale_power": 10, "hysteresis": 1})
    cfg["train_batch_size"] = 4
    out = run_distributed(fp16_overflow_run, 2, cfg, 4, 2, 1)
    for r in out:
        assert r["applied"] == [True, True, False, True]
        assert r["unchanged"][2] and not r["unchanged"][3]
        assert r["skipped"] == 1
        assert r["scales"][1] == 1024 and r["scales"][2] == 512  # halved at the overflow


@pytest.mark.parametrize("stage", [0, 2])
def test_reductions_start_during_backward(stage):
    out = run_distributed(overlap_probe, 2, {**config(stage, bucket=2000), "train_batch_size": 4})
    r = out[0]
    assert r["buckets"] >= 4
    # when backward reaches the first block, the buckets of the later layers are in flight
    assert r["launched_before_end"] >= 2


@pytest.mark.parametrize("world", [2, 3])
def test_memory_report_partitions_state(world):
    full = run_distributed(shardwise_run, 1, config(0), 1)[0]["memory"]
    s1 = run_distributed(shardwise_run, world, config(1), 1)
    s2 = run_distributed(shardwise_run, world, config(2), 1)
    assert set(full) == {"params", "grads", "master_params", "optimizer_state", "total"}
    for r in s1:
        m = r["memory"]
        # parameters and gradients stay whole at stage 1 (padding to a multiple of the world)
        assert m["params"] == pytest.approx(full["params"], rel=0.02)
        assert m["grads"] == pytest.approx(full["grads"], rel=0.02)
        assert m["optimizer_state"] == pytest.approx(full["optimizer_state"] / world, rel=0.05)
    for r in s2:
        m = r["memory"]
        assert m["optimizer_state"] == pytest.approx(full["optimizer_state"] / world, rel=0.05)
        # only the own gradient chunk persists (staging buffers live only during backward)
        assert m["grads"] == pytest.approx(full["grads"] / world, rel=0.05)
        assert m["total"] == sum(v for k, v in m.items() if k != "total")


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_parameters_without_gradients(stage):
    """A head used every other step and a parameter never used: reductions still match on every
    rank, and the result equals plain PyTorch where a missing gradient counts as zeros (what
    flat-buffer optimizers, DeepSpeed's included, do: Adam's moments decay and its step count
    advances for such parameters; see README "Parity")."""
    ref = partly_used_run(None, 4)
    cfg = {**config(stage, bucket=1500), "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}}}
    cfg["train_batch_size"] = 6
    out = run_distributed(partly_used_run, 2, cfg, 4)[0]
    torch.testing.assert_close(out["losses"], ref["losses"], rtol=1e-6, atol=0)
    for k in ref["params"]:
        torch.testing.assert_close(out["params"][k], ref["params"][k], rtol=0, atol=1e-5)


def test_backward_bypassing_the_engine_is_caught_and_discarded():
    """At every stage and on every rank: a named error, no step, and the next proper step is
    exactly a fresh engine's first step (nothing of the bad backward left behind)."""
    out = run_distributed(misuse_run, 2, [0, 1, 2, 3])
    for rank in out:
        for stage, r in rank.items():
            assert r["raised"] and "not engine.module(batch)" in r["raised"], stage
            assert r["steps"] == 1 and r["same"], (stage, r)
