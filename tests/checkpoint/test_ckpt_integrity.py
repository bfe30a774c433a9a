"""A checkpoint whose manifest disagrees with its files, a manifest with bad fields, files that are
not regular files, tags with a newline, format-1 checkpoints: every failed load is a named
:class:`CheckpointError` and changes nothing, on every rank (issue 11, Checkpoints)."""
from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file

import ckpt_corrupt as C
import ckpt_workers as W
from shardwise.checkpoint import committed_tags, consolidate
from shardwise.checkpoint import manifest as M
from shardwise.errors import CheckpointError, ShardwiseError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TAG = "global_step2"


@pytest.fixture()
def ckpt(two_rank, tmp_path):
    """A fresh copy of the world-2 / ZeRO-1 checkpoint of the small model (two shard files)."""
    root, _ = two_rank
    shutil.copytree(root / "pristine", tmp_path / "ckpt", symlinks=True)
    return tmp_path / "ckpt"


def _fails(d, match: str, timeout_s: float = 20.0, extra: bool = True, **kw) -> str:
    """Load into a live engine (whose state differs from the checkpoint's): a CheckpointError
    matching ``match``, nothing changed, and no blocking (the load runs in a thread)."""
    engine, _ = W.small_engine(seed=3, extra=extra)
    before = C.snapshot(engine)
    result = {}

    def load():
        try:
            engine.load_checkpoint(d, **kw)
            result["exc"] = None
        except BaseException as exc:  # noqa: BLE001
            result["exc"] = exc

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(timeout_s)
    assert "exc" in result, f"load_checkpoint blocked for {timeout_s} s"
    exc = result["exc"]
    assert isinstance(exc, CheckpointError), f"expected CheckpointError, got {exc!r}"
    assert C.same(before, C.snapshot(engine)), "a failed load changed state"
    msg = str(exc)
    assert __import__("re").search(match, msg), msg
    return msg


def _swap_keys(doc):  # a weight's piece now points at Adam's first moment, and back
    name, i, _ = C.equal_pieces(doc)
    p = doc["tensors"][name]["pieces"][i]
    for d in (p["keys"], p["crc32"]):
        d["param"], d["exp_avg"] = d["exp_avg"], d["param"]


def _swap_ranges(doc):
    name, i, j = C.equal_pieces(doc)
    a, b = doc["tensors"][name]["pieces"][i], doc["tensors"][name]["pieces"][j]
    for k in ("start", "stop"):
        a[k], b[k] = b[k], a[k]


def _swap_files(doc):
    name, i, j = C.equal_pieces(doc)
    a, b = doc["tensors"][name]["pieces"][i], doc["tensors"][name]["pieces"][j]
    for k in ("file", "rank", "crc32"):
        a[k], b[k] = b[k], a[k]


def _drop(*path):
    def fn(doc):
        for p in path[:-1]:
            doc = doc[p]
        del doc[path[-1]]
    return fn


def _set(value, *path):
    def fn(doc):
        for p in path[:-1]:
            doc = doc[p]
        doc[path[-1]] = value
    return fn


MANIFEST_EDITS = {  # each with the manifest's own checksum recomputed
    "swapped piece keys param <-> exp_avg": (_swap_keys, "keys"),
    "swapped ranges of two pieces": (_swap_ranges, "pieces must cover|checksum mismatch"),
    "swapped files of two pieces": (_swap_files, "checksum mismatch"),
    "missing global_steps": (_drop("counters", "global_steps"), r"counters\.global_steps: Field required"),
    "global_steps a float": (_set(2.5, "counters", "global_steps"), r"counters\.global_steps"),
    "negative micro_steps": (_set(-1, "counters", "micro_steps"), r"counters\.micro_steps"),
    "lr a string": (_set("0.1", "param_groups", 0, "lr"), r"param_groups\[0\]\.lr"),
    "betas of the wrong length": (_set([0.9], "param_groups", 0, "betas"), r"param_groups\[0\]\.betas"),
    "scheduler base_lrs of the wrong length": (_set([0.1, 0.2], "lr_scheduler", "base_lrs"), r"lr_scheduler\.base_lrs"),
    "scheduler last_epoch a string": (_set("3", "lr_scheduler", "last_epoch"), r"lr_scheduler\.last_epoch"),
    "scheduler state missing last_epoch": (_drop("lr_scheduler", "last_epoch"), r"lacks \['last_epoch'\]"),
    "empty ranks[0]": (_set({}, "ranks", 0), r"ranks\[0\]\.rng: Field required"),
    "no ranks": (_set([], "ranks"), r"ranks: List should have at least 1 item"),
    "torch RNG state garbage": (_set("AAAA", "ranks", 0, "rng", "torch"), r"ranks\[0\]\.rng: not a random"),
    "shard file name with a path": (lambda d: d["files"].update({"../x": d["files"].pop("rank00001.safetensors")}),
                                    r"files\['\.\./x'\]"),
    "piece past the tensor's end": (lambda d: d["tensors"]["lin.bias"]["pieces"][-1].update(stop=99), "pieces"),
    "frozen tensor from rank 1": (lambda d: d["tensors"]["frozen"]["pieces"][0].update(
        rank=1, file="rank00001.safetensors"), "written by rank 0"),
    "unknown dtype": (_set("float8", "tensors", "lin.bias", "saved_dtype"), r"saved_dtype"),
    "unknown field": (_set(1, "extra_field"), r"extra_field: Extra inputs are not permitted"),
    "loss scaler junk": (_set({"scale": -1, "hysteresis_left": 0, "good_steps": 0}, "loss_scaler"), "loss_scaler"),
}


@pytest.mark.parametrize("case", list(MANIFEST_EDITS))
def test_manifest_edited_and_rechecksummed(ckpt, case):
    edit, match = MANIFEST_EDITS[case]
    C.edit_doc(ckpt / TAG, edit)
    _fails(ckpt, match)


def _header_dtype(h):
    key = next(k for k in h if k.startswith("param:"))
    h[key]["dtype"] = "I32"


def _header_swap_names(h):  # exchange the names of a weight and its first moment
    key = next(k for k in h if k.startswith("param:"))
    other = "optim.exp_avg:" + key.removeprefix("param:")
    h[key], h[other] = h[other], h[key]


def test_header_dtype_edited(ckpt):
    C.edit_header(ckpt / TAG, "rank00000.safetensors", _header_dtype)
    _fails(ckpt, r"is I32 of shape .* the manifest says F32")


def test_header_names_swapped_with_their_checksums(ckpt):
    """Header names and the manifest's crc32 entries exchanged together: the bytes verify, the
    identity does not (format 2 checksums cover name and key)."""
    C.edit_header(ckpt / TAG, "rank00000.safetensors", _header_swap_names)
    doc = C.read_doc(ckpt / TAG)
    header, _ = C.read_header(ckpt / TAG / "rank00000.safetensors")
    key = next(k for k in header if k.startswith("param:"))
    name = key.removeprefix("param:")
    piece = next(p for p in doc["tensors"][name]["pieces"] if p["file"] == "rank00000.safetensors")
    piece["crc32"]["param"], piece["crc32"]["exp_avg"] = piece["crc32"]["exp_avg"], piece["crc32"]["param"]
    C.write_doc(ckpt / TAG, doc)
    _fails(ckpt, f"checksum mismatch for tensor '{key}'")


def test_header_extra_tensor_or_unparseable(ckpt):
    def extra(h):
        k = next(k for k in h if k.startswith("param:"))
        h["junk"] = h.pop(k)
    C.edit_header(ckpt / TAG, "rank00001.safetensors", extra)
    _fails(ckpt, "has no tensor|does not list")


@pytest.mark.parametrize("where", ["latest", "manifest", "shard"])
@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory"])
def test_special_files_are_refused_without_blocking(ckpt, where, kind):
    path = {"latest": ckpt / "latest", "manifest": ckpt / TAG / "manifest.json",
            "shard": ckpt / TAG / "rank00001.safetensors"}[where]
    os.unlink(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        os.symlink("/dev/zero", path)
    else:
        os.mkdir(path)
    explicit = {"tag": TAG} if where == "manifest" else {}
    msg = _fails(ckpt, "FIFO|device|directory|not a regular file", **explicit)
    assert str(path) in msg


def test_latest_too_large(ckpt):
    (ckpt / "latest").write_bytes(b"x" * 100_000)
    _fails(ckpt, "more than the 4096")


def test_tag_with_trailing_newline_is_refused(tmp_path):
    engine, _ = W.small_engine()
    for tag in ("step1\n", "step 1", "../up", "-x", "a" * 201):
        with pytest.raises(CheckpointError, match="not usable as a directory name"):
            engine.save_checkpoint(tmp_path, tag=tag)
    assert committed_tags(tmp_path) == []
    engine.save_checkpoint(tmp_path, tag="step1")
    (tmp_path / "latest").write_text("step1\n")  # a hand-written pointer with a newline still resumes
    assert engine.load_checkpoint(tmp_path)[0].endswith("step1")


def test_two_ranks_fail_together_and_change_nothing(two_rank):
    _, out = two_rank
    for case in out[0]:
        results = [r[case] for r in out]
        assert all(r["result"].startswith("CheckpointError: ") for r in results), (case, results)
        assert len({r["result"] for r in results}) == 1, (case, results)  # the same error on every rank
        assert all(r["unchanged"] for r in results), (case, results)
    assert "rank(s) [1]" in out[0]["empty ranks[1]"]["result"] or "ranks[1]" in out[0]["empty ranks[1]"]["result"]


def test_pristine_copy_loads(ckpt):
    engine, _ = W.small_engine(seed=3, extra=True)
    assert engine.load_checkpoint(ckpt)[0].endswith(TAG)
    assert engine.global_steps == 2


def test_format1_fixture_still_loads(tmp_path):
    """``fixtures/format1`` was written by the format-1 code (crc32 over bytes only) from
    ``W.small_engine(seed=0, steps=2)``; ``format1_expected.safetensors`` holds its state."""
    shutil.copytree(os.path.join(FIXTURES, "format1"), tmp_path / "v1")
    assert C.read_doc(tmp_path / "v1" / TAG)["format_version"] == 1
    expected = load_file(os.path.join(FIXTURES, "format1_expected.safetensors"))
    engine, model = W.small_engine(seed=3, steps=1)
    engine.load_checkpoint(tmp_path / "v1")
    assert engine.global_steps == 2
    for k, v in model.state_dict().items():
        if k != "head.weight":
            assert torch.equal(v, expected[f"model.{k}"]), k
    for b in engine.strategy.buckets:
        for k, v in engine.optimizer.state[b.opt_param].items():
            assert torch.equal(v.reshape(-1), expected[f"optim.{b.index}.{k}"].reshape(-1)), (b.index, k)
    assert torch.equal(consolidate(tmp_path / "v1")["emb.weight"], expected["model.emb.weight"])
    # format 1 is checked as strictly as format 2: a flipped bit and an edited header fail
    C.edit_header(tmp_path / "v1" / TAG, "rank00000.safetensors", _header_dtype)
    _fails(tmp_path / "v1", r"is I32 of shape", extra=False)


@pytest.mark.parametrize("fixture,stage", [("format2", 0), ("format2", 3), ("format4", 3)])
def test_format2_fixture_still_loads_bitwise(tmp_path, fixture, stage):
    """``fixtures/format2`` was written by the format-2 code (``fixtures/make_fixture.py format2
    --world 2 --stage 1``: ``W.small_engine(seed=0, steps=2, extra=True)`` at 2 ranks, ZeRO-1),
    before format 3; ``fixtures/format4`` by the format-4 code (commit 522f7bb, ``make_fixture.py
    format4 --world 2 --stage 2``), before format 5's n-d pieces; ``<name>_expected.*`` hold
    their state. Loaded at world 1, ZeRO 0 and 3."""
    shutil.copytree(os.path.join(FIXTURES, fixture), tmp_path / "v2")
    doc = C.read_doc(tmp_path / "v2" / TAG)
    assert (doc["format_version"], doc["world_size"], doc["zero_stage"]) == \
        ((2, 2, 1) if fixture == "format2" else (4, 2, 2))
    expected = load_file(os.path.join(FIXTURES, f"{fixture}_expected.safetensors"))
    with open(os.path.join(FIXTURES, f"{fixture}_expected.json")) as f:
        meta = json.load(f)
    engine, model = W.small_engine(seed=3, steps=1, stage=stage, extra=True)
    engine.load_checkpoint(tmp_path / "v2")
    assert engine.global_steps == meta["global_steps"] == 2
    assert engine.get_lr() == meta["lr"]
    whole = W.whole_state(model)
    assert sorted(f"model.{k}" for k in whole if k != "head.weight") == sorted(k for k in expected if k.startswith("model."))
    for k, v in whole.items():
        if k != "head.weight":
            assert torch.equal(v, expected[f"model.{k}"]), k
    seen = set()
    for name, entry in W.per_param_state(engine).items():
        for key, pieces in entry.items():
            if key in ("param", "master"):
                continue
            seen.add(f"optim.{name}.{key}")
            for start, t in pieces:
                assert torch.equal(t, expected[f"optim.{name}.{key}"][start:start + t.numel()]), (name, key)
    assert seen == {k for k in expected if k.startswith("optim.")}
    assert all(st["step"].item() == 2 for st in engine.optimizer.state.values())
    assert torch.equal(consolidate(tmp_path / "v2")["gate"], expected["model.gate"])
    # format 2 is checked as strictly as format 3: an edited header fails
    C.edit_header(tmp_path / "v2" / TAG, "rank00001.safetensors", _header_dtype)
    _fails(tmp_path / "v2", r"is I32 of shape")


def test_format3_manifest_is_merged_from_every_rank(two_rank):
    """The world-2 checkpoint is format 3; a tensor that only rank 1 holds (``lin.bias``) has its
    entry from rank 1's pieces; the piece identity covers the global shape."""
    root, _ = two_rank
    doc = C.read_doc(root / "pristine" / TAG)
    assert doc["format_version"] == M.FORMAT_VERSION == 5  # format 5: n-d pieces (whole-tensor blocks here)
    owners = {name: {p["rank"] for p in t["pieces"]} for name, t in doc["tensors"].items()}
    assert owners["frozen"] == owners["scale"] == {0} and owners["gate"] == {0, 1}
    assert any(ranks == {1} for name, ranks in owners.items()), owners
    ident = M.piece_identity("w", "param", "param:w", "float32", 0, 4, [2, 2], version=4)
    assert json.loads(ident) == ["w", "param", "param:w", "float32", 0, 4, [2, 2]]
    # format 5: the piece's block too (offsets, block shape; the whole tensor when not given)
    assert json.loads(M.piece_identity("w", "param", "param:w", "float32", 0, 4, [2, 2])) == \
        ["w", "param", "param:w", "float32", 0, 4, [2, 2], [0, 0], [2, 2]]
    assert json.loads(M.piece_identity("w", "param", "param:w", "float32", 0, 2, [4, 2], offsets=[2, 0],
                                       block=[1, 2])) == ["w", "param", "param:w", "float32", 0, 2, [4, 2], [2, 0], [1, 2]]
    assert json.loads(M.piece_identity("w", "param", "param:w", "float32", 0, 4, [2, 2], version=2)) == \
        ["w", "param", "param:w", "float32", 0, 4]
    assert M.piece_identity("w", "param", "param:w", "float32", 0, 4, [2, 2], version=1) == b""


def test_format3_shape_edit_fails_the_piece_checksum(ckpt):
    """Format 3's identity covers the global shape: a manifest whose tensor shape was changed (and
    its own checksum recomputed) fails on the piece checksum even where the model is not asked."""
    from shardwise.checkpoint.reader import PieceReader

    def edit(doc):  # format 5 records each piece's block: edited alike, so the manifest stays consistent
        doc["tensors"]["gate"]["shape"] = [8, 8]
        for p in doc["tensors"]["gate"]["pieces"]:
            p["offsets"], p["block"] = [0, 0], [8, 8]

    C.edit_doc(ckpt / TAG, edit)
    m = M.read_manifest(str(ckpt / TAG))
    with PieceReader(str(ckpt / TAG), m) as reader, pytest.raises(CheckpointError, match="checksum mismatch"):
        reader.read("gate", "param", 0, 64)


def _described(rank, name="w", kind="param", start=0, stop=4, group=0, scalars=None, dtype="float32"):
    return {"name": name, "kind": kind, "key": f"param:{name}" if kind == "param" else f"optim.{kind}:{name}",
            "shape": [4], "start": start, "stop": stop, "dtype": dtype, "model_dtype": "float32", "group": group,
            "scalars": scalars or {}, "file": f"rank{rank:05d}.safetensors", "rank": rank, "crc32": 7}


def test_merge_pieces_groups_kinds_and_refuses_disagreeing_ranks():
    from shardwise.checkpoint.save import merge_pieces

    step = {"step": {"tensor": False, "value": 2}}
    ranks = [[_described(0, stop=2, scalars=step), _described(0, kind="exp_avg", stop=2, scalars=step)],
             [_described(1, start=2, scalars=step), _described(1, kind="exp_avg", start=2, scalars=step),
              _described(1, name="b", group=None, stop=4)]]
    tensors = merge_pieces(ranks, ["b", "w"])
    assert list(tensors) == ["b", "w"]
    w = tensors["w"]
    assert (w["optimizer_state"], w["state_dtypes"], w["optimizer_scalars"]) == (["exp_avg"], {"exp_avg": "float32"}, step)
    assert [(p["rank"], p["start"], p["stop"], sorted(p["keys"])) for p in w["pieces"]] == \
        [(0, 0, 2, ["exp_avg", "param"]), (1, 2, 4, ["exp_avg", "param"])]
    assert tensors["b"]["trainable"] is False
    ranks[1][0] = _described(1, start=2, scalars={"step": {"tensor": False, "value": 3}})
    with pytest.raises(CheckpointError, match="rank 1 describes param of 'w'"):
        merge_pieces(ranks, ["b", "w"])
    with pytest.raises(CheckpointError, match="no rank holds the values"):
        merge_pieces([[_described(0, kind="exp_avg")]], ["w"])


def test_errors_are_shardwise_errors():
    assert issubclass(CheckpointError, ShardwiseError)
