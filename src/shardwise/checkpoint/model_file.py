"""``engine.save_16bit_model``: the model's whole state dict in one file, for inference or hand-off.

Unlike a checkpoint (every rank writes its shards; resumable), this is the module's
``state_dict()`` as plain PyTorch would give it, in the module's own dtype (bf16/fp16 under
mixed precision, hence DeepSpeed's name; fp32 otherwise), with tied weights under each of their
names. Every rank calls it; at stage 3 parameters are gathered one module at a time, so a rank
never holds more than one module's parameters whole beyond its shards, and rank 0 writes.
``.safetensors`` file names get the safetensors format, anything else ``torch.save``.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from shardwise.comm.collectives import barrier
from shardwise.comm.context import ParallelContext
from shardwise.zero.gathered import GatheredParameters


def whole_state_dict(module: nn.Module, ctx: ParallelContext, exclude_frozen: bool = False) -> dict[str, torch.Tensor]:
    """The module's state dict with whole tensors (CPU copies) on (global) rank 0; ``{}``
    elsewhere. Stage-3 parameters are gathered within each data-parallel group."""
    out: dict[str, torch.Tensor] = {}
    for prefix, mod in module.named_modules(remove_duplicate=False):
        own = [p for p in mod._parameters.values() if p is not None]
        with GatheredParameters(own):
            if ctx.rank != 0:
                continue
            for name, p in mod._parameters.items():
                if p is not None and not (exclude_frozen and not p.requires_grad):
                    out[f"{prefix}.{name}" if prefix else name] = p.detach().cpu().clone()
        if ctx.rank == 0:
            for name, b in mod._buffers.items():
                if b is not None and name not in mod._non_persistent_buffers_set:
                    out[f"{prefix}.{name}" if prefix else name] = b.detach().cpu().clone()
    return out


def save_model_file(module: nn.Module, ctx: ParallelContext, save_dir, save_filename: str = "pytorch_model.bin",
                    exclude_frozen: bool = False) -> str:
    """Write :func:`whole_state_dict` to ``<save_dir>/<save_filename>`` from rank 0 (atomically:
    a temporary file renamed into place); returns the path once every rank has it."""
    state = whole_state_dict(module, ctx, exclude_frozen)
    path = os.path.join(os.fspath(save_dir), save_filename)
    if ctx.rank == 0:
        os.makedirs(os.fspath(save_dir), exist_ok=True)
        tmp = f"{path}.tmp"
        if save_filename.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(state, tmp, metadata={"format": "pt"})
        else:
            torch.save(state, tmp)
        os.replace(tmp, path)
    barrier(ctx.world)
    return path


__all__ = ["save_model_file", "whole_state_dict"]
