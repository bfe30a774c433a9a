"""Reading element ranges of saved tensors from whichever shard files hold them, verified."""
from __future__ import annotations

import json
import os
import struct
import zlib
from contextlib import ExitStack

import torch

from shardwise.checkpoint.files import crc32_of, dtype_from_name, tensor_bytes
from shardwise.errors import CheckpointError

_FROM_ST = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
            "U8": torch.uint8, "BOOL": torch.bool}


class _ShardFile:
    """One safetensors file read with plain ``readinto`` (no mmap: the memory a read costs is
    the tensor it returns, and file pages do not count against the process)."""

    def __init__(self, path: str, head: bytes, f):
        self.path, self.f = path, f
        (n,) = struct.unpack("<Q", head[:8])
        self.header = json.loads(head[8:8 + n])
        self.data_start = 8 + n

    def get_tensor(self, key: str) -> torch.Tensor:
        spec = self.header.get(key)
        if spec is None:
            raise CheckpointError(f"tensor {key!r} is not in shard file {self.path}")
        a, b = spec["data_offsets"]
        t = torch.empty(spec["shape"], dtype=_FROM_ST[spec["dtype"]])
        if b - a != t.numel() * t.element_size():
            raise CheckpointError(f"tensor {key!r} in {self.path}: header size mismatch")
        self.f.seek(self.data_start + a)
        if self.f.readinto(tensor_bytes(t)) != b - a:
            raise CheckpointError(f"shard file {self.path} ended inside tensor {key!r}: it is truncated")
        return t


class PieceReader:
    """``read(name, kind, a, b)``: elements ``[a, b)`` of flattened tensor ``name`` (``kind`` is
    ``"param"`` or an optimizer-state key), assembled from the pieces that overlap the range.
    Every piece read is checked against its crc32; every file's header once, when opened.
    Use as a context manager (files are closed on exit)."""

    def __init__(self, ckpt_path: str, manifest: dict):
        self.path = ckpt_path
        self.manifest = manifest
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}

    def __enter__(self) -> "PieceReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()
        self._stack.close()

    def _handle(self, file: str):
        h = self._handles.get(file)
        if h is None:
            path = os.path.join(self.path, file)
            info = self.manifest["files"][file]
            f = self._stack.enter_context(open(path, "rb", buffering=0))
            head = f.read(info["header_bytes"])
            if zlib.crc32(head) & 0xFFFFFFFF != info["header_crc32"]:
                raise CheckpointError(f"checksum mismatch in the header of shard file {path}: the "
                                      "file is corrupt (a bit flipped on disk, or it was modified)")
            try:
                h = _ShardFile(path, head, f)
            except (ValueError, struct.error) as exc:
                raise CheckpointError(f"cannot read shard file {path}: {exc}") from exc
            self._handles[file] = h
        return h

    def _piece(self, name: str, piece: dict, kind: str) -> torch.Tensor:
        key = piece["keys"].get(kind)
        path = os.path.join(self.path, piece["file"])
        if key is None:
            raise CheckpointError(f"{path} holds no {kind!r} for {name!r}")
        try:
            t = self._handle(piece["file"]).get_tensor(key)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"cannot read tensor {key!r} from {path}: {exc}") from exc
        if t.numel() != piece["stop"] - piece["start"]:
            raise CheckpointError(f"tensor {key!r} in {path} has {t.numel()} elements, the manifest "
                                  f"says {piece['stop'] - piece['start']}")
        if crc32_of(t) != piece["crc32"][kind]:
            raise CheckpointError(f"checksum mismatch for tensor {key!r} in shard file {path}: the "
                                  "file is corrupt (a bit flipped on disk, or it was modified)")
        return t.reshape(-1)

    def read(self, name: str, kind: str, a: int, b: int) -> torch.Tensor:
        entry = self.manifest["tensors"][name]
        dtype = dtype_from_name(entry["saved_dtype"])
        out = None
        covered = 0
        for piece in entry["pieces"]:
            s, e = max(a, piece["start"]), min(b, piece["stop"])
            if s >= e:
                continue
            t = self._piece(name, piece, kind)
            if out is None:
                out = torch.empty(b - a, dtype=t.dtype)
            out[s - a:e - a] = t[s - piece["start"]:e - piece["start"]]
            covered += e - s
        if covered != b - a:
            raise CheckpointError(f"checkpoint {self.path} does not cover elements [{a}, {b}) of "
                                  f"{kind} {name!r} (found {covered}); the manifest is inconsistent")
        return out if out is not None else torch.empty(0, dtype=dtype)
