"""``requires_grad_(False)`` after ``shardwise.initialize`` is honoured at every stage exactly
as plain PyTorch honours it (issue 11): no gradient, no reduction, and the optimizer skips the
parameter (AdamW with weight decay would otherwise move it). See [Note: freezing after
initialize] in zero/sharded_optimizer.py. fp32 parity tolerances as in test_stage3.py."""
from __future__ import annotations

import pytest
import torch

from freeze_workers import partial_freeze, reference, resume_mid_schedule, sharded, stage3_frozen_units
from shardwise.testing import run_distributed


@pytest.fixture(scope="module")
def ref():
    return reference()


def _close(got: dict, want: dict) -> None:
    torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-6, atol=0)
    for step, (g, w) in enumerate(zip(got["params"], want["params"])):
        assert g.keys() == w.keys()
        for k in w:
            torch.testing.assert_close(g[k], w[k], rtol=0, atol=1e-6, msg=lambda m, k=k, s=step: f"step {s} {k}: {m}")


@pytest.mark.parametrize("stage,world,groups", [
    (0, 1, True), (0, 2, True), (1, 2, True), (2, 2, True), (2, 3, True),
    (3, 1, False), (3, 2, False), (3, 3, False), (3, 2, True)])
def test_gan_alternating_freeze_matches_plain_pytorch(stage, world, groups, ref):
    """Alternately frozen generator / discriminator, unfrozen again, unfrozen between backward
    and step (still skipped, as in torch): losses and every parameter after every step."""
    for r in run_distributed(sharded, world, stage, groups):
        _close(r, ref)
    assert all(r["requires_grad"].values())  # the last step unfroze everything


@pytest.mark.parametrize("stage,groups", [(1, True), (2, True), (3, False)])
def test_gan_freeze_with_gradient_accumulation(stage, groups, ref):
    """3 micro-steps per step; at stage 3 also prefetch and reuse off."""
    zero = {"stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": 0} if stage == 3 else {}
    got = run_distributed(sharded, 2, stage, groups, len(ref["losses"]), zero, 3)
    _close(got[0], ref)


def test_stage3_frozen_units_are_not_reduced_nor_updated():
    r = run_distributed(stage3_frozen_units, 2)[0]
    assert r["seen"]["disc.0"] == [("Parameter", False)] * 2 and r["seen"]["gen.0"] == [("Parameter", True)] * 2
    assert not [u for u in r["launched"] if u.startswith("disc")], r["launched"]
    assert sorted(set(r["launched"])) == ["gen.0", "gen.2"]
    assert r["changed"] and all(k.startswith("gen.") for k in r["changed"]), r["changed"]
    assert set(r["states"].values()) == {"sharded"}


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_freezing_part_of_a_bucket_is_a_named_error(stage):
    msg = run_distributed(partial_freeze, 2, stage)[0]
    assert msg.startswith("PartiallyFrozenBucketError"), msg
    assert "own param group" in msg
    if stage == 3:
        assert "gen.0.weight" in msg and "gen.0.bias" in msg and "set_fetch_units" in msg


@pytest.mark.parametrize("stage,groups", [(2, True), (3, False)])
def test_checkpoint_of_a_never_trained_frozen_part_resumes_exactly(stage, groups, ref, tmp_path):
    """After step 1 the generator (frozen from the start) has no optimizer state: saved and
    loaded, training goes on as if uninterrupted."""
    got = run_distributed(resume_mid_schedule, 2, stage, groups, str(tmp_path), 1)[0]
    _close({"losses": ref["losses"], "params": got["params"]}, ref)


def test_stage3_requires_grad_reaches_both_objects_of_a_parameter():
    from freeze_workers import requires_grad_round_trip

    r = run_distributed(requires_grad_round_trip, 2)[0]
    assert r["kinds"] == ["ShardedParameter"] * 4 + ["Parameter"] * 4
    assert r["after_gathered_freeze"] == [False] * 4
    assert r["after_stale_unfreeze"] == [True, False, False, False]
