"""Pipeline bubble: measured idle fraction of torch's schedules vs theory (issue 15). Not a test.

Each pipeline rank runs 2 layers per stage of Linear(W, W) on 64-row micro-batches (one
intra-op thread per rank, one rank per core). The bubble of a rank is the fraction of the
schedule's ``step()`` (the optimizer step is outside) it spends blocked in the schedule's
point-to-point waits (torch's ``_wait_batch_p2p``, timed), averaged over ranks and steps (the
first step, which infers shapes, is dropped). Theory for p stages and m micro-batches, forward and backward
of equal cost per stage: GPipe and 1F1B (p-1)/(m+p-1); interleaved 1F1B with v stages per rank
(p-1)/(v*m+p-1). Gaps include the point-to-point transfers (gloo, same host), which theory
counts as zero.

    .venv/bin/python benchmarks/pipeline_bubble.py [--pp 2] [--width 512] [--steps 5]

Only pp=2 means something on a 2-core machine (pp=4 oversubscribes the cores).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples", "gpt"))
sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))

import pipeline_workers as W  # noqa: E402
from shardwise.testing import run_distributed  # noqa: E402


def theory(schedule: str, p: int, m: int) -> float:
    v = 2 if schedule in ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble") else 1
    return (p - 1) / (v * m + p - 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--schedules", default="GPipe,1F1B,Interleaved1F1B")
    ap.add_argument("--micro", default="2,4,8,16")
    args = ap.parse_args()
    print(f"pp={args.pp} width={args.width} (2 Linear layers per stage, 64 rows per micro-batch)")
    print(f"{'schedule':<18}{'m':>4}{'measured':>10}{'theory':>9}{'step ms':>9}")
    for schedule in args.schedules.split(","):
        for m in [int(x) for x in args.micro.split(",")]:
            res = run_distributed(W.bubble_probe, args.pp, schedule, args.pp, m, args.steps, args.width, timeout_s=300)
            fracs = [b / w for r in res for w, b in zip(r["wall"], r["blocked"])]
            wall = statistics.median(w for r in res for w in r["wall"])
            print(f"{schedule:<18}{m:>4}{statistics.mean(fracs):>10.3f}{theory(schedule, args.pp, m):>9.3f}"
                  f"{wall * 1e3:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
