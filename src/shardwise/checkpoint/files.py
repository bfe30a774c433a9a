"""Bytes on disk: a streaming safetensors writer with checksums, fsync, atomic replace.

[Note: streamed shard files]
A shard file is written in the safetensors layout (8-byte little-endian header length, JSON
header, raw little-endian tensor data) by :func:`write_safetensors`, one tensor at a time
straight from the tensor's memory: no second copy of the shard is built, and the crc32 of the
header, of every tensor and of the whole file are computed in the same pass. Any reader of
safetensors (``safetensors.safe_open``) reads the result.

[Note: durable commit]
A file is durable only after ``fsync`` of the file *and* of the directory that names it; a
rename is durable after ``fsync`` of the directory it lands in. :func:`atomic_write_text`
writes a sibling temporary file, fsyncs it, ``os.replace``-s it over the target and fsyncs
the directory, so a reader sees the old content or the new one, never a mix.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import stat
import struct
import zlib

import torch

from shardwise.errors import CheckpointError

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_DTYPE_NAMES = {getattr(torch, n): n for n in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")}
_CHUNK = 64 << 20  # bytes written per call: bounds what one write() holds


def open_regular(path: str, what: str, max_bytes: int | None = None):
    """Open ``path`` for binary reading only if it is a regular file (a symlink to one is fine)
    of at most ``max_bytes``: a FIFO, a device (``/dev/zero``), a socket or a directory is a
    :class:`CheckpointError` naming it, never a blocking or unbounded read. ``O_NONBLOCK``
    makes opening a FIFO return at once; the type is checked on the opened descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"cannot open {what} {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise CheckpointError(f"{what} {path} is {kind}, not a regular file: checkpoints only read "
                                  "regular files; replace it with the file the save wrote")
        if max_bytes is not None and st.st_size > max_bytes:
            raise CheckpointError(f"{what} {path} has {st.st_size} bytes, more than the {max_bytes} such "
                                  "a file can have: it is not the file a save wrote")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str, what: str, max_bytes: int) -> bytes:
    """The whole content of regular file ``path`` (see :func:`open_regular`), at most
    ``max_bytes`` even if it grows while being read."""
    with open_regular(path, what, max_bytes) as f:
        parts, left = [], max_bytes + 1
        while left > 0:
            block = f.read(min(left, _CHUNK))
            if not block:
                break
            parts.append(block)
            left -= len(block)
    data = b"".join(parts)
    if len(data) > max_bytes:
        raise CheckpointError(f"{what} {path} has more than {max_bytes} bytes: it is not the file a save wrote")
    return data


def is_regular(path: str) -> bool:
    """``path`` is (or links to) a regular file; never opens it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"tensors of dtype {dtype} cannot be checkpointed (supported: "
                              f"{', '.join(_DTYPE_NAMES.values())})")
    return _DTYPE_NAMES[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype) or dt not in _DTYPE_NAMES:
        raise CheckpointError(f"unknown dtype {name!r} in checkpoint manifest")
    return dt


def cpu_contiguous(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.cpu() if t.device.type != "cpu" else t).contiguous()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy view of the bytes of ``t``, a contiguous CPU tensor the caller keeps alive."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def crc32_of(t: torch.Tensor, seed: bytes = b"") -> int:
    t = cpu_contiguous(t)
    return zlib.crc32(tensor_bytes(t), zlib.crc32(seed)) & 0xFFFFFFFF


def write_bytes(f, data, path: str, written: int, total: int, rank: int) -> None:
    """``f.write(data)``; an ``OSError`` becomes a :class:`CheckpointError` naming rank, path and
    bytes. (Tests replace this function to simulate a full disk.)"""
    try:
        f.write(data)
    except OSError as exc:
        raise _write_error(exc, path, written, total, rank) from exc


def _write_error(exc: OSError, path: str, written: int, total: int, rank: int) -> CheckpointError:
    why = "the disk is full" if exc.errno == errno.ENOSPC else os.strerror(exc.errno or 0) or str(exc)
    return CheckpointError(
        f"rank {rank}: writing {path} failed after {written} of {total} bytes: {why} "
        f"([Errno {exc.errno}] {exc.strerror or exc}). Free space (or choose another save_dir) "
        "and save again; nothing was committed and the previous checkpoint is intact."
    )


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], rank: int,
                      metadata: dict[str, str] | None = None, seeds: dict[str, bytes] | None = None) -> dict:
    """Write ``tensors`` to ``path`` (safetensors layout), fsync it. A value may be a tensor or
    an object with ``dtype``, ``shape``, ``numel()``, ``element_size()`` and ``load()`` (called
    when the writer reaches it, so only one such tensor is in memory at a time). Returns
    ``{"size", "crc32", "header_bytes", "header_crc32", "tensors": {key: crc32}}``; a tensor's
    crc32 starts from ``seeds[key]`` (its identity, see [Note: piece identity]) when given."""
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    for key, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise CheckpointError(f"tensor {key!r} has dtype {t.dtype}, which safetensors cannot store")
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes
    head = struct.pack("<Q", len(raw)) + raw
    total = len(head) + offset
    crc, crcs, written = 0, {}, 0
    try:
        with open(path, "wb") as f:
            write_bytes(f, head, path, written, total, rank)
            crc = zlib.crc32(head, crc)
            written += len(head)
            for key, t in tensors.items():
                if not isinstance(t, torch.Tensor):  # produced on demand (export streams them)
                    t = t.load()
                t = cpu_contiguous(t)
                view = tensor_bytes(t)
                tcrc = zlib.crc32(seeds[key]) if seeds and key in seeds else 0
                for i in range(0, len(view), _CHUNK):
                    part = view[i:i + _CHUNK]
                    write_bytes(f, part, path, written, total, rank)
                    tcrc = zlib.crc32(part, tcrc)
                    crc = zlib.crc32(part, crc)
                    written += len(part)
                crcs[key] = tcrc & 0xFFFFFFFF
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:  # open / flush / fsync / close
        raise _write_error(exc, path, written, total, rank) from exc
    return {"size": total, "crc32": crc & 0xFFFFFFFF, "header_bytes": len(head),
            "header_crc32": zlib.crc32(head) & 0xFFFFFFFF, "tensors": crcs}


def file_crc32(path: str, limit: int | None = None) -> int:
    crc = 0
    left = limit
    with open_regular(path, "shard file") as f:
        while left is None or left > 0:
            block = f.read(_CHUNK if left is None else min(_CHUNK, left))
            if not block:
                break
            crc = zlib.crc32(block, crc)
            if left is not None:
                left -= len(block)
    return crc & 0xFFFFFFFF


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably (see [Note: durable commit])."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(directory)


def remove_tree(path: str) -> None:
    """Delete a directory; a half-deleted one is first renamed out of the committed namespace."""
    if not os.path.exists(path):
        return
    base = os.path.basename(path)
    if not base.startswith("."):
        trash = os.path.join(os.path.dirname(path), f".trash-{base}-{os.getpid()}")
        os.replace(path, trash)
        path = trash
    shutil.rmtree(path, ignore_errors=True)
