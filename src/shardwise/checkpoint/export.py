"""Whole-model views of a checkpoint: ``consolidate`` (a state dict), ``export_hf`` (Hugging Face
safetensors layout) and ``info`` (what is there, verified).

[Note: streaming consolidation]
Tensors are assembled one at a time from their pieces (whichever rank files hold them), so
the memory needed is about the largest tensor, not the model. ``export_hf`` knows every
shape from the manifest, writes each output file's header first and then each tensor as it
is assembled.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterator, NamedTuple

import torch

from shardwise.checkpoint import manifest as M
from shardwise.checkpoint.files import atomic_write_text, dtype_from_name, file_crc32, write_safetensors
from shardwise.checkpoint.reader import PieceReader, verify_files
from shardwise.errors import CheckpointError


def _open(ckpt_dir, tag: str | int | None) -> tuple[str, dict]:
    ckpt_dir = os.fspath(ckpt_dir)
    tag = M.normalize_tag(tag)
    if tag is None and os.path.isfile(os.path.join(ckpt_dir, M.MANIFEST)):
        path = ckpt_dir  # a tag directory itself
    else:
        _, path = M.resolve(ckpt_dir, tag)
    m = M.read_manifest(path)
    M.check_files(path, m)
    verify_files(path, m)
    return path, m


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _out_dtype(entry: dict, dtype: torch.dtype | None) -> torch.dtype:
    saved = dtype_from_name(entry["saved_dtype"])
    return dtype if dtype is not None and saved.is_floating_point else saved


def iter_consolidated(ckpt_dir, tag: str | None = None, dtype: torch.dtype | None = torch.float32,
                      *, include_aliases: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every entry of the saved ``model.state_dict()``, one tensor
    at a time (tied names right after the tensor they share). ``dtype`` casts floating-point
    tensors (None keeps the saved dtype: fp32 master weights for bf16/fp16 training)."""
    path, m = _open(ckpt_dir, tag)
    yield from _iter(path, m, dtype, include_aliases)


def _iter(path: str, m: dict, dtype, include_aliases: bool) -> Iterator[tuple[str, torch.Tensor]]:
    by_canonical: dict[str, list[str]] = {}
    for alias, canonical in m["aliases"].items():
        by_canonical.setdefault(canonical, []).append(alias)
    with PieceReader(path, m) as reader:
        for name, entry in m["tensors"].items():
            numel = 1
            for d in entry["shape"]:
                numel *= d
            t = _cast(reader.read(name, "param", 0, numel), dtype).reshape(entry["shape"])
            yield name, t
            if include_aliases:
                for alias in by_canonical.get(name, ()):
                    yield alias, t


def consolidate(ckpt_dir, tag: str | None = None, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """The full model state dict (names as in ``model.state_dict()``; tied names share a tensor),
    assembled from a checkpoint saved at any world size and ZeRO stage. ``ckpt_dir`` is the
    save directory (``tag=None`` follows ``latest``) or one checkpoint's directory."""
    path, m = _open(ckpt_dir, tag)
    out = dict(_iter(path, m, dtype, True))
    order = m.get("state_dict_keys", list(out))
    return {k: out[k] for k in order if k in out}


class _Lazy(NamedTuple):
    """A tensor the writer asks for only when it reaches it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    load: object

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def parse_size(text) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"10KiB"`` / an int -> bytes (GB = 10**9, GiB = 2**30)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise CheckpointError(f"cannot read size {text!r}: write e.g. 5GB, 500MB or a number of bytes")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base ** power)


def _config_json(config, m: dict, dtype: torch.dtype | None) -> dict | None:
    """``config.json``'s content: ``config`` (a Hugging Face config or a dict) if given, else
    the one the checkpoint recorded (the model had a ``config`` with ``to_json_string``)."""
    if config is None:
        doc = m.get("hf_config")
    elif isinstance(config, dict):
        doc = dict(config)
    elif callable(getattr(config, "to_json_string", None)):
        doc = json.loads(config.to_json_string(use_diff=False))
    else:
        raise CheckpointError(f"export_hf(config=...) takes a Hugging Face config (with to_json_string) or a "
                              f"dict, not {type(config).__name__}")
    if doc is None:
        return None
    doc = dict(doc)
    if dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in doc:
                doc[key] = str(dtype).removeprefix("torch.")
    return doc


def export_hf(ckpt_dir, out_dir, tag: str | None = None, dtype: torch.dtype | None = torch.float32,
              max_shard_size="5GB", config=None) -> list[str]:
    """Write the model in Hugging Face layout: ``model.safetensors``, or
    ``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``, and
    ``config.json`` when the saved model had a Hugging Face config (or ``config=`` gives one),
    so ``transformers``' ``from_pretrained(out_dir)`` loads it. Tied names are written once (as
    Hugging Face does). Returns the files written."""
    path, m = _open(ckpt_dir, tag)
    return write_model(path, m, out_dir, dtype, max_shard_size, _config_json(config, m, dtype))


def frozen_parameters(m: dict, path: str) -> set[str]:
    """The saved tensors that are frozen parameters (not trainable, not buffers): format 4
    records the buffers; earlier formats cannot tell them apart (an error naming the fix)."""
    if m.get("buffers") is None:
        raise CheckpointError(f"{path} is a format {m['format_version']} checkpoint, which does not record which "
                              "non-trainable tensors are buffers: exclude_frozen_parameters needs format 4 (save it "
                              "again with this shardwise), or filter the state dict yourself")
    buffers = set(m["buffers"])
    return {n for n, e in m["tensors"].items() if not e["trainable"] and n not in buffers}


def write_model(path: str, m: dict, out_dir, dtype: torch.dtype | None, max_shard_size, config_doc: dict | None,
                skip: set[str] = frozenset(), single_file: str | None = None) -> list[str]:
    """The writer of :func:`export_hf` for an opened checkpoint (``path``, manifest ``m``):
    every saved tensor but ``skip``, streamed one at a time; ``single_file`` (a name in
    ``out_dir``): one file whatever the size."""
    limit = parse_size(max_shard_size) if single_file is None else None
    shards: list[list[str]] = [[]]
    used = 0
    for name, entry in m["tensors"].items():
        if name in skip:
            continue
        n = _Lazy(_out_dtype(entry, dtype), tuple(entry["shape"]), None)
        size = n.numel() * n.element_size()
        if shards[-1] and limit is not None and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    os.makedirs(out_dir, exist_ok=True)
    count = len(shards)
    names = [single_file or "model.safetensors"] if count == 1 else \
        [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    weight_map, total = {}, 0
    with PieceReader(path, m) as reader:
        for file, shard in zip(names, shards):
            lazy = {}
            for name in shard:
                entry = m["tensors"][name]
                numel = _Lazy(torch.float32, tuple(entry["shape"]), None).numel()

                def load(name=name, numel=numel, entry=entry):
                    return _cast(reader.read(name, "param", 0, numel), dtype).reshape(entry["shape"])

                lazy[name] = _Lazy(_out_dtype(entry, dtype), tuple(entry["shape"]), load)
                weight_map[name] = file
            info = write_safetensors(os.path.join(out_dir, file), lazy, 0, {"format": "pt"})
            total += info["size"] - info["header_bytes"]
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(os.path.join(out_dir, "model.safetensors.index.json"), json.dumps(index, indent=2))
        names.append("model.safetensors.index.json")
    if config_doc is not None:
        atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(config_doc, indent=2, sort_keys=True) + "\n")
        names.append("config.json")
    return [os.path.join(out_dir, n) for n in names]


def read_client_state(ckpt_dir, tag: str | None = None):
    """The ``client_state`` a checkpoint holds (what ``load_checkpoint`` returns), verified,
    without an engine. ``ckpt_dir``: the save directory (``tag=None`` follows ``latest``) or one
    checkpoint's directory."""
    from shardwise.checkpoint.client_state import load

    path, m = _open(ckpt_dir, tag)
    return load(path, m)


def info(save_dir, verify: bool = True) -> dict:
    """What ``save_dir`` holds: ``{"latest", "tags": [{tag, ok, problem, step, world_size,
    zero_stage, dtype, bytes, files}], "stale": [leftover temporary dirs]}``; with ``verify``
    every shard file's size and crc32 are checked."""
    save_dir = os.fspath(save_dir)
    if not os.path.isdir(save_dir):
        raise CheckpointError(f"{save_dir} does not exist")
    try:
        latest = M.read_latest(save_dir)
    except CheckpointError as exc:
        latest = None
        latest_problem = str(exc)
    else:
        latest_problem = None
    rows = []
    for tag in M.committed_tags(save_dir):
        path = os.path.join(save_dir, tag)
        row = {"tag": tag, "ok": True, "problem": None}
        try:
            m = M.read_manifest(path)
            row |= {"step": m["counters"]["global_steps"], "world_size": m["world_size"],
                    "zero_stage": m["zero_stage"], "dtype": m["compute_dtype"], "mesh": m.get("mesh"),
                    "bytes": sum(f["size"] for f in m["files"].values()), "files": len(m["files"])}
            M.check_files(path, m)
            verify_files(path, m)
            if verify:
                for file, spec in m["files"].items():
                    if file_crc32(os.path.join(path, file)) != spec["crc32"]:
                        raise CheckpointError(f"checksum mismatch in shard file {os.path.join(path, file)} "
                                              f"(written by rank {spec['rank']}): the file is corrupt")
                client = m.get("client_tensors")
                if client is not None:
                    from shardwise.checkpoint.client_state import read_file

                    read_file(path, client)  # size, header, every tensor's crc32
                    if file_crc32(os.path.join(path, client["file"])) != client["crc32"]:
                        raise CheckpointError(f"checksum mismatch in client-state file "
                                              f"{os.path.join(path, client['file'])}: the file is corrupt")
        except CheckpointError as exc:
            row |= {"ok": False, "problem": str(exc)}
        rows.append(row)
    stale = sorted(n for n in os.listdir(save_dir) if n.startswith((M.TMP_PREFIX, M.TRASH_PREFIX)))
    return {"latest": latest, "latest_problem": latest_problem, "tags": rows, "stale": stale}
