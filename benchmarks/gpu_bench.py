"""CUDA path check and throughput: one GPU, bf16, a ~1B-parameter GPT, shardwise vs plain PyTorch.

Run by `benchmarks/gpu_check.sh` (under `shardwise run --nproc-per-node 1`, so NCCL is used).
Prints tokens/s and MFU (model FLOPs utilisation, 6 * params * tokens / time / peak) for plain
PyTorch (bf16 weights, fp32 master copy, fused AdamW) and shardwise stages 0-3, steps interleaved.
Not yet run on a GPU by the team: treat the first run as the test of this script too.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "gpt"))
import shardwise  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher
    ap.add_argument("--layers", type=int, default=16)  # ~0.9B with the 50k vocab
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=4)  # 4 systems x ~14.5 GB of state fit 78 GB
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device", file=sys.stderr)
        return 2
    cfg = GPTConfig(vocab_size=50304, seq_len=args.seq, n_layer=args.layers, n_head=args.d_model // 128,
                    d_model=args.d_model)
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.micro, cfg.seq_len + 1), generator=g).to(dev)
    systems = {}

    torch.manual_seed(0)
    plain = GPT(cfg).to(dev, torch.bfloat16)
    n_params = sum(p.numel() for p in plain.parameters())
    master = [p.detach().float().clone().requires_grad_(True) for p in plain.parameters()]
    opt = torch.optim.AdamW(master, lr=1e-4, fused=True)

    def plain_step():
        loss = plain(x[:, :-1], x[:, 1:])
        loss.backward()
        for m, p in zip(master, plain.parameters()):
            m.grad = p.grad.float()
            p.grad = None
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for m, p in zip(master, plain.parameters()):
                p.copy_(m)
        return loss

    systems["plain"] = plain_step
    for stage in (0, 1, 2, 3):
        torch.manual_seed(0)
        model = GPT(cfg)
        engine, *_ = shardwise.initialize(model=model, config={
            "train_batch_size": args.micro, "bf16": {"enabled": True}, "steps_per_print": 10**6,
            "gradient_clipping": 0.0,  # as the torch rows
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 5e7}})

        def sw_step(engine=engine):
            loss = engine(x[:, :-1], x[:, 1:])
            engine.backward(loss)
            engine.step()
            return loss

        systems[f"zero{stage}"] = sw_step
    times = {k: [] for k in systems}
    for i in range(args.steps + 2):
        for name, fn in systems.items():
            torch.cuda.synchronize()
            t = time.perf_counter()
            loss = fn()
            torch.cuda.synchronize()
            if i >= 2:
                times[name].append(time.perf_counter() - t)
    tokens = args.micro * args.seq
    peak = peak_tflops()
    print(f"{torch.cuda.get_device_name()} | GPT {n_params / 1e9:.2f}B params | bf16 | micro {args.micro} x seq {args.seq}")
    print("| system | median step | tokens/s | MFU | peak mem |")
    print("|---|---:|---:|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        mfu = 6 * n_params * tokens / med / (peak * 1e12)
        print(f"| {name} | {med * 1000:.1f} ms | {tokens / med:,.0f} | {mfu:.1%} | "
              f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB (cumulative) |")
    print(f"last loss {loss.item():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
