"""`shardwise.estimate` / `shardwise.planner` / `shardwise.zero.units`: formulas, layout, CLI JSON.

Models are built on the meta device: the 1B-parameter GPT below costs no memory. The factories
are module-level so the CLI can load them as ``test_estimate:gpt_1b`` (pytest puts this folder
on sys.path).
"""
from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn as nn

from model import GPT, GPTConfig
from shardwise.cli import main as cli_main
from shardwise.comm.buckets import assign_buckets
from shardwise.errors import ConfigError, UsageError
from shardwise.estimate import (TransformerShape, activation_bytes, estimate_all, model_states, parse_bytes,
                                transformer_shape)
from shardwise.planner import UnitTooLargeError, plan_job, plan_model
from shardwise.zero.units import UnknownUnitClassError, fetch_units

FIELDS = ["params", "grads", "master_params", "optimizer_state", "activations", "total"]


def gpt_tiny() -> GPT:
    return GPT(GPTConfig.preset("tiny"))


def gpt_1b() -> GPT:
    # 1.01e9 parameters; the 100B acceptance model is d_model=10240, n_layer=80, n_head=80
    return GPT(GPTConfig(vocab_size=50304, seq_len=2048, n_layer=18, n_head=16, d_model=2048))


def write_config(tmp_path, **extra) -> str:
    doc = {"train_batch_size": 128, "bf16": {"enabled": True},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, **extra}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(doc))
    return str(path)


# -- analytic formulas --------------------------------------------------------------------------
@pytest.mark.parametrize("precision,pb", [("fp32", 4), ("bf16", 2), ("fp16", 2)])
def test_analytic_per_stage(precision, pb):
    # gradients in the compute dtype (the default): the ZeRO paper's / DeepSpeed's figures,
    # 16, 4+12/N (pb 2), 2+14/N, 16/N bytes per parameter for mixed-precision Adam
    n, w = 7_000_000_000, 8
    master = 0 if precision == "fp32" else 4
    s = {k: model_states(n, w, k, precision) for k in range(4)}
    assert s[0] == dict(params=pb * n, grads=pb * n, master_params=master * n, optimizer_state=8 * n,
                        activations=None, total=(2 * pb + master + 8) * n)
    assert s[0]["total"] == 16 * n
    assert s[1]["optimizer_state"] == 8 * n // w and s[1]["grads"] == pb * n
    assert s[1]["master_params"] == master * n // w
    assert s[1]["total"] == 2 * pb * n + (master + 8) * n // w
    assert s[2]["grads"] == pb * n // w and s[2]["params"] == pb * n
    assert s[2]["total"] == pb * n + (pb + master + 8) * n // w
    assert s[3]["total"] == 16 * n // w
    assert s[3]["params"] == pb * n // w


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_analytic_fp32_gradients(precision):
    # data_types.grad_accum_dtype "fp32": 4-byte gradients, 18 bytes per parameter at stage 3
    n, w = 7_000_000_000, 8
    s = {k: model_states(n, w, k, precision, grad_precision="fp32") for k in range(4)}
    assert s[0]["grads"] == 4 * n and s[1]["grads"] == 4 * n
    assert s[2]["grads"] == 4 * n // w and s[3]["grads"] == 4 * n // w
    assert s[3]["total"] == 18 * n // w
    with pytest.raises(UsageError, match="grad_precision"):
        model_states(n, w, 0, "bf16", grad_precision="fp16")


def test_analytic_optimizers_and_persistent():
    assert model_states(1000, 1, 0, optimizer="sgd")["optimizer_state"] == 4000
    assert model_states(1000, 1, 0, optimizer="sgd-nomomentum")["optimizer_state"] == 0
    assert model_states(1000, 10, 3, "bf16", persistent_numel=50)["params"] == 2 * (100 + 50)
    with pytest.raises(UsageError, match="unknown optimizer"):
        model_states(1000, 1, 0, optimizer="lion")
    with pytest.raises(UsageError, match="stage"):
        model_states(1000, 1, 4)


def test_activation_formula():
    """The terms of [Note: activation estimate]; tests/unit/test_activation_estimate.py checks
    the figure against what autograd saves."""
    shape = TransformerShape(layers=2, hidden=64, heads=4, vocab=None)
    s, b = 32, 3
    ints = (2 * b + 1) * s * 8 + 4  # token / position ids and targets; the loss's fp32 total weight
    layer16 = 16 * s * b * 64 * 2 + 4 * s * b * 4 + 4 * s * b * 4
    outside16 = 2 * s * b * 64 * 2 + 2 * s * b * 4 + ints
    assert activation_bytes(shape, b, s, "bf16") == 2 * layer16 + outside16
    assert activation_bytes(shape, b, s, "bf16", checkpoint_every=1) == 2 * s * b * 64 * 2 + outside16
    assert activation_bytes(shape, b, s, "bf16", checkpoint_every=2) == layer16 + s * b * 64 * 2 + outside16
    assert activation_bytes(shape, None, s) is None
    with_vocab = TransformerShape(2, 64, 4, vocab=100)
    assert activation_bytes(with_vocab, b, s, "bf16") == activation_bytes(shape, b, s, "bf16") + s * b * 100 * 4
    assert transformer_shape(gpt_tiny()) == TransformerShape(2, 32, 2, 64)
    st = model_states(gpt_tiny, 2, 1, micro_batch=4, seq_len=16)
    assert st["activations"] == activation_bytes(TransformerShape(2, 32, 2, 64), 4, 16, "fp32")
    assert st["total"] == sum(st[k] for k in FIELDS[:5])
    st = model_states(gpt_tiny, 2, 1, micro_batch=4, seq_len=16, checkpoint_every=1)
    assert st["activations"] == activation_bytes(TransformerShape(2, 32, 2, 64), 4, 16, "fp32", 1)


# -- layout-based estimate ------------------------------------------------------------------------
def test_model_estimate_uses_bucket_layout():
    """Stage 2 at 3 ranks: the numbers come from assign_buckets' padded per-rank chunks."""
    with torch.device("meta"):
        model = gpt_tiny()
    numels = [p.numel() for p in model.parameters()]
    lays = assign_buckets(numels, [0] * len(numels), 3000, 3)
    padded, chunk = sum(l.padded_numel for l in lays), sum(l.chunk_numel(3) for l in lays)
    assert padded > sum(numels)  # padding is accounted for
    got = model_states(model, 3, 2, "bf16", bucket_numel=3000)
    assert got["params"] == 2 * padded
    assert got["grads"] == 2 * chunk and got["master_params"] == 4 * chunk  # bf16 gradient chunk
    assert got["optimizer_state"] == 8 * chunk + 4 * len(lays)  # + one `step` scalar per bucket
    fp32 = model_states(model, 3, 0, "fp32", bucket_numel=3000)
    assert fp32["master_params"] == 0 and fp32["grads"] == 4 * padded


def test_estimate_all_shape_and_frozen_params():
    def frozen_model():
        m = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
        m[0].weight.requires_grad_(False)
        return m

    out = estimate_all(frozen_model, 2)
    assert list(out) == ["world_size", "stages"] and list(out["stages"]) == ["0", "1", "2", "3"]
    assert all(list(v) == FIELDS for v in out["stages"].values())
    s0 = out["stages"]["0"]
    # trainable, last first: bias 10 @ 0, weight 100 @ 16, bias 10 @ 128 -> 138, padded to 160
    assert s0["grads"] == 4 * 160
    assert s0["params"] == 4 * (160 + 100)  # the frozen weight is kept whole, outside the buckets


# -- fetch units ----------------------------------------------------------------------------------
def test_fetch_units_blocks_root_and_tied():
    with torch.device("meta"):
        model = gpt_tiny()
    units = fetch_units(model, persistence_threshold=100)
    assert [u.name for u in units] == ["", "blocks.0", "blocks.1"]
    root = units[0]
    assert "tok_emb.weight" in root.param_names and "ln_f.weight" in root.param_names
    assert not any("head" in n for n in root.param_names)  # tied to tok_emb: counted once
    assert sum(u.numel for u in units) == sum(p.numel() for p in model.parameters())
    assert units[1].persistent_numel == sum(p.numel() for p in model.blocks[0].parameters() if p.numel() < 100)
    by_class = fetch_units(model, unit_classes=["MLP"])
    assert [u.name for u in by_class] == ["", "blocks.0.mlp", "blocks.1.mlp"]
    with pytest.raises(UnknownUnitClassError, match="Blok"):
        fetch_units(model, unit_classes=["Blok"])


def test_fetch_units_shared_across_blocks_go_to_root():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Sequential(shared, nn.ReLU()), nn.Sequential(shared, nn.Linear(4, 4)))
    units = fetch_units(model)
    assert [(u.name, u.numel) for u in units] == [("", 20), ("1", 20)]


# -- plan -------------------------------------------------------------------------------------------
def test_plan_1b_stage3_at_64_ranks(tmp_path):
    """The small version of the acceptance run (100B at 1024 ranks): 16 Ψ / N within 1% (bf16:
    2 parameter + 2 gradient + 4 master + 8 Adam bytes); nothing persistent by default. With
    fp32 gradients (data_types.grad_accum_dtype) 18 Ψ / N."""
    t0 = time.perf_counter()
    report = plan_job(write_config(tmp_path), "test_estimate:gpt_1b", 64, stage=3, device_memory=parse_bytes("80GB"))
    assert time.perf_counter() - t0 < 60
    with torch.device("meta"):
        units = fetch_units(gpt_1b())
    n = sum(u.numel for u in units)
    assert n > 1e9
    assert report.max_bytes == report.min_bytes
    assert report.max_bytes == pytest.approx(16 * n / 64, rel=0.01)
    assert [u[0] for u in report.units] == [""] + [f"blocks.{i}" for i in range(18)]
    assert report.fits is True
    fp32_grads = plan_job(write_config(tmp_path, data_types={"grad_accum_dtype": "fp32"}), "test_estimate:gpt_1b",
                          64, stage=3)
    assert fp32_grads.max_bytes == pytest.approx(18 * n / 64, rel=0.01)
    # all-gather forward + backward of the (padded) model in bf16, reduce-scatter in the gradient
    # dtype (bf16; fp32 when asked), per step
    assert report.comm_bytes_per_step == pytest.approx((2 + 2 + 2) * n, rel=0.01)
    assert fp32_grads.comm_bytes_per_step == pytest.approx((2 + 2 + 4) * n, rel=0.01)


def test_plan_stage2_matches_estimate(tmp_path):
    path = write_config(tmp_path, zero_optimization={"stage": 2, "reduce_bucket_size": 3000})
    report = plan_job(path, "test_estimate:gpt_tiny", 4)
    want = model_states(gpt_tiny, 4, 2, "bf16", bucket_numel=3000)
    assert report.max_bytes == want["total"] and report.stage == 2
    assert all(name.startswith("bucket") for name, _ in report.units)
    assert sum(k for _, k in report.units) == sum(p.numel() for p in gpt_tiny().parameters())


def test_plan_errors(tmp_path):
    with pytest.raises(ConfigError, match="divisible"):
        plan_job(write_config(tmp_path), "test_estimate:gpt_tiny", 3)  # 128 at 3 ranks
    with torch.device("meta"):
        model = gpt_1b()
    with pytest.raises(UnitTooLargeError, match="fetch unit '<root>'"):  # embeddings: the largest unit
        plan_model(model, 64, 3, precision="bf16", device_memory=parse_bytes("300MB"))
    assert plan_model(model, 64, 3, precision="bf16", device_memory=parse_bytes("800MB")).fits is False
    with pytest.raises(UsageError, match="stage 3"):
        plan_job(write_config(tmp_path), "test_estimate:gpt_tiny", 2, unit_classes=["Block"])


def test_config_stage3_keys_are_read_by_the_planner(tmp_path):
    path = write_config(tmp_path, zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 0})
    report = plan_job(path, "test_estimate:gpt_tiny", 2)
    assert report.stage == 3
    assert report.states["params"] == report.states["grads"]  # bf16 shards and grads; nothing whole
    path = write_config(tmp_path, zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 1000})
    report = plan_job(path, "test_estimate:gpt_tiny", 2)
    assert report.states["params"] > report.states["grads"]  # LayerNorms and biases kept whole


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6 and parse_bytes("1.5e3") == 1500
    with pytest.raises(UsageError):
        parse_bytes("lots")


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_estimate_json(capsys):
    assert cli_main(["estimate", "--params", "7e9", "--nodes", "2", "--gpus-per-node", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["world_size"] == 8 and list(out["stages"]) == ["0", "1", "2", "3"]
    for s, v in out["stages"].items():
        assert list(v) == FIELDS and v == model_states(7e9, 8, int(s))


def test_cli_estimate_model_table_and_errors(capsys, tmp_path):
    assert cli_main(["estimate", "--model", "test_estimate:gpt_tiny", "--world-size", "2", "--micro-batch", "2",
                     "--seq", "16", "--device-memory", "1GB", "--config", write_config(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "fits" in text and "bf16" in text and len(text.strip().splitlines()) >= 6
    assert cli_main(["estimate", "--params", "1e9"]) == 2  # no world size
    assert "--world-size" in capsys.readouterr().err
    assert cli_main(["estimate", "--model", "no_such_module:f", "--world-size", "2"]) == 2


def test_cli_hf_config_without_transformers(capsys):
    try:
        import transformers  # noqa: F401
        pytest.skip("transformers is installed")
    except ImportError:
        pass
    assert cli_main(["estimate", "--hf-config", "config.json", "--world-size", "2"]) == 2
    assert "transformers" in capsys.readouterr().err


def test_cli_plan_json(capsys, tmp_path):
    assert cli_main(["plan", write_config(tmp_path), "--model", "test_estimate:gpt_tiny", "--world-size", "4",
                     "--stage", "3", "--device-memory", "1GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["world_size", "stage", "model_state_bytes_per_rank", "units", "comm_bytes_per_step", "fits"]
    assert out["world_size"] == 4 and out["stage"] == 3 and out["fits"] is True
    assert set(out["model_state_bytes_per_rank"]) == {"max", "min"}
    assert out["units"][0] == {"name": "", "numel": out["units"][0]["numel"]} and len(out["units"]) == 3
    assert cli_main(["plan", write_config(tmp_path), "--model", "test_estimate:gpt_tiny", "--world-size", "4"]) == 0
    assert "collectives" in capsys.readouterr().out


def test_plan_and_estimate_share_one_memory_model():
    """`shardwise plan` and `model_states` give the same per-rank bytes at every stage, with
    persistent and frozen parameters at stage 3 (the engine's layout: tests/distributed/
    test_estimate_vs_measured.py checks both against memory_report())."""
    def partly_frozen():
        m = gpt_tiny()
        m.pos_emb.weight.requires_grad_(False)
        return m

    keys = ("params", "grads", "master_params", "optimizer_state", "total")
    for factory in (gpt_tiny, partly_frozen):
        with torch.device("meta"):
            model = factory()
        for stage in range(4):
            for threshold in (0, 100):
                plan = plan_model(model, 3, stage, precision="bf16", bucket_numel=3000,
                                  persistence_threshold=threshold)
                want = model_states(model, 3, stage, "bf16", bucket_numel=3000, persistence_threshold=threshold)
                assert {k: plan.states[k] for k in keys} == {k: want[k] for k in keys}
                assert plan.max_bytes == plan.min_bytes == want["total"]
    with torch.device("meta"):
        model = gpt_tiny()
    whole = model_states(model, 3, 3, "bf16", persistence_threshold=100)
    sharded = model_states(model, 3, 3, "bf16")
    assert whole["params"] > sharded["params"] and whole["grads"] >= sharded["grads"]
    with pytest.raises(UsageError, match="rank"):
        model_states(model, 3, 3, rank=3)
