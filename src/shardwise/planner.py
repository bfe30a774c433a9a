"""Dry run of a job: ``shardwise plan CONFIG --model pkg.module:factory --world-size N``.

Builds the model on the meta device (no storage), resolves the config at N ranks (so batch
sizes that do not divide at N fail here, not on the cluster), and runs shardwise's own
partitioning for the stage: the bucket layout of stages 0-2
(:func:`shardwise.comm.buckets.assign_buckets`, exactly what the strategy builds) or the fetch
units of stage 3 (:func:`shardwise.zero.units.fetch_units`). The partitioning is pure
arithmetic on element counts and the world size, so no process group is needed: rank r's
chunk of every buffer is ``chunk_range(r, N)``; ranks 0 and N-1 are evaluated for the
max/min (equal by construction: every buffer is padded to a multiple of ``N * 16``).

[Note: plan figures]
- ``comm_bytes_per_step``: bytes of the buffers the collectives operate on, summed over one
  optimizer step (``gradient_accumulation_steps`` micro-steps) as seen by one rank. On the wire
  a ring all-reduce sends about ``2 (N-1)/N`` times that, a reduce-scatter or all-gather
  ``(N-1)/N`` times. Gradients travel in the gradient dtype (the compute dtype, or fp32 with
  ``data_types.grad_accum_dtype: "fp32"``). Stage 0: one gradient all-reduce per step. Stage
  1: reduce-to-shard at the boundary + parameter all-gather (compute dtype). Stage 2:
  reduce-to-shard every micro-step + all-gather. Stage 3: parameter all-gather in forward and
  again in backward and a gradient reduce-scatter, every micro-step.
- working memory beyond the model states: stage 2's staging pool (up to
  ``ShardGradSync.POOL_SIZE`` full buckets in the gradient dtype during backward); stage 3's
  gathered units (the running and the prefetched unit's parameters plus the running unit's
  full gradient, compute dtype).
- ``fits``: model states + working memory + activations (when ``--seq`` is given) <= device
  memory; null without ``--device-memory``. Stage 3 raises :class:`UnitTooLargeError` when even
  one unit's gathered parameters and gradient do not fit next to the sharded states.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch.nn as nn

from shardwise.errors import ShardwiseError, UsageError
from shardwise.estimate import (activation_bytes, add_world_args, build_on_meta, fmt_bytes, load_factory, parse_bytes,
                                planning_config, sharded_numel, transformer_shape, world_from_args)
from shardwise.memory_model import (BUCKET_NUMEL, DTYPE_BYTES, PERSISTENCE_THRESHOLD, bucket_layouts, layout_states,
                                    stage3_buffer_states, stage3_buffers, trainable_params)
from shardwise.zero.grad_sync import ShardGradSync
from shardwise.zero.units import declared_unit_classes, fetch_units


class PlanError(ShardwiseError):
    """The planned job cannot run as configured."""


class UnitTooLargeError(PlanError):
    """A stage-3 fetch unit, gathered whole, does not fit the device next to the sharded states."""


@dataclass
class Collective:
    op: str
    calls: int  # per optimizer step
    bytes: int  # per optimizer step, per rank (buffer payload)


@dataclass
class PlanReport:
    world_size: int
    stage: int
    precision: str
    n_params: int
    states: dict[str, Any]  # rank 0's breakdown (model_states fields)
    max_bytes: int
    min_bytes: int
    units: list[tuple[str, int]]  # (name, numel) of buckets (stages 0-2) or fetch units (stage 3)
    collectives: list[Collective]
    working_bytes: int
    activations: int | None
    device_memory: int | None
    fits: bool | None
    seconds: float = 0.0

    @property
    def comm_bytes_per_step(self) -> int:
        return sum(c.bytes for c in self.collectives)

    def to_json(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "stage": self.stage,
                "model_state_bytes_per_rank": {"max": self.max_bytes, "min": self.min_bytes},
                "units": [{"name": n, "numel": k} for n, k in self.units],
                "comm_bytes_per_step": self.comm_bytes_per_step, "fits": self.fits}


def _model_state_total(states: dict[str, Any]) -> int:
    return states["total"] - (states["activations"] or 0)


def plan_model(model: nn.Module, world_size: int, stage: int, *, precision: str = "fp32", optimizer: str = "adamw",
               bucket_numel: int = BUCKET_NUMEL, gradient_accumulation_steps: int = 1, micro_batch: int | None = None,
               seq_len: int | None = None, persistence_threshold: int = PERSISTENCE_THRESHOLD,
               unit_classes: Sequence[type | str] | None = None, device_memory: int | None = None,
               grad_precision: str | None = None, checkpoint_every: int = 0) -> PlanReport:
    """Plan ``model`` (build it on the meta device) at ``world_size`` ranks; see [Note: plan figures].
    ``grad_precision``: the gradient dtype (default ``precision``); ``checkpoint_every``: activation
    checkpointing of every k-th block (0: none)."""
    t0 = time.perf_counter()
    pb, gas = DTYPE_BYTES[precision], gradient_accumulation_steps
    grad_precision = grad_precision or precision
    gb = DTYPE_BYTES[grad_precision]
    act = activation_bytes(transformer_shape(model), micro_batch, seq_len, precision, checkpoint_every)
    trainable, frozen = trainable_params(model)
    n_params = sum(p.numel() for p in trainable) + frozen
    ranks = sorted({0, world_size - 1})
    if stage == 3:
        unit_classes = unit_classes or declared_unit_classes(model)
        units = fetch_units(model, unit_classes=unit_classes, persistence_threshold=persistence_threshold,
                            trainable_only=True)
        numels = [u.numel for u in units]
        buffers = stage3_buffers(model, world_size, persistence_threshold, unit_classes)
        per_rank_states = [stage3_buffer_states(buffers, world_size, precision, optimizer, rank=r,
                                                grad_precision=grad_precision) for r in ranks]
        states = per_rank_states[0]
        per_rank = [_model_state_total(s) for s in per_rank_states]
        padded = sum(sharded_numel(n, world_size) * world_size for n in numels)
        collectives = [Collective("all_gather params (forward)", gas * len(units), gas * padded * pb),
                       Collective("all_gather params (backward)", gas * len(units), gas * padded * pb),
                       Collective(f"reduce_scatter grads ({grad_precision})", gas * len(units), gas * padded * gb)]
        largest = max(units, key=lambda u: u.numel)
        working = 3 * largest.numel * pb
        if device_memory is not None and per_rank[0] + 2 * largest.numel * pb > device_memory:
            raise UnitTooLargeError(
                f"fetch unit {largest.name or '<root>'!r} ({largest.numel:,} elements) needs "
                f"{fmt_bytes(2 * largest.numel * pb)} gathered (parameters + gradient, {precision}) on top of "
                f"{fmt_bytes(per_rank[0])} of sharded model states per rank, more than the "
                f"{fmt_bytes(device_memory)} of device memory; split the unit (unit classes), use more ranks, or a "
                "larger device")
        unit_rows = [(u.name, u.numel) for u in units]
    else:
        layouts = bucket_layouts(model, world_size, bucket_numel)
        per_rank_states = [layout_states(layouts, frozen, world_size, stage, precision, optimizer, rank=r,
                                         grad_precision=grad_precision)
                           for r in ranks]
        states = per_rank_states[0]
        per_rank = [_model_state_total(s) for s in per_rank_states]
        padded = sum(lay.padded_numel for lay in layouts)
        nb = len(layouts)
        if stage == 0:
            collectives = [Collective(f"all_reduce grads ({grad_precision})", nb, padded * gb)]
        else:
            reductions = nb * (gas if stage == 2 else 1)
            collectives = [Collective(f"reduce_to_shard grads ({grad_precision})", reductions,
                                      reductions // nb * padded * gb),
                           Collective(f"all_gather params ({precision})", nb, padded * pb)]
        pool = ShardGradSync.POOL_SIZE  # stage 2's staging buffers alive during backward
        working = pool * max(lay.padded_numel for lay in layouts) * gb if stage == 2 and layouts else 0
        unit_rows = [(f"bucket{i}", lay.numel) for i, lay in enumerate(layouts)]
    states = {**states, "activations": act, "total": _model_state_total(states) + (act or 0)}
    fits = None if device_memory is None else max(per_rank) + working + (act or 0) <= device_memory
    return PlanReport(world_size, stage, precision, n_params, states, max(per_rank), min(per_rank), unit_rows,
                      collectives, working, act, device_memory, fits, time.perf_counter() - t0)


def plan_job(config_path: str, model_spec: str, world_size: int, *, stage: int | None = None,
             device_memory: int | None = None, seq_len: int | None = None,
             unit_classes: Sequence[str] | None = None) -> PlanReport:
    """``shardwise plan`` as a function: resolve the config at N, build the model on meta, plan."""
    t0 = time.perf_counter()
    cfg = planning_config(config_path, world_size)
    stage = cfg.stage if stage is None else stage
    if unit_classes and stage != 3:
        raise UsageError("fetch unit classes apply to ZeRO stage 3 (add --stage 3)")
    model = build_on_meta(load_factory(model_spec))
    report = plan_model(model, world_size, stage, precision=cfg.precision, grad_precision=cfg.grad_precision,
                        optimizer=cfg.optimizer, bucket_numel=cfg.bucket_numel,
                        gradient_accumulation_steps=cfg.gradient_accumulation_steps, micro_batch=cfg.micro_batch,
                        seq_len=seq_len, persistence_threshold=cfg.persistence_threshold,
                        checkpoint_every=cfg.checkpoint_every,
                        unit_classes=unit_classes, device_memory=device_memory)
    report.seconds = time.perf_counter() - t0
    return report


def _print(r: PlanReport) -> None:
    print(f"plan: {r.n_params / 1e9:.3f} B parameters, ZeRO stage {r.stage}, {r.world_size} ranks, {r.precision} "
          f"({r.seconds:.1f} s)")
    s = r.states
    print("model states per rank: " + ", ".join(f"{k} {fmt_bytes(s[k])}" for k in
                                                ("params", "grads", "master_params", "optimizer_state"))
          + f"; total {fmt_bytes(r.max_bytes)} (max) / {fmt_bytes(r.min_bytes)} (min)")
    kind = "fetch units" if r.stage == 3 else "buckets"
    big = sorted(r.units, key=lambda u: -u[1])[:5]
    print(f"{kind}: {len(r.units)}; largest: " + ", ".join(f"{n or '<root>'} {k:,}" for n, k in big))
    print("collectives per optimizer step (buffer bytes per rank):")
    for c in r.collectives:
        print(f"  {c.op:<32} {c.calls:>8} calls  {fmt_bytes(c.bytes)}")
    print(f"  {'total':<32} {'':>8}        {fmt_bytes(r.comm_bytes_per_step)}")
    print(f"working memory (transient): {fmt_bytes(r.working_bytes)}; activations: {fmt_bytes(r.activations)}")
    if r.device_memory is not None:
        need = r.max_bytes + r.working_bytes + (r.activations or 0)
        print(f"fits {fmt_bytes(r.device_memory)}: {'yes' if r.fits else 'NO'} (needs {fmt_bytes(need)})")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardwise plan", description="Dry-run a job's partitioning at N ranks "
                                "on this machine (meta device; no storage, no processes).")
    p.add_argument("config", help="DeepSpeed-style JSON config")
    p.add_argument("--model", required=True, help="pkg.module:factory or file.py:factory")
    add_world_args(p)
    p.add_argument("--stage", type=int, choices=(0, 1, 2, 3), help="override the config's ZeRO stage (3: planning only)")
    p.add_argument("--seq", type=int, help="sequence length: adds an activation estimate at the config's micro-batch")
    p.add_argument("--fetch-units", help="stage 3: comma-separated module class names to use as fetch units")
    args = p.parse_args(argv)
    world = world_from_args(args)
    classes = [c.strip() for c in args.fetch_units.split(",") if c.strip()] if args.fetch_units else None
    report = plan_job(args.config, args.model, world, stage=args.stage, seq_len=args.seq, unit_classes=classes,
                      device_memory=parse_bytes(args.device_memory) if args.device_memory else None)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        _print(report)
    return 0


__all__ = ["PlanError", "UnitTooLargeError", "PlanReport", "Collective", "plan_model", "plan_job"]
