"""Bad input and interrupted saves (faults.md rows 4-10, 19, 21, 22): each injected, each a named
error with the file / rank / tags in its message, and the last commit intact."""
from __future__ import annotations

import json
import os

import pytest
import torch

import ckpt_workers as W
import shardwise
from shardwise.checkpoint import committed_tags, consolidate, info
from shardwise.checkpoint import save as ck_save
from shardwise.errors import CheckpointError
from shardwise.testing import RankFailedError, run_distributed


def _engine(seed: int = 0, keep_last: int | None = None, preset_overrides: dict | None = None):
    torch.manual_seed(seed)
    from model import GPT, GPTConfig

    model = GPT(GPTConfig.preset("tiny", **(preset_overrides or {})))
    engine, *_ = shardwise.initialize(model=model, config=W.config(0, 1, keep_last=keep_last))
    x = W.global_batches(1, 2)[0]
    engine.backward(engine(x[:, :-1], x[:, 1:]))
    engine.step()
    return engine, model


@pytest.fixture()
def saved(tmp_path):
    engine, model = _engine()
    path = engine.save_checkpoint(tmp_path)
    return tmp_path, path, engine, model


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _load_fails(ckpt_dir, match: str, **kw):
    engine, model = _engine(seed=5)
    before = _params(model)
    with pytest.raises(CheckpointError, match=match) as err:
        engine.load_checkpoint(ckpt_dir, **kw)
    after = _params(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "state touched before the error"
    assert engine.global_steps == 1
    return str(err.value)


def test_truncated_and_missing_shard(saved):
    d, path, *_ = saved
    shard = os.path.join(path, "rank00000.safetensors")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    msg = _load_fails(d, "truncated")
    assert shard in msg and f"{size - 100} bytes, expected {size}" in msg
    os.unlink(shard)
    assert shard in _load_fails(d, "missing")


def test_missing_and_garbage_manifest(saved):
    d, path, *_ = saved
    manifest = os.path.join(path, "manifest.json")
    text = open(manifest).read()
    open(manifest, "w").write(text[: len(text) // 2])
    assert manifest in _load_fails(d, "not valid JSON")
    os.unlink(manifest)
    msg = _load_fails(d, "its manifest .* is missing")  # `latest` names a tag whose manifest is gone
    assert manifest in msg
    msg = _load_fails(d, "the manifest .* is missing", tag="global_step1")
    assert manifest in msg


def test_bit_flip_names_file_and_tensor(saved):
    d, path, *_ = saved
    shard = os.path.join(path, "rank00000.safetensors")
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) - 10)  # inside the last tensor's data
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    msg = _load_fails(d, "checksum mismatch for tensor")
    assert shard in msg and "for tensor 'optim.exp_avg_sq:tok_emb.weight'" in msg
    report = info(d)
    assert not report["tags"][0]["ok"] and "checksum" in report["tags"][0]["problem"]


def test_latest_empty_garbage_or_missing_tag(saved):
    d, path, *_ = saved
    latest = os.path.join(d, "latest")
    for content, match in (("", "is empty"), ("\x00garbage\n", "not a committed"), ("global_step99", "not a committed")):
        open(latest, "w").write(content)
        assert "committed tags in" in _load_fails(d, match) and "global_step1" in _load_fails(d, match)
    os.unlink(latest)
    assert "['global_step1']" in _load_fails(d, "does not exist")
    assert _engine(seed=5)[0].load_checkpoint(d / "nowhere") == (None, None)  # no checkpoint at all: DeepSpeed's answer
    _load_fails(d / "nowhere", "does not exist", tag="global_step1")
    _load_fails(d, "does not exist", tag="global_step99")


def test_unknown_format_version(saved):
    d, path, *_ = saved
    manifest = os.path.join(path, "manifest.json")
    doc = json.load(open(manifest))
    doc["format_version"] = 99
    json.dump(doc, open(manifest, "w"))
    assert "reads versions [1, 2, 3, 4, 5]" in _load_fails(d, "format version 99")


def test_other_model_is_a_named_error(saved):
    d, *_ = saved
    torch.manual_seed(0)
    from model import GPT, GPTConfig

    model = GPT(GPTConfig.preset("tiny", n_layer=3))
    engine, *_ = shardwise.initialize(model=model, config=W.config(0, 1))
    with pytest.raises(CheckpointError, match="does not match the model .saved at world size 1, ZeRO stage 0"):
        engine.load_checkpoint(d)


def test_module_only_and_consolidate_match_state_dict(saved):
    d, path, _, model = saved
    full = consolidate(d)
    ref = model.state_dict()
    assert list(full) == list(ref)  # names and order as in model.state_dict(), tied names included
    assert all(torch.equal(full[k], ref[k]) for k in ref)
    engine, model2 = _engine(seed=5)
    engine.load_checkpoint(d, load_module_only=True)
    assert all(torch.equal(v, ref[k]) for k, v in model2.state_dict().items())
    assert engine.global_steps == 1  # counters untouched with load_module_only


def test_stale_tmp_dir_is_ignored_and_cleaned(saved):
    d, path, engine, _ = saved
    stale = d / ".tmp-global_step2"
    stale.mkdir()
    (stale / "rank00000.safetensors").write_bytes(b"partial")
    assert committed_tags(d) == ["global_step1"]
    assert info(d)["stale"] == [".tmp-global_step2"]
    engine.save_checkpoint(d, tag="global_step2")
    assert not stale.exists() and committed_tags(d) == ["global_step1", "global_step2"]


def test_crash_between_manifest_and_latest_leaves_old_latest(saved, monkeypatch):
    """Rank 0 dies after the rename and before `latest` is replaced: `latest` is old, never
    empty or partial; both checkpoints load."""
    d, path, engine, _ = saved

    def die(*a, **k):
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(ck_save, "atomic_write_text", die)
    with pytest.raises(KeyboardInterrupt):
        engine.save_checkpoint(d, tag="newer")
    assert open(d / "latest").read() == "global_step1"
    assert committed_tags(d) == ["global_step1", "newer"]
    monkeypatch.undo()
    e2, _ = _engine(seed=5)
    assert e2.load_checkpoint(d)[0].endswith("global_step1")
    assert e2.load_checkpoint(d, tag="newer")[0].endswith("newer")


def test_fifty_rotations_keep_two_and_leak_no_fds(tmp_path):
    engine, _ = _engine(keep_last=2)
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    engine.save_checkpoint(tmp_path, tag="warmup")
    engine.load_checkpoint(tmp_path)
    before = fds()
    for i in range(50):
        engine.save_checkpoint(tmp_path, tag=f"t{i}")
        if i % 10 == 0:
            engine.load_checkpoint(tmp_path)
    assert fds() == before
    assert sorted(os.listdir(tmp_path)) == ["latest", "t48", "t49"]
    assert open(tmp_path / "latest").read() == "t49"


def test_disk_full_on_one_rank_is_collective_and_commits_nothing(tmp_path):
    out = run_distributed(W.disk_full, 2, str(tmp_path))
    for r in out:
        msg = r["error"]
        assert "rank(s) [1]" in msg and "rank00001.safetensors" in msg and "disk is full" in msg
        assert "bytes" in msg and "nothing was committed" in msg
    assert out[0]["listing"] == ["global_step1", "latest"]  # stale .tmp cleaned; keep_last=1 kept it
    assert open(tmp_path / "latest").read() == "global_step1"
    assert info(tmp_path)["tags"][0]["ok"]


def test_save_on_rank0_only_names_the_missing_rank(tmp_path):
    out = run_distributed(W.save_on_rank0_only, 2, str(tmp_path), timeout_s=60)
    assert "must be called on every rank" in out[0] and "[1]" in out[0]
    assert committed_tags(tmp_path) == []


def test_kill_during_shard_write_keeps_previous_commit(tmp_path):
    with pytest.raises(RankFailedError):
        run_distributed(W.killed_during_write, 2, str(tmp_path), timeout_s=60, grace_s=1.0)
    assert open(tmp_path / "latest").read() == "global_step1"
    assert committed_tags(tmp_path) == ["global_step1"]
    report = info(tmp_path)
    assert report["tags"][0]["ok"] and report["stale"] == [".tmp-second"]
    engine, _ = _engine(seed=5)  # a fresh start (world 1) resumes and cleans the leftovers
    assert engine.load_checkpoint(tmp_path)[0].endswith("global_step1")
    engine.save_checkpoint(tmp_path)
    assert info(tmp_path)["stale"] == []
