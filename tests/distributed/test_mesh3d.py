"""The (pp, dp, tp) mesh of model parallelism ([Note: parallel context]): DeepSpeed's rank
layout, the groups of each dimension, coordinates in messages, and the start-up fingerprint
compared within each pipeline stage."""
from __future__ import annotations

import pytest

from mesh3d_workers import layout, stage_models
from shardwise.config import load_config, plan_for
from shardwise.errors import ConfigError
from shardwise.testing import run_distributed


def test_pp_dp_tp_layout_is_deepspeeds():
    out = run_distributed(layout, 4, 2, 2, timeout_s=120)
    # global rank = (pp_rank * dp + dp_rank) * tp + tp_rank: tp groups are consecutive ranks
    assert [o["tp"] for o in out] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [o["pp"] for o in out] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert [o["dp"] for o in out] == [(0,), (1,), (2,), (3,)]
    assert out[3]["where"] == "rank 3 (dp=0 tp=1 pp=1)"
    assert out[0]["coords"] == {0: "dp=0 tp=0 pp=0", 1: "dp=0 tp=1 pp=0", 2: "dp=0 tp=0 pp=1",
                                3: "dp=0 tp=1 pp=1"}
    assert all(o["model_parallel"] == ["tp", "pp"] and o["replicas"] == 1 for o in out)


def test_pp2_dp2_layout():
    out = run_distributed(layout, 4, 2, 1, timeout_s=120)
    assert [o["dp"] for o in out] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [o["pp"] for o in out] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert out[2]["where"] == "rank 2 (dp=0 pp=1)" and out[1]["model_parallel"] == ["pp"]


def test_fingerprint_compares_models_within_a_pipeline_stage():
    assert run_distributed(stage_models, 4, None, timeout_s=120) == ["ok"] * 4
    msgs = run_distributed(stage_models, 4, 3, timeout_s=120)
    for m in msgs:  # every rank raises, naming the odd rank by its coordinates
        assert "model.parameters" in m and "3 (dp=1 pp=1)" in m and "stage 1" in m, m


def test_batch_triangle_is_for_dp_and_sizes_must_divide_the_world():
    plan = plan_for({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
                     "tensor_parallel": {"autotp_size": 2}}, world_size=8)
    assert (plan.parallel.pp, plan.parallel.dp, plan.parallel.tp) == (1, 4, 2)
    assert plan.batch.gradient_accumulation_steps == 1 and plan.world_size == 4
    with pytest.raises(ConfigError) as info:
        plan_for({"tensor_parallel": {"autotp_size": 3}}, world_size=4)
    assert "tensor_parallel.autotp_size" in str(info.value) and "does not divide the 4 ranks" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config({"train_batch_size": 4, "pipeline": {"stages": 4}}, world_size=4, pipeline_stages=2)
    assert "num_stages=2" in str(info.value)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_2_and_3_with_pipelining_are_refused_by_name(stage):
    with pytest.raises(ConfigError) as info:
        plan_for({"pipeline": {"stages": 2}, "zero_optimization": {"stage": stage}}, world_size=2)
    text = str(info.value)
    assert f"ZeRO stage {stage} with pipeline parallelism" in text and "use ZeRO stage 0 or 1" in text


def test_tp_plan_pattern_matching_no_pipeline_stage_is_named():
    from mesh3d_workers import tp_pattern_on_no_stage

    for msg in run_distributed(tp_pattern_on_no_stage, 4, timeout_s=180):
        assert "tensor_parallel.tp_plan['*.attn.qq']" in msg and "any of the 2 pipeline stages" in msg, msg
