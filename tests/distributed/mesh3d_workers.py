"""Rank functions for test_mesh3d.py: the (pp, dp, tp) mesh and the per-stage start-up check."""
from __future__ import annotations

import torch.nn as nn

from shardwise.comm.context import init_context, mesh_coords
from shardwise.config import plan_for
from shardwise.consistency import check_same_everywhere
from shardwise.errors import MismatchError


def layout(pp: int, tp: int) -> dict:
    ctx = init_context(pp=pp, tp=tp)
    return {"where": ctx.where(), "dp": ctx.dp.global_ranks, "tp": ctx.tp.global_ranks, "pp": ctx.pp.global_ranks,
            "model_parallel": [g.name for g in ctx.model_parallel], "replicas": ctx.dp_replicas,
            "coords": mesh_coords(ctx.mesh)}


def stage_models(mismatch_rank: int | None) -> str:
    """Each pipeline stage builds a different model; ``mismatch_rank`` builds a wrong one."""
    ctx = init_context(pp=2)
    width = 4 + ctx.pp.rank + (1 if ctx.rank == mismatch_rank else 0)
    plan = plan_for({"train_batch_size": 2, "pipeline": {"stages": 2}}, world_size=ctx.world_size)
    try:
        check_same_everywhere(plan, nn.Linear(width, width), ctx, None)
    except MismatchError as exc:
        return str(exc)
    return "ok"


def tp_pattern_on_no_stage() -> str:
    """(pp 2, tp 2): a tp_plan pattern that matches on no pipeline stage is a ConfigError on
    every rank (a pattern matching on one stage only is fine: see test_pipeline.py)."""
    import shardwise
    from model import GPTConfig
    from pipeline import gpt_pipeline

    from shardwise.errors import ConfigError

    config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1,
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
              "tensor_parallel": {"autotp_size": 2, "tp_plan": {"*.attn.q": "colwise", "*.attn.qq": "colwise"}}}
    try:
        shardwise.initialize(model=gpt_pipeline(GPTConfig.preset("tiny"), num_stages=2), config=config)
    except ConfigError as exc:
        return str(exc)
    return "no error"
