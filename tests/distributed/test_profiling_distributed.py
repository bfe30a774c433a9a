"""The profilers on 2 gloo ranks: the flops profiler's table is the same at ZeRO stage 3 as at
stage 0 (full parameter shapes, FLOPs on the gathered tensors), and the comms logger sees
exactly the collectives a stage-2 bucket layout implies."""
from __future__ import annotations

import pytest

from profiling_workers import comms_stage2, flops_at_stages
from shardwise.testing import run_distributed

FP32 = 4


def test_flops_profile_stage3_matches_stage0():
    ranks = run_distributed(flops_at_stages, 2)
    for r in ranks:
        s0, s3 = r[0], r[3]
        assert s3["placeholders"] > 0  # stage 3 really held sharded placeholders
        assert s0["placeholders"] == 0
        assert s3["totals"] == s0["totals"]
        assert s3["modules"] == s0["modules"]
        assert s3["table"] == s0["table"]
        # the recorder and the flop counter together: stage 3 gathers every unit in forward
        # and again in backward; stage 0 all-reduces its buckets and gathers nothing
        assert s3["comms"]["all_gather"] > 2 * 2 and "all_gather" not in s0["comms"]
        assert s0["comms"]["all_reduce"] >= 2
        params, fwd, bwd, micro, step = s0["totals"]
        assert (micro, step) == (1, 1) and fwd > 0 and bwd > 0
    # full shapes, not the local half: the GPT "tiny" model's parameter count, tied head once
    from model import GPT, GPTConfig, count_parameters

    assert ranks[0][3]["totals"][0] == count_parameters(GPT(GPTConfig.preset("tiny")))
    assert ranks[0][3]["modules"] == ranks[1][3]["modules"]  # equal micro-batch shapes per rank


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _expected_padded() -> list[int]:
    """TwoLinear at 2 ranks, reduce_bucket_size 250, offsets aligned to 16 elements and each
    bucket padded to a multiple of 2 * 16 ([Note: bucket layout]). Parameters are packed in
    reverse order: b.bias (5) at 0, b.weight (100) at 16, a.bias (20) at 128 -> 148 used;
    a.weight (200) would end at 360 > 250, so it opens bucket 2 (200 used)."""
    return [_round_up(148, 32), _round_up(200, 32)]  # 160, 224 elements


@pytest.fixture(scope="module")
def stage2():
    return run_distributed(comms_stage2, 2, 2, 2)  # 2 optimizer steps of 2 micro-batches


def test_comms_logger_counts_and_bytes_match_the_bucket_layout(stage2):
    padded = _expected_padded()
    steps, gas = 2, 2
    for r in stage2:
        assert [p for _, p in r["layouts"]] == padded
        s = r["summary"]
        # stage 2 reduces every bucket on every micro-batch (reduce_to_shard; gloo: by all-reduce)
        rs = s["reduce_scatter"]
        assert rs["count"] == len(padded) * steps * gas
        assert {size: v["count"] for size, v in rs["sizes"].items()} == {p * FP32: steps * gas for p in padded}
        assert rs["bytes"] == sum(padded) * FP32 * steps * gas
        # after each step, every bucket's updated parameters are all-gathered
        ag = s["all_gather"]
        assert {size: v["count"] for size, v in ag["sizes"].items()} == {p * FP32: steps for p in padded}
        # the grad-norm: one fp64 scalar all-reduce per step
        assert set(s["all_reduce"]["sizes"]) == {8}
        assert s["all_reduce"]["count"] == steps
        assert set(s) == {"reduce_scatter", "all_gather", "all_reduce"}
        for op in s.values():
            assert op["time_s"] > 0 and op["algbw_GBps"] > 0
        # gloo: reduce-scatter by all-reduce -> busbw = algbw * 2(n-1)/n = algbw at 2 ranks;
        # all-gather: (n-1)/n
        assert rs["busbw_GBps"] == pytest.approx(rs["algbw_GBps"])
        assert ag["busbw_GBps"] == pytest.approx(ag["algbw_GBps"] / 2)
        assert r["recorder_after"]  # the recorder was uninstalled at close
        assert r["objects"] == {"all_gather_object": 1, "broadcast_object": 1, "barrier": 2}


def test_comms_logger_logs_on_rank_0_once(stage2):
    r0, r1 = stage2
    verbose = [line for line in r0["lines"] if line.startswith("comm op: ")]
    assert len(verbose) == sum(v["count"] for v in r0["summary"].values()) + sum(r0["objects"].values())
    assert sum(line.startswith("comm op: reduce_scatter") for line in verbose) == 8
    assert sum("Comms summary" in line for line in r0["lines"]) == 1  # destroy() + close(): once
    assert not any(line.startswith(("comm op", "Comms summary")) for line in r1["lines"])


def test_wall_clock_breakdown_charges_comm_waits(stage2):
    for r in stage2:
        t = r["timer"]
        assert set(t) == {"forward", "backward", "step", "forward_comm_wait", "backward_comm_wait",
                          "step_comm_wait"}
        assert t["forward"] > 0 and t["backward"] > 0 and t["step"] > 0
        assert t["forward_comm_wait"] == 0  # stage 2: nothing to gather in forward
        assert 0 < t["backward_comm_wait"] <= t["backward"]  # the reductions drained at the end of backward
        assert 0 < t["step_comm_wait"] <= t["step"]  # grad norm + parameter all-gather
    assert any(line.startswith("time (ms) | forward: ") for line in stage2[0]["lines"])
    assert not any(line.startswith("time (ms)") for line in stage2[1]["lines"])


def test_comms_logger_prof_ops_filter():
    # DeepSpeed's names map onto shardwise's: reduce_scatter_tensor -> reduce_scatter
    ranks = run_distributed(comms_stage2, 2, 1, 1, False, False, ("reduce_scatter_tensor",))
    for r in ranks:
        assert set(r["summary"]) == {"reduce_scatter"}
        assert r["summary"]["reduce_scatter"]["count"] == 2
