"""ZeRO stage 3 against single-process plain PyTorch, and its user-facing contracts.

Tolerances as in test_parity.py (README "Parity"): fp32 losses rtol 1e-6 / parameters atol
1e-5 at every world size (stage 3 reduces through a different flat layout than one process
sums, so world size 1 is not bitwise), bf16 2e-2.
"""
from __future__ import annotations

import pytest
import torch

from parity_workers import reference_run, shardwise_run
from stage3_workers import (gathered_round_trip, placeholder_errors, prefetch_probe, zoo_config, zoo_reference,
                            zoo_shardwise)
from shardwise.testing import run_distributed

STEPS = 10
GLOBAL_BATCH = 6


def config(gas: int = 1, clip: float = 0.0, **zero) -> dict:
    return {
        "train_batch_size": GLOBAL_BATCH,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, **zero},
        "gradient_clipping": clip,
        "steps_per_print": 1000,
    }


def _close(got: dict, want: dict, *, loss_rtol=1e-6, atol=1e-5) -> None:
    torch.testing.assert_close(got["losses"], want["losses"], rtol=loss_rtol, atol=0)
    assert got["params"].keys() == want["params"].keys()
    for k in want["params"]:
        torch.testing.assert_close(got["params"][k], want["params"][k], rtol=0, atol=atol,
                                   msg=lambda m, k=k: f"parameter {k}: {m}")


@pytest.fixture(scope="module")
def reference():
    return reference_run(GLOBAL_BATCH, STEPS)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_gpt_parity(world, reference):
    got = run_distributed(shardwise_run, world, config(), STEPS)
    for r in got:
        _close(r, reference)
    # every rank holds 1/world of the model (padding aside), nothing persistent with threshold 0
    psi = sum(t.numel() for k, t in reference["params"].items() if k != "head.weight")
    assert got[0]["memory"]["params"] <= 4 * psi / world * 1.05 + 4 * 16 * world * 8


def test_gpt_parity_accumulation_clipping_persistent(reference):
    """gas 2, clipping, default persistence threshold (LayerNorms and biases stay whole), small
    prefetch bucket."""
    ref = reference_run(GLOBAL_BATCH, STEPS, clip=0.05)
    cfg = config(gas=3, clip=0.05, stage3_param_persistence_threshold=1000, stage3_prefetch_bucket_size=3000)
    got = run_distributed(shardwise_run, 2, cfg, STEPS)
    _close(got[0], ref)
    torch.testing.assert_close(got[0]["norms"], ref["norms"], rtol=1e-5, atol=0)


def test_gpt_parity_bf16():
    ref = reference_run(GLOBAL_BATCH, STEPS, compute="bf16")
    got = run_distributed(shardwise_run, 2, {**config(), "bf16": {"enabled": True}}, STEPS)
    _close(got[0], ref, loss_rtol=2e-2, atol=2e-2)
    assert got[0]["memory"]["master_params"] > 0


@pytest.fixture(scope="module")
def zoo_ref():
    return zoo_reference(STEPS)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_case_parity(world, zoo_ref):
    """Tied, reused, borrowed (same and other unit), sometimes-unused, frozen + LoRA,
    re-entrant and non-re-entrant checkpointing, generation under no_grad between steps."""
    got = run_distributed(zoo_shardwise, world, zoo_config(), STEPS)
    for r in got:
        _close(r, zoo_ref)
        assert r["gens"] == zoo_ref["gens"]


def test_every_case_parity_prefetch_off_and_tight_live_budget(zoo_ref):
    cfg = zoo_config(stage3_prefetch_bucket_size=0, stage3_max_reuse_distance=0)
    _close(run_distributed(zoo_shardwise, 2, cfg, STEPS)[0], zoo_ref)
    cfg = zoo_config(stage3_prefetch_bucket_size=100, stage3_max_live_parameters=2000)
    _close(run_distributed(zoo_shardwise, 2, cfg, STEPS)[0], zoo_ref)


def test_sharded_parameter_outside_forward_is_a_named_error():
    out = run_distributed(placeholder_errors, 2)[0]
    assert out["shape"] == (64, 16) and out["numel"] == 1024 and out["requires_grad"] and out["is_param"]
    assert "GatheredParameters" in out["repr"]
    for what in ("add", "sum", "data", "copy", "item"):
        assert "'blocks.0.fc.weight' is sharded by ZeRO stage 3" in out[what], (what, out[what])
        assert "GatheredParameters" in out[what]
    assert "blocks.3.mix.weight" in out["undeclared"] and "register_external_parameter" in out["undeclared"]


def test_gathered_parameters_read_and_modify():
    for r in run_distributed(gathered_round_trip, 2, 1):
        torch.testing.assert_close(r["after"], r["read"] * 2)  # rank 1's change reached every rank
        assert torch.all(r["emb0"] == 0.5)
        torch.testing.assert_close(r["kept"], r["after"])  # no modifier_rank: change discarded
        assert r["sharded_after"]


def test_prefetch_gathers_the_next_unit_while_the_current_one_runs():
    cfg = config(stage3_prefetch_bucket_size=3000)
    on = run_distributed(prefetch_probe, 2, cfg)[0]
    assert on["second"][0] == ("blocks.0", "gathering") or on["second"][0] == ("blocks.0", "gathered"), on
    assert on["live_after"] == []  # a no_grad forward on another path frees what it gathered
    off = run_distributed(prefetch_probe, 2, config(stage3_prefetch_bucket_size=0))[0]
    assert off["second"][0] == ("blocks.0", "sharded"), off
    assert off["peak"] < on["memory"]["params"] * 2 * 0.9  # never the whole model at once


@pytest.mark.parametrize("world", [2, 4])
def test_model_states_are_16_psi_over_nd(world):
    """fp32 AdamW: parameter 4 + gradient 4 + two moments 8 bytes, all sharded: 16 psi / Nd."""
    got = run_distributed(zoo_shardwise, world, {**zoo_config(), "train_batch_size": world}, 1)[0]
    from stage3_workers import Zoo

    torch.manual_seed(0)
    m = Zoo()
    psi = sum(p.numel() for p in m.parameters())
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    mem = got["memory"]
    ideal = 4 * psi / world + 12 * trainable / world
    model_states = mem["params"] + mem["grads"] + mem["optimizer_state"]
    assert abs(model_states - ideal) <= 0.05 * ideal, (model_states, ideal)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_zero_init_values_equal_plain_construction(world):
    from stage3_workers import init_build, plain_gpt

    want = plain_gpt("tiny", {})
    for r in run_distributed(init_build, world, True, "tiny", {}):
        assert r["kinds"] == ["InitParameter"]  # nothing whole survived construction
        assert r["params"].keys() == want.keys()
        for k in want:
            assert torch.equal(r["params"][k], want[k]), k


def test_zero_init_trains_like_a_plain_build():
    from stage3_workers import init_build

    a = run_distributed(init_build, 2, True, "tiny", {}, 3)[0]["params"]
    b = run_distributed(init_build, 2, False, "tiny", {}, 3)[0]["params"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_zero_init_no_rank_allocates_the_whole_model():
    """A 217 MiB model at 2 ranks: construction under Init grows a rank by about half of it
    plus the largest block (28 MiB); a plain construction by all of it."""
    from stage3_workers import init_build

    big = dict(vocab_size=256, d_model=768, n_layer=8, n_head=8, seq_len=16)
    for r in run_distributed(init_build, 2, True, "tiny", big):
        assert r["built_peak_mib"] < r["full_mib"] / 2 + 28 + 8, r
    for r in run_distributed(init_build, 2, False, "tiny", big):
        assert r["built_peak_mib"] > 0.95 * r["full_mib"], r  # the measurement sees a whole model


def test_fetch_units_by_class(reference):
    """set_fetch_units(model, ["MLP", "CausalSelfAttention"]): each of those modules is a unit."""
    got = run_distributed(shardwise_run, 2, config(), STEPS, ["MLP", "CausalSelfAttention"])[0]
    _close(got, reference)
    assert got["units"] == ["", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    with pytest.raises(Exception, match="do not occur in GPT"):
        run_distributed(shardwise_run, 1, config(), 1, ["NoSuchBlock"])


def test_gathered_parameters_on_one_rank_only_is_a_named_error():
    from stage3_workers import gathered_on_one_rank_only

    msg = run_distributed(gathered_on_one_rank_only, 2)[0]
    assert "GatheredParameters must be called on every rank" in msg and "[1]" in msg, msg


def test_zero_init_refuses_other_stages():
    from shardwise.errors import UsageError
    from shardwise.zero import Init

    with pytest.raises(UsageError, match="stage 3"):
        Init(config={"train_batch_size": 1, "zero_optimization": {"stage": 2}})
