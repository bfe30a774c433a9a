"""Ways to damage a saved checkpoint (for the integrity table and the fuzz test), and a bitwise
snapshot of everything a load may change."""
from __future__ import annotations

import copy
import json
import os
import random
import struct
import zlib

import numpy as np
import torch

from shardwise.checkpoint import manifest as M

MANIFEST = "manifest.json"


def read_doc(ckpt: str) -> dict:
    with open(os.path.join(ckpt, MANIFEST)) as f:
        return json.load(f)


def write_doc(ckpt: str, doc: dict, fix_crc: bool = True) -> None:
    """Write a manifest; with ``fix_crc`` its own checksum is recomputed (a buggy writer)."""
    if fix_crc:
        body = {k: v for k, v in doc.items() if k not in ("format", "format_version", "crc32")}
        doc["crc32"] = M._digest(body)
    with open(os.path.join(ckpt, MANIFEST), "w") as f:
        json.dump(doc, f)


def edit_doc(ckpt: str, fn) -> None:
    doc = read_doc(ckpt)
    fn(doc)
    write_doc(ckpt, doc)


def read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), n


def edit_header(ckpt: str, file: str, fn, fix_manifest: bool = True) -> None:
    """Change a shard's safetensors header in place (same length) and, with ``fix_manifest``,
    record the new header and file checksums in the manifest (and recompute its checksum)."""
    path = os.path.join(ckpt, file)
    header, n = read_header(path)
    fn(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n, "edited header longer than the original"
    raw += b" " * (n - len(raw))
    data = bytearray(open(path, "rb").read())
    data[8:8 + n] = raw
    open(path, "wb").write(bytes(data))
    if fix_manifest:
        def fix(doc):
            doc["files"][file]["header_crc32"] = zlib.crc32(data[:8 + n]) & 0xFFFFFFFF
            doc["files"][file]["crc32"] = zlib.crc32(data) & 0xFFFFFFFF
        edit_doc(ckpt, fix)


def equal_pieces(doc: dict) -> tuple[str, int, int]:
    """A trainable tensor with two pieces of the same length in different files."""
    for name, t in doc["tensors"].items():
        ps = t["pieces"]
        for i in range(len(ps)):
            for j in range(i + 1, len(ps)):
                if t["trainable"] and ps[i]["stop"] - ps[i]["start"] == ps[j]["stop"] - ps[j]["start"] \
                        and ps[i]["file"] != ps[j]["file"]:
                    return name, i, j
    raise AssertionError("no tensor with two equal pieces in the checkpoint")


# -- bitwise snapshot --------------------------------------------------------------------------


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, dict):
        return {k: _clone(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_clone(x) for x in v)
    return copy.deepcopy(v)


def snapshot(engine) -> dict:
    """Everything a load may change, cloned: weights, masters, optimizer state and groups,
    counters, loss scaler, LR scheduler, RNGs."""
    s = engine.strategy
    return {
        "module": _clone(dict(engine.module.state_dict())),
        "flat": [_clone(b.param_flat if b.holds_full else b.shard) for b in s.buckets],
        "master": [_clone(b.opt_param) for b in s.buckets],
        "optim": [_clone(dict(engine.optimizer.state.get(b.opt_param, {}))) for b in s.buckets],
        "groups": [_clone({k: v for k, v in g.items() if k != "params"}) for g in engine.optimizer.param_groups],
        "counters": (engine.global_steps, engine.global_samples, engine.skipped_steps, engine.micro_steps),
        "scaler": _clone(s.scaler.state_dict()),
        "sched": _clone(engine.lr_scheduler.state_dict()) if engine.lr_scheduler is not None else None,
        "rng": (random.getstate(), torch.get_rng_state().clone(), repr(np.random.get_state())),
    }


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and (a == b or (a != a and b != b))


def tensors_only(snap: dict) -> dict:
    return {k: snap[k] for k in ("module", "flat", "master", "optim")}
