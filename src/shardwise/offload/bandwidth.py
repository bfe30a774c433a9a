"""``python -m shardwise.offload.aio`` (or ``.bandwidth``): the swap-file I/O microbenchmark.

It times the engine exactly as ZeRO-Infinity uses it: one preallocated swap file, a page-aligned
buffer of random bytes, ``IOEngine`` writes in ``block_size`` pieces on ``threads`` threads, then
``fsync`` (the write counts as done when durable); the file's page cache is dropped
(``posix_fadvise(DONTNEED)``) and the bytes are read back and spot-checked. GB = 1e9 bytes.
A read right after a write may be served by a cache below the guest (design ``offload.md`` A.5:
"do not design on it"); ``--repeat`` shows the spread.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
import uuid

import torch

from shardwise.offload.aio import ALIGN, IOEngine, OffloadIOError, SwapFile, _round_up, aligned_empty

def _measure(directory: str, nbytes: int, threads: int, block_size: int) -> tuple[float, float, bool]:
    n = _round_up(max(nbytes, ALIGN))
    path = pathlib.Path(directory) / f".shardwise-bandwidth-{os.getpid()}-{uuid.uuid4().hex[:8]}.swp"
    buf = aligned_empty(n)
    buf.view(torch.int64).random_()  # incompressible, not all zeros (thin-provisioned disks skip zeros)
    probe = [buf[:ALIGN].clone(), buf[-ALIGN:].clone()]
    eng = IOEngine(threads=threads, block_size=block_size)
    f = None
    try:
        f = SwapFile(path, n, rank=0)
        t0 = time.perf_counter()
        eng.write(f, 0, buf).wait()
        f.sync()  # durable, and the page cache (buffered mode) dropped
        t1 = time.perf_counter()
        buf.zero_()
        t2 = time.perf_counter()
        eng.read(f, 0, buf).wait()
        t3 = time.perf_counter()
        if not (torch.equal(buf[:ALIGN], probe[0]) and torch.equal(buf[-ALIGN:], probe[1])):
            raise OffloadIOError(f"rank 0: {path}: the bytes read back differ from those written", path=path)
        return n / (t3 - t2) / 1e9, n / (t1 - t0) / 1e9, f.direct
    finally:
        eng.close()
        if f is not None:
            f.close()
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shardwise.offload.aio", description=(
        "Measure shardwise's swap-file I/O (O_DIRECT pwrite/preadv on a thread pool) on a directory."))
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="directory to test (default: %(default)s)")
    ap.add_argument("--gib", type=float, default=1.0, help="file size in GiB (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--block-mib", type=float, default=1.0, help="bytes per request piece, MiB (default: 1)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds (default: 1)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per round")
    args = ap.parse_args(argv)
    from shardwise.offload.swapdir import check_nvme_path

    problem = check_nvme_path(args.dir)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    nbytes, block = int(args.gib * (1 << 30)), _round_up(int(args.block_mib * (1 << 20)))
    for i in range(args.repeat):
        r, w, direct = _measure(args.dir, nbytes, args.threads, block)
        row = dict(dir=args.dir, nbytes=_round_up(nbytes), threads=args.threads, block_size=block,
                   direct=direct, read_gbs=round(r, 4), write_gbs=round(w, 4))
        print(json.dumps(row) if args.json else
              f"{args.dir}: {row['nbytes'] / (1 << 30):.2f} GiB, {args.threads} threads, {block >> 10} KiB pieces, "
              f"{'O_DIRECT' if direct else 'buffered'}: write {w:.3f} GB/s, read {r:.3f} GB/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
