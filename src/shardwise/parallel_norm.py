"""Which gradients a rank leaves out of the global gradient norm under model parallelism.

[Note: norm over the mesh]
The gradient norm (clipping, the fp16/non-finite decision) is the norm of the *whole* model's
gradient. With tensor and pipeline parallelism a rank holds part of the model: its squared
norm is summed over dp (when gradients are sharded), then over tp and pp
(``ctx.model_parallel``). A gradient two ranks of those groups both hold must count once: a
parameter replicated over tp (its gradient equal on every tp rank) counts on tp rank 0 only,
a tied weight copied onto several pipeline stages (``PipelineModule.tied_duplicates()``) on its
first owner only. Those parameters get weight 0 in :class:`~shardwise.zero.sharded_optimizer.ShardedStep`;
buckets are built homogeneous in that weight (the strategies key buckets by it).
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn


def duplicate_params(module: nn.Module, ctx: Any) -> set[int]:
    """Ids of ``module``'s parameters whose gradient another rank of ``ctx.model_parallel`` counts."""
    out: set[int] = set()
    tied = getattr(module, "tied_duplicates", None)
    if callable(tied):
        out |= {id(p) for p in tied()}
    if ctx.tp.size > 1:
        from shardwise.tensor_parallel import replicated_duplicates

        out |= replicated_duplicates(module, ctx)
    return out


def norm_weight(param: nn.Parameter, duplicates: set[int]) -> float:
    """1.0: counted in this rank's share of the norm; 0.0: another rank counts it."""
    return 0.0 if id(param) in duplicates else 1.0
