"""Bit-for-bit resume and resharding across world sizes / ZeRO stages (gloo, CPU, fp32)."""
from __future__ import annotations

import torch

import ckpt_workers as W
from shardwise.checkpoint import consolidate
from shardwise.testing import run_distributed


def test_resume_is_bitwise_through_the_engines_loader(tmp_path):
    """20 steps straight (saving at 10) == 10 steps, save, fresh processes, load, 10 more:
    losses, parameters, optimizer state, LR and counters equal; dropout RNG and the data loader's
    position (mid-epoch) are restored."""
    straight = run_distributed(W.resume_run, 2, str(tmp_path), "straight")
    resumed = run_distributed(W.resume_run, 2, str(tmp_path), "resume")
    for a, b in zip(straight, resumed):
        assert len(a["losses"]) == len(b["losses"]) == 20  # 10 steps x 2 micro-batches
        assert a["losses"] == b["losses"]
        assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
        for sa, sb in zip(a["optim"], b["optim"]):
            assert sa.keys() == sb.keys()
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert a["lr"] == b["lr"] and a["counters"] == b["counters"]
        assert b["client"] == {"epoch": 1, "note": "mid-epoch"}


def _merge(per_rank: list[dict]) -> dict:
    """Per-parameter full optimizer state from every rank's pieces."""
    out: dict = {}
    for rank_state in per_rank:
        for name, entry in rank_state.items():
            slot = out.setdefault(name, {"param": entry["param"]})
            assert torch.equal(slot["param"], entry["param"])  # every rank holds the whole param
            for k, pieces in entry.items():
                if k == "param":
                    continue
                full = slot.setdefault(k, torch.full((entry["param"].numel(),), float("nan")))
                for start, t in pieces:
                    full[start:start + t.numel()] = t
    return out


def _assert_same_state(saved: dict, loaded: dict) -> None:
    assert saved.keys() == loaded.keys()
    for name in saved:
        assert saved[name].keys() == loaded[name].keys(), name
        for k in saved[name]:
            assert not torch.isnan(loaded[name][k]).any(), (name, k)
            assert torch.equal(saved[name][k], loaded[name][k]), (name, k)


def _reshard(tmp_path, save_world: int, save_stage: int, targets: list[tuple[int, int]], **kw) -> None:
    steps = 3
    src = run_distributed(W.reshard_save, save_world, str(tmp_path), save_stage, steps, **kw)
    saved = _merge([r["saved"] for r in src])
    uninterrupted = src[0]["next"]
    full = consolidate(tmp_path)
    compute = torch.bfloat16 if kw.get("bf16") else torch.float32
    for name, entry in saved.items():
        assert torch.equal(full[name].reshape(-1), entry["master"]), name  # fp32 master weights
        assert torch.equal(full[name].reshape(-1).to(compute).float(), entry["param"]), name
    for world, stage in targets:
        out = run_distributed(W.reshard_load, world, str(tmp_path), stage, steps, **kw)
        _assert_same_state(saved, _merge([r["saved"] for r in out]))
        assert out[0]["global_steps"] == steps + 1
        tol = dict(rtol=1e-2, atol=1e-3) if kw.get("bf16") else dict(rtol=1e-5, atol=1e-6)  # one bf16 ulp
        for k, v in uninterrupted.items():
            torch.testing.assert_close(out[0]["next"][k], v, **tol, msg=f"{k} at {world}/{stage}")


def test_reshard_from_world2_stage2(tmp_path):
    _reshard(tmp_path, 2, 2, [(1, 0), (3, 2), (2, 1)])


def test_reshard_to_and_from_stage3(tmp_path):
    """Stage 3 keeps only a chunk of every parameter: its checkpoint loads at other world sizes
    and stages, and a stage-0/1/2 checkpoint loads into stage 3."""
    _reshard(tmp_path / "a", 2, 3, [(1, 0), (3, 2), (4, 1), (3, 3)])
    _reshard(tmp_path / "b", 3, 1, [(2, 3)])


def test_resume_is_bitwise_at_stage3(tmp_path):
    straight = run_distributed(W.resume_run, 2, str(tmp_path), "straight", 3)
    resumed = run_distributed(W.resume_run, 2, str(tmp_path), "resume", 3)
    for a, b in zip(straight, resumed):
        assert a["losses"] == b["losses"]
        assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
        for sa, sb in zip(a["optim"], b["optim"]):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_reshard_from_world3_stage1_sgd_momentum(tmp_path):
    """Any optimizer with per-element state reshards (SGD's momentum_buffer here)."""
    _reshard(tmp_path, 3, 1, [(2, 0)], optimizer="SGD")


def test_reshard_bf16_master_weights_are_fp32(tmp_path):
    """bf16 training keeps fp32 masters: they are what is saved, and what a new layout gets."""
    _reshard(tmp_path, 2, 2, [(1, 1)], bf16=True)
