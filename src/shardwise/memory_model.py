"""The per-rank model-state bytes of each ZeRO strategy: the one memory model that
``shardwise estimate``, ``shardwise plan`` and the tests share.

[Note: memory model]
The figures are what :meth:`shardwise.Engine.memory_report` measures after a step on rank
``rank``, in bytes, computed from the layout code the strategies themselves run:
:func:`shardwise.comm.buckets.assign_buckets` (stages 0-2: one param group, reverse order,
per-bucket padding to ``world_size * 16`` elements) and, at stage 3, the fetch units of
:func:`shardwise.zero.units.fetch_units` split as ``zero/stage3.py``'s ``apply_stage3`` splits
them (parameters below ``stage3_param_persistence_threshold`` into one resident unit kept
whole; trainable and frozen parameters in separate flat buffers, each padded the same way):

| stage | params (compute dtype)                    | grads (grad dtype) | master (bf16/fp16 only) | optimizer state |
|-------|-------------------------------------------|--------------------|-------------------------|-----------------|
| 0     | all buckets, padded, + frozen params      | all buckets        | all, fp32               | all             |
| 1     | all buckets, padded, + frozen params      | all buckets        | own chunk, fp32         | own chunk       |
| 2     | all buckets, padded, + frozen params      | own chunk          | own chunk, fp32         | own chunk       |
| 3     | own chunk of every buffer; resident whole | own chunk          | own chunk, fp32         | own chunk       |

The optimizer state is k fp32 tensors per element (k = 2 for Adam/AdamW, 1 for SGD with
momentum and Adagrad) plus, for optimizers that keep one, a 4-byte ``step`` per optimizer
tensor (one per bucket or trainable stage-3 buffer). With fp32 the parameters are the master
weights (no copy). Every buffer is padded to a multiple of ``world_size * 16``, so every rank
owns an equal chunk; the rank is still an argument, and the chunk is taken for it.

The strategy classes (``shardwise/strategy.py``) build the buffers; this module mirrors their
layout calls without allocating anything (meta-device models are fine), keyed by stage as
``strategy.STRATEGIES`` is (:data:`MEMORY_MODELS`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch.nn as nn

from shardwise.comm.buckets import BucketLayout, assign_buckets
from shardwise.config.schema import default
from shardwise.errors import UsageError
from shardwise.zero.units import ROOT, declared_unit_classes, fetch_units

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ALIGN = 16  # assign_buckets' default alignment, used by the strategies
# the config's defaults (written once, in the schema)
BUCKET_NUMEL = default("zero_optimization.reduce_bucket_size")
PERSISTENCE_THRESHOLD = default("zero_optimization.stage3_param_persistence_threshold")
_NO_SPLIT = 2 ** 62  # as zero/stage3.py: one flat buffer per (unit, group, dtype)
# optimizer -> (fp32 state tensors per element, has a 4-byte `step` tensor per param tensor)
OPTIMIZER_STATES = {"adamw": (2, True), "adam": (2, True), "fusedadam": (2, True), "lamb": (2, True),
                    "sgd": (1, False), "sgd-nomomentum": (0, False), "adagrad": (1, True)}


def states_per_element(optimizer: str) -> tuple[int, bool]:
    key = optimizer.lower().replace("_", "")
    if key not in OPTIMIZER_STATES:
        raise UsageError(f"unknown optimizer {optimizer!r} for the estimate; known: {sorted(OPTIMIZER_STATES)}")
    return OPTIMIZER_STATES[key]


def result(params: int, grads: int, master: int, state: int, activations: int | None) -> dict[str, int | None]:
    total = params + grads + master + state + (activations or 0)
    return {"params": params, "grads": grads, "master_params": master, "optimizer_state": state,
            "activations": activations, "total": total}


def trainable_params(model: nn.Module) -> tuple[list[nn.Parameter], int]:
    """Unique trainable parameters in registration order (as the strategy sees them), and the
    element count of the frozen ones."""
    params = list(model.parameters())  # deduplicated (tied weights once)
    return [p for p in params if p.requires_grad], sum(p.numel() for p in params if not p.requires_grad)


# -- stages 0-2 ---------------------------------------------------------------------------------
def bucket_layouts(model: nn.Module, world_size: int, bucket_numel: int = BUCKET_NUMEL) -> list[BucketLayout]:
    """The buckets :class:`shardwise.strategy.FlatBucketStrategy` builds for ``model`` (one
    param group; all floating-point parameters share the compute dtype and device)."""
    trainable, _ = trainable_params(model)
    return assign_buckets([p.numel() for p in trainable], [(0, "compute", "device")] * len(trainable),
                          bucket_numel, world_size, ALIGN)


def layout_states(layouts: list[BucketLayout], frozen_numel: int, world_size: int, stage: int, precision: str,
                  optimizer: str = "adamw", rank: int = 0, activations: int | None = None,
                  grad_precision: str | None = None) -> dict[str, int | None]:
    """Stage 0-2 bytes of ``rank`` from the bucket layout (see [Note: memory model])."""
    pb, (k, step) = DTYPE_BYTES[precision], states_per_element(optimizer)
    gb = DTYPE_BYTES[grad_precision or precision]
    padded = sum(lay.padded_numel for lay in layouts)
    chunk = sum(hi - lo for lo, hi in (lay.chunk_range(rank, world_size) for lay in layouts))
    opt = padded if stage == 0 else chunk
    grads = gb * (chunk if stage == 2 else padded)
    master = 4 * opt if precision != "fp32" else 0
    state = 4 * k * opt + (4 * len(layouts) if step and k else 0)
    return result(pb * (padded + frozen_numel), grads, master, state, activations)


# -- stage 3 ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage3Buffer:
    """One flat buffer of ``apply_stage3``: a fetch unit's trainable or frozen parameters, or
    the resident unit's (kept whole on every rank)."""

    unit: str
    layout: BucketLayout
    trainable: bool
    resident: bool


def stage3_buffers(model: nn.Module, world_size: int, persistence_threshold: int = PERSISTENCE_THRESHOLD,
                   unit_classes: Sequence[type | str] | None = None) -> list[Stage3Buffer]:
    """The flat buffers ``zero/stage3.py``'s ``apply_stage3`` builds for ``model`` (one param
    group): per fetch unit its parameters of at least ``persistence_threshold`` elements, the
    smaller ones of every unit in the resident unit; trainable and frozen ones apart."""
    named = dict(model.named_parameters())
    classes = unit_classes or declared_unit_classes(model)
    units: list[tuple[str, list[nn.Parameter], bool]] = []
    small: list[nn.Parameter] = []
    for spec in fetch_units(model, unit_classes=classes):
        big = [named[n] for n in spec.param_names if named[n].numel() >= persistence_threshold]
        small += [named[n] for n in spec.param_names if named[n].numel() < persistence_threshold]
        if big:
            units.append((spec.name, big, False))
    if small:
        units.append(("<persistent>", small, True))
    out = []
    for name, params, resident in units:
        keys = [p.requires_grad for p in params]
        for lay in assign_buckets([p.numel() for p in params], keys, _NO_SPLIT, world_size, ALIGN):
            out.append(Stage3Buffer(name or ROOT, lay, bool(lay.group_key), resident))
    return out


def stage3_buffer_states(buffers: list[Stage3Buffer], world_size: int, precision: str, optimizer: str = "adamw",
                         rank: int = 0, activations: int | None = None,
                         grad_precision: str | None = None) -> dict[str, int | None]:
    """Stage 3 bytes of ``rank`` from the buffers of :func:`stage3_buffers`."""
    pb, (k, step) = DTYPE_BYTES[precision], states_per_element(optimizer)
    gb = DTYPE_BYTES[grad_precision or precision]

    def chunk(b: Stage3Buffer) -> int:
        lo, hi = b.layout.chunk_range(rank, world_size)
        return hi - lo

    params = sum(b.layout.padded_numel if b.resident else chunk(b) for b in buffers)
    trained = [chunk(b) for b in buffers if b.trainable]
    master = 4 * sum(trained) if precision != "fp32" else 0
    state = 4 * k * sum(trained) + (4 * len(trained) if step and k else 0)
    return result(pb * params, gb * sum(trained), master, state, activations)


# -- one entry point, keyed by stage --------------------------------------------------------------
def _layout_model(stage: int) -> Callable[..., dict[str, int | None]]:
    def states(model: nn.Module, world_size: int, precision: str, optimizer: str, *, rank: int,
               bucket_numel: int, persistence_threshold: int, unit_classes: Sequence[type | str] | None,
               grad_precision: str | None, activations: int | None) -> dict[str, int | None]:
        _, frozen = trainable_params(model)
        return layout_states(bucket_layouts(model, world_size, bucket_numel), frozen, world_size, stage,
                             precision, optimizer, rank, activations, grad_precision)
    return states


def _stage3_model(model: nn.Module, world_size: int, precision: str, optimizer: str, *, rank: int,
                  bucket_numel: int, persistence_threshold: int, unit_classes: Sequence[type | str] | None,
                  grad_precision: str | None, activations: int | None) -> dict[str, int | None]:
    return stage3_buffer_states(stage3_buffers(model, world_size, persistence_threshold, unit_classes),
                                world_size, precision, optimizer, rank, activations, grad_precision)


MEMORY_MODELS: dict[int, Callable[..., dict[str, int | None]]] = {
    0: _layout_model(0), 1: _layout_model(1), 2: _layout_model(2), 3: _stage3_model}


def model_state_bytes(model: nn.Module, world_size: int, stage: int, precision: str = "fp32",
                      optimizer: str = "adamw", *, rank: int = 0, bucket_numel: int = BUCKET_NUMEL,
                      persistence_threshold: int = PERSISTENCE_THRESHOLD,
                      unit_classes: Sequence[type | str] | None = None, grad_precision: str | None = None,
                      activations: int | None = None) -> dict[str, int | None]:
    """``rank``'s bytes at ``stage`` for ``model`` (see [Note: memory model]); the keys of
    ``memory_report()`` plus ``activations`` (passed through, counted in ``total``)."""
    if not 0 <= rank < world_size:
        raise UsageError(f"rank must be in [0, {world_size}), got {rank!r}")
    return MEMORY_MODELS[stage](model, world_size, precision, optimizer, rank=rank, bucket_numel=bucket_numel,
                                persistence_threshold=persistence_threshold, unit_classes=unit_classes,
                                grad_precision=grad_precision, activations=activations)


__all__ = ["DTYPE_BYTES", "ALIGN", "BUCKET_NUMEL", "PERSISTENCE_THRESHOLD", "OPTIMIZER_STATES", "MEMORY_MODELS",
           "Stage3Buffer", "bucket_layouts", "layout_states", "stage3_buffers", "stage3_buffer_states",
           "model_state_bytes", "trainable_params", "states_per_element"]
