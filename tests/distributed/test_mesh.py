"""A world of 4 ranks split by a (replica, dp) DeviceMesh into two independent data-parallel
groups of 2, each training on its own data: each group must match a plain single-process run of
its data (tolerances as in test_parity.py), at every ZeRO stage. A strategy that reduced over
the whole world would mix the two groups' gradients."""
from __future__ import annotations

import pytest
import torch

from mesh_workers import data_seed, grouped_run, mesh_without_dp
from parity_workers import reference_run
from shardwise.testing import run_distributed

STEPS = 6
GROUP_BATCH = 6  # per data-parallel group: 2 ranks x micro-batch 3 (as in test_parity.py)


def config(stage: int) -> dict:
    zero = {"stage": stage, "reduce_bucket_size": 3000}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": GROUP_BATCH,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
        "zero_optimization": zero,
        "gradient_clipping": 0.0,  # the reference does not clip
        "steps_per_print": 1000,
    }


@pytest.fixture(scope="module")
def references():
    return [reference_run(GROUP_BATCH, STEPS, seed=data_seed(r)) for r in range(2)]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_independent_dp_groups_match_their_own_reference(stage, references):
    out = run_distributed(grouped_run, 4, config(stage), STEPS, timeout_s=240)
    assert [o["replica"] for o in out] == [0, 0, 1, 1]
    for rank, o in enumerate(out):
        assert o["same_ctx"]
        assert o["dp"] == (rank % 2, 2, (2 * (rank // 2), 2 * (rank // 2) + 1))
        assert o["replicas"] == 2
        assert o["sampler"] == (2, rank % 2)  # the loader splits the data over the dp group
        assert o["batch"] == (GROUP_BATCH, 3)  # the batch triangle is for the dp size
        assert "several data-parallel replica groups are not supported" in o["refused"], o["refused"]
        want = references[o["replica"]]
        torch.testing.assert_close(o["losses"], want["losses"], rtol=1e-6, atol=0)
        for k in want["params"]:
            torch.testing.assert_close(o["params"][k], want["params"][k], rtol=0, atol=1e-5,
                                       msg=lambda m, k=k: f"rank {rank}, parameter {k}: {m}")
    # the two groups really trained on different data
    assert out[0]["losses"] != out[2]["losses"]


def test_mesh_without_a_dp_dimension_is_a_named_error():
    out = run_distributed(mesh_without_dp, 4, timeout_s=120)
    for msg in out:
        assert "has no 'dp' dimension" in msg, msg
