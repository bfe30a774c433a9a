"""Launcher test script (no engine): join the gloo group torchrun set up, all_reduce, report.

usage: allreduce_script.py [--local_rank=N] OUT_DIR [extra args...]; writes OUT_DIR/rank{R}.json
(``local_rank_arg``: the --local_rank=N the launcher passed, as DeepSpeed's launcher does, or None).
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> int:
    args = sys.argv[1:]
    local_rank_arg = None
    if args and args[0].startswith("--local_rank="):
        local_rank_arg = int(args.pop(0).partition("=")[2])
    out, extra = Path(args[0]), args[1:]
    dist.init_process_group("gloo")  # env:// — RANK, WORLD_SIZE, MASTER_ADDR/PORT from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    report = {
        "rank": rank,
        "world_size": world,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "local_rank_arg": local_rank_arg,
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
