"""ZeRO-Infinity's file I/O: page-aligned buffers, preallocated swap files, a threaded engine.

[Note: why threads + pread/pwrite]
``os.pwritev``/``os.preadv`` release the GIL, so a small ``ThreadPoolExecutor`` gives the disk
the queue depth it needs (depth 1 loses 2-3x on writes here) and matches fio and libaio on this
machine (design ``offload.md`` A.5, A.6) with no compiled extension and no system library (the
DeepSpeed ``async_io`` op's build failures are its most reported NVMe problem). A request is cut
into ``block_size`` pieces, one pool task each; a piece loops until all its bytes moved (partial
transfers; ``EINTR`` is retried). The syscalls write straight from and read straight into the
tensor's memory (a ``memoryview`` of its bytes): no copy, no ``bytes`` object.

[Note: alignment]
``O_DIRECT`` moves data by DMA between the disk and the buffer, bypassing the page cache, so the
buffer address, the file offset and the length must be multiples of the logical block size;
``ALIGN`` = 4096 covers 512 B and 4 KiB disks. :func:`aligned_empty` gives such buffers (an
anonymous ``mmap``: page-aligned, returned to the OS when the tensor is garbage); callers pad
each tensor's slot in a file to ``ALIGN``. Unaligned input to a direct file is refused up front
(:class:`OffloadUsageError`) rather than left to fail as ``EINVAL`` in a worker thread.

[Note: buffered fallback]
Without ``O_DIRECT`` every byte goes through the page cache: slower writes here and, worse, host
memory that grows with the offloaded state. ``direct=None`` therefore tries ``O_DIRECT`` first
(one probe write per directory, since some filesystems accept the flag and fail the I/O) and
falls back to buffered I/O with one :class:`OffloadWarning` per directory. tmpfs/ramfs are
buffered without trying: the files live in RAM whatever the flag (older kernels refuse
``O_DIRECT`` there with ``EINVAL``; newer ones, e.g. this machine's 6.18, accept and ignore it). So that the page cache
stays flat in buffered mode, readahead is off (``POSIX_FADV_RANDOM``: out-of-order pieces would
re-read ranges already dropped) and each piece is written out (``sync_file_range``) and
dropped (``posix_fadvise(DONTNEED)``; on its own it keeps dirty pages).

[Note: failures are named, never zeros]
A swap file is preallocated (``posix_fallocate``), so a full disk fails when the file is created,
before training, as :class:`DiskFullError`. Every request first ``fstat``-s the file: deleted
(``st_nlink == 0``) or resized files raise :class:`SwapFileCorruptError`, and so does a read
that hits the end of the file early. Other ``OSError`` is :class:`OffloadIOError`. Each message
names the rank, the file, the offset, the byte count and the OS error text.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import pathlib
import sys
import threading
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from shardwise.offload.ioerrors import (DiskFullError, OffloadIOError, OffloadUsageError, OffloadWarning,
                                        SwapFileCorruptError, _os_error, _where)

__all__ = ["ALIGN", "aligned_empty", "pinned_if", "OffloadWarning", "OffloadUsageError", "OffloadIOError",
           "DiskFullError", "SwapFileCorruptError", "SwapFile", "IOHandle", "IOEngine", "measure_bandwidth"]

ALIGN = 4096
_RAM_FS = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}  # statfs f_type magics
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_LOCK = threading.Lock()
_WARNED: set[str] = set()  # directories already warned about (one OffloadWarning each)
_DIRECT_OK: dict[str, bool] = {}  # directory -> O_DIRECT I/O probed and works
_OPEN: set[tuple[int, int]] = set()  # (st_dev, st_ino) of the swap files open here: O_TRUNC would zero them


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def aligned_empty(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes`` rounded up to ``ALIGN``, ``data_ptr() % ALIGN == 0``,
    backed by a private anonymous mmap (zero pages until touched; unmapped with the tensor)."""
    if nbytes < 0:
        raise OffloadUsageError(f"aligned_empty: nbytes must be >= 0, got {nbytes}")
    n = _round_up(nbytes)
    if n == 0:
        return torch.empty(0, dtype=torch.uint8)
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(m, dtype=torch.uint8)  # the tensor keeps the mmap object alive


def pinned_if(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """``t.pin_memory()`` when ``pin`` and CUDA is available, else ``t`` (no CUDA: nothing to pin)."""
    return t.pin_memory() if pin and torch.cuda.is_available() else t


def _fs_type(directory: pathlib.Path) -> int | None:
    """statfs(2) ``f_type`` (the first field of ``struct statfs`` on Linux), or None."""
    try:
        buf = ctypes.create_string_buffer(256)
        if ctypes.CDLL(None, use_errno=True).statfs(os.fsencode(str(directory)), buf) != 0:
            return None
        return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF
    except (OSError, AttributeError, TypeError):
        return None


def _warn_once(directory: pathlib.Path, message: str, stacklevel: int = 5) -> None:
    key = str(directory.resolve())
    with _LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(message, OffloadWarning, stacklevel=stacklevel)


def _fallback_message(directory: pathlib.Path, reason: str) -> str:
    return (f"{directory}: {reason}, so shardwise swap files there use buffered I/O through the page cache "
            f"(host memory grows with the swapped state and writes are slower). For ZeRO-Infinity, point nvme_path "
            f"at a directory on a local disk (ext4/xfs on NVMe or SSD)")


def _release_fd(fd: int, key: tuple[int, int]) -> None:
    _OPEN.discard(key)
    os.close(fd)


class SwapFile:
    """One preallocated swap file. ``nbytes`` is the reserved size (the request rounded up to
    ``ALIGN``); ``direct`` says whether it was opened with ``O_DIRECT``. Close it only after the
    I/O on it has been waited for (``IOEngine.close`` waits for everything)."""

    def __init__(self, path: str | os.PathLike, nbytes: int, *, rank: int, direct: bool | None = None,
                 _preallocate: bool = True):
        if nbytes < 0:
            raise OffloadUsageError(f"rank {rank}: swap file {path}: nbytes must be >= 0, got {nbytes}")
        self.path, self.rank, self.nbytes = pathlib.Path(path), rank, _round_up(nbytes)
        self._fd, self.direct = -1, False
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) in _OPEN:
                raise OffloadUsageError(f"rank {rank}: swap file {self.path} is already open in this process; "
                                        f"close that SwapFile first or use another file name")
        except FileNotFoundError:
            pass
        folder = self.path.parent
        want = direct
        if direct is None:
            fs = _RAM_FS.get(_fs_type(folder))
            if fs:
                _warn_once(folder, _fallback_message(
                    folder, f"its filesystem is {fs} (RAM), which does not do O_DIRECT (older kernels refuse it)"),
                    stacklevel=3)
                want = False
        self._adopt(*self._open(want, truncate=True))
        try:
            self._reserve(_preallocate)
            if direct is None and self.direct and self.nbytes:
                self._probe_direct()
        except BaseException:
            self.close()
            self.path.unlink(missing_ok=True)
            raise

    def _open(self, want: bool | None, *, truncate: bool) -> tuple[int, bool]:
        flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if truncate else 0) | getattr(os, "O_CLOEXEC", 0)
        kw = dict(rank=self.rank, path=self.path, needed=self.nbytes)
        if want is not False:
            try:
                if not _O_DIRECT:
                    raise OSError(errno.EINVAL, "O_DIRECT is not available on this platform")
                return os.open(self.path, flags | _O_DIRECT, 0o600), True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise _os_error("open (O_DIRECT)", e, **kw) from e
                if want is True:
                    raise _os_error("open with O_DIRECT", e, **kw, hint=(
                        "this filesystem refuses O_DIRECT; use direct=None (falls back to buffered I/O) or an "
                        "nvme_path on a local disk")) from e
                _warn_once(self.path.parent, _fallback_message(
                    self.path.parent, "its filesystem refuses O_DIRECT (EINVAL; e.g. tmpfs)"))
        try:
            return os.open(self.path, flags, 0o600), False
        except OSError as e:
            raise _os_error("open", e, **kw, hint="check that nvme_path exists and is writable") from e

    def _reserve(self, preallocate: bool) -> None:
        if not self.nbytes:
            return
        try:
            if preallocate:
                try:
                    os.posix_fallocate(self._fd, 0, self.nbytes)
                    return
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
            os.ftruncate(self._fd, self.nbytes)  # sparse: no reservation (test hook, or no fallocate)
        except OSError as e:
            raise _os_error(f"reserving {self.nbytes} bytes (posix_fallocate)", e, rank=self.rank,
                            path=self.path, offset=0, nbytes=self.nbytes) from e

    def _probe_direct(self) -> None:
        key = str(self.path.parent.resolve())
        if _DIRECT_OK.get(key):
            return
        try:
            while True:
                try:
                    os.pwritev(self._fd, [memoryview(aligned_empty(ALIGN).numpy())], 0)
                    break
                except InterruptedError:
                    continue
            _DIRECT_OK[key] = True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise _os_error("probe write (O_DIRECT)", e, rank=self.rank, path=self.path, offset=0,
                                nbytes=ALIGN) from e
            self._finalizer.detach()
            os.close(self._fd)
            self._adopt(*self._open(False, truncate=False))
            _warn_once(self.path.parent, _fallback_message(
                self.path.parent, "its filesystem accepts O_DIRECT at open but fails the I/O (EINVAL)"))

    def _adopt(self, fd: int, direct: bool) -> None:
        self._fd, self.direct = fd, direct
        if not direct:
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: see [Note: buffered fallback]
            except OSError:
                pass
        st = os.fstat(fd)
        _OPEN.add((st.st_dev, st.st_ino))
        self._finalizer = weakref.finalize(self, _release_fd, fd, (st.st_dev, st.st_ino))

    def fileno(self) -> int:
        return self._fd

    def _check(self, offset: int | None = None, nbytes: int | None = None, op: str = "check") -> None:
        if self._fd < 0:
            raise OffloadUsageError(f"rank {self.rank}: swap file {self.path} is closed ({op} refused)")
        where = _where(self.rank, self.path, offset, nbytes) if offset is not None else \
            f"rank {self.rank}: swap file {self.path}"
        kw = dict(rank=self.rank, path=self.path, offset=offset, nbytes=nbytes)
        try:
            st = os.fstat(self._fd)
        except OSError as e:
            raise _os_error(f"{op}: fstat", e, **kw) from e
        fix = ("Nothing else may touch nvme_path/shardwise-swap during a run (tmp cleaners, other jobs, "
               "manual rm); the swapped state is lost: restart from the last checkpoint")
        if st.st_nlink == 0:
            raise SwapFileCorruptError(f"{where}: {op} refused: the swap file was deleted while this job was "
                                       f"using it. {fix}", **kw)
        if st.st_size != self.nbytes:
            raise SwapFileCorruptError(f"{where}: {op} refused: the swap file is {st.st_size} bytes, expected the "
                                       f"reserved {self.nbytes} (truncated or resized by something else). {fix}",
                                       **kw)

    def check(self) -> None:
        """Raise :class:`SwapFileCorruptError` if the file was deleted or resized."""
        self._check()

    def sync(self) -> None:
        """fsync (durable), then drop the file's clean pages from the page cache."""
        self._check(op="sync")
        try:
            os.fsync(self._fd)
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            raise _os_error("fsync", e, rank=self.rank, path=self.path) from e

    def close(self) -> None:
        """Close the descriptor (idempotent); the file stays (the swap directory removes it)."""
        self._fd = -1
        self._finalizer()

    def __enter__(self) -> SwapFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SwapFile({str(self.path)!r}, nbytes={self.nbytes}, rank={self.rank}, direct={self.direct})"


def _sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _sync_file_range()


def _drop_cache(fd: int, offset: int, n: int, *, written: bool) -> None:
    """Buffered mode: take the range out of the page cache; written pages are written out first
    (``sync_file_range`` wait-write-wait, ctypes releases the GIL; else ``fdatasync``)."""
    try:
        if written:
            if _SYNC_FILE_RANGE is None or _SYNC_FILE_RANGE(fd, offset, n, 7) != 0:
                os.fdatasync(fd)
        os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass  # advisory: the data is written either way


def _run_piece(op: str, f: SwapFile, fd: int, offset: int, mv: memoryview) -> None:
    """Move all of ``mv`` at ``offset`` (one pool task): partial transfers and EINTR loop."""
    pos, n = 0, len(mv)
    call = os.pwritev if op == "write" else os.preadv
    while pos < n:
        try:
            k = call(fd, [mv[pos:]], offset + pos)
        except InterruptedError:
            continue
        except OSError as e:
            hint = ("O_DIRECT needs ALIGN-aligned buffers, offsets and lengths" if e.errno == errno.EINVAL and f.direct
                    else "the file was closed while I/O was in flight" if e.errno == errno.EBADF else "")
            raise _os_error(op, e, rank=f.rank, path=f.path, offset=offset + pos, nbytes=n - pos, hint=hint) from e
        if k == 0:
            where = _where(f.rank, f.path, offset + pos, n - pos)
            if op == "read":
                raise SwapFileCorruptError(
                    f"{where}: short read: the file ends at byte {offset + pos}, before the {n - pos} bytes "
                    f"still expected (truncated by something else). The swapped state is lost: restart from the "
                    f"last checkpoint", rank=f.rank, path=f.path, offset=offset + pos, nbytes=n - pos)
            raise OffloadIOError(f"{where}: write made no progress (0 bytes written)", rank=f.rank,
                                 path=f.path, offset=offset + pos, nbytes=n - pos)
        pos += k
    if not f.direct:
        _drop_cache(fd, offset, n, written=op == "write")


class IOHandle:
    """One request in flight. ``wait()`` blocks until every piece ended, then raises the named
    error of the first failed piece (again on every call: a failed request stays failed)."""

    def __init__(self, futures: list[Future], keep: torch.Tensor | None, nbytes: int):
        self._futures, self._keep, self.nbytes = futures, keep, nbytes  # keep: the buffer stays alive
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def done(self) -> bool:
        return all(fu.done() for fu in self._futures)

    def wait(self) -> None:
        with self._lock:
            if self._futures:
                errors = [fu.exception() for fu in self._futures]  # waits for all: none touches buf later
                self._error = next((e for e in errors if e is not None), None)
                self._futures, self._keep = [], None
        if self._error is not None:
            raise self._error


class IOEngine:
    """Reads and writes tensors at offsets of :class:`SwapFile` s on a pool of ``threads``
    threads, ``block_size`` bytes per piece (see [Note: why threads + pread/pwrite])."""

    def __init__(self, *, threads: int = 8, block_size: int = 1 << 20, rank: int = 0):
        if threads < 1:
            raise OffloadUsageError(f"IOEngine: threads must be >= 1, got {threads}")
        if block_size <= 0 or block_size % ALIGN:
            raise OffloadUsageError(f"IOEngine: block_size must be a positive multiple of {ALIGN}, got {block_size}")
        self.threads, self.block_size, self.rank = threads, block_size, rank
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"shardwise-aio-rank{rank}")
        self._closed = False

    def write(self, f: SwapFile, offset: int, buf: torch.Tensor) -> IOHandle:
        """Write ``buf``'s bytes to ``f`` at ``offset``."""
        return self._submit("write", f, offset, buf)

    def read(self, f: SwapFile, offset: int, buf: torch.Tensor) -> IOHandle:
        """Read ``buf``'s size in bytes from ``f`` at ``offset`` into ``buf``."""
        return self._submit("read", f, offset, buf)

    def _submit(self, op: str, f: SwapFile, offset: int, buf: torch.Tensor) -> IOHandle:
        where = f"rank {f.rank}: {op} at offset {offset} of {f.path}"
        if self._closed:
            raise OffloadUsageError(f"{where}: the IOEngine is closed")
        if not isinstance(buf, torch.Tensor) or buf.device.type != "cpu" or not buf.is_contiguous():
            raise OffloadUsageError(f"{where}: the buffer must be a contiguous CPU tensor (got {type(buf).__name__} "
                                    f"{getattr(buf, 'device', '')}); copy it to a host buffer first")
        flat = buf.detach().reshape(-1)
        try:
            mv = memoryview((flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)).numpy())
        except (RuntimeError, TypeError) as e:
            raise OffloadUsageError(f"{where}: cannot view the {buf.dtype} buffer as bytes ({e})") from e
        nbytes = mv.nbytes
        if offset < 0 or offset % ALIGN:
            raise OffloadUsageError(f"{where}: offset must be a non-negative multiple of ALIGN={ALIGN}")
        if offset + nbytes > f.nbytes:
            raise OffloadUsageError(f"{where}: {nbytes} bytes end at {offset + nbytes}, past the file's reserved "
                                    f"{f.nbytes} bytes; size the SwapFile for every slot")
        if f.direct and (buf.data_ptr() % ALIGN or nbytes % ALIGN):
            raise OffloadUsageError(
                f"{where}: the file uses O_DIRECT, which needs the buffer address and length to be multiples of "
                f"ALIGN={ALIGN} (address % {ALIGN} = {buf.data_ptr() % ALIGN}, length {nbytes}); allocate with "
                f"aligned_empty() and pad the slot to a multiple of {ALIGN}")
        f._check(offset, nbytes, op)
        bs, futures = self.block_size, []
        try:
            for p in range(0, nbytes, bs):
                futures.append(self._pool.submit(_run_piece, op, f, f.fileno(), offset + p, mv[p:p + bs]))
        except RuntimeError as e:  # closed by another thread meanwhile
            IOHandle(futures, buf, nbytes).wait()
            raise OffloadUsageError(f"{where}: the IOEngine was closed while the request was issued") from e
        return IOHandle(futures, buf, nbytes)

    def close(self) -> None:
        """Wait for the requests in flight, stop the threads (idempotent)."""
        self._closed = True
        self._pool.shutdown(wait=True)

    def __enter__(self) -> IOEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure_bandwidth(directory: str, nbytes: int = 256 << 20, *, threads: int = 8,
                      block_size: int = 1 << 20) -> tuple[float, float]:
    """(read GB/s, write GB/s), GB = 1e9 bytes, of this engine on ``directory``: writes ``nbytes``
    of random bytes durably (fsync counted), drops the file's page cache, reads them back;
    removes its file. See ``shardwise.offload.bandwidth``."""
    from shardwise.offload.bandwidth import _measure

    read_gbs, write_gbs, _ = _measure(directory, nbytes, threads, block_size)
    return read_gbs, write_gbs


def _main(argv: list[str] | None = None) -> int:
    from shardwise.offload.bandwidth import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(_main())
