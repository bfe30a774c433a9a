"""Compute dtype of the model and casting of floating-point inputs."""
from __future__ import annotations

from typing import Any, Callable

import torch

from shardwise.config.plan import PrecisionPlan

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(plan: PrecisionPlan) -> torch.dtype:
    return _DTYPES[plan.compute]


def grad_dtype(plan: PrecisionPlan) -> torch.dtype:
    """The dtype gradients are reduced, accumulated and kept in."""
    return _DTYPES[plan.grads or plan.compute]


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor nested in tuples, namedtuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(x, fn) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def prepare_inputs(obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move tensors to ``device``; cast floating-point ones to the compute ``dtype``."""

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and dtype != torch.float32:
            return t.to(device=device, dtype=dtype, non_blocking=True)
        return t.to(device, non_blocking=True)

    return map_tensors(obj, move)
