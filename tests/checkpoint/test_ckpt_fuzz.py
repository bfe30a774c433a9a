"""Seeded, bounded fuzzing of checkpoint loading: a few hundred random corruptions of one small
world-2 / ZeRO-1 checkpoint, each loaded at world 1. Every load either raises a ShardwiseError
(no internal exception leaking through, no blocking) and leaves the engine bitwise unchanged, or
-- the corruption was a no-op (a trailing newline in `latest`, an edit of client state) --
loads exactly the saved weights and optimizer state. Never wrong data."""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
from collections import Counter

import ckpt_corrupt as C
import ckpt_workers as W
from shardwise.errors import ShardwiseError

CASES = 300
SEED = 20240611
TAG = "global_step2"
LEAK = re.compile(r"\b(KeyError|IndexError|TypeError|AttributeError|ValueError|OverflowError|RuntimeError|"
                  r"struct\.error|JSONDecodeError|UnicodeDecodeError|RecursionError|ValidationError)\b")
JUNK = [None, True, False, -1, 0, 1, 7, 2 ** 40, 1.5, -0.5, float("nan"), "", "x", "float32", "rank00000.safetensors",
        [], [1], [0, 1], {}, {"a": 1}]


def _files(d):
    t = os.path.join(d, TAG)
    return [os.path.join(d, "latest")] + [os.path.join(t, f) for f in sorted(os.listdir(t))]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def bit_flip(d, rng):
    path = rng.choice(_files(d))
    data = bytearray(open(path, "rb").read())
    if not data:
        return "empty file"
    i = rng.randrange(len(data))
    data[i] ^= 1 << rng.randrange(8)
    open(path, "wb").write(bytes(data))
    return f"bit flip in {os.path.basename(path)} at {i}"


def truncate(d, rng):
    path = rng.choice(_files(d))
    n = rng.randrange(os.path.getsize(path) + 1) if os.path.getsize(path) else 0
    os.truncate(path, n)
    return f"truncate {os.path.basename(path)} to {n}"


def append(d, rng):
    path = rng.choice(_files(d)[1:])
    with open(path, "ab") as f:
        f.write(b"\0" * rng.randint(1, 64))
    return f"append to {os.path.basename(path)}"


def delete(d, rng):
    path = rng.choice(_files(d))
    os.unlink(path)
    return f"delete {os.path.basename(path)}"


def swap_files(d, rng):
    t = os.path.join(d, TAG)
    a, b = (os.path.join(t, f) for f in ("rank00000.safetensors", rng.choice(["rank00001.safetensors", "manifest.json"])))
    os.rename(a, a + ".x")
    os.rename(b, a)
    os.rename(a + ".x", b)
    return f"swap {os.path.basename(a)} and {os.path.basename(b)}"


def edit_field(d, rng):
    doc = C.read_doc(os.path.join(d, TAG))
    paths = [p for p in _paths(doc) if p and p[0] not in ("format", "format_version", "crc32")]
    path = rng.choice(paths)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    old = parent[path[-1]]
    how = rng.random()
    if how < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
        what = "delete"
    elif how < 0.45 and type(old) is int:
        parent[path[-1]] = old + rng.choice([-1, 1, 16, -(2 ** 33)])
        what = "shift"
    elif how < 0.55 and isinstance(old, list) and old:
        parent[path[-1]] = old[:-1] if rng.random() < 0.5 else old + old[-1:]
        what = "resize"
    elif how < 0.6 and isinstance(old, str):
        parent[path[-1]] = old + rng.choice(["x", "\n", "/..", ".0"])
        what = "extend"
    else:
        parent[path[-1]] = rng.choice(JUNK)
        what = f"set {parent[path[-1]]!r}"
    C.write_doc(os.path.join(d, TAG), doc)
    return f"manifest {'.'.join(map(str, path))}: {what}"


def _pieces(doc):
    return [(n, p) for n, t in doc["tensors"].items() for p in t["pieces"]]


def swap_keys(d, rng):
    doc = C.read_doc(os.path.join(d, TAG))
    name, p = rng.choice([(n, p) for n, p in _pieces(doc) if len(p["keys"]) > 1])
    other = rng.choice([k for k in p["keys"] if k != "param"])
    for m in (p["keys"], p["crc32"]):
        m["param"], m[other] = m[other], m["param"]
    C.write_doc(os.path.join(d, TAG), doc)
    return f"swap keys param/{other} of {name}"


def swap_pieces(d, rng):
    doc = C.read_doc(os.path.join(d, TAG))
    (na, a), (nb, b) = rng.sample(_pieces(doc), 2)
    fields = rng.choice([("start", "stop"), ("file", "rank"), ("file", "rank", "crc32"), ("crc32",), ("keys", "crc32")])
    for k in fields:
        a[k], b[k] = b[k], a[k]
    C.write_doc(os.path.join(d, TAG), doc)
    return f"swap {fields} of pieces of {na} and {nb}"


def edit_header(d, rng):
    file = rng.choice(["rank00000.safetensors", "rank00001.safetensors"])
    header, _ = C.read_header(os.path.join(d, TAG, file))
    keys = [k for k in header if k != "__metadata__"]
    how = rng.choice(["dtype", "swap", "offsets", "shape"])

    def fn(h):
        a, b = rng.sample(keys, 2) if len(keys) > 1 else (keys[0], keys[0])
        if how == "dtype":
            h[a]["dtype"] = rng.choice(["I32", "U8", "F16", "BOOL", "I64"])
        elif how == "swap":
            h[a], h[b] = h[b], h[a]
        elif how == "offsets":
            h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
        else:
            h[a]["shape"] = [1, *h[a]["shape"]] if rng.random() < 0.5 else list(reversed(h[a]["shape"] + [1]))

    C.edit_header(os.path.join(d, TAG), file, fn, fix_manifest=rng.random() < 0.8)
    return f"header {how} in {file}"


def weird_latest(d, rng):
    latest = os.path.join(d, "latest")
    os.unlink(latest)
    how = rng.choice(["fifo", "devzero", "dir", "newline", "space", "updir", "empty", "huge", "binary",
                      "dangling", "manifest", "self", "other"])
    if how == "fifo":
        os.mkfifo(latest)
    elif how == "devzero":
        os.symlink("/dev/zero", latest)
    elif how == "dir":
        os.mkdir(latest)
    elif how == "dangling":
        os.symlink(os.path.join(d, "nowhere"), latest)
    elif how == "manifest":
        os.symlink(os.path.join(d, TAG, "manifest.json"), latest)
    else:
        text = {"newline": TAG + "\n", "space": f" {TAG} ", "updir": "../pristine", "empty": "", "huge": "x" * 10 ** 5,
                "binary": "\x00\xff", "self": "latest", "other": "global_step1"}[how]
        open(latest, "w", encoding="utf-8", errors="surrogateescape").write(text)
    return f"latest: {how}"


def special_file(d, rng):
    path = rng.choice(_files(d)[1:])
    os.unlink(path)
    how = rng.choice(["fifo", "devzero", "dir", "dangling"])
    if how == "fifo":
        os.mkfifo(path)
    elif how == "devzero":
        os.symlink("/dev/zero", path)
    elif how == "dir":
        os.mkdir(path)
    else:
        os.symlink(path + ".gone", path)
    return f"{os.path.basename(path)} is a {how}"


KINDS = [bit_flip, truncate, append, delete, swap_files, edit_field, edit_field, edit_field, swap_keys,
         swap_pieces, edit_header, weird_latest, special_file]


def _timeout(signum, frame):
    raise TimeoutError("a checkpoint load blocked")


def test_fuzz_checkpoint_loading(two_rank, tmp_path):
    root, _ = two_rank
    pristine = root / "pristine"
    engine, _ = W.small_engine(seed=3, extra=True)
    engine.load_checkpoint(pristine)
    reference = C.tensors_only(C.snapshot(engine))
    W.small_steps(engine, 1)
    engine.save_checkpoint(tmp_path / "reset")  # a state that differs from the checkpoint's
    rng = random.Random(SEED)
    stats: Counter = Counter()
    work = tmp_path / "work"
    old = signal.signal(signal.SIGALRM, _timeout)
    try:
        for i in range(CASES):
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(pristine, work, symlinks=True)
            kind = rng.choice(KINDS)
            what = f"case {i}: {kind(work, rng)}"
            before = C.snapshot(engine)
            signal.alarm(30)
            try:
                engine.load_checkpoint(work)
                error = None
            except Exception as exc:  # noqa: BLE001 - checked below
                error = exc
            finally:
                signal.alarm(0)
            if error is None:
                assert C.same(C.tensors_only(C.snapshot(engine)), reference), f"{what}: loaded wrong data"
                stats["loaded"] += 1
                engine.load_checkpoint(tmp_path / "reset")
            else:
                assert isinstance(error, ShardwiseError), f"{what}: {error!r}"
                assert not LEAK.search(str(error)), f"{what}: an internal error leaked: {error}"
                assert C.same(before, C.snapshot(engine)), f"{what}: a failed load changed state"
                stats["failed"] += 1
            stats[kind.__name__] += 1
    finally:
        signal.signal(signal.SIGALRM, old)
    assert stats["failed"] > CASES // 2 and stats["loaded"] > 0, stats
    print(dict(stats))
