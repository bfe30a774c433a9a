"""Rank function for tests/distributed/test_estimate_vs_measured.py (importable in spawned ranks)."""
from __future__ import annotations

import torch
import torch.distributed as dist

import shardwise
from model import GPT, GPTConfig

PRESET = "tiny"
BUCKET = 3000  # elements: several buckets, so per-bucket padding shows
PERSIST = 100  # stage3_param_persistence_threshold of the "persist" cases: LayerNorms and biases whole


def tiny_gpt() -> GPT:
    return GPT(GPTConfig.preset(PRESET))


def tiny_gpt_frozen() -> GPT:
    """The tiny GPT with its position embedding and first block's LayerNorms frozen (frozen
    parameters are kept outside the buckets at stages 0-2, in their own flat buffers at 3)."""
    model = tiny_gpt()
    for name, p in model.named_parameters():
        if name.startswith("pos_emb") or (name.startswith("blocks.0.") and ".ln" in name):
            p.requires_grad_(False)
    return model


def case_config(stage: int, precision: str, variant: str = "") -> dict:
    """The config of one case: ``precision`` "fp32", "bf16" or "bf16/fp32-grads"
    (data_types.grad_accum_dtype fp32); ``variant`` "", "persist" or "frozen"."""
    config = {"train_micro_batch_size_per_gpu": 2,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "zero_optimization": {"stage": stage, **({"reduce_bucket_size": BUCKET} if stage < 3 else {})},
              "bf16": {"enabled": precision.startswith("bf16")}, "steps_per_print": 1000}
    if precision.endswith("fp32-grads"):
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if variant == "persist":
        config["zero_optimization"]["stage3_param_persistence_threshold"] = PERSIST
    return config


def factory(variant: str):
    return tiny_gpt_frozen if variant == "frozen" else tiny_gpt


def measure(cases: list[tuple[int, str, str]]) -> list[dict]:
    """For each (stage, precision, variant): build an engine, take one step, return memory_report()."""
    rank = dist.get_rank()
    cfg = GPTConfig.preset(PRESET)
    out = []
    for stage, precision, variant in cases:
        torch.manual_seed(0)
        model = factory(variant)()
        engine, *_ = shardwise.initialize(model=model, config=case_config(stage, precision, variant))
        g = torch.Generator().manual_seed(rank)
        x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1), generator=g)
        engine.backward(engine(x[:, :-1], x[:, 1:]))
        engine.step()
        out.append(engine.memory_report())
    return out
