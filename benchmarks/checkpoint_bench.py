"""Checkpoint save/load time and peak memory for the GPT example at 2 ranks (ZeRO-2), and the
peak memory of a streaming export against the model size.

    .venv/bin/python benchmarks/checkpoint_bench.py [--preset demo] [--export-presets demo 25m]

Peak memory is the growth of the process's peak RSS (ru_maxrss) during the operation, on top
of what the process already held (the model, gradients and optimizer state)."""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples", "gpt"))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_rank(ckpt: str, preset: str) -> dict:
    import torch

    import shardwise
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig.preset(preset)
    model = GPT(cfg)
    config = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "zero_optimization": {"stage": 2}, "steps_per_print": 10**6}
    engine, *_ = shardwise.initialize(model=model, config=config)
    x = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len + 1))
    engine.backward(engine(x[:, :-1], x[:, 1:]))
    engine.step()
    base = _peak_mb()
    t0 = time.perf_counter()
    engine.save_checkpoint(ckpt)
    save_s = time.perf_counter() - t0
    after_save = _peak_mb()
    t0 = time.perf_counter()
    engine.load_checkpoint(ckpt)
    load_s = time.perf_counter() - t0
    return {"save_s": save_s, "load_s": load_s, "save_peak_mb": after_save - base,
            "load_peak_mb": _peak_mb() - after_save, "rss_before_mb": base,
            "params": sum(p.numel() for p in model.parameters())}


def _export_child(ckpt: str, out: str) -> None:
    import torch  # noqa: F401  (baseline: an interpreter with torch loaded)

    from shardwise.checkpoint import export_hf

    base = _peak_mb()
    t0 = time.perf_counter()
    export_hf(ckpt, out, max_shard_size="5GB")
    print(f"{_peak_mb() - base:.1f} {time.perf_counter() - t0:.2f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="demo")
    p.add_argument("--export-presets", nargs="*", default=["demo", "25m"])
    p.add_argument("--export-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.export_child:
        _export_child(*args.export_child)
        return
    import checkpoint_bench as me
    from shardwise.testing import run_distributed

    presets = [args.preset] + [x for x in args.export_presets if x != args.preset]
    for preset in presets:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = os.path.join(tmp, "ckpt")
            res = run_distributed(me.bench_rank, 2, ckpt, preset, timeout_s=900)
            size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(ckpt) for f in fs)
            if preset == args.preset:
                r = res[0]
                print(f"save/load, GPT '{preset}' ({r['params'] / 1e6:.2f}M params), 2 ranks, ZeRO-2, fp32 AdamW:")
                print(f"  checkpoint {size / 1e6:.1f} MB on disk")
                for rank, r in enumerate(res):
                    print(f"  rank {rank}: save {r['save_s'] * 1000:.0f} ms (+{r['save_peak_mb']:.1f} MB peak RSS), "
                          f"load {r['load_s'] * 1000:.0f} ms (+{r['load_peak_mb']:.1f} MB), held before: "
                          f"{r['rss_before_mb']:.0f} MB")
            if preset in args.export_presets:
                out = subprocess.run([sys.executable, __file__, "--export-child", ckpt, os.path.join(tmp, "hf")],
                                     capture_output=True, text=True, check=True).stdout.split()
                model_mb = res[0]["params"] * 4 / 1e6
                print(f"export GPT '{preset}': model {model_mb:.1f} MB fp32, export peak RSS +{float(out[0]):.1f} MB "
                      f"({float(out[1]):.2f} s)")


if __name__ == "__main__":
    main()
