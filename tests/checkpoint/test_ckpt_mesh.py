"""Checkpoints follow the mesh: saved at (dp 2, tp 2) or (pp 2, dp 2), loaded at dp 4 (a plain
model), and the reverse, bitwise (4 gloo ranks; ckpt_mesh_workers.py)."""
from __future__ import annotations

import os

import pytest
import torch

import ckpt_mesh_workers as W
from safetensors.torch import load_file

from shardwise.checkpoint import consolidate, export_hf
from shardwise.checkpoint import manifest as M
from shardwise.checkpoint.reader import PieceReader
from shardwise.testing import run_distributed
from shardwise.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint


def _all_kinds(path: str) -> dict[tuple[str, str], torch.Tensor]:
    m = M.read_manifest(path)
    out = {}
    with PieceReader(path, m) as reader:
        for name, entry in m["tensors"].items():
            n = torch.Size(entry["shape"]).numel()
            for kind in ["param", *entry["optimizer_state"]]:
                out[(name, kind)] = reader.read(name, kind, 0, n)
    return out


def _same(a: dict, b: dict) -> list:
    bad = sorted(set(a) ^ set(b))
    bad += [k for k in set(a) & set(b) if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    return bad


def _check_cycle(root, out, saved_mesh: dict) -> dict:
    a, b, c = (os.path.join(root, x, "t") for x in "ABC")
    ma, mb, mc = (M.read_manifest(p) for p in (a, b, c))
    assert ma["format_version"] == 5 and ma["mesh"] == saved_mesh and mb["mesh"] == {"pp": 1, "dp": 4, "tp": 1}
    assert mc["mesh"] == saved_mesh and len(ma["files"]) <= 4 and ma["world_size"] == 4
    # every tensor, weights and optimizer state, bitwise through dp 4 and back
    ka, kb, kc = _all_kinds(a), _all_kinds(b), _all_kinds(c)
    assert any(k == "exp_avg" for _, k in ka)
    assert _same(ka, kb) == [] and _same(ka, kc) == []
    assert ma["state_dict_keys"] == mb["state_dict_keys"] == mc["state_dict_keys"]
    assert ma["aliases"] == mb["aliases"]
    whole = consolidate(a, dtype=None)
    assert set(whole) == set(ma["state_dict_keys"])
    fp32 = get_fp32_state_dict_from_zero_checkpoint(a)
    assert all(torch.equal(fp32[k], whole[k]) for k in whole)
    files = export_hf(a, os.path.join(root, "hf"))  # Hugging Face layout (one file at this size)
    exported = load_file(files[0])
    assert set(exported) == set(ma["tensors"]) and all(torch.equal(v, whole[k]) for k, v in exported.items())
    # what every rank's model holds after each load: the saved values
    for phase in (1, 2):
        for rank, r in enumerate(out):
            values = r[phase]["values"]
            assert values, (phase, rank)
            for k, v in values.items():
                assert torch.equal(v, whole[k].to(v.dtype)), (phase, rank, k)
            assert r[phase]["steps"] == 2
    # the saving ranks' own values are the checkpoint's
    for r in out:
        for k, v in r[0]["values"].items():
            assert torch.equal(v, whole[k].to(v.dtype)), k
    return {"manifest": ma, "whole": whole}


def _tp_built() -> bool:
    try:
        from shardwise.tensor_parallel import PRESETS  # noqa: F401
    except ImportError:
        return False
    return True


def _pp_built() -> bool:
    try:
        from pipeline import gpt_pipeline  # noqa: F401
        from shardwise.pipe import PipelineModule  # noqa: F401
    except ImportError:
        return False
    return True


def test_dtensor_blocks_tile_and_one_rank_writes_each():
    """Each dp rank's tp group writes every element once (the dp chunking of the flat buffers
    then splits those blocks over dp); a Replicate DTensor is written by tp rank 0 only."""
    out = run_distributed(W.dtensor_blocks, 4)
    for i in range(len(out[0])):
        shape = out[0][i]["shape"]
        for dp in range(2):
            full = torch.full(shape, -1.0)
            for rank in (2 * dp, 2 * dp + 1):  # (dp, tp) mesh: global rank = dp * 2 + tp
                b = out[rank][i]
                region = tuple(slice(o, o + d) for o, d in zip(b["offsets"], b["local"]))
                assert tuple(b["value"].shape) == b["local"]
                if b["unique"]:
                    assert torch.all(full[region] == -1), "two writers of one element"
                    full[region] = b["value"]
            assert torch.equal(full, torch.arange(float(full.numel())).reshape(shape)), (i, dp)
    assert [r[4]["unique"] for r in out] == [True, False, True, False]
    assert [r[0]["local"] for r in out[:2]] == [(3, 3), (2, 3)] and out[1][0]["offsets"] == (3, 0)  # uneven
    assert [r[3]["local"] for r in out[:2]] == [(1, 4), (0, 4)]


@pytest.mark.skipif(not _tp_built(), reason="tensor parallelism not built yet")
def test_tp_checkpoint_loads_at_dp4_and_back(tmp_path):
    out = run_distributed(W.tp_cycle, 4, str(tmp_path), timeout_s=240)
    assert {r[0]["coords"] for r in out} == {"dp=0 tp=0", "dp=0 tp=1", "dp=1 tp=0", "dp=1 tp=1"}
    assert "Shard" in out[0][0]["dtensors"]["blocks.0.attn.q.weight"]
    checked = _check_cycle(str(tmp_path), out, {"pp": 1, "dp": 2, "tp": 2})
    m = checked["manifest"]
    q = m["tensors"]["blocks.0.attn.q.weight"]
    blocks = {(tuple(p["offsets"]), tuple(p["block"])) for p in q["pieces"]}
    assert len(blocks) == 2 and all(b[1] != tuple(q["shape"]) for b in blocks)  # one block per tp rank
    assert M.read_manifest(str(tmp_path / "B" / "t"))["tensors"]["blocks.0.attn.q.weight"]["pieces"][0]["block"] == \
        q["shape"]


@pytest.mark.skipif(not _pp_built(), reason="pipeline parallelism not built yet")
def test_pp_checkpoint_loads_at_dp4_and_back(tmp_path):
    out = run_distributed(W.pp_cycle, 4, str(tmp_path), timeout_s=240)
    assert {r[0]["coords"] for r in out} == {"dp=0 pp=0", "dp=1 pp=0", "dp=0 pp=1", "dp=1 pp=1"}
    assert sum(r[0]["duplicates"] > 0 for r in out) == 2  # the last stage's tied copies
    checked = _check_cycle(str(tmp_path), out, {"pp": 2, "dp": 2, "tp": 1})
    m = checked["manifest"]
    # stage 0's and stage 1's names both in the merged manifest; the tied weight written once (stage 0)
    tied = m["tensors"]["tied_modules.embed.weight"]
    assert {p["rank"] for p in tied["pieces"]} <= {0, 1}
    stage_names = [set(r[0]["values"]) for r in out]
    assert stage_names[0] != stage_names[2] and set(m["state_dict_keys"]) == stage_names[0] | stage_names[2]


@pytest.mark.skipif(not (_pp_built() and _tp_built()), reason="pipeline and tensor parallelism not built yet")
def test_pp_tp_checkpoint_loads_at_dp4_and_back(tmp_path):
    out = run_distributed(W.pp_cycle, 4, str(tmp_path), (1, 0, 1), 2, timeout_s=240)
    assert {r[0]["coords"] for r in out} == {f"dp=0 tp={t} pp={p}" for t in (0, 1) for p in (0, 1)}
    assert any("Shard" in p for r in out for p in r[0]["dtensors"].values())
    checked = _check_cycle(str(tmp_path), out, {"pp": 2, "dp": 1, "tp": 2})
    m = checked["manifest"]
    sharded = [n for n, t in m["tensors"].items() if any(p["block"] != t["shape"] for p in t["pieces"])]
    assert sharded and all(".attn." in n or ".mlp." in n for n in sharded)
