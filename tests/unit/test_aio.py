"""The ZeRO-Infinity I/O layer (issue 13): aligned buffers, swap files, the threaded engine,
the per-rank swap directory. Small files (a few MiB) under pytest's tmp_path (/tmp, ext4)."""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings

import pytest
import torch

from shardwise.errors import UsageError
from shardwise.offload import aio
from shardwise.offload.aio import (ALIGN, IOEngine, OffloadIOError, OffloadUsageError, OffloadWarning, SwapFile,
                                   aligned_empty, measure_bandwidth, pinned_if)
from shardwise.offload.swapdir import SwapDirectory, check_nvme_path, default_job_name

BLOCK = 64 << 10  # small pieces: several per request at test sizes


def _direct_works(d) -> bool:
    try:
        fd = os.open(os.path.join(d, ".odirect-probe"), os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(os.path.join(d, ".odirect-probe"))
    return True


@pytest.fixture
def engine():
    eng = IOEngine(threads=4, block_size=BLOCK, rank=0)
    yield eng
    eng.close()


def _random(nbytes: int, dtype: torch.dtype, aligned: bool = True) -> torch.Tensor:
    es = torch.empty(0, dtype=dtype).element_size()
    n = nbytes // es
    if aligned:
        t = aligned_empty(n * es).view(dtype)[:n]
    else:
        t = torch.empty(n, dtype=dtype)
    if dtype.is_floating_point:
        t.copy_(torch.randn(n).to(dtype))
    else:
        t.copy_(torch.randint(-(2 ** 62), 2 ** 62, (n,), dtype=torch.int64).to(dtype))
    return t


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


# --- buffers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("nbytes", [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, 3 << 20])
def test_aligned_empty(nbytes):
    t = aligned_empty(nbytes)
    assert t.dtype == torch.uint8 and t.device.type == "cpu" and t.is_contiguous()
    assert t.numel() == (nbytes + ALIGN - 1) // ALIGN * ALIGN
    assert t.data_ptr() % ALIGN == 0
    if t.numel():
        assert int(t.max()) == 0  # fresh anonymous pages
        t.fill_(7)  # writable
        assert int(t.sum()) == 7 * t.numel()
        assert t.view(torch.float32).data_ptr() % ALIGN == 0


def test_aligned_empty_rejects_negative():
    with pytest.raises(OffloadUsageError):
        aligned_empty(-1)


def test_pinned_if_without_cuda_is_identity():
    t = torch.zeros(4)
    if not torch.cuda.is_available():
        assert pinned_if(t, True) is t
    assert pinned_if(t, False) is t


# --- round trips ----------------------------------------------------------------------------------


SIZES = [ALIGN, 3 * ALIGN, BLOCK, 5 * BLOCK + 2 * ALIGN]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64], ids=["fp32", "bf16", "int64"])
@pytest.mark.parametrize("nbytes", SIZES, ids=[f"{s}B" for s in SIZES])
def test_round_trip_bitwise(tmp_path, engine, direct, dtype, nbytes):
    if direct and not _direct_works(tmp_path):
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    f = SwapFile(tmp_path / "x.swp", 8 * BLOCK, rank=0, direct=direct)
    assert f.direct is direct and f.nbytes == 8 * BLOCK and os.path.getsize(f.path) == f.nbytes
    src = _random(nbytes, dtype)
    h = engine.write(f, 2 * ALIGN, src)
    h.wait()
    assert h.done() and h.nbytes == nbytes
    dst = aligned_empty(nbytes).view(dtype)
    engine.read(f, 2 * ALIGN, dst).wait()
    assert torch.equal(_bytes(dst), _bytes(src))
    f.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64], ids=["fp32", "bf16", "int64"])
def test_buffered_takes_unaligned_buffers(tmp_path, engine, dtype):
    f = SwapFile(tmp_path / "x.swp", 1 << 20, rank=0, direct=False)
    for numel in (1, 333, 40_001):
        src = _random(numel * torch.empty(0, dtype=dtype).element_size(), dtype, aligned=False)[1:]  # odd address
        dst = torch.full_like(src, 0)
        engine.write(f, ALIGN, src).wait()
        engine.read(f, ALIGN, dst).wait()
        assert torch.equal(_bytes(dst), _bytes(src))
    f.close()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_many_concurrent_requests(tmp_path, direct):
    if direct and not _direct_works(tmp_path):
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    gen = torch.Generator().manual_seed(0)
    sizes = [int(s) * ALIGN for s in torch.randint(1, 40, (48,), generator=gen)]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    files = [SwapFile(tmp_path / f"f{k}.swp", sum(sizes), rank=0, direct=direct) for k in range(2)]
    srcs = [_random(s, torch.float32) for s in sizes]
    with IOEngine(threads=8, block_size=2 * ALIGN) as eng:
        hs = [eng.write(files[i % 2], o, s) for i, (o, s) in enumerate(zip(offsets, srcs))]
        for h in hs:
            h.wait()
        dsts = [aligned_empty(s).view(torch.float32) for s in sizes]
        hs = [eng.read(files[i % 2], o, d) for i, (o, d) in enumerate(zip(offsets, dsts))]
        for h in reversed(hs):
            h.wait()
    assert all(torch.equal(_bytes(a), _bytes(b)) for a, b in zip(srcs, dsts))
    for f in files:
        f.close()


def _resident_bytes(path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux fincore to count cached pages")
def test_buffered_mode_keeps_the_page_cache_flat(tmp_path, engine):
    f = SwapFile(tmp_path / "x.swp", 8 << 20, rank=0, direct=False)
    src = _random(8 << 20, torch.float32)
    engine.write(f, 0, src).wait()
    assert _resident_bytes(f.path) <= 4 * ALIGN  # written out and dropped, not left dirty in RAM
    dst = torch.empty_like(src)
    engine.read(f, 0, dst).wait()
    assert _resident_bytes(f.path) <= 4 * ALIGN  # no readahead left behind either
    assert torch.equal(dst, src)
    f.close()


def test_handle_wait_is_idempotent_and_zero_bytes(tmp_path, engine):
    f = SwapFile(tmp_path / "x.swp", ALIGN, rank=0)
    h = engine.write(f, 0, aligned_empty(ALIGN))
    h.wait()
    h.wait()
    assert h.done()
    empty = engine.read(f, 0, torch.empty(0))
    empty.wait()
    assert empty.done() and empty.nbytes == 0
    f.close()
    f.close()  # idempotent


# --- refusals -------------------------------------------------------------------------------------


def test_same_swap_file_open_twice_is_refused(tmp_path, engine):
    f = SwapFile(tmp_path / "x.swp", ALIGN, rank=0)
    engine.write(f, 0, aligned_empty(ALIGN).fill_(1)).wait()
    with pytest.raises(OffloadUsageError, match="already open in this process"):
        SwapFile(tmp_path / "x.swp", ALIGN, rank=0)  # O_TRUNC would have zeroed f's data
    dst = aligned_empty(ALIGN)
    engine.read(f, 0, dst).wait()
    assert int(dst.min()) == 1
    f.close()
    g = SwapFile(tmp_path / "x.swp", ALIGN, rank=0)  # free again once closed
    os.unlink(g.path)  # an open file deleted (a swap directory cleaned up): the path is free too
    SwapFile(tmp_path / "x.swp", ALIGN, rank=0).close()
    g.close()


def test_unaligned_input_to_direct_file_is_refused(tmp_path, engine):
    if not _direct_works(tmp_path):
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    f = SwapFile(tmp_path / "x.swp", 4 * ALIGN, rank=2, direct=True)
    base = aligned_empty(3 * ALIGN)
    with pytest.raises(OffloadUsageError, match=r"O_DIRECT.*address % 4096 = 1.*aligned_empty\(\)") as ei:
        engine.write(f, 0, base[1:ALIGN + 1])
    assert "rank 2" in str(ei.value) and str(f.path) in str(ei.value)
    assert isinstance(ei.value, UsageError) and isinstance(ei.value, ValueError)
    with pytest.raises(OffloadUsageError, match=r"length 1000.*pad the slot"):
        engine.write(f, 0, base[:1000])
    with pytest.raises(OffloadUsageError, match="offset must be a non-negative multiple of ALIGN=4096"):
        engine.read(f, 100, base[:ALIGN])
    with pytest.raises(OffloadUsageError, match="past the file's reserved 16384 bytes"):
        engine.write(f, 2 * ALIGN, base)
    with pytest.raises(OffloadUsageError, match="contiguous CPU tensor"):
        engine.write(f, 0, base.view(3, ALIGN)[:, :8])
    f.close()
    with pytest.raises(OffloadUsageError, match="is closed"):
        engine.write(f, 0, base[:ALIGN])


def test_engine_arguments_and_closed_engine(tmp_path):
    with pytest.raises(OffloadUsageError, match="block_size"):
        IOEngine(block_size=1000)
    with pytest.raises(OffloadUsageError, match="threads"):
        IOEngine(threads=0)
    eng = IOEngine(threads=1)
    eng.close()
    eng.close()
    f = SwapFile(tmp_path / "x.swp", ALIGN, rank=0)
    with pytest.raises(OffloadUsageError, match="IOEngine is closed"):
        eng.write(f, 0, aligned_empty(ALIGN))
    f.close()


# --- buffered fallback ----------------------------------------------------------------------------


def test_tmpfs_falls_back_to_buffered_with_one_warning(engine):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="shardwise-test-")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            files = [SwapFile(os.path.join(d, f"{k}.swp"), 3 * ALIGN, rank=0) for k in range(3)]
        ours = [w for w in caught if issubclass(w.category, OffloadWarning)]
        assert len(ours) == 1, [str(w.message) for w in ours]
        msg = str(ours[0].message)
        assert d in msg and "O_DIRECT" in msg and "tmpfs" in msg and "nvme_path" in msg
        assert not any(f.direct for f in files)
        src = _random(3 * ALIGN - 8, torch.float32, aligned=False)
        dst = torch.empty_like(src)
        engine.write(files[1], 0, src).wait()
        engine.read(files[1], 0, dst).wait()
        assert torch.equal(_bytes(dst), _bytes(src))
        for f in files:
            f.close()
    finally:
        for n in os.listdir(d):
            os.unlink(os.path.join(d, n))
        os.rmdir(d)


def test_filesystem_refusing_o_direct(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, mode=0o777, **kw):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(aio.os, "open", refusing_open)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = SwapFile(tmp_path / "a.swp", ALIGN, rank=0)
        b = SwapFile(tmp_path / "b.swp", ALIGN, rank=0)
    ours = [str(w.message) for w in caught if issubclass(w.category, OffloadWarning)]
    assert len(ours) == 1 and str(tmp_path) in ours[0] and "refuses O_DIRECT" in ours[0]
    assert not a.direct and not b.direct
    with pytest.raises(OffloadIOError, match=r"open with O_DIRECT failed: \[Errno 22\].*direct=None"):
        SwapFile(tmp_path / "c.swp", ALIGN, rank=0, direct=True)
    assert not (tmp_path / "c.swp").exists()
    a.close()
    b.close()


# --- swap directory -------------------------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: the pid names no process
    return p.pid


def _plant(tmp_path, owner: dict | None, payload: int = 10_000):
    d = tmp_path / "shardwise-swap" / "j" / "rank0"
    d.mkdir(parents=True)
    (d / "exp_avg.swp").write_bytes(b"\1" * payload)
    if owner is not None:
        (d / "owner.json").write_text(json.dumps(owner))
    return d, sum(p.stat().st_size for p in d.iterdir())


def test_swap_directory_layout_and_cleanup(tmp_path):
    a = SwapDirectory(str(tmp_path), job="myjob", rank=3)
    b = SwapDirectory(str(tmp_path), job="myjob", rank=4)
    assert a.path == tmp_path / "shardwise-swap" / "myjob" / "rank3" and a.path.is_dir()
    owner = json.loads((a.path / "owner.json").read_text())
    assert owner["pid"] == os.getpid() and owner["hostname"] == socket.gethostname()
    assert abs(owner["start_time"] - time.time()) < 60
    assert a.file("master.swp") == a.path / "master.swp"
    for bad in ("", "..", "x/y", "owner.json"):
        with pytest.raises(OffloadUsageError):
            a.file(bad)
    with SwapFile(a.file("master.swp"), 2 * ALIGN, rank=3):
        pass
    assert sorted(os.listdir(tmp_path / "shardwise-swap" / "myjob")) == ["rank3", "rank4"]  # no temporaries left
    a.cleanup()
    a.cleanup()  # idempotent
    assert not a.path.exists() and b.path.exists()
    b.cleanup()
    assert not (tmp_path / "shardwise-swap").exists()


def test_bad_job_name_and_nvme_path(tmp_path):
    with pytest.raises(OffloadUsageError, match="SHARDWISE_JOB"):
        SwapDirectory(str(tmp_path), job="a/b", rank=0)
    with pytest.raises(OffloadIOError, match="does not exist"):
        SwapDirectory(str(tmp_path / "nope"), job="j", rank=0)


def test_stale_directory_of_dead_owner_is_cleared(tmp_path):
    pid = _dead_pid()
    d, nbytes = _plant(tmp_path, {"pid": pid, "hostname": socket.gethostname(), "start_time": time.time()})
    pattern = rf"stale swap directory .*owner pid {pid}.*cleared {nbytes} bytes in 2 files"
    with pytest.warns(OffloadWarning, match=pattern):
        s = SwapDirectory(str(tmp_path), job="j", rank=0)
    assert sorted(os.listdir(d)) == ["owner.json"]
    assert json.loads((d / "owner.json").read_text())["pid"] == os.getpid()
    s.cleanup()


def test_stale_directory_without_owner_file_is_cleared(tmp_path):
    d, nbytes = _plant(tmp_path, None, payload=123)
    with pytest.warns(OffloadWarning, match=rf"no owner file.*cleared {nbytes} bytes in 1 files"):
        s = SwapDirectory(str(tmp_path), job="j", rank=0)
    assert not (d / "exp_avg.swp").exists()
    s.cleanup()


def test_directory_of_live_owner_is_refused(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        d, _ = _plant(tmp_path, {"pid": live.pid, "hostname": socket.gethostname(), "start_time": time.time()})
        with pytest.raises(OffloadIOError, match=rf"in use by pid {live.pid}.*SHARDWISE_JOB"):
            SwapDirectory(str(tmp_path), job="j", rank=0)
        assert (d / "exp_avg.swp").exists()  # untouched
    finally:
        live.kill()
        live.wait()


def _own_start_tick(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[19])


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_reused_pid_or_other_host_without_lock_is_stale(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tick = _own_start_tick(live.pid)
        for owner in ({"pid": live.pid, "hostname": socket.gethostname(), "proc_start": tick + 1},  # pid reused
                      {"pid": live.pid, "hostname": socket.gethostname(), "boot_id": "another-boot"},
                      {"pid": 1, "hostname": "some-other-host"}):  # its lock is free: that run is gone
            d, _ = _plant(tmp_path, owner)
            with pytest.warns(OffloadWarning, match="stale swap directory"):
                SwapDirectory(str(tmp_path), job="j", rank=0).cleanup()
        d, _ = _plant(tmp_path, {"pid": live.pid, "hostname": socket.gethostname(), "proc_start": tick})
        with pytest.raises(OffloadIOError, match=rf"in use by pid {live.pid}"):
            SwapDirectory(str(tmp_path), job="j", rank=0)
    finally:
        live.kill()
        live.wait()


def test_same_rank_twice_in_one_process_is_refused(tmp_path):
    a = SwapDirectory(str(tmp_path), job="j", rank=0)
    with pytest.raises(OffloadIOError, match=r"in use by this process.*cleanup\(\)"):
        SwapDirectory(str(tmp_path), job="j", rank=0)
    a.cleanup()
    b = SwapDirectory(str(tmp_path), job="j", rank=0)  # free again
    b.cleanup()


def test_check_nvme_path_messages(tmp_path):
    assert check_nvme_path(str(tmp_path)) is None
    assert "empty" in check_nvme_path("")
    assert "does not exist" in check_nvme_path(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in check_nvme_path(str(tmp_path / "file"))


def test_check_nvme_path_read_only(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not stop root from writing")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "not writable" in check_nvme_path(str(ro))
    finally:
        ro.chmod(0o700)


def test_default_job_name(monkeypatch):
    monkeypatch.delenv("SHARDWISE_JOB", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert default_job_name() == "default"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "elastic7")
    assert default_job_name() == "elastic7"
    monkeypatch.setenv("SHARDWISE_JOB", "mine")
    assert default_job_name() == "mine"


# --- bandwidth ------------------------------------------------------------------------------------


def test_measure_bandwidth(tmp_path):
    r, w = measure_bandwidth(str(tmp_path), 8 << 20, threads=4, block_size=1 << 20)
    assert all(math.isfinite(x) and x > 0 for x in (r, w))
    assert os.listdir(tmp_path) == []  # its file is gone


def test_microbenchmark_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "shardwise.offload.aio", "--dir", str(tmp_path), "--gib", "0.005",
                          "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["read_gbs"] > 0 and row["write_gbs"] > 0 and row["nbytes"] % ALIGN == 0



def test_microbenchmark_cli_refuses_a_missing_directory(tmp_path, capsys):
    assert aio._main(["--dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
