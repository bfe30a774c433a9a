"""Compute dtype of the model and casting of floating-point inputs."""
from __future__ import annotations

from typing import Any

import torch

from shardwise.config.plan import PrecisionPlan

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(plan: PrecisionPlan) -> torch.dtype:
    return _DTYPES[plan.compute]


def cast_inputs(obj: Any, dtype: torch.dtype) -> Any:
    """Cast floating-point tensors (nested in tuples/lists/dicts) to ``dtype``; others untouched."""
    if dtype == torch.float32:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(cast_inputs(x, dtype) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(cast_inputs(x, dtype) for x in obj)
    if isinstance(obj, dict):
        return {k: cast_inputs(v, dtype) for k, v in obj.items()}
    return obj
