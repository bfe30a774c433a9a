"""Rank function for tests/distributed/test_monitor.py: a tiny GPT trained at ZeRO stage 3 on
2 ranks with tensorboard + csv_monitor on; every rank reports what it computed itself."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

import shardwise
from model import GPT, GPTConfig
from shardwise.monitor import Monitor

CFG = GPTConfig.preset("tiny")
MICRO, GAS = 2, 2


def _batch(rank: int, step: int, micro: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randint(0, CFG.vocab_size, (MICRO, CFG.seq_len), generator=g)


def monitored_training(out_dir: str, steps: int, every: int, stage: int = 3) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = GPT(CFG)
    section = {"enabled": True, "output_path": out_dir, "job_name": "job"}
    conf = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3,
                                                         "warmup_num_steps": 4}},
            "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0}
                                                     if stage == 3 else {})},
            "steps_per_print": every, "tensorboard": section, "csv_monitor": section}
    engine, _, _, _ = shardwise.initialize(model=model, model_parameters=model.parameters(), config=conf)
    losses, lrs = [], []
    for step in range(steps):
        for micro in range(GAS):
            x = _batch(rank, step, micro)
            loss = engine(x, x)
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary():
                lrs.append(engine.get_lr()[0])
            engine.step()
            losses.append(loss.item())
    mon = engine.observers.find(Monitor)
    out = {"losses": losses, "lrs": lrs, "pid": os.getpid(), "writers": [w.name for w in mon.writers],
           "memory": engine.memory_report()["total"], "samples": engine.global_samples,
           "train_batch_size": engine.train_batch_size()}
    engine.destroy()  # every rank: the last, shorter interval is written here
    out["last_events"] = mon.last_events
    out["intervals"] = mon.intervals
    return out
