"""The estimator against the engine: ``shardwise.estimate.model_states`` for the tiny GPT of
examples/gpt at world sizes 1-3, stages 0-3, fp32, bf16 and bf16 with fp32 gradients, within 5%
of ``memory_report()`` measured after one step on every rank (in practice equal: the estimate uses the engine's own
bucket / fetch-unit layout). One process group per world size runs all twelve cases."""
from __future__ import annotations

import pytest

from estimate_workers import BUCKET, measure, tiny_gpt
from shardwise.estimate import model_states
from shardwise.testing import run_distributed

CASES = [(stage, precision) for precision in ("fp32", "bf16", "bf16/fp32-grads") for stage in (0, 1, 2, 3)]
FIELDS = ("params", "grads", "master_params", "optimizer_state", "total")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_estimate_matches_memory_report(world):
    measured = run_distributed(measure, world, CASES)
    for (stage, precision), *per_rank in zip(CASES, *measured):
        compute, _, grads = precision.partition("/")
        want = model_states(tiny_gpt, world, stage, compute, bucket_numel=BUCKET,
                            grad_precision="fp32" if grads else None)
        for rank, got in enumerate(per_rank):
            for field in FIELDS:
                assert want[field] == pytest.approx(got[field], rel=0.05), (
                    f"world {world} stage {stage} {precision} rank {rank} {field}: "
                    f"estimated {want[field]}, measured {got[field]}")
            assert want["activations"] is None
    if world > 1:  # sharding pays off per rank
        totals = {c: model_states(tiny_gpt, world, *c, bucket_numel=BUCKET)["total"] for c in CASES[:8]}
        assert totals[(3, "fp32")] < totals[(2, "fp32")] < totals[(1, "fp32")] < totals[(0, "fp32")]
