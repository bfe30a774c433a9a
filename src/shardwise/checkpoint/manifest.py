"""The checkpoint format: directory layout, the JSON manifest, tags and the ``latest`` pointer.

[Note: checkpoint layout]
``<save_dir>/<tag>/`` holds one ``rank{r:05d}.safetensors`` per saving rank and
``manifest.json``. The manifest is written last (by rank 0) and the directory renamed into
place only after every rank's file is durable, so *a tag directory with a manifest is
committed*; ``.tmp-<tag>`` and ``.trash-<tag>`` directories never are. ``<save_dir>/latest``
holds the newest committed tag (DeepSpeed's convention).

The manifest lists, for every tensor of ``model.state_dict()`` (tied names as ``aliases``),
its shape and dtypes and its *pieces*: which rank's file holds which element range
``[start, stop)`` of the flattened tensor, under which key, with a crc32. Optimizer state
that has one value per parameter element (Adam's ``exp_avg``, SGD's ``momentum_buffer``, ...)
is stored in the same ranges, so any world size / ZeRO stage (stage 3 included: it only
changes which ranges a rank holds) can read what it needs. Non-tensor state (counters, loss
scaler, LR scheduler, param-group hyper-parameters, client state, RNG, data loader) is JSON.
The manifest carries a crc32 of its own content.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from typing import Any

from shardwise.errors import CheckpointError

FORMAT = "shardwise-checkpoint"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST = "manifest.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]*$")


def shard_file(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def param_key(name: str) -> str:
    return f"param:{name}"


def state_key(state: str, name: str) -> str:
    return f"optim.{state}:{name}"


def check_tag(tag: Any) -> str | None:
    """The problem with ``tag`` as a directory name, or None."""
    if not isinstance(tag, str) or not _TAG_RE.match(tag) or tag == LATEST or len(tag) > 200:
        return (f"checkpoint tag {tag!r} is not usable as a directory name: use letters, digits "
                f"and _ . + = - (not starting with '.', not {LATEST!r})")
    return None


def _digest(body: dict) -> int:
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()) & 0xFFFFFFFF


def encode(body: dict) -> str:
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "crc32": _digest(body), **body}
    return json.dumps(doc, indent=1, sort_keys=False)


def read_manifest(ckpt_path: str) -> dict:
    """Parse and check ``<ckpt_path>/manifest.json``; every problem is a :class:`CheckpointError`
    naming the file."""
    path = os.path.join(ckpt_path, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {ckpt_path} is not a committed checkpoint "
                              "(the save did not finish, or the manifest was deleted)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.msg} at byte {exc.pos} of "
                              f"{len(text)}): the manifest is truncated or corrupt") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a shardwise checkpoint manifest (format "
                              f"{doc.get('format') if isinstance(doc, dict) else None!r})")
    version = doc.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}; this shardwise "
            f"reads versions {list(SUPPORTED_VERSIONS)}. Load it with the shardwise that wrote it "
            "(or a newer one)")
    body = {k: v for k, v in doc.items() if k not in ("format", "format_version", "crc32")}
    if doc.get("crc32") != _digest(body):
        raise CheckpointError(f"{path}: checksum mismatch (stored {doc.get('crc32')}, computed "
                              f"{_digest(body)}): the manifest was modified or corrupted")
    return doc


def check_files(ckpt_path: str, manifest: dict) -> None:
    """Every shard file exists with its recorded size (before any state is touched)."""
    for name, info in manifest["files"].items():
        path = os.path.join(ckpt_path, name)
        try:
            size = os.path.getsize(path)
        except OSError:
            raise CheckpointError(f"shard file {path} is missing (expected {info['size']} bytes, "
                                  f"written by rank {info['rank']})") from None
        if size != info["size"]:
            raise CheckpointError(f"shard file {path} has {size} bytes, expected {info['size']} "
                                  f"(written by rank {info['rank']}): the file is "
                                  f"{'truncated' if size < info['size'] else 'longer than written'}")


def committed_tags(save_dir: str) -> list[str]:
    """Committed tags in ``save_dir``, oldest first (by the manifest's commit counter/time)."""
    if not os.path.isdir(save_dir):
        return []
    found = []
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if name.startswith(".") or not os.path.isfile(os.path.join(path, MANIFEST)):
            continue
        try:
            with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
                created = json.load(f).get("created_ns", 0)
        except (OSError, ValueError, AttributeError):
            created = 0
        found.append((created, name))
    return [name for _, name in sorted(found)]


def read_latest(save_dir: str) -> str:
    """The tag named by ``<save_dir>/latest``; a missing, empty or stale pointer is an error
    listing the committed tags (never a silent fresh start)."""
    path = os.path.join(save_dir, LATEST)
    tags = committed_tags(save_dir)
    listing = f"committed tags in {save_dir}: {tags}" if tags else f"{save_dir} holds no committed checkpoint"
    fix = "; pass tag=... to load_checkpoint to pick one" if tags else ""
    if not os.path.isdir(save_dir):
        raise CheckpointError(f"cannot resume: checkpoint directory {save_dir} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            tag = f.read().strip()
    except FileNotFoundError:
        raise CheckpointError(f"cannot resume: {path} does not exist; {listing}{fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot resume: {path} is unreadable ({exc}); {listing}{fix}") from None
    if not tag:
        raise CheckpointError(f"cannot resume: {path} is empty; {listing}{fix}")
    if check_tag(tag) is not None or tag not in tags:
        shown = tag if len(tag) < 80 else tag[:77] + "..."
        raise CheckpointError(f"cannot resume: {path} names {shown!r}, which is not a committed "
                              f"checkpoint; {listing}{fix}")
    return tag


def resolve(load_dir: str, tag: str | None) -> tuple[str, str]:
    """``(tag, path)`` to load; ``tag=None`` follows ``latest``."""
    load_dir = os.fspath(load_dir)
    if tag is None:
        tag = read_latest(load_dir)
    problem = check_tag(tag)
    if problem:
        raise CheckpointError(problem)
    path = os.path.join(load_dir, tag)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist; committed tags in {load_dir}: "
                              f"{committed_tags(load_dir)}")
    return tag, path
