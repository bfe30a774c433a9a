"""Rank function for tests/distributed/test_estimate_vs_measured.py (importable in spawned ranks)."""
from __future__ import annotations

import torch
import torch.distributed as dist

import shardwise
from model import GPT, GPTConfig

PRESET = "tiny"
BUCKET = 3000  # elements: several buckets, so per-bucket padding shows


def tiny_gpt() -> GPT:
    return GPT(GPTConfig.preset(PRESET))


def measure(cases: list[tuple[int, str]]) -> list[dict]:
    """For each (stage, precision): build an engine, take one step, return memory_report()."""
    rank = dist.get_rank()
    cfg = GPTConfig.preset(PRESET)
    out = []
    for stage, precision in cases:  # precision "bf16/fp32-grads": data_types.grad_accum_dtype fp32
        torch.manual_seed(0)
        model = tiny_gpt()
        config = {"train_micro_batch_size_per_gpu": 2,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                  "zero_optimization": {"stage": stage, "reduce_bucket_size": BUCKET},
                  "bf16": {"enabled": precision.startswith("bf16")}, "steps_per_print": 1000}
        if precision.endswith("fp32-grads"):
            config["data_types"] = {"grad_accum_dtype": "fp32"}
        engine, *_ = shardwise.initialize(model=model, config=config)
        g = torch.Generator().manual_seed(rank)
        x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1), generator=g)
        engine.backward(engine(x[:, :-1], x[:, 1:]))
        engine.step()
        out.append(engine.memory_report())
    return out
