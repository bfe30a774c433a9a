"""Reading element ranges of saved tensors from whichever shard files hold them, verified.

[Note: files agree with the manifest]
Before anything is read, :func:`verify_files` opens every shard file the manifest lists (regular
files only, [Note: bounded reads]), checks its size and its header's crc32, parses the
safetensors header strictly (every entry's dtype, shape and byte range; the ranges tile the data
exactly) and cross-checks it with the manifest: each piece's key is in its file with the dtype
the manifest records for it and shape ``[stop - start]``, and the file holds nothing else. A
header edited by hand (``F32`` -> ``I32``), two keys or ranges exchanged, or files swapped is a
:class:`CheckpointError` naming file and tensor; the piece checksums then cover the bytes and,
from format 2 on, their identity ([Note: piece identity]).

:class:`PieceReader` is the :class:`~shardwise.zero.pieces.PieceSource` that
``strategy.load_pieces`` reads from ([Note: state pieces]).
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from contextlib import ExitStack

import torch

from shardwise.checkpoint import manifest as M
from shardwise.checkpoint import nd as ND
from shardwise.checkpoint.files import dtype_from_name, open_regular, tensor_bytes
from shardwise.errors import CheckpointError

_FROM_ST = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
            "U8": torch.uint8, "BOOL": torch.bool}
_TO_ST = {v: k for k, v in _FROM_ST.items()}
_SIZE = {k: torch.empty((), dtype=v).element_size() for k, v in _FROM_ST.items()}


def _bad(path: str, why: str) -> CheckpointError:
    return CheckpointError(f"shard file {path} has a corrupt safetensors header: {why}; the file was "
                           "modified or written by something else. Load another checkpoint (tag=...)")


def parse_header(head: bytes, path: str, data_bytes: int) -> dict[str, tuple[str, list[int], int, int]]:
    """``{key: (st dtype, shape, start, stop)}`` of a safetensors header ``head`` (the 8-byte
    length included), every entry checked; the byte ranges must tile ``[0, data_bytes)``."""
    if len(head) < 8:
        raise _bad(path, "shorter than 8 bytes")
    (n,) = struct.unpack("<Q", head[:8])
    if 8 + n != len(head):
        raise _bad(path, f"it says {n} header bytes, the manifest {len(head) - 8}")
    try:
        header = json.loads(head[8:].decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise _bad(path, f"not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _bad(path, "not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad(path, "__metadata__ is not a map of strings")
    out, spans = {}, []
    for key, spec in header.items():
        ok = isinstance(spec, dict) and set(spec) == {"dtype", "shape", "data_offsets"}
        dtype, shape, offs = (spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")) if ok else (None,) * 3
        if not (ok and dtype in _FROM_ST and isinstance(shape, list) and isinstance(offs, list) and len(offs) == 2
                and all(type(d) is int and d >= 0 for d in shape + offs) and offs[0] <= offs[1]):
            raise _bad(path, f"entry {key!r} is not {{dtype, shape, data_offsets}} with a known dtype and "
                       f"non-negative integers (it is {str(spec)[:120]})")
        numel = 1
        for d in shape:
            numel *= d
        if numel * _SIZE[dtype] != offs[1] - offs[0]:
            raise _bad(path, f"entry {key!r}: {dtype} of shape {shape} is {numel * _SIZE[dtype]} bytes, its "
                       f"data_offsets span {offs[1] - offs[0]}")
        out[key] = (dtype, shape, offs[0], offs[1])
        spans.append((offs[0], offs[1], key))
    end = 0
    for a, b, key in sorted(spans):
        if a != end:
            raise _bad(path, f"entry {key!r} starts at byte {a}, expected {end} (entries overlap or leave gaps)")
        end = b
    if end != data_bytes:
        raise _bad(path, f"its entries cover {end} data bytes, the file has {data_bytes}")
    return out


def kind_dtype(entry: dict, kind: str) -> str:
    """The dtype (torch name) the manifest records for ``kind`` of tensor ``entry``: format 1
    recorded none for optimizer state, which every torch optimizer keeps like the parameter."""
    if kind == "param" or entry.get("state_dtypes") is None:
        return entry["saved_dtype"]
    return entry["state_dtypes"][kind]


def _expected(m: dict) -> dict[str, dict[str, tuple[str, str, int, int, str]]]:
    out: dict[str, dict] = {file: {} for file in m["files"]}
    for name, entry in m["tensors"].items():
        for piece in entry["pieces"]:
            for kind, key in piece["keys"].items():
                keys = out[piece["file"]]
                if key in keys:
                    raise CheckpointError(f"the manifest lists tensor {key!r} of {piece['file']} twice")
                keys[key] = (name, kind, piece["start"], piece["stop"], kind_dtype(entry, kind))
    return out


def _read_head(ckpt_path: str, file: str, info: dict):
    """Open shard ``file`` (regular, its recorded size), read and check its header."""
    path = os.path.join(ckpt_path, file)
    what = f"shard file (written by rank {info['rank']}, expected {info['size']} bytes)"
    f = open_regular(path, what)
    try:
        size = os.fstat(f.fileno()).st_size
        if size != info["size"]:
            raise CheckpointError(f"shard file {path} has {size} bytes, expected {info['size']} "
                                  f"(written by rank {info['rank']}): the file is "
                                  f"{'truncated' if size < info['size'] else 'longer than written'}")
        head = f.read(info["header_bytes"])
        if len(head) != info["header_bytes"] or zlib.crc32(head) & 0xFFFFFFFF != info["header_crc32"]:
            raise CheckpointError(f"checksum mismatch in the header of shard file {path}: the "
                                  "file is corrupt (a bit flipped on disk, or it was modified)")
        return f, path, parse_header(head, path, size - info["header_bytes"])
    except BaseException:
        f.close()
        raise


def verify_files(ckpt_path: str, m: dict) -> None:
    """See [Note: files agree with the manifest]. Reads headers only."""
    expected = _expected(m)
    for file, info in m["files"].items():
        f, path, header = _read_head(ckpt_path, file, info)
        f.close()
        want = expected[file]
        for key, (name, kind, start, stop, dtype) in want.items():
            got = header.get(key)
            if got is None:
                raise CheckpointError(f"shard file {path} has no tensor {key!r} ({kind} of {name!r}, elements "
                                      f"[{start}, {stop})), which the manifest says it holds")
            st = _TO_ST[dtype_from_name(dtype)]
            if got[0] != st or got[1] != [stop - start]:
                raise CheckpointError(
                    f"tensor {key!r} in shard file {path} is {got[0]} of shape {got[1]}, the manifest says "
                    f"{st} of shape [{stop - start}] ({kind} of {name!r}): the file and the manifest disagree")
        extra = sorted(set(header) - set(want))
        if extra:
            raise CheckpointError(f"shard file {path} holds tensors the manifest does not list: {extra[:4]}; the "
                                  "file and the manifest disagree")


class _ShardFile:
    """One safetensors file read with plain ``readinto`` (no mmap: the memory a read costs is
    the tensor it returns, and file pages do not count against the process)."""

    def __init__(self, path: str, f, header: dict, data_start: int):
        self.path, self.f, self.header, self.data_start = path, f, header, data_start

    def get_tensor(self, key: str) -> torch.Tensor:
        spec = self.header.get(key)
        if spec is None:
            raise CheckpointError(f"tensor {key!r} is not in shard file {self.path}")
        dtype, shape, a, b = spec
        t = torch.empty(shape, dtype=_FROM_ST[dtype])
        self.f.seek(self.data_start + a)
        if b > a and self.f.readinto(tensor_bytes(t)) != b - a:
            raise CheckpointError(f"shard file {self.path} ended inside tensor {key!r}: it is truncated")
        return t


def layout_text(m: dict) -> str:
    """"saved at world size 4 (pp 1, dp 2, tp 2), ZeRO stage 1, float32": for messages."""
    mesh = m.get("mesh")
    shown = f" (pp {mesh['pp']}, dp {mesh['dp']}, tp {mesh['tp']})" if mesh and (mesh["pp"] > 1 or mesh["tp"] > 1) else ""
    return f"saved at world size {m['world_size']}{shown}, ZeRO stage {m['zero_stage']}, {m['compute_dtype']}"


class PieceReader:
    """``read(name, kind, a, b)``: elements ``[a, b)`` of flattened tensor ``name`` (``kind`` is
    ``"param"`` or an optimizer-state key), assembled from the pieces that overlap the range.
    Every piece read is checked against its crc32; every file's header once, when opened.
    Use as a context manager (files are closed on exit)."""

    def __init__(self, ckpt_path: str, manifest: dict):
        self.path = ckpt_path
        self.manifest = manifest
        self.version = manifest["format_version"]
        # a PieceSource ([Note: state pieces]): what strategy.load_pieces reads
        self.layout = layout_text(manifest)
        self._stack = ExitStack()
        self._handles: dict[str, _ShardFile] = {}
        self.aliases: dict[str, str] = dict(manifest.get("aliases") or {})  # tied names: read as their tensor
        self.partial = False  # True: the module loading is one pipeline stage (holds a subset of the names)

    def __enter__(self) -> "PieceReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tensors(self) -> dict[str, dict]:
        """The manifest's entry of every saved tensor (shape, trainable, group, optimizer_state,
        optimizer_scalars, pieces, ...)."""
        return self.manifest["tensors"]

    def close(self) -> None:
        self._handles.clear()
        self._stack.close()

    def _handle(self, file: str) -> _ShardFile:
        h = self._handles.get(file)
        if h is None:
            info = self.manifest["files"][file]
            f, path, header = _read_head(self.path, file, info)
            self._stack.enter_context(f)
            h = self._handles[file] = _ShardFile(path, f, header, info["header_bytes"])
        return h

    def _piece(self, name: str, entry: dict, piece: dict, kind: str) -> torch.Tensor:
        key = piece["keys"].get(kind)
        path = os.path.join(self.path, piece["file"])
        if key is None:
            raise CheckpointError(f"{path} holds no {kind!r} for {name!r}")
        t = self._handle(piece["file"]).get_tensor(key)
        dtype = kind_dtype(entry, kind)
        if t.numel() != piece["stop"] - piece["start"] or t.dtype != dtype_from_name(dtype):
            raise CheckpointError(f"tensor {key!r} in {path} is {t.numel()} x {t.dtype}, the manifest says "
                                  f"{piece['stop'] - piece['start']} x {dtype}")
        seed = M.piece_identity(name, kind, key, dtype, piece["start"], piece["stop"], entry["shape"], self.version,
                                piece.get("offsets"), piece.get("block"))
        if zlib.crc32(tensor_bytes(t), zlib.crc32(seed)) & 0xFFFFFFFF != piece["crc32"][kind]:
            raise CheckpointError(f"checksum mismatch for tensor {key!r} in shard file {path}: the "
                                  "file is corrupt (a bit flipped on disk, or it was modified), or the "
                                  "manifest names the wrong piece")
        return t.reshape(-1)

    def entry(self, name: str) -> dict:
        """The saved entry of ``name``, following an alias (a tied name)."""
        tensors = self.manifest["tensors"]
        if name not in tensors and name in self.aliases:
            name = self.aliases[name]
        if name not in tensors:
            raise CheckpointError(f"checkpoint {self.path} holds no tensor {name!r}")
        return tensors[name]

    def read(self, name: str, kind: str, a: int, b: int,
             block: tuple[tuple[int, ...], tuple[int, ...]] | None = None) -> torch.Tensor:
        """Elements ``[a, b)`` of the flattening of ``block`` (``(offsets, shape)`` within the
        global tensor; None: the whole tensor) of ``kind`` of tensor ``name`` (or of the tensor
        it is an alias of), assembled from whichever saved pieces hold them ([Note: n-d pieces]),
        each verified; a gap or overlap is a :class:`CheckpointError` naming tensor and region."""
        if name not in self.manifest["tensors"] and name in self.aliases:
            name = self.aliases[name]
        entry = self.entry(name)
        shape = entry["shape"]
        dtype = dtype_from_name(kind_dtype(entry, kind) if kind == "param" or kind in entry["optimizer_state"]
                                else entry["saved_dtype"])
        want = ND.Region(block[0], block[1], a, b) if block is not None else \
            ND.Region([0] * len(shape), shape, a, b)
        pieces = entry["pieces"]
        regions = [piece_region(p, shape) for p in pieces]
        return ND.assemble(f"{kind} {name!r} in checkpoint {self.path}", shape, want, regions,
                           lambda i: self._piece(name, entry, pieces[i], kind), dtype)


def piece_region(piece: dict, shape: list[int]) -> ND.Region:
    """A manifest piece as a region: format 5's block, or the whole tensor (formats 1-4)."""
    offsets = piece.get("offsets")
    block = piece.get("block")
    return ND.Region(offsets if offsets is not None else [0] * len(shape), block if block is not None else shape,
                     piece["start"], piece["stop"])
