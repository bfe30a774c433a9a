"""A one-rank training script with the optimizer state on disk, run as its own process by
test_offload.py (so that interpreter exit, SIGKILL and the next run's start-up are real):
``python offload_script.py NVME_PATH STORE_DIR {exit|destroy|hang}``."""
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import shardwise  # noqa: E402
from offload_workers import MLP, config, data  # noqa: E402

if __name__ == "__main__":
    nvme, store, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    torch.manual_seed(0)
    engine, *_ = shardwise.initialize(model=MLP(), config=config(2, {"device": "nvme"}, "adamw", nvme_path=nvme))
    for x, y in data(2, 1):
        engine.backward(engine(x, y))
        engine.step()
    print("swap files:", sum(len(f) for _, _, f in os.walk(nvme)), flush=True)
    if mode == "destroy":
        engine.destroy()
        print("after destroy:", sum(len(f) for _, _, f in os.walk(nvme)), flush=True)
    elif mode == "hang":
        print("ready", flush=True)
        time.sleep(600)
    dist.destroy_process_group()
