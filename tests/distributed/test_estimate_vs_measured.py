"""The memory model against the engine, exactly: ``engine.memory_report()`` measured after one
step on every rank equals, field by field, ``shardwise.estimate.model_states`` for that rank,
``shardwise estimate --json --config`` and ``shardwise plan`` (rank 0; plan's max/min over the
ranks), for the tiny GPT of examples/gpt at world sizes 1-3 (3: an uneven world), stages 0-3,
fp32, bf16 and bf16 with fp32 gradients; stage 3 also with persistent parameters, and every
stage with frozen parameters. One process group per world size runs every case."""
from __future__ import annotations

import json

import pytest

from estimate_workers import BUCKET, PERSIST, case_config, factory, measure
from shardwise.cli import main as cli_main
from shardwise.estimate import model_states
from shardwise.planner import plan_job
from shardwise.testing import run_distributed

CASES = ([(stage, precision, "") for precision in ("fp32", "bf16", "bf16/fp32-grads") for stage in (0, 1, 2, 3)]
         + [(3, "fp32", "persist"), (3, "bf16", "persist")]
         + [(stage, "bf16", "frozen") for stage in (0, 1, 2, 3)])
FIELDS = ("params", "grads", "master_params", "optimizer_state", "total")


def cli_estimate(capsys, path: str, spec: str, world: int) -> dict:
    assert cli_main(["estimate", "--model", spec, "--world-size", str(world), "--config", path, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_estimate_and_plan_equal_memory_report(world, tmp_path, capsys):
    measured = run_distributed(measure, world, CASES)
    for i, ((stage, precision, variant), *per_rank) in enumerate(zip(CASES, *measured)):
        name = f"world {world} stage {stage} {precision} {variant}".strip()
        compute, _, grads = precision.partition("/")
        path = tmp_path / f"case{i}.json"
        path.write_text(json.dumps(case_config(stage, precision, variant)))
        spec = f"estimate_workers:{factory(variant).__name__}"
        cli = cli_estimate(capsys, str(path), spec, world)["stages"][str(stage)]
        plan = plan_job(str(path), spec, world)
        assert plan.stage == stage
        for rank, got in enumerate(per_rank):
            want = model_states(factory(variant), world, stage, compute, bucket_numel=BUCKET, rank=rank,
                                grad_precision="fp32" if grads else None,
                                persistence_threshold=PERSIST if variant == "persist" else 0)
            assert want["activations"] is None
            assert {f: want[f] for f in FIELDS} == {f: got[f] for f in FIELDS}, f"{name} rank {rank}"
        assert {f: cli[f] for f in FIELDS} == {f: per_rank[0][f] for f in FIELDS}, f"{name}: shardwise estimate"
        assert {f: plan.states[f] for f in FIELDS} == {f: per_rank[0][f] for f in FIELDS}, f"{name}: shardwise plan"
        totals = [got["total"] for got in per_rank]
        assert (plan.max_bytes, plan.min_bytes) == (max(totals), min(totals)), f"{name}: plan max/min"
    if world > 1:  # sharding pays off per rank
        totals = {c: model_states(factory(c[2]), world, c[0], c[1], bucket_numel=BUCKET)["total"] for c in CASES[:4]}
        assert totals[(3, "fp32", "")] < totals[(2, "fp32", "")] < totals[(1, "fp32", "")] < totals[(0, "fp32", "")]
