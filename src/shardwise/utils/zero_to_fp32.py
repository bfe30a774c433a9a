"""DeepSpeed's ``deepspeed.utils.zero_to_fp32`` for shardwise checkpoints: the whole fp32 model.

``from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint`` becomes
``from shardwise.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint``; the
calls keep DeepSpeed's signatures. DeepSpeed copies a ``zero_to_fp32.py`` script into every
checkpoint; shardwise writes nothing extra there: the same conversion is
``shardwise zero_to_fp32 CKPT_DIR OUT [--tag T]`` (or ``python -m shardwise.utils.zero_to_fp32``).

A shardwise checkpoint already holds each parameter's fp32 master weights as pieces (n-d
blocks and element ranges of them: [Note: n-d pieces]), whatever the ZeRO stage, world size
and mesh (tensor-parallel blocks, pipeline stages), so the state dict is assembled from them
(:func:`shardwise.checkpoint.consolidate`'s reader: every piece's crc32 checked), tied names
sharing one tensor as in ``model.state_dict()``. Trainable parameters come back in fp32 (the
masters, also under bf16 / fp16 training); frozen parameters and buffers in the dtype they were
saved in, as DeepSpeed's script gives them. Files are always safetensors (never a pickle).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import torch
import torch.nn as nn

from shardwise.checkpoint.export import _iter, _open, frozen_parameters, parse_size, write_model
from shardwise.checkpoint.reader import PieceReader
from shardwise.errors import CheckpointError, ShardwiseError, UsageError

log = logging.getLogger("shardwise")

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


def _skipped(m: dict, path: str, exclude_frozen_parameters: bool) -> set[str]:
    if not exclude_frozen_parameters:
        return set()
    skip = frozen_parameters(m, path)
    return skip | {alias for alias, target in m["aliases"].items() if target in skip}


class LazyTensor:
    """One tensor of a ``lazy_mode=True`` state dict: read (and verified) from the checkpoint
    when ``.contiguous()`` is called, as DeepSpeed's lazy tensors are."""

    def __init__(self, path: str, manifest: dict, name: str):
        self._path, self._m, self.name = path, manifest, name
        entry = manifest["tensors"][name]
        self.shape = torch.Size(entry["shape"])

    def contiguous(self) -> torch.Tensor:
        entry = self._m["tensors"][self.name]
        with PieceReader(self._path, self._m) as reader:
            return reader.read(self.name, "param", 0, self.shape.numel()).reshape(entry["shape"])

    def __repr__(self) -> str:
        return f"LazyTensor({self.name!r}, shape={list(self.shape)})"


def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag: str | int | None = None,
                                             exclude_frozen_parameters: bool = False,
                                             lazy_mode: bool = False) -> dict[str, Any]:
    """The whole model's state dict (CPU tensors; names and order as in ``model.state_dict()``,
    tied names sharing a tensor) from a shardwise checkpoint saved at any ZeRO stage and world
    size. ``checkpoint_dir``: the save directory (``tag=None`` follows ``latest``) or one
    checkpoint's directory. ``exclude_frozen_parameters``: without the parameters that were in
    no param group (needs a format-4 checkpoint). ``lazy_mode``: values are
    :class:`LazyTensor` objects, read when ``.contiguous()`` is called."""
    path, m = _open(checkpoint_dir, tag)
    skip = _skipped(m, path, exclude_frozen_parameters)
    order = [k for k in m["state_dict_keys"] if k not in skip]
    if lazy_mode:
        canonical = {**{n: n for n in m["tensors"]}, **m["aliases"]}
        lazy = {n: LazyTensor(path, m, n) for n in m["tensors"] if n not in skip}
        return {k: lazy[canonical[k]] for k in order}
    out = {name: t for name, t in _iter(path, m, None, True) if name not in skip}
    return {k: out[k] for k in order if k in out}


def _output(output_dir_or_file) -> tuple[str, str | None]:
    out = os.fspath(output_dir_or_file)
    if out.endswith(_PICKLE_SUFFIXES):
        raise UsageError(f"convert_zero_checkpoint_to_fp32_state_dict: {out!r} names a pickle file "
                         f"({os.path.splitext(out)[1]}); shardwise writes safetensors only. Pass a directory "
                         "(model.safetensors is written there) or a file name ending in .safetensors, and read it "
                         "with safetensors.torch.load_file")
    if out.endswith(".safetensors"):
        return os.path.dirname(os.path.abspath(out)), os.path.basename(out)
    return out, None


def convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir, output_dir, max_shard_size="5GB",
                                               safe_serialization: bool = False, tag: str | int | None = None,
                                               exclude_frozen_parameters: bool = False) -> list[str]:
    """Write the whole fp32 state dict of a checkpoint as safetensors: into directory
    ``output_dir`` as ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` +
    ``model.safetensors.index.json`` above ``max_shard_size``; ``None``: one file), or, when
    ``output_dir`` ends in ``.safetensors``, that one file (DeepSpeed's older
    ``output_file``). Tied names are written once (safetensors holds no shared tensors).
    ``safe_serialization`` is accepted for DeepSpeed's signature: the output is safetensors
    either way (a name ending in ``.bin`` / ``.pt`` is refused). Returns the files written."""
    if isinstance(max_shard_size, bool):  # DeepSpeed's order: (dir, out, max_shard_size, safe_serialization, tag)
        raise UsageError("convert_zero_checkpoint_to_fp32_state_dict: max_shard_size is a bool; DeepSpeed's order "
                         "is (checkpoint_dir, output_dir, max_shard_size, safe_serialization, tag, ...): pass the "
                         "others by keyword")
    if max_shard_size is not None:
        try:
            parse_size(max_shard_size)
        except CheckpointError as exc:
            raise UsageError(f"convert_zero_checkpoint_to_fp32_state_dict: {exc}. (DeepSpeed's order is "
                             "(checkpoint_dir, output_dir, max_shard_size, safe_serialization, tag, ...): pass "
                             "tag=... by keyword)") from None
    out_dir, single = _output(output_dir)
    path, m = _open(checkpoint_dir, tag)
    if not safe_serialization:
        log.debug("zero_to_fp32: writing safetensors (shardwise never writes pickles)")
    skip = _skipped(m, path, exclude_frozen_parameters)
    if single is None and max_shard_size is None:
        single = "model.safetensors"
    files = write_model(path, m, out_dir, None, max_shard_size, None, skip=skip, single_file=single)
    log.info("zero_to_fp32: %s -> %s", path, ", ".join(files))
    return files


def load_state_dict_from_zero_checkpoint(model: nn.Module, checkpoint_dir, tag: str | int | None = None) -> nn.Module:
    """Load the checkpoint's whole fp32 state dict into ``model`` (moved to the CPU first, as
    DeepSpeed does; loaded with ``strict=False``, what differs is logged) and return it. For a
    plain model: one that ``shardwise.initialize`` has sharded is no place for it (build a new
    model, or use ``engine.load_checkpoint``)."""
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag)
    model = model.cpu()
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        log.warning("load_state_dict_from_zero_checkpoint: missing from the checkpoint (left as they were): %s; "
                    "not in the model (ignored): %s", result.missing_keys, result.unexpected_keys)
    return model


def main(argv: list[str] | None = None) -> int:
    """``shardwise zero_to_fp32 CKPT_DIR OUT [--tag T]``: DeepSpeed's ``zero_to_fp32.py`` options."""
    parser = argparse.ArgumentParser(
        prog="shardwise zero_to_fp32",
        description="write the whole fp32 model of a shardwise checkpoint as safetensors (DeepSpeed's "
                    "zero_to_fp32.py)")
    parser.add_argument("checkpoint_dir", help="the save directory (holding `latest`) or one checkpoint's directory")
    parser.add_argument("output_dir", help="a directory (model.safetensors, sharded above --max_shard_size) or a "
                        "file name ending in .safetensors")
    parser.add_argument("--max_shard_size", "--max-shard-size", default="5GB")
    parser.add_argument("--safe_serialization", "--safe-serialization", action="store_true",
                        help="accepted for DeepSpeed's command line: the output is always safetensors")
    parser.add_argument("-t", "--tag", default=None, help="default: the one `latest` names")
    parser.add_argument("--exclude_frozen_parameters", "--exclude-frozen-parameters", action="store_true")
    parser.add_argument("-d", "--debug", action="store_true", help="accepted; log at DEBUG level")
    args = parser.parse_args(argv)
    if args.debug:
        logging.getLogger("shardwise").setLevel(logging.DEBUG)
    files = convert_zero_checkpoint_to_fp32_state_dict(
        args.checkpoint_dir, args.output_dir, args.max_shard_size, args.safe_serialization, tag=args.tag,
        exclude_frozen_parameters=args.exclude_frozen_parameters)
    for f in files:
        print(f)
    return 0


__all__ = ["get_fp32_state_dict_from_zero_checkpoint", "convert_zero_checkpoint_to_fp32_state_dict",
           "load_state_dict_from_zero_checkpoint", "LazyTensor", "main"]


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ShardwiseError as exc:
        print(f"zero_to_fp32: error: {exc}", file=sys.stderr)
        sys.exit(2)
