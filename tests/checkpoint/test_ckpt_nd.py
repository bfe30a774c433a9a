"""n-d checkpoint pieces ([Note: n-d pieces]): random global tensors cut into random tilings of
(block, range) pieces, saved as format-5 checkpoints, and re-assembled into other tilings,
bitwise; gaps and overlaps are named errors. One process, no engine."""
from __future__ import annotations

import os
import random

import pytest
import torch

from shardwise.checkpoint import consolidate
from shardwise.checkpoint import manifest as M
from shardwise.checkpoint import nd as ND
from shardwise.checkpoint import rng as RNG
from shardwise.checkpoint.files import dtype_name, write_safetensors
from shardwise.checkpoint.reader import PieceReader, verify_files
from shardwise.checkpoint.save import merge_pieces
from shardwise.checkpoint.schema import validate
from shardwise.errors import CheckpointError
from shardwise.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from shardwise.zero.pieces import piece_key

DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.float16]


def _flat_index(shape, region: ND.Region) -> torch.Tensor:
    """Global flat indices of a region's elements, in the region's order (the slow reference)."""
    if not shape:
        return torch.zeros(region.size, dtype=torch.long)
    idx = torch.arange(ND.numel(shape)).reshape(shape)
    box = idx[tuple(slice(o, o + d) for o, d in zip(region.offsets, region.block))]
    return box.reshape(-1)[region.start:region.stop]


def _random_shape(r: random.Random) -> tuple[int, ...]:
    return tuple(r.randint(1, 6) for _ in range(r.randint(0, 4)))


def _random_tiling(r: random.Random, shape) -> list[ND.Region]:
    """A grid of blocks (random cuts in each dimension), each block cut into random ranges."""
    cuts = []
    for d in shape:
        inner = sorted(r.sample(range(1, d), r.randint(0, min(2, d - 1)))) if d > 1 else []
        cuts.append([0, *inner, d])
    blocks = [((), ())]
    for c in cuts:
        blocks = [(o + (a,), b + (z - a,)) for o, b in blocks for a, z in zip(c, c[1:])]
    out = []
    for offsets, block in blocks:
        n = ND.numel(block)
        inner = sorted(r.sample(range(1, n), r.randint(0, min(3, n - 1)))) if n > 1 else []
        bounds = [0, *inner, n]
        out += [ND.Region(offsets, block, a, z) for a, z in zip(bounds, bounds[1:])]
    r.shuffle(out)
    return out


def _values(t: torch.Tensor, region: ND.Region) -> torch.Tensor:
    return t.reshape(-1)[_flat_index(list(t.shape), region)].clone()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.dtype.is_floating_point else t.reshape(-1)


def _random_tensor(r: random.Random, shape, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(r.randrange(1 << 30))
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=g, dtype=dtype)


def test_range_boxes_match_the_flattening():
    r = random.Random(5)
    for _ in range(300):
        shape = _random_shape(r)
        n = ND.numel(shape)
        offsets = [r.randint(0, 3) for _ in shape]
        a = r.randint(0, n)
        b = r.randint(a, n)
        boxes = ND.range_boxes(offsets, shape, a, b)
        assert len(boxes) <= max(1, 2 * len(shape) - 1)
        pos = a
        big = [o + d for o, d in zip(offsets, shape)]
        idx = torch.arange(ND.numel(big)).reshape(big) if shape else torch.zeros(())
        want = _flat_index(big, ND.Region(offsets, shape, a, b)) if shape else torch.zeros(b - a, dtype=torch.long)
        got = []
        for start, (lo, hi) in boxes:
            assert start == pos
            box = idx[tuple(slice(l, h) for l, h in zip(lo, hi))] if shape else idx.reshape(1)
            got.append(box.reshape(-1).long())
            pos += ND.box_numel((lo, hi))
        assert pos == b
        assert torch.equal(torch.cat(got) if got else torch.zeros(0, dtype=torch.long), want.long())


def test_random_tilings_reassemble_bitwise():
    r = random.Random(11)
    for case in range(200):
        shape = _random_shape(r)
        t = _random_tensor(r, shape, r.choice(DTYPES))
        saved = _random_tiling(r, shape)
        assert ND.tiling_problems(shape, saved) is None
        values = [_values(t, p) for p in saved]
        fetched = []

        def fetch(i):
            fetched.append(i)
            return values[i]

        for want in _random_tiling(r, shape) + [ND.Region.whole(shape)]:
            fetched.clear()
            got = ND.assemble("param 'x'", shape, want, saved, fetch, t.dtype)
            assert torch.equal(_bits(got), _bits(_values(t, want))), (case, shape, want.describe())
            assert len(fetched) == len(set(fetched))  # each piece read once per region


def test_gaps_and_overlaps_are_named():
    shape = (4, 6)
    t = torch.arange(24.0).reshape(shape)
    left, right = ND.Region([0, 0], [4, 3], 0, 12), ND.Region([0, 3], [4, 3], 0, 12)
    pieces = [left, right]
    fetch = lambda i: _values(t, pieces[i])  # noqa: E731
    whole = ND.Region.whole(shape)
    assert torch.equal(ND.assemble("param 'w'", shape, whole, pieces, fetch, t.dtype), t.reshape(-1))
    gap = [left, ND.Region([0, 3], [4, 3], 0, 11)]
    with pytest.raises(CheckpointError, match=r"does not cover .*param 'w'.*23 of those 24"):
        ND.assemble("param 'w'", shape, whole, gap, lambda i: _values(t, gap[i]), t.dtype)
    over = [left, right, ND.Region([1, 2], [2, 2], 0, 4)]
    with pytest.raises(CheckpointError, match=r"pieces of param 'w' overlap \(block \[4, 3\] at offsets \[0, 0\]"):
        ND.assemble("param 'w'", shape, whole, over, lambda i: _values(t, over[i]), t.dtype)
    same = [ND.Region([0, 0], [4, 6], 0, 13), ND.Region([0, 0], [4, 6], 12, 24)]
    with pytest.raises(CheckpointError, match="overlap"):
        ND.assemble("param 'w'", shape, whole, same, lambda i: _values(t, same[i]), t.dtype)
    with pytest.raises(CheckpointError, match="not inside"):
        ND.assemble("param 'w'", shape, ND.Region([3, 0], [2, 6], 0, 12), pieces, fetch, t.dtype)
    assert "overlap" in ND.tiling_problems(shape, [left, right, ND.Region([1, 2], [1, 1], 0, 1)])
    assert "cover" in ND.tiling_problems(shape, [left])


# -- the same through format-5 files ------------------------------------------------------------


def write_checkpoint(path: str, tensors: dict[str, tuple[torch.Tensor, list[ND.Region], bool]]) -> int:
    """A format-5 checkpoint of ``tensors`` ({name: (value, tiling, trainable)}), piece ``i`` of
    every tensor in rank ``i``'s file; trainable tensors carry an ``exp_avg`` (the value + 1)."""
    world = max(len(tiling) for _, tiling, _ in tensors.values())
    os.makedirs(path)
    ranks: list[list[dict]] = [[] for _ in range(world)]
    files = {}
    for rank in range(world):
        file = M.shard_file(rank)
        data, seeds, described = {}, {}, []
        for name, (t, tiling, trainable) in tensors.items():
            if rank >= len(tiling):
                continue
            p = tiling[rank]
            kinds = {"param": t} | ({"exp_avg": t + 1} if trainable else {})
            for kind, v in kinds.items():
                key = piece_key(name, kind)
                d = {"name": name, "kind": kind, "key": key, "shape": list(t.shape), "start": p.start,
                     "stop": p.stop, "dtype": dtype_name(v.dtype), "model_dtype": dtype_name(t.dtype),
                     "group": 0 if trainable else None, "scalars": {}, "file": file, "rank": rank,
                     "offsets": list(p.offsets), "block": list(p.block)}
                data[key] = _values(v, p)
                seeds[key] = M.piece_identity(name, kind, key, d["dtype"], p.start, p.stop, d["shape"],
                                              offsets=d["offsets"], block=d["block"])
                described.append(d)
        info = write_safetensors(os.path.join(path, file), data, rank, {"format": M.FORMAT}, seeds)
        for d in described:
            d["crc32"] = info["tensors"][d["key"]]
        info.pop("tensors")
        files[file] = {**info, "rank": rank}
        ranks[rank] = described
    merged = merge_pieces(ranks, list(tensors))
    body = {"tag": os.path.basename(path), "created_ns": 1, "world_size": world, "zero_stage": 1,
            "compute_dtype": "float32", "optimizer": "AdamW", "param_groups": [{"lr": 0.1}],
            "counters": {"global_steps": 1, "global_samples": 1, "skipped_steps": 0, "micro_steps": 1},
            "loss_scaler": {}, "lr_scheduler": None, "client_state": None,
            "ranks": [{"rng": RNG.capture(), "data_loader": None} for _ in range(world)], "aliases": {},
            "state_dict_keys": list(tensors), "files": files, "tensors": merged, "hf_config": None,
            "client_tensors": None, "buffers": [], "excluded": [], "mesh": {"pp": 1, "dp": 1, "tp": world}}  # (frozen pieces: dp rank 0 of each)
    text = M.encode(body)
    import json

    validate(json.loads(text), path)
    with open(os.path.join(path, M.MANIFEST), "w") as f:
        f.write(text)
    return world


def test_format5_files_reassemble_into_other_tilings(tmp_path):
    r = random.Random(3)
    tensors = {}
    for i in range(12):
        shape = _random_shape(r)
        dtype = r.choice(DTYPES)
        trainable = dtype.is_floating_point and r.random() < 0.7
        tensors[f"t{i}"] = (_random_tensor(r, shape, dtype), _random_tiling(r, shape), trainable)
    path = str(tmp_path / "tag")
    write_checkpoint(path, tensors)
    m = M.read_manifest(path)
    assert m["format_version"] == 5
    verify_files(path, m)
    with PieceReader(path, m) as reader:
        for name, (t, _, trainable) in tensors.items():
            for kind, v in [("param", t)] + ([("exp_avg", t + 1)] if trainable else []):
                for want in _random_tiling(r, list(t.shape)):
                    got = reader.read(name, kind, want.start, want.stop, (want.offsets, want.block))
                    assert torch.equal(_bits(got), _bits(_values(v, want))), (name, kind, want.describe())
    whole = consolidate(path, dtype=None)
    assert list(whole) == list(tensors)
    for name, (t, _, _) in tensors.items():
        assert whole[name].dtype == t.dtype and torch.equal(_bits(whole[name]), _bits(t)), name
    fp32 = get_fp32_state_dict_from_zero_checkpoint(path)
    assert all(torch.equal(_bits(fp32[n]), _bits(t)) for n, (t, _, _) in tensors.items())


def _edited(path, fn):
    import json

    with open(os.path.join(path, M.MANIFEST)) as f:
        doc = json.load(f)
    fn(doc)
    body = {k: v for k, v in doc.items() if k not in ("format", "format_version", "crc32")}
    doc["crc32"] = M._digest(body)
    with open(os.path.join(path, M.MANIFEST), "w") as f:
        json.dump(doc, f)


def test_format5_manifest_tiling_and_block_identity_are_checked(tmp_path):
    t = torch.arange(24.0).reshape(4, 6)
    tiling = [ND.Region([0, 0], [2, 6], 0, 12), ND.Region([2, 0], [2, 3], 0, 6), ND.Region([2, 3], [2, 3], 0, 6)]
    path = str(tmp_path / "tag")
    write_checkpoint(path, {"w": (t, tiling, True)})
    assert torch.equal(consolidate(path)["w"], t)

    def overlap(doc):  # a block moved onto its neighbour: the blocks no longer tile the tensor
        doc["tensors"]["w"]["pieces"][2]["offsets"] = [2, 2]

    _edited(path, overlap)
    with pytest.raises(CheckpointError, match=r"tensors\['w'\]\.pieces: pieces must tile the tensor .*"):
        M.read_manifest(path)
    _edited(path, lambda doc: doc["tensors"]["w"]["pieces"][2].__setitem__("offsets", [2, 3]))
    M.read_manifest(path)

    def swap(doc):  # two blocks of the same size exchanged: the manifest is consistent, the crc is not
        ps = doc["tensors"]["w"]["pieces"]
        ps[1]["offsets"], ps[2]["offsets"] = ps[2]["offsets"], ps[1]["offsets"]

    _edited(path, swap)
    m = M.read_manifest(path)
    with PieceReader(path, m) as reader, pytest.raises(CheckpointError, match="checksum mismatch"):
        reader.read("w", "param", 0, 24)
    _edited(path, lambda doc: doc["tensors"]["w"]["pieces"][0].pop("block"))
    with pytest.raises(CheckpointError, match="offsets and block"):
        M.read_manifest(path)


def test_merge_names_of_pipeline_stages_and_tied_copies():
    """Every stage's names in rank order; a tied copy its stage did not write is saved by the
    owner under the same name (PipelineModule's ``tied_modules.<key>``) or is an alias of the
    name the module's ``tied_aliases()`` gives; neither is an error naming the copy."""
    from shardwise.checkpoint.save import merge_names

    def rank(r, keys, tied=None, aliases=None):
        return {"file": {M.shard_file(r): {"rank": r}},
                "names": {"state_dict_keys": keys, "aliases": aliases or {}, "tied": tied or {}, "parameters": keys}}

    stage0 = rank(0, ["tied_modules.embed.weight", "1.weight"])
    stage1 = rank(1, ["2.w", "tied_modules.embed.weight", "4.weight"], tied={"tied_modules.embed.weight": None})
    keys, aliases, _ = merge_names([stage0, stage1], {"tied_modules.embed.weight", "1.weight", "2.w"})
    assert keys == ["tied_modules.embed.weight", "1.weight", "2.w", "4.weight"] and aliases == {}
    head = rank(1, ["2.w", "head.weight"], tied={"head.weight": "emb.weight"})
    keys, aliases, _ = merge_names([rank(0, ["emb.weight"]), head], {"emb.weight", "2.w"})
    assert keys == ["emb.weight", "2.w", "head.weight"] and aliases == {"head.weight": "emb.weight"}
    with pytest.raises(CheckpointError, match=r"'head.weight' is a tied copy .* on rank 1, but no rank saves"):
        merge_names([rank(0, ["emb.weight"]), rank(1, ["head.weight"], tied={"head.weight": None})], {"emb.weight"})
