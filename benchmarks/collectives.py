"""gloo collectives on N ranks: all_reduce vs reduce_scatter vs all_gather, fp32, 1/8/64 MiB.

Checks shardwise's choice in ``src/shardwise/comm/context.py`` ([Note: reduce-to-shard
implementation]): on gloo a rank all-reduces a bucket and keeps its chunk instead of calling
reduce-scatter. Run::

    .venv/bin/python benchmarks/collectives.py [--sizes 1 8 64] [--iters 9] [--world 2]

The three operations are interleaved within each iteration (AR, RS, AG, AR, RS, AG, ...) so
they see the same machine drift. Reported: median time and "buffer GB/s" = full buffer bytes /
median time (the buffer is what a ZeRO bucket is: the input of all_reduce and reduce_scatter,
the output of all_gather), plus the ratio of reduce_scatter's time to all_reduce's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
OPS = ("all_reduce", "reduce_scatter", "all_gather")


def _bench_rank(sizes_mib: list[int], iters: int, warmup: int) -> dict:
    torch.set_num_threads(1)
    world, rank = dist.get_world_size(), dist.get_rank()
    out: dict = {}
    for mib in sizes_mib:
        n = mib * 2**20 // 4
        n -= n % world
        flat = torch.randn(n)
        chunk_out = torch.empty(n // world)
        gather_out = torch.empty(n)
        gather_in = torch.randn(n // world)

        def run(op: str) -> float:
            dist.barrier()
            t0 = time.perf_counter()
            if op == "all_reduce":
                dist.all_reduce(flat)
            elif op == "reduce_scatter":
                _reduce_scatter_single(chunk_out, flat)
            else:
                _all_gather_single(gather_out, gather_in)
            return time.perf_counter() - t0

        times: dict[str, list[float]] = {op: [] for op in OPS}
        for it in range(warmup + iters):
            for op in OPS:
                t = run(op)
                if it >= warmup:
                    times[op].append(t)
        # a collective ends when the slowest rank ends: take the max over ranks per sample
        for op in OPS:
            t = torch.tensor(times[op], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times[op] = t.tolist()
        out[mib] = {"bytes": n * 4, **{op: times[op] for op in OPS}}
    return out


def main(argv: list[str] | None = None) -> dict:
    from shardwise.testing import run_distributed

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 64], help="buffer sizes in MiB")
    ap.add_argument("--iters", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    from benchmarks.collectives import _bench_rank as fn  # importable by module name in the ranks

    res = run_distributed(fn, args.world, args.sizes, args.iters, args.warmup, timeout_s=900)[0]
    rows = []
    print(f"\ngloo collectives, {args.world} ranks x 1 thread, fp32, median of {args.iters} (max over ranks)\n")
    print("| buffer | all_reduce ms | GB/s | reduce_scatter ms | GB/s | all_gather ms | GB/s | RS / AR time |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mib in args.sizes:
        r = res[mib]
        med = {op: statistics.median(r[op]) for op in OPS}
        gbs = {op: r["bytes"] / med[op] / 1e9 for op in OPS}
        rows.append({"MiB": mib, "bytes": r["bytes"],
                     **{f"{op}_s": med[op] for op in OPS}, **{f"{op}_GBps": gbs[op] for op in OPS},
                     "rs_over_ar": med["reduce_scatter"] / med["all_reduce"]})
        print(f"| {mib} MiB | {1e3 * med['all_reduce']:.1f} | {gbs['all_reduce']:.2f} | "
              f"{1e3 * med['reduce_scatter']:.1f} | {gbs['reduce_scatter']:.2f} | "
              f"{1e3 * med['all_gather']:.1f} | {gbs['all_gather']:.2f} | "
              f"{med['reduce_scatter'] / med['all_reduce']:.2f}x |")
    verdict = all(row["rs_over_ar"] > 1.0 for row in rows)
    print(f"\nall_reduce + keep own chunk {'beats' if verdict else 'does NOT always beat'} "
          f"reduce_scatter on gloo at every size measured "
          f"(RS/AR time: {', '.join('%.2fx' % row['rs_over_ar'] for row in rows)}).")
    print(f"[collectives.py ran in {time.perf_counter() - t0:.0f} s; torch {torch.__version__}; "
          f"reduce_scatter via {_reduce_scatter_single.__name__}, all_gather via {_all_gather_single.__name__}]")
    if args.out:
        Path(args.out).write_text(json.dumps({"world": args.world, "torch": torch.__version__, "rows": rows}, indent=2))
    return {"rows": rows}


if __name__ == "__main__":
    main()
