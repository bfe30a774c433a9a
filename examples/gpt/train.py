"""Train the bundled byte-level GPT on Shakespeare with shardwise (ZeRO stage from the config).

    shardwise run --nproc-per-node 2 examples/gpt/train.py --config examples/gpt/ds_zero2.json
    python examples/gpt/train.py                      # one process

The training loop is the DeepSpeed one: ``loss = engine(batch); engine.backward(loss);
engine.step()``. Everything else here is logging: a progress bar on rank 0, the loss averaged
across ranks, a metrics CSV and the per-rank memory report at the end.
"""
from __future__ import annotations

import argparse
import json
import csv
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # model.py and data.py sit beside this script

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

import shardwise  # noqa: E402
from data import DEFAULT_TEXT, ByteDataset, load_text  # noqa: E402
from model import GPT, GPTConfig, count_parameters  # noqa: E402

MEMORY_KEYS = ("params", "grads", "master_params", "optimizer_state", "total")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(HERE / "ds_zero2.json"), help="DeepSpeed-style JSON")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps to train")
    p.add_argument("--preset", default="demo", help="model size: demo (3.3M), 1m, tiny, 25m")
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    p.add_argument("--seed", type=int, default=1234, help="same on every rank")
    p.add_argument("--data", default=str(DEFAULT_TEXT), help="any text file; bytes are tokens")
    p.add_argument(
        "--metrics-csv", default="runs/gpt/metrics.csv", help="written by rank 0; '' disables"
    )
    p.add_argument("--log-every", type=int, default=10, help="optimizer steps between log lines")
    # the DeepSpeed launcher passes --local_rank; torchrun sets LOCAL_RANK instead
    p.add_argument("--local-rank", "--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.log_every < 1:
        p.error("--steps and --log-every must be >= 1")
    return args


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def mean_across_ranks(value: float) -> float:
    """For logging only: the mean of ``value`` over all ranks (every rank must call it)."""
    _, world = rank_and_world()
    if world == 1 or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world


def gather_to_all(obj):
    _, world = rank_and_world()
    if world == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def print_memory_reports(engine) -> None:
    report = engine.memory_report() if hasattr(engine, "memory_report") else None
    reports = gather_to_all(report)
    if rank_and_world()[0] != 0:
        return
    if any(r is None for r in reports):
        print("engine.memory_report() is not available in this shardwise version")
        return
    mib = 2.0**20
    keys = [k for k in MEMORY_KEYS if k in reports[0]] or sorted(reports[0])
    print("model state per rank (MiB):")
    print("rank " + " ".join(f"{k:>16}" for k in keys))
    for rank, r in enumerate(reports):
        print(f"{rank:>4} " + " ".join(f"{r.get(k, 0) / mib:>16.2f}" for k in keys))


def open_metrics(path: str):
    if not path:
        return None, None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("w", newline="")
    writer = csv.writer(f)
    writer.writerow(["step", "loss", "lr", "tokens_per_s", "elapsed_s"])
    return f, writer


def zero_stage(config_path: str) -> int:
    with open(config_path) as f:
        return int((json.load(f).get("zero_optimization") or {}).get("stage", 0))


def set_epoch(loader, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None) or getattr(loader, "data_sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # same model on every rank
    cfg = GPTConfig.preset(args.preset, **({"seq_len": args.seq_len} if args.seq_len else {}))
    # ZeRO stage 3: build under zero.Init so that no rank ever holds the whole model
    with shardwise.zero.Init(config=args.config, enabled=zero_stage(args.config) == 3):
        model = GPT(cfg)
    dataset = ByteDataset(load_text(args.data), cfg.seq_len, vocab_size=cfg.vocab_size)

    engine, optimizer, loader, scheduler = shardwise.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=args.config,
        training_data=dataset,
    )

    rank, world = rank_and_world()
    tokens_per_step = engine.train_batch_size() * cfg.seq_len
    if rank == 0:
        print(
            f"GPT '{args.preset}': {count_parameters(model) / 1e6:.2f}M parameters | "
            f"{world} rank(s) | config {args.config} | {len(dataset)} sequences of {cfg.seq_len} "
            f"bytes | {engine.train_batch_size()} sequences = {tokens_per_step} tokens per step",
            flush=True,
        )

    metrics_file, metrics = open_metrics(args.metrics_csv) if rank == 0 else (None, None)
    # rank 0 only; tqdm hides the bar itself when stderr is not a terminal (None), log lines stay
    bar = tqdm(total=args.steps, unit="step", disable=True if rank else None, mininterval=0.5)
    step = epoch = 0
    window_loss, window_micro, window_steps = 0.0, 0, 0
    start = window_start = time.perf_counter()
    first_loss = last_loss = float("nan")
    while step < args.steps:
        set_epoch(loader, epoch)
        batches = 0
        for batches, batch in enumerate(loader, start=1):  # noqa: B007 (counted for the check)
            loss = engine(batch)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            window_loss += loss.item()
            window_micro += 1
            if not boundary:
                continue
            step += 1
            window_steps += 1
            bar.update(1)
            if step % args.log_every == 0 or step == args.steps or step == 1:
                now = time.perf_counter()
                last_loss = mean_across_ranks(window_loss / window_micro)
                if step == 1:
                    first_loss = last_loss
                tok_s = tokens_per_step * window_steps / (now - window_start)
                lr = engine.get_lr()[0]
                bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tok_s:,.0f}")
                if rank == 0:
                    bar.write(
                        f"step {step:>5} | loss {last_loss:.4f} | lr {lr:.2e} | "
                        f"{tok_s:,.0f} tokens/s | {now - start:.1f}s"
                    )
                    if metrics:
                        metrics.writerow(
                            [step, f"{last_loss:.6f}", lr, f"{tok_s:.1f}", f"{now - start:.3f}"]
                        )
                        metrics_file.flush()
                window_loss, window_micro, window_steps = 0.0, 0, 0
                window_start = now
            if step >= args.steps:
                break
        if batches == 0:
            raise SystemExit(f"{args.data}: too little text for one micro-batch per rank")
        epoch += 1
    bar.close()
    elapsed = time.perf_counter() - start

    if rank == 0:
        print(
            f"trained {step} steps ({step * engine.train_batch_size() / len(dataset):.2f} epochs) "
            f"in {elapsed:.1f}s: {tokens_per_step * step / elapsed:,.0f} tokens/s; "
            f"loss {first_loss:.3f} -> {last_loss:.3f}",
            flush=True,
        )
    print_memory_reports(engine)
    if rank == 0 and metrics_file:
        metrics_file.close()
        print(f"metrics saved to {Path(args.metrics_csv).resolve()}", flush=True)
    # every rank: the monitors (tensorboard / csv_monitor in ds_zero2.json) write the last
    # partial interval and close their files
    engine.destroy()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
