"""Multi-host test script (tests/multinode): a tiny MLP trained with ZeRO stage 2 in fp32.

usage: mn_train.py OUT_DIR STEPS [SECONDS_PER_STEP]

Every rank writes OUT_DIR/rank{R}.json: its host name, the losses, a checksum of the parameters
after the last step (sha256 of their bytes, and their sum), and the environment it saw
(MN_* variables, PYTHONPATH). OUT_DIR/pid{R} holds "PID PARENT_PID" (the parent is torchrun)
once the rank has trained its first step. SECONDS_PER_STEP slows the steps (for the kill test).
"""
import hashlib
import json
import os
import socket
import sys
import time

import torch

import shardwise


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank=")]
    out, steps = argv[0], int(argv[1])
    pause = float(argv[2]) if len(argv) > 2 else 0.0
    rank = int(os.environ["RANK"])
    print(f"mn_train rank {rank} on {socket.gethostname()}", flush=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, generator=g), torch.randn(4, generator=g)) for _ in range(256)]
    cfg = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
           "zero_optimization": {"stage": 2}, "steps_per_print": 10**6}
    engine, _, loader, _ = shardwise.initialize(model=model, config=cfg, training_data=data)
    losses = []
    batches = iter(loader)
    for step in range(steps):
        x, y = next(batches)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if step == 0:
            with open(os.path.join(out, f"pid{rank}.tmp"), "w") as f:
                f.write(f"{os.getpid()} {os.getppid()}")
            os.replace(os.path.join(out, f"pid{rank}.tmp"), os.path.join(out, f"pid{rank}"))
        if pause:
            time.sleep(pause)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    report = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]), "host": socket.gethostname(),
              "losses": [float(v).hex() for v in losses],
              "sha256": hashlib.sha256(flat.numpy().tobytes()).hexdigest(), "sum": float(flat.sum()),
              "env": {k: v for k, v in os.environ.items() if k.startswith("MN_") or k == "PYTHONPATH"},
              "omp": os.environ.get("OMP_NUM_THREADS")}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
