"""Started directly (no torchrun) with Open MPI's variables, as `mpirun -np 2 python this.py` would.

usage: mpi_style_script.py OUT_DIR; writes OUT_DIR/rank{R}.json. The ranks come from
shardwise.comm.env_discovery ([Note: rank discovery]); then shardwise joins the gloo group."""
import json
import os
import sys

import torch
import torch.distributed as dist

import shardwise
from shardwise.comm.env_discovery import apply_launcher_env

source = apply_launcher_env()  # a no-op once init_distributed does it itself
shardwise.init_distributed()
value = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(value)
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump({"source": source or os.environ.get("SHARDWISE_RANKS_FROM"), "rank": dist.get_rank(),
               "world": dist.get_world_size(), "local_rank": os.environ["LOCAL_RANK"], "sum": value.item(),
               "master": os.environ["MASTER_ADDR"]}, f)
