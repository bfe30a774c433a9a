"""Faults of the ZeRO-Infinity I/O layer: swap files truncated or deleted under a running job,
full disks, I/O errors, a killed owner. Every one is a named error, never zeros."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from shardwise.offload import aio
from shardwise.offload.aio import (ALIGN, DiskFullError, IOEngine, OffloadIOError, OffloadWarning, SwapFile,
                                   SwapFileCorruptError, aligned_empty)
from shardwise.offload.swapdir import SwapDirectory


@pytest.fixture
def engine():
    eng = IOEngine(threads=4, block_size=4 * ALIGN, rank=5)
    yield eng
    eng.close()


def _written(tmp_path, engine, nbytes=16 * ALIGN, **kw):
    f = SwapFile(tmp_path / "state.swp", nbytes, rank=5, **kw)
    src = aligned_empty(nbytes)
    src.view(torch.int64).random_()
    engine.write(f, 0, src).wait()
    return f, src


def test_truncated_file_read_raises_named_error(tmp_path, engine):
    f, _ = _written(tmp_path, engine)
    os.truncate(f.path, 5 * ALIGN)
    dst = aligned_empty(8 * ALIGN)
    with pytest.raises(SwapFileCorruptError) as ei:
        engine.read(f, 2 * ALIGN, dst).wait()
    msg = str(ei.value)
    assert "rank 5" in msg and str(f.path) in msg and f"{8 * ALIGN} bytes at offset {2 * ALIGN}" in msg
    assert "truncated" in msg and "checkpoint" in msg
    assert (ei.value.rank, ei.value.offset, ei.value.nbytes) == (5, 2 * ALIGN, 8 * ALIGN)
    with pytest.raises(SwapFileCorruptError, match="is 20480 bytes, expected the reserved 65536"):
        f.check()
    f.close()


def test_truncation_racing_the_check_is_a_short_read(tmp_path, engine, monkeypatch):
    """Truncated after the request's fstat: the piece that meets the end of file raises."""
    f, _ = _written(tmp_path, engine)
    os.truncate(f.path, 6 * ALIGN)
    monkeypatch.setattr(f, "_check", lambda *a, **k: None)  # as if truncated right after the check
    dst = aligned_empty(16 * ALIGN)
    h = engine.read(f, 0, dst)
    with pytest.raises(SwapFileCorruptError, match=rf"rank 5: {2 * ALIGN} bytes at offset {6 * ALIGN} of .*short read"):
        h.wait()
    with pytest.raises(SwapFileCorruptError):  # a failed request stays failed
        h.wait()
    f.close()


@pytest.mark.parametrize("direct", [None, False], ids=["auto", "buffered"])
def test_file_deleted_under_running_engine(tmp_path, engine, direct):
    f, src = _written(tmp_path, engine, nbytes=64 * ALIGN, direct=direct)
    pending = [engine.write(f, k * 8 * ALIGN, src[: 8 * ALIGN]) for k in range(8)]
    os.unlink(f.path)
    for h in pending:
        h.wait()  # issued before the unlink: they complete into the orphaned inode
    dst = aligned_empty(8 * ALIGN)
    with pytest.raises(SwapFileCorruptError, match=rf"rank 5: {8 * ALIGN} bytes at offset 0 of .*state.swp.*deleted"):
        engine.read(f, 0, dst)
    with pytest.raises(SwapFileCorruptError, match="deleted"):
        engine.write(f, 0, dst)
    with pytest.raises(SwapFileCorruptError, match="deleted"):
        f.check()
    f.close()


DISK_FULL_SCRIPT = textwrap.dedent("""
    import json, os, resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    from shardwise.offload.aio import ALIGN, DiskFullError, IOEngine, SwapFile, aligned_empty
    d, limit = sys.argv[1], 1 << 20
    sparse = SwapFile(os.path.join(d, "sparse.swp"), 4 * limit, rank=1, _preallocate=False)  # before the limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    out = {}
    try:
        SwapFile(os.path.join(d, "big.swp"), 3 * limit, rank=1)
    except DiskFullError as e:
        out["create"] = [str(e), e.needed, e.free, os.path.exists(os.path.join(d, "big.swp"))]
    buf = aligned_empty(2 * limit)
    with IOEngine(threads=2, block_size=limit // 2, rank=1) as eng:
        try:
            eng.write(sparse, 0, buf).wait()
        except DiskFullError as e:
            out["write"] = [str(e), e.needed, e.free, e.offset]
    print(json.dumps(out))
""")


def test_disk_full_is_named(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: the kernel answers EFBIG past the limit."""
    out = subprocess.run([sys.executable, "-c", DISK_FULL_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    msg, needed, free, left = res["create"]
    assert "rank 1" in msg and "big.swp" in msg and f"{3 << 20} bytes needed" in msg and "bytes free" in msg
    assert "ulimit -f" in msg and "nvme_path" in msg and "posix_fallocate" in msg
    assert needed == 3 << 20 and free > 0 and not left  # a failed reservation leaves no file
    msg, needed, free, offset = res["write"]
    assert "sparse.swp" in msg and "[Errno 27]" in msg and f"at offset {1 << 20}" in msg and "bytes needed" in msg
    assert offset == 1 << 20 and needed > 0


def test_enospc_at_reservation(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(aio.os, "posix_fallocate", full)
    pattern = (rf"rank 2: .*x.swp.*the filesystem is full; {1 << 20} bytes needed, \d+ bytes free.*"
               r"Fix: free space there, point nvme_path at another disk")
    with pytest.raises(DiskFullError, match=pattern) as ei:
        SwapFile(tmp_path / "x.swp", 1 << 20, rank=2)
    assert ei.value.needed == 1 << 20 and ei.value.free > 0
    assert not (tmp_path / "x.swp").exists()


@pytest.mark.parametrize("op", ["read", "write"])
def test_io_error_is_named_never_zeros(tmp_path, engine, monkeypatch, op):
    f, src = _written(tmp_path, engine)
    calls = {"n": 0}
    real = getattr(os, "preadv" if op == "read" else "pwritev")

    def flaky(fd, bufs, offset):
        calls["n"] += 1
        if offset >= 8 * ALIGN:  # the second half of the request fails
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, bufs, offset)

    monkeypatch.setattr(aio.os, "preadv" if op == "read" else "pwritev", flaky)
    dst = aligned_empty(16 * ALIGN)
    h = engine.read(f, 0, dst) if op == "read" else engine.write(f, 0, src)
    with pytest.raises(OffloadIOError, match=rf"rank 5: \d+ bytes at offset \d+ of .*state.swp: {op} failed: "
                                             r"\[Errno 5\] Input/output error") as ei:
        h.wait()
    assert type(ei.value) is OffloadIOError and ei.value.os_error.errno == errno.EIO
    assert ei.value.offset >= 8 * ALIGN and calls["n"] >= 2
    f.close()


def test_partial_transfers_and_eintr_complete(tmp_path, monkeypatch):
    """Short transfers (one page at a time) and EINTR are retried until every byte moved."""
    real_r, real_w = os.preadv, os.pwritev
    state = {"intr": 0}

    def short(real):
        def call(fd, bufs, offset):
            if state["intr"] < 4:
                state["intr"] += 1
                raise InterruptedError(errno.EINTR, "Interrupted system call")
            return real(fd, [bufs[0][:ALIGN]], offset)
        return call

    f = SwapFile(tmp_path / "x.swp", 32 * ALIGN, rank=0)
    monkeypatch.setattr(aio.os, "preadv", short(real_r))
    monkeypatch.setattr(aio.os, "pwritev", short(real_w))
    with IOEngine(threads=3, block_size=4 * ALIGN) as eng:
        src = aligned_empty(30 * ALIGN)
        src.view(torch.int64).random_()
        eng.write(f, ALIGN, src).wait()
        state["intr"] = 0
        dst = aligned_empty(30 * ALIGN)
        eng.read(f, ALIGN, dst).wait()
    assert torch.equal(dst, src)
    f.close()


def test_direct_io_refused_after_open_falls_back(tmp_path, monkeypatch):
    """A filesystem that accepts O_DIRECT at open but fails the I/O: buffered, one warning."""
    import fcntl

    real = os.pwritev

    def einval_if_direct(fd, bufs, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, offset)

    monkeypatch.setattr(aio.os, "pwritev", einval_if_direct)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f = SwapFile(tmp_path / "x.swp", 4 * ALIGN, rank=0)
    ours = [str(w.message) for w in caught if issubclass(w.category, OffloadWarning)]
    assert len(ours) == 1 and "fails the I/O" in ours[0] and str(tmp_path) in ours[0]
    assert not f.direct and os.path.getsize(f.path) == 4 * ALIGN
    with IOEngine(threads=2) as eng:
        src = torch.arange(100, dtype=torch.float32)
        dst = torch.zeros(100)
        eng.write(f, 0, src).wait()
        eng.read(f, 0, dst).wait()
    assert torch.equal(src, dst)
    f.close()


KILLED_OWNER = textwrap.dedent("""
    import sys, time
    from shardwise.offload.aio import SwapFile
    from shardwise.offload.swapdir import SwapDirectory
    d = SwapDirectory(sys.argv[1], job="killed", rank=0)
    SwapFile(d.file("exp_avg.swp"), 1 << 20, rank=0).close()
    print("ready", flush=True)
    time.sleep(120)
""")


def test_killed_owner_leaves_stale_set_that_next_run_clears(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", KILLED_OWNER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        with pytest.raises(OffloadIOError, match=rf"in use by pid {p.pid}"):  # alive: refused
            SwapDirectory(str(tmp_path), job="killed", rank=0)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
    stale = tmp_path / "shardwise-swap" / "killed" / "rank0"
    assert (stale / "exp_avg.swp").exists()  # SIGKILL: no cleanup ran
    nbytes = sum(q.stat().st_size for q in stale.iterdir())
    assert nbytes > 1 << 20
    pattern = rf"owner pid {p.pid} .*no longer running.*cleared {nbytes} bytes in 2 files"
    with pytest.warns(OffloadWarning, match=pattern):
        s = SwapDirectory(str(tmp_path), job="killed", rank=0)
    assert not (stale / "exp_avg.swp").exists()
    s.cleanup()
    assert not (tmp_path / "shardwise-swap").exists()


def test_clean_exit_removes_the_swap_directory(tmp_path):
    """No explicit cleanup(): the interpreter-exit hook removes the set and the empty parents."""
    script = textwrap.dedent("""
        import sys
        from shardwise.offload.aio import SwapFile
        from shardwise.offload.swapdir import SwapDirectory
        keep = SwapDirectory(sys.argv[1], job="exits", rank=0)
        f = SwapFile(keep.file("m.swp"), 1 << 16, rank=0)
        print(keep.path, flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("shardwise-swap/exits/rank0")
    assert os.listdir(tmp_path) == []
