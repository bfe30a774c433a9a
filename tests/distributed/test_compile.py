"""torch.compile of the model's blocks at ZeRO stages 0-3 (shardwise/compile.py).

Parity (fp32, README "torch.compile"): the compiled run's losses within 1e-6 relative of the
eager run's (same seed, same batches, same process) and parameters within 1e-5 after the
steps, at 1 and 2 ranks. Backends: ``aot_eager`` (dynamo + AOT autograd, eager kernels: cheap to
compile) for most cases, ``inductor`` (the C++ backend on CPU: ~40-60 s to compile the block's
forward and backward on 2 shared cores) once, at stage 3 on 1 rank; one inductor/FX cache
directory for the whole module. Every case also checks that
the blocks really ran compiled graphs (the report's per-region compiled runs), so a compile
that silently did nothing fails.

Time budget: the cases of one world size run in one ``run_distributed`` call (one spawn and one
dynamo start-up each); the tests below read their results.
"""
from __future__ import annotations

import os

import pytest
import torch

from compile_workers import run_cases
from shardwise.testing import run_distributed

STEPS = 3
STAGES = (0, 1, 2, 3)
ONE_RANK = [(f"stage{s}", "eager_vs_compiled", (s, "aot_eager", STEPS), {}) for s in STAGES] + [
    ("inductor", "eager_vs_compiled", (3, "inductor", STEPS), {}),
    ("engine.compile", "eager_vs_compiled", (1, "aot_eager", STEPS), {"via_call": True}),
    ("breaking", "break_report", ("breaking", 0), {}),
    ("flat", "break_report", ("flat", 3), {}),
    ("misuse", "misuse", (), {}),
]
CKPT_STAGES = (0, 3)
TWO_RANKS = [(f"stage{s}", "eager_vs_compiled", (s, "aot_eager", STEPS), {}) for s in STAGES] + [
    ("checkpointed", "eager_vs_compiled", (2, "aot_eager", STEPS), {"ac": True}),
    ("checkpointed3", "eager_vs_compiled", (3, "aot_eager", STEPS), {"ac": True}),
]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One inductor cache for every rank of every case here (ranks inherit the environment)."""
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor-cache"))
    yield
    if old is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def one_rank(compile_cache, tmp_path_factory):
    ckpt = [(f"ckpt{s}", "checkpoint_roundtrip", (s, str(tmp_path_factory.mktemp(f"ckpt{s}"))), {})
            for s in CKPT_STAGES]
    out = run_distributed(run_cases, 1, ONE_RANK + ckpt, timeout_s=400)
    print("compile cases, 1 rank, seconds:", out[0]["_seconds"])
    return out


@pytest.fixture(scope="module")
def two_ranks(compile_cache):
    out = run_distributed(run_cases, 2, TWO_RANKS, timeout_s=400)
    print("compile cases, 2 ranks, seconds:", out[0]["_seconds"])
    return out


def _case(out: list[dict], name: str) -> list:
    results = [r[name] for r in out]
    for r in results:
        assert not (isinstance(r, str) and r.startswith("ERROR")), r
    return results


def _check_parity(results: list[dict], stage: int, backend: str, regions=("blocks.0", "blocks.1")) -> None:
    for r in results:
        eager, comp = r["eager"], r["compiled"]
        assert not eager["is_compiled"] and eager["report"] is None
        assert comp["is_compiled"]
        torch.testing.assert_close(comp["losses"], eager["losses"], rtol=1e-6, atol=0)
        assert comp["params"].keys() == eager["params"].keys()
        for k in eager["params"]:
            torch.testing.assert_close(comp["params"][k], eager["params"][k], rtol=0, atol=1e-5,
                                       msg=lambda m, k=k: f"parameter {k}: {m}")
        rep = comp["report"]
        assert rep["backend"] == backend and rep["stage"] == stage
        assert [g["name"] for g in rep["regions"]] == list(regions)
        for g in rep["regions"]:
            # every forward of every block ran a compiled graph (not a silent eager fallback)
            assert g["calls"] >= STEPS and g["compiled_runs"] >= g["calls"], g
        # blocks of one class share one graph (0: an earlier engine's, reused); no break inside a
        # block, at every stage
        assert rep["graphs"] <= 1 and rep["graph_breaks"] == 0 and rep["breaks"] == [], rep
        if stage == 3:  # the gathers run between the compiled blocks, named
            assert len(rep["eager_boundaries"]) == len(regions)
            assert all("all-gather" in b for b in rep["eager_boundaries"])
        else:
            assert rep["eager_boundaries"] == []


@pytest.mark.parametrize("stage", STAGES)
def test_compiled_matches_eager_one_rank(stage, one_rank):
    _check_parity(_case(one_rank, f"stage{stage}"), stage, "aot_eager")


@pytest.mark.parametrize("stage", STAGES)
def test_compiled_matches_eager_two_ranks(stage, two_ranks):
    _check_parity(_case(two_ranks, f"stage{stage}"), stage, "aot_eager")


def test_inductor_matches_eager(one_rank):
    _check_parity(_case(one_rank, "inductor"), 3, "inductor")


@pytest.mark.parametrize("stage", [2, 3])
def test_compiled_with_activation_checkpointing(stage, two_ranks):
    # dynamo traces the checkpointed forward as one region: the recomputation is part of the
    # compiled backward (stage 3: of the gathered parameters the saved-tensor hooks hand back)
    _check_parity(_case(two_ranks, "checkpointed" if stage == 2 else "checkpointed3"), stage, "aot_eager")


def test_engine_compile_after_initialize(one_rank):
    _check_parity(_case(one_rank, "engine.compile"), 1, "aot_eager")


@pytest.mark.parametrize("stage", CKPT_STAGES)
def test_compiled_engine_checkpoint_roundtrip(stage, one_rank):
    ((trained, loaded, runs),) = _case(one_rank, f"ckpt{stage}")
    assert loaded == trained and runs == 1  # same state; the loading engine runs compiled too


def _item_line() -> int:
    path = os.path.join(os.path.dirname(__file__), "compile_workers.py")
    with open(path) as f:
        return next(i for i, line in enumerate(f, 1) if ".item()" in line and "if " in line)


def test_graph_breaks_are_counted_and_named(one_rank):
    (rep,) = _case(one_rank, "breaking")
    assert [g["name"] for g in rep["regions"]] == ["blocks.0", "blocks.1"]
    for g in rep["regions"]:
        # one break inside each block (at the .item()), met once when the block is compiled;
        # every call runs two compiled graphs: before and after it
        assert g["breaks"] == 1 and g["calls"] == 2 and g["compiled_runs"] == 2 * g["calls"], g
    assert rep["graph_breaks"] == 2
    assert [b["region"] for b in rep["breaks"]] == ["blocks.0", "blocks.1"]
    for b in rep["breaks"]:
        assert "item()" in b["reason"], b
        assert b["where"].endswith(f"compile_workers.py:{_item_line()}"), b


def test_flat_model_is_one_region_at_stage3(one_rank):
    (rep,) = _case(one_rank, "flat")
    assert [g["name"] for g in rep["regions"]] == [""]
    assert rep["graph_breaks"] == 0 and rep["graphs"] == 1
    assert rep["regions"][0]["compiled_runs"] == rep["regions"][0]["calls"] == 2
    assert len(rep["eager_boundaries"]) == 1


def test_engine_compile_misuse(one_rank):
    ((again, schedule, autograd, bad_kwarg, bad_mode),) = _case(one_rank, "misuse")
    assert "already compiled" in again
    assert "DeepCompile" in schedule
    assert "compiled autograd" in autograd
    assert "'fulgraph'" in bad_kwarg and "fullgraph" in bad_kwarg
    assert "inductor setting" in bad_mode
