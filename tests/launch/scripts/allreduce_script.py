"""Launcher test script (no engine): join the gloo group torchrun set up, all_reduce, report.

usage: allreduce_script.py OUT_DIR [extra args...]; writes OUT_DIR/rank{R}.json.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> int:
    out, extra = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")  # env:// — RANK, WORLD_SIZE, MASTER_ADDR/PORT from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    report = {
        "rank": rank,
        "world_size": world,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "all_reduce_sum": value.item(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "script_args": extra,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
