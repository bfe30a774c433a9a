"""`shardwise checkpoint info|export`: Hugging Face layout, sharding, dtype, verification."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import ckpt_workers as W
import shardwise
from shardwise.cli import main


def _saved(tmp_path):
    torch.manual_seed(0)
    from model import GPT, GPTConfig

    model = GPT(GPTConfig.preset("tiny"))
    engine, *_ = shardwise.initialize(model=model, config=W.config(0, 1, bf16=True))
    x = W.global_batches(1, 2)[0]
    engine.backward(engine(x[:, :-1], x[:, 1:]))
    engine.step()
    engine.save_checkpoint(tmp_path / "ckpt")
    return model, engine


def test_export_sharded_and_single(tmp_path, capsys):
    model, engine = _saved(tmp_path)
    masters = {}
    for b in engine.strategy.buckets:  # bf16 training: the fp32 masters are what is exported
        for slot, p in zip(b.layout.slots, b.params):
            masters[id(p)] = b.opt_param.detach()[slot.offset:slot.offset + slot.numel].view(p.shape)
    named = dict(model.named_parameters())
    assert main(["checkpoint", "export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--max-shard-size", "40KB"]) == 0
    index = json.load(open(tmp_path / "hf" / "model.safetensors.index.json"))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all(os.path.exists(tmp_path / "hf" / f) for f in files)
    loaded = {}
    for f in files:
        loaded |= load_file(tmp_path / "hf" / f)
    assert set(loaded) == set(named)  # tied head.weight written once, as Hugging Face does
    assert all(loaded[n].dtype == torch.float32 and torch.equal(loaded[n], masters[id(p)]) for n, p in named.items())
    assert main(["checkpoint", "export", str(tmp_path / "ckpt"), str(tmp_path / "one"), "--dtype", "bf16"]) == 0
    single = load_file(tmp_path / "one" / "model.safetensors")
    assert all(single[n].dtype == torch.bfloat16 and torch.equal(single[n], p.detach()) for n, p in named.items())


def test_info_lists_and_verifies(tmp_path, capsys):
    _saved(tmp_path)
    assert main(["checkpoint", "info", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "latest: global_step1" in out and "world size 1, ZeRO stage 0, bfloat16" in out and "(verified)" in out
    shard = tmp_path / "ckpt" / "global_step1" / "rank00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["checkpoint", "info", str(tmp_path / "ckpt")]) == 1
    assert "BAD: checksum mismatch in shard file" in capsys.readouterr().out


def test_save_16bit_model_at_every_stage(tmp_path):
    """DeepSpeed's save_16bit_model: the whole state dict in the compute dtype, tied weights under
    both names, loadable into a plain model; at stage 3 gathered module by module."""
    from safetensors.torch import load_file as load_st

    from model import GPT, GPTConfig
    from shardwise.testing import run_distributed

    for stage, bf16, name in ((1, False, "pytorch_model.bin"), (3, True, "model.safetensors"),
                              (3, False, "pytorch_model.bin")):
        out = tmp_path / f"s{stage}{bf16}"
        want = run_distributed(W.save_16bit_run, 2, str(out), stage, bf16, name)[0]
        got = load_st(str(out / name)) if name.endswith(".safetensors") else torch.load(out / name)
        assert sorted(got) == sorted(GPT(GPTConfig.preset("tiny")).state_dict())  # safetensors sorts keys
        for k, v in want.items():
            assert got[k].dtype == (torch.bfloat16 if bf16 else torch.float32), k
            assert torch.equal(got[k], v), k
        plain = GPT(GPTConfig.preset("tiny")).to(torch.bfloat16 if bf16 else torch.float32)
        plain.load_state_dict(got, strict=True)


def test_export_hf_gpt2_loads_with_from_pretrained(tmp_path):
    """A transformers GPT-2 trained one step: the export has config.json (recorded in the
    manifest at save) and from_pretrained(export_dir) gives the engine's logits."""
    T = pytest.importorskip("transformers", reason="needs transformers (pip install -e '.[test]')")

    from shardwise.checkpoint import export_hf

    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = T.GPT2LMHeadModel(cfg)
    engine, *_ = shardwise.initialize(model=model, config=W.config(1, 1))
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    engine.save_checkpoint(tmp_path / "ckpt")
    files = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert str(tmp_path / "hf" / "config.json") in files
    model.eval()
    with torch.no_grad():
        want = model(input_ids=x).logits
    loaded = T.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    auto = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, want)
        assert torch.equal(auto(input_ids=x).logits, want)
