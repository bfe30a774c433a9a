"""Activation checkpointing: activation bytes kept for backward, and step time, with and
without ``activation_checkpointing {"modules": "blocks"}``, side by side in one process.

    .venv/bin/python benchmarks/activation_checkpointing.py            # demo and 25m GPTs, ~1 min

One rank, one thread, fp32, AdamW through ``shardwise.initialize`` at stage 0. The two engines
take steps in turn (the same batches), so the time ratio is paired step by step; the figure is
the median of the per-step ratios. Bytes are counted as autograd keeps them (each storage once,
parameters excluded, plus the block inputs a checkpoint holds), beside the estimator's figure.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for _p in (str(_ROOT / "examples" / "gpt"), str(_ROOT / "tests" / "unit")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import shardwise  # noqa: E402
from shardwise.estimate import activation_bytes, transformer_shape  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from test_activation_estimate import saved_bytes  # noqa: E402  (the measurement the tests use)


def engine_for(cfg: GPTConfig, micro: int, checkpoint: bool):
    torch.manual_seed(0)
    config = {"train_batch_size": micro, "steps_per_print": 10**9, "gradient_clipping": 0.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    if checkpoint:
        config["activation_checkpointing"] = {"modules": "blocks"}
    engine, *_ = shardwise.initialize(model=GPT(cfg), config=config)
    return engine


def step_s(engine, x) -> float:
    t0 = time.perf_counter()
    engine.backward(engine(x[:, :-1], x[:, 1:]))
    engine.step()
    return time.perf_counter() - t0


def bench(preset: str, seq: int, micro: int, steps: int) -> dict:
    cfg = GPTConfig.preset(preset, seq_len=seq)
    plain, ckpt = engine_for(cfg, micro, False), engine_for(cfg, micro, True)
    g = torch.Generator().manual_seed(1)
    ratios = []
    for i in range(steps + 1):
        x = torch.randint(0, cfg.vocab_size, (micro, seq + 1), generator=g)
        if i % 2:  # alternate who goes first
            t_ckpt, t_plain = step_s(ckpt, x), step_s(plain, x)
        else:
            t_plain, t_ckpt = step_s(plain, x), step_s(ckpt, x)
        if i:  # the first pair warms up
            ratios.append(t_ckpt / t_plain)
    shape = transformer_shape(GPT(cfg))
    return {"model": preset, "seq": seq, "micro": micro,
            "saved_full": saved_bytes(cfg, torch.float32, 0, micro), "saved_ckpt": saved_bytes(cfg, torch.float32, 1, micro),
            "estimate_full": activation_bytes(shape, micro, seq, "fp32"),
            "estimate_ckpt": activation_bytes(shape, micro, seq, "fp32", checkpoint_every=1),
            "time_ratio": statistics.median(ratios), "pairs": len(ratios)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print("| model | seq x micro | activations kept (no ckpt) | with ckpt | saving | estimate (no ckpt / ckpt) "
          "| step time ckpt / none (median of paired steps) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for preset, seq, micro in (("demo", 128, 4), ("25m", 256, 2)):
        r = bench(preset, seq, micro, args.steps)
        rows.append(r)
        mb = 1e6
        print(f"| {preset} | {seq} x {micro} | {r['saved_full'] / mb:.1f} MB | {r['saved_ckpt'] / mb:.1f} MB "
              f"| {r['saved_full'] / r['saved_ckpt']:.1f}x | {r['estimate_full'] / mb:.1f} / {r['estimate_ckpt'] / mb:.1f} MB "
              f"| {r['time_ratio']:.2f}x ({r['pairs']} pairs) |", flush=True)
    return rows


if __name__ == "__main__":
    main()
