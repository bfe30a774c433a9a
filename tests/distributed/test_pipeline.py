"""Pipeline parallelism (issue 15): the example GPT with its tied embedding / head as a
``PipelineModule`` (examples/gpt/pipeline.py) trained with ``engine.train_batch``, against the
plain GPT in one process on the same global batch (pipeline_workers.py).

Tolerances: fp32 losses rtol 1e-6 and parameters atol 1e-5 after every step. With SGD the
pipeline is exact to rounding (measured: losses equal to 1e-7, parameters to 6e-8): the
schedule's micro-batch losses are scaled by 1/(gas * dp) as ``engine.backward`` would. AdamW
(lr 1e-3, 3 steps) measures 1.2e-6: Adam divides by sqrt(v) + eps, so an entry whose gradient is
~0 (rounding noise) moves by up to lr, which is why SGD is the parity optimizer. bf16 (bf16
model, fp32 masters; the reference likewise, on the whole batch) measures 6e-5 relative on the
losses and 5e-4 on the parameters: documented tolerance losses rtol 2e-3, parameters atol 5e-3.
fp16 (dynamic loss scale 2^16, compared with the fp32 reference) measures 7e-6 / 5e-4, same
tolerance.
Every run also checks that training moved the parameters, that the tied weight is bitwise
equal on both stages after every step, that the loss train_batch returns is equal on every
rank, and that the gradient norm (summed over pp, the tied copy counted once) equals the
reference's.
"""
from __future__ import annotations

import pytest
import torch

import pipeline_workers as W
import shardwise
import shardwise.pipe
from shardwise.testing import run_distributed

SCHEDULES = ["1F1B", "GPipe", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble"]
PP2_CASES = [
    {"schedule": "1F1B", "eval": True, "misuse": True},
    {"schedule": "GPipe"},
    {"schedule": "Interleaved1F1B", "ckpt": 1},  # activation checkpointing every layer
    {"schedule": "LoopedBFS"},
    {"schedule": "InterleavedZeroBubble"},
    {"schedule": "ZBVZeroBubble"},
    {"schedule": "1F1B", "gas": 4, "clip": 0.5},  # accumulation + active clipping
    {"schedule": "1F1B", "dtype": "bf16"},
    {"schedule": "ZBVZeroBubble", "dtype": "fp16"},  # loss scale folded into the schedule's loss
    {"schedule": "1F1B", "opt": "AdamW", "lr": 1e-3},
]
DP2_CASES = [
    {"zero": 0, "gas": 4, "clip": 0.5},
    {"zero": 1, "gas": 4, "clip": 0.5},
    {"zero": 1, "schedule": "Interleaved1F1B"},
]


@pytest.fixture(scope="module")
def pp2():
    return run_distributed(W.run_cases, 2, PP2_CASES, 2, timeout_s=240)


@pytest.fixture(scope="module")
def pp2_dp2():
    return run_distributed(W.run_cases, 4, DP2_CASES, 2, timeout_s=240)


def _tolerances(case: dict) -> tuple[float, float]:
    return (2e-3, 5e-3) if case.get("dtype") in ("bf16", "fp16") else (1e-6, 1e-5)


def _check_case(ranks: list[dict], case: dict, dp: int) -> None:
    ref = W.reference(case, dp, eval_too=case.get("eval", False))
    loss_rtol, param_atol = _tolerances(case)
    steps = W.case_defaults(case)["steps"]
    gas = W.case_defaults(case)["gas"]
    seen: set[str] = set()
    for r in ranks:
        where = f"{case} rank {r['rank']} (stage {r['stage']})"
        # the loss train_batch returns is the same on every rank, and equals the reference's
        assert r["losses"] == ranks[0]["losses"], where
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=loss_rtol, atol=0,
                                   msg=where)
        torch.testing.assert_close(torch.tensor(r["norms"]), torch.tensor(ref["norms"]), rtol=max(loss_rtol, 1e-5),
                                   atol=0, msg=where)
        assert r["global_steps"] == steps and r["micro_steps"] == steps * gas, where
        for s in range(steps):
            for name, value in r["params"][s].items():
                torch.testing.assert_close(value, ref["params"][s][name], rtol=0, atol=param_atol,
                                           msg=f"{where} step {s + 1} {name}")
        # training moved this stage's parameters (a run that never stepped would fail here)
        moved = max((r["params"][-1][k] - r["start"][k]).abs().max().item() for k in r["start"])
        assert moved > 1e-3, where
        seen |= set(r["params"][0])
        # activation_checkpoint_interval=1: every layer with parameters of every micro-batch's
        # forward ran under torch.utils.checkpoint (this rank's stages hold 4 such layers)
        layers_with_params = 4 if case.get("ckpt") else 0
        assert r["checkpoint_calls"] >= layers_with_params * gas * steps, where
        assert bool(r["checkpoint_calls"]) == bool(case.get("ckpt")), where
    assert seen == set(ref["params"][0])  # every parameter of the GPT is held by some stage


def _stage_ranks(ranks: list[dict], stage: int) -> list[dict]:
    return [r for r in ranks if r["stage"] == stage]


@pytest.mark.parametrize("index", range(len(PP2_CASES)), ids=[
    "-".join(f"{k}={v}" for k, v in c.items() if k not in ("eval", "misuse")) for c in PP2_CASES])
def test_pp2_matches_one_process(pp2, index):
    case = PP2_CASES[index]
    ranks = [per_rank[index] for per_rank in pp2]
    _check_case(ranks, case, dp=1)
    first, last = _stage_ranks(ranks, 0)[0], _stage_ranks(ranks, 1)[0]
    if case["schedule"] == "ZBVZeroBubble":
        # V placement: rank 0 holds the first and the last stage, so the tied embedding/head is
        # one module there, and not a tie group
        assert first["first"] and first["last"] and not last["first"] and not last["last"]
        assert first["local_stages"] == [0, 3] and last["local_stages"] == [1, 2]
        assert first["duplicates"] == 0 and last["tied"][0] is None
        return
    assert first["first"] and not first["last"] and last["last"] and not last["first"]
    # no rank holds the whole model: the layers are split, only the tied weight is on both
    assert set(first["names"]) & set(last["names"]) == {W.TIED}
    assert first["duplicates"] == 0 and last["duplicates"] == 1  # the copy on stage 1 is left out of the norm
    for a, b in zip(first["tied"], last["tied"]):
        assert torch.equal(a, b)  # tied weights stay equal across stages, every step
    assert not torch.equal(first["tied"][-1], first["tied"][0])  # ... and they trained


def test_all_schedules_offered_were_run():
    from shardwise.config.schema_parallel import SCHEDULES as OFFERED

    assert set(OFFERED) == set(SCHEDULES)
    assert {c["schedule"] for c in PP2_CASES} == set(SCHEDULES)


def test_eval_batch(pp2):
    ranks = [per_rank[0] for per_rank in pp2]
    ref = W.reference(PP2_CASES[0], 1, eval_too=True)
    for r in ranks:
        assert r["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6)  # broadcast to every stage
        assert r["eval_one"] == pytest.approx(ref["eval_one"], rel=1e-6)  # num_micro_batches=1
        assert r["after_eval_loss"] == ranks[0]["after_eval_loss"]  # training goes on after eval
    first, last = _stage_ranks(ranks, 0)[0], _stage_ranks(ranks, 1)[0]
    assert first["eval_logits"] is None
    torch.testing.assert_close(last["eval_logits"], ref["eval_logits"], rtol=0, atol=1e-5)
    assert first["eval_loss_last_only"] is None and float(last["eval_loss_last_only"]) == pytest.approx(
        ref["eval_loss"], rel=1e-6)  # bcast_loss=False
    assert first["eval_losses_list"] is None and len(last["eval_losses_list"]) == 2  # reduce_output=None
    assert float(torch.stack(last["eval_losses_list"]).mean()) == pytest.approx(ref["eval_loss"], rel=1e-6)


def test_forward_backward_step_raise(pp2):
    for per_rank in pp2:
        errors = per_rank[0]["misuse"]
        for name in ("forward", "backward", "step"):
            assert errors[name] is not None and f"engine.{name}()" in errors[name], errors
            assert "train_batch" in errors[name]


@pytest.mark.parametrize("index", range(len(DP2_CASES)), ids=[
    "-".join(f"{k}={v}" for k, v in c.items()) for c in DP2_CASES])
def test_pp2_dp2_matches_one_process(pp2_dp2, index):
    case = DP2_CASES[index]
    ranks = [per_rank[index] for per_rank in pp2_dp2]
    assert [r["stage"] for r in ranks] == [0, 0, 1, 1]  # (pp, dp) layout: pipeline outermost
    _check_case(ranks, case, dp=2)
    for stage in (0, 1):
        a, b = _stage_ranks(ranks, stage)
        for s in range(len(a["params"])):  # the two data-parallel replicas of a stage stay equal
            for k in a["params"][s]:
                assert torch.equal(a["params"][s][k], b["params"][s][k]), (stage, s, k)
    for s in range(len(ranks[0]["tied"])):
        assert all(torch.equal(ranks[0]["tied"][s], r["tied"][s]) for r in ranks if r["tied"][s] is not None)


def test_pp2_tp2_matches_one_process():
    """(pp 2, tp 2): tensor parallelism inside each stage (the blocks' projections sharded by
    the config's tp_plan), ZeRO 1; the tp ranks of a stage hold different shards."""
    case = {"zero": 1, "tp": 2}
    ranks = [r[0] for r in run_distributed(W.run_cases, 4, [case], 2, timeout_s=240)]
    assert [r["stage"] for r in ranks] == [0, 0, 1, 1]  # (pp, dp, tp): tp innermost
    _check_case(ranks, case, dp=1)


def test_layer_specs_are_built_only_on_their_stage():
    counts = run_distributed(W.build_counts, 2, timeout_s=120)
    assert [c["built"] for c in counts] == [[0, 1], [2, 3]]  # each rank built only its own layers
    assert counts[0]["tied_built"] == counts[1]["tied_built"] == 1
    assert counts[0]["tied_equal"] and counts[1]["tied_equal"]  # broadcast from the first owner


# -- the DeepSpeed pipeline script, launched as a user would ----------------------------------
def test_deepspeed_pipeline_script_two_stages_equals_one_process(tmp_path, monkeypatch):
    """examples/deepspeed_style/pipeline_gpt.py with only the import changed: 2 pipeline stages
    through `shardwise run` vs the same script in this process with 1 stage (seed_layers: the
    same initial values; the same global batch): the per-step losses match."""
    import json
    import os
    import runpy
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    here = os.path.join(root, "examples", "deepspeed_style")
    script, cfg = os.path.join(here, "pipeline_gpt.py"), os.path.join(here, "ds_config_pipeline.json")
    cmd = [sys.executable, "-c", "from shardwise.cli import main; raise SystemExit(main())", "run",
           "--nproc-per-node", "2", script, "--deepspeed_config", cfg, "-p", "2", "--out", str(tmp_path / "two.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.load(open(tmp_path / "two.json"))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sys, "argv", [script, "--deepspeed_config", cfg, "-p", "1", "--out", str(tmp_path / "one.json")])
    runpy.run_path(script, run_name="__main__")
    one = json.load(open(tmp_path / "one.json"))
    assert two["stages"] == 2 and one["stages"] == 1 and two["gas"] == one["gas"] == 4
    assert two["first"] and not two["last"]
    assert len(two["losses"]) == len(one["losses"]) == 6
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-6, atol=0)
    assert len(set(two["losses"])) > 1


# -- partitioning and construction, one process -------------------------------------------------
def test_partition_methods():
    from shardwise.pipe import partition_balanced, partition_layers, LayerSpec

    assert partition_balanced([1, 1, 1, 1, 1], 2) == [0, 3, 5]  # uniform: the first part takes the extra
    assert partition_balanced([0, 1, 1, 0], 2) == [0, 2, 4]  # zero-weight layers join the part before
    assert partition_balanced([5, 1, 1, 1], 3) == [0, 1, 3, 4]  # every part gets a layer, greedy after
    layers = [LayerSpec(torch.nn.Linear, 4, 4), LayerSpec(torch.nn.Linear, 4, 400), LayerSpec(torch.nn.ReLU),
              LayerSpec(torch.nn.Linear, 400, 4), LayerSpec(torch.nn.Linear, 4, 4)]
    assert partition_layers(layers, 2, "parameters") == [0, 3, 5]  # 2020 | 1624 parameters
    heavy = [LayerSpec(torch.nn.Linear, 4, 400), *[LayerSpec(torch.nn.Linear, 4, 4) for _ in range(3)]]
    assert partition_layers(heavy, 2, "parameters") == [0, 1, 4]  # counted on the meta device
    assert partition_layers(heavy, 2, "uniform") == [0, 2, 4]
    assert partition_layers(layers, 2, "uniform") == [0, 3, 5]
    assert partition_layers(layers, 2, "type:relu|linear") == [0, 3, 5]
    assert partition_layers(layers, 2, "type:ReLU") == [0, 4, 5]  # one weighted layer: the last part gets one
    with pytest.raises(shardwise.errors.UsageError, match="cannot split 5 layers into 6"):
        partition_layers(layers, 6, "uniform")
    with pytest.raises(shardwise.errors.UsageError, match="no layer's class name matches"):
        partition_layers(layers, 2, "type:Conv")


def test_one_process_pipeline_module_is_the_gpt():
    """num_stages=1 in one process: the names the stages use, and GPT(cfg)'s math."""
    from model import GPT
    from pipeline import gpt_pipeline, gpt_to_pipe_names, load_gpt_state

    torch.manual_seed(0)
    gpt = GPT(W.CFG)
    pipe = gpt_pipeline(W.CFG)
    assert load_gpt_state(pipe, gpt.state_dict(), W.CFG) == len(gpt_to_pipe_names(W.CFG))
    assert set(pipe.state_dict()) == set(gpt_to_pipe_names(W.CFG).values())
    x = torch.randint(0, W.CFG.vocab_size, (2, W.CFG.seq_len + 1))
    torch.testing.assert_close(pipe.loss_fn(pipe(x[:, :-1]), x[:, 1:]), gpt(x[:, :-1], x[:, 1:]), rtol=0, atol=0)
    with pytest.raises(shardwise.errors.UsageError, match="topology"):
        shardwise.pipe.PipelineModule([torch.nn.ReLU()], topology=object())
    with pytest.raises(shardwise.errors.UsageError, match="needs torch.distributed initialised"):
        shardwise.pipe.PipelineModule([torch.nn.ReLU(), torch.nn.ReLU()], num_stages=2)


@pytest.fixture(scope="module")
def misc(tmp_path_factory):
    return run_distributed(W.two_rank_misc, 2, str(tmp_path_factory.mktemp("pipe_ckpt")), timeout_s=240)


def test_one_stage_pipeline_module_under_data_parallelism_every_zero_stage(misc):
    """num_stages=1 (dp 2): train_batch runs the micro-batches through the strategy like the
    plain engine (no torch schedule), so ZeRO 2 and 3 work there too; SGD parity."""
    for stage in (0, 1, 2, 3):
        ref = W.reference({"zero": stage, "steps": 2}, 2)
        for r in misc:
            o = r["one_stage"][stage]
            assert o["first"] and o["last"]
            torch.testing.assert_close(torch.tensor(o["losses"]), torch.tensor(ref["losses"]), rtol=1e-6, atol=0)
            for s in range(2):
                for k, v in o["params"][s].items():
                    torch.testing.assert_close(v, ref["params"][s][k], rtol=0, atol=1e-5, msg=f"stage {stage} {k}")


def test_checkpoint_loads_across_pipeline_sizes(misc):
    """Saved at (pp 2), loaded at (pp 1, dp 2) and at (pp 2), bitwise: parameter names are the
    global layer indices (and tied_modules.<key>), so every split finds its own."""
    assert all(r["saved"]["equal"] for r in misc)  # a load at the same split restores the values
    want = {}
    for r in misc:
        want.update(r["saved"]["params"])
    for pp in (1, 2):
        seen = set()
        for r in misc:
            got = r["loaded"][pp]
            assert got["steps"] == 2
            for k, v in got["params"].items():
                assert torch.equal(v, want[k]), (pp, k)
            seen |= set(got["params"])
        assert seen == set(want)
