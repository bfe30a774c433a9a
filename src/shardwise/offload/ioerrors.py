"""The named errors of the swap-file I/O layer (re-exported by ``shardwise.offload.aio``).

Each message says what failed, where (rank, file, offset, byte count), the OS error text, and
the fix; the fields are attributes too (``rank``, ``path``, ``offset``, ``nbytes``, ``os_error``;
``needed`` and ``free`` on :class:`DiskFullError`).
"""
from __future__ import annotations

import errno
import pathlib
import shutil

from shardwise.errors import ShardwiseError, UsageError

_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class OffloadWarning(UserWarning):
    """Offload works but not as configured (buffered fallback, stale files cleared)."""


class OffloadUsageError(UsageError, ValueError):
    """A request the I/O layer refuses (unaligned, out of range, closed); the caller must fix it."""


class OffloadIOError(ShardwiseError):
    """A swap-file operation failed; ``rank``, ``path``, ``offset``, ``nbytes``, ``os_error``."""

    def __init__(self, message: str, *, rank: int | None = None, path: object = None,
                 offset: int | None = None, nbytes: int | None = None, os_error: OSError | None = None):
        super().__init__(message)
        self.rank, self.path, self.offset, self.nbytes, self.os_error = rank, path, offset, nbytes, os_error


class DiskFullError(OffloadIOError):
    """ENOSPC / EFBIG / EDQUOT; ``needed`` and ``free`` are bytes."""

    def __init__(self, message: str, *, needed: int | None = None, free: int | None = None, **kw):
        super().__init__(message, **kw)
        self.needed, self.free = needed, free


class SwapFileCorruptError(OffloadIOError):
    """The swap file no longer holds what was written (truncated, deleted, short read)."""


def _free_bytes(path: pathlib.Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def _where(rank, path, offset, nbytes) -> str:
    return f"rank {rank}: {nbytes} bytes at offset {offset} of {path}"


def _os_error(what: str, e: OSError, *, rank, path, offset=None, nbytes=None, needed=None, hint=""):
    """The named error for an ``OSError`` during ``what`` (an operation on ``path``)."""
    path = pathlib.Path(path)
    where = _where(rank, path, offset, nbytes) if offset is not None else f"rank {rank}: {path}"
    text = f"{where}: {what} failed: [Errno {e.errno}] {e.strerror}"
    kw = dict(rank=rank, path=path, offset=offset, nbytes=nbytes, os_error=e)
    if e.errno in _FULL_ERRNOS:
        need = needed if needed is not None else nbytes
        free = _free_bytes(path.parent)
        why, fix = {errno.EFBIG: ("the file would pass this process's file-size limit or the filesystem's "
                                  "largest file", "raise `ulimit -f`, "),
                    errno.EDQUOT: ("this user's disk quota is used up", "raise the quota, ")
                    }.get(e.errno, ("the filesystem is full", ""))
        return DiskFullError(
            f"{text}: {why}; {need} bytes needed, {free} bytes free on {path.parent}. Fix: {fix}free space there, "
            f"point nvme_path at another disk, or offload less state per rank (more data-parallel ranks, "
            f"offload_optimizer.ratio < 1)", needed=need, free=free, **kw)
    return OffloadIOError(f"{text}{'; ' + hint if hint else ''}", **kw)
