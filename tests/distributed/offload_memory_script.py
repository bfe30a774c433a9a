"""Peak host memory of one rank training with its optimizer state on disk (run as its own
process by test_offload_memory.py, so VmHWM is this run's alone):
``python offload_memory_script.py NVME_PATH STORE {nvme|none}`` prints one JSON line."""
import json
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import shardwise

WIDTH, DEPTH = 1024, 12


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


if __name__ == "__main__":
    nvme, store, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(DEPTH)])
    x = torch.randn(8, WIDTH)
    before = status("VmRSS")  # interpreter, torch, the model's parameters, the batch
    zero = {"stage": 1, "sub_group_size": 1_000_000}
    if mode == "nvme":
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": nvme, "buffer_count": 2}
    cfg = {"train_batch_size": 8, "gradient_clipping": 0.0, "steps_per_print": 1000,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": zero}
    engine, *_ = shardwise.initialize(model=model, config=cfg)
    after_init = status("VmRSS")  # + the flat buckets and gradient buffers (what stays resident)
    for _ in range(3):
        engine.backward(engine(x).square().mean())
        engine.step()
    rep = engine.memory_report()
    print(json.dumps({"before": before, "after_init": after_init, "peak": status("VmHWM"), "report": rep,
                      "params": sum(p.numel() for p in model.parameters())}), flush=True)
    engine.destroy()
    dist.destroy_process_group()
