"""Dry run of a job: ``shardwise plan CONFIG --model pkg.module:factory --world-size N``.

Builds the model on the meta device (no storage), resolves the config at N ranks (so batch
sizes that do not divide at N fail here, not on the cluster), and runs shardwise's own
partitioning for the stage: the bucket layout of stages 0-2
(:func:`shardwise.comm.buckets.assign_buckets`, exactly what the strategy builds) or the fetch
units of stage 3 (:func:`shardwise.zero.units.fetch_units`). The partitioning is pure
arithmetic on element counts and the world size, so no process group is needed: rank r's
chunk of every buffer is ``chunk_range(r, N)``; ranks 0 and N-1 are evaluated for the
max/min (equal by construction: every buffer is padded to a multiple of ``N * 16``).

With ``--tp T --pp P`` (or a config with ``tensor_parallel`` / ``pipeline``) the plan is of the
(pp, dp, tp) mesh: [Note: parallel memory model] in ``planner_parallel.py``.

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
- offload (the config's ``zero_optimization.offload_optimizer`` / ``offload_param``, see
  [Note: offload in the memory model]): the model states count only what stays on the device;
  ``tiers`` (JSON ``"offload"``) holds the max over the ranks of ``host_offload``,
  ``disk_offload``, ``swap_buffers`` and the bytes moved per step. Collectives and working
  memory do not change with offload.

[Note: plan --fit]
``shardwise plan CONFIG --model M --world-size N --fit DEVICE_MEM [--host-memory H] [--disk D]``
evaluates every stage x ``offload_optimizer.device`` x ``offload_param.device`` combination
that can run (offload needs stage >= 1, ``offload_param`` stage 3), with the config's ratio,
buffer counts and ``sub_group_size`` (``--offload-ratio`` / ``--sub-group-size`` override). A
combination fits when the worst rank's device bytes (model states + working memory +
activations) <= DEVICE_MEM and, per node (``--ranks-per-node``, default ``--gpus-per-node``,
else 1 rank), ``host_offload + swap_buffers`` <= H and ``disk_offload`` <= D (a budget not
given is not checked). The recommendation is the cheapest that fits: least disk traffic, then
least host<->device traffic, then least communication (``comm_bytes_per_step``), then the
lowest stage. Every other combination is listed with the tier that overflows and by how much,
or the first of those costs where it is worse. ``--params N`` instead of ``--model``: the same
from a parameter count (no padding; stage 3's gathered units unknown, so not counted). Exit
status 1 when nothing fits.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Collection, Sequence

import torch.nn as nn

from shardwise.errors import ShardwiseError, UsageError
from shardwise.estimate import (activation_bytes, add_offload_args, add_world_args, build_on_meta, disk_bandwidth,
                                fmt_bytes, load_factory, model_states, offload_base, parse_bytes, planning_config,
                                sharded_numel, transformer_shape, world_from_args)
from shardwise.memory_model import (BUCKET_NUMEL, DTYPE_BYTES, OFFLOAD_KEYS, PERSISTENCE_THRESHOLD, TRAFFIC_KEYS,
                                    Offload, RankElements, bucket_layouts, layout_elements, layout_states,
                                    offload_choices, offload_states, stage3_buffer_states, stage3_buffers,
                                    stage3_elements, trainable_params)
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
    optimizer: str = "adamw"
    grad_precision: str | None = None
    gradient_accumulation_steps: int = 1
    # with an offload choice: max over the ranks of OFFLOAD_KEYS + TRAFFIC_KEYS (None: no offload applied)
    offload: Offload | None = None
    tiers: dict[str, int] | None = None
    # per evaluated rank: (rank, resident states, element counts), for with_offload
    rank_states: list[tuple[int, dict[str, Any], RankElements]] = field(default_factory=list, repr=False)

    @property
    def comm_bytes_per_step(self) -> int:
        return sum(c.bytes for c in self.collectives)

    @property
    def device_need(self) -> int:
        """Device bytes of the worst rank: model states + working memory + activations."""
        return self.max_bytes + self.working_bytes + (self.activations or 0)

    def with_offload(self, offload: Offload) -> "PlanReport":
        """This plan with ``offload`` applied to every evaluated rank ([Note: offload in the
        memory model]): device bytes drop, ``tiers`` says what went to host memory and disk and
        what moves per step. The stage's working memory stays on the device."""
        rows = [(r, offload_states(st, el, offload, self.stage, self.precision, self.optimizer, self.grad_precision,
                                   self.gradient_accumulation_steps)) for r, st, el in self.rank_states]
        per_rank = [_model_state_total(s) for _, s in rows]
        states = {**rows[0][1], "activations": self.activations,
                  "total": _model_state_total(rows[0][1]) + (self.activations or 0)}
        tiers = {k: max(s[k] for _, s in rows) for k in OFFLOAD_KEYS + TRAFFIC_KEYS}
        out = replace(self, states=states, max_bytes=max(per_rank), min_bytes=min(per_rank), offload=offload,
                      tiers=tiers)
        out.fits = None if self.device_memory is None else out.device_need <= self.device_memory
        return out

    def to_json(self) -> dict[str, Any]:
        out = {"world_size": self.world_size, "stage": self.stage,
               "model_state_bytes_per_rank": {"max": self.max_bytes, "min": self.min_bytes},
               "units": [{"name": n, "numel": k} for n, k in self.units],
               "comm_bytes_per_step": self.comm_bytes_per_step, "fits": self.fits}
        if self.offload is not None and self.offload.enabled:
            out["offload"] = {"offload_optimizer": self.offload.optimizer, "offload_param": self.offload.param,
                              "ratio": self.offload.ratio, "sub_group_size": self.offload.sub_group_size,
                              **(self.tiers or {})}
        return out


def _model_state_total(states: dict[str, Any]) -> int:
    return states["total"] - (states["activations"] or 0)


def plan_model(model: nn.Module, world_size: int, stage: int, *, precision: str = "fp32", optimizer: str = "adamw",
               bucket_numel: int = BUCKET_NUMEL, gradient_accumulation_steps: int = 1, micro_batch: int | None = None,
               seq_len: int | None = None, persistence_threshold: int = PERSISTENCE_THRESHOLD,
               unit_classes: Sequence[type | str] | None = None, device_memory: int | None = None,
               grad_precision: str | None = None, checkpoint_every: int = 0,
               offload: Offload | None = None, duplicates: Collection[int] = frozenset()) -> PlanReport:
    """Plan ``model`` (build it on the meta device) at ``world_size`` ranks; see [Note: plan figures].
    ``grad_precision``: the gradient dtype (default ``precision``); ``checkpoint_every``: activation
    checkpointing of every k-th block (0: none); ``offload``: an offload choice applied to the
    model states ([Note: offload in the memory model]; None or no offload: as without);
    ``duplicates``: ids of parameters another tp / pp rank counts in the norm (kept in own buckets)."""
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
        buffers = stage3_buffers(model, world_size, persistence_threshold, unit_classes, duplicates)
        resident = [stage3_buffer_states(buffers, world_size, precision, optimizer, rank=r,
                                         grad_precision=grad_precision) for r in ranks]
        elements = [stage3_elements(buffers, world_size, r) for r in ranks]
        per_rank_states = _offloaded(resident, elements, offload, stage, precision, optimizer, grad_precision, gas)
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
        layouts = bucket_layouts(model, world_size, bucket_numel, duplicates)
        resident = [layout_states(layouts, frozen, world_size, stage, precision, optimizer, rank=r,
                                  grad_precision=grad_precision)
                    for r in ranks]
        elements = [layout_elements(layouts, world_size, r) for r in ranks]
        per_rank_states = _offloaded(resident, elements, offload, stage, precision, optimizer, grad_precision, gas)
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
    applied = offload is not None and offload.enabled
    tiers = {k: max(s[k] for s in per_rank_states) for k in OFFLOAD_KEYS + TRAFFIC_KEYS} if applied else None
    states = {**states, "activations": act, "total": _model_state_total(states) + (act or 0)}
    fits = None if device_memory is None else max(per_rank) + working + (act or 0) <= device_memory
    return PlanReport(world_size, stage, precision, n_params, states, max(per_rank), min(per_rank), unit_rows,
                      collectives, working, act, device_memory, fits, time.perf_counter() - t0, optimizer,
                      grad_precision, gas, offload if applied else None, tiers, list(zip(ranks, resident, elements)))


def _offloaded(resident: list[dict[str, Any]], elements: list[RankElements], offload: Offload | None, stage: int,
               precision: str, optimizer: str, grad_precision: str, gas: int) -> list[dict[str, Any]]:
    if offload is None or not offload.enabled:
        return resident
    return [offload_states(st, el, offload, stage, precision, optimizer, grad_precision, gas)
            for st, el in zip(resident, elements)]


def plan_job(config_path: str, model_spec: str, world_size: int, *, stage: int | None = None,
             device_memory: int | None = None, seq_len: int | None = None,
             unit_classes: Sequence[str] | None = None, offload: Offload | None = None) -> PlanReport:
    """``shardwise plan`` as a function: resolve the config at N, build the model on meta, plan.
    ``offload``: the offload choice (default: the config's ``offload_optimizer`` /
    ``offload_param``)."""
    t0 = time.perf_counter()
    cfg = planning_config(config_path, world_size)
    stage = cfg.stage if stage is None else stage
    offload = cfg.offload if offload is None else offload
    if unit_classes and stage != 3:
        raise UsageError("fetch unit classes apply to ZeRO stage 3 (add --stage 3)")
    model = build_on_meta(load_factory(model_spec))
    report = plan_model(model, world_size, stage, precision=cfg.precision, grad_precision=cfg.grad_precision,
                        optimizer=cfg.optimizer, bucket_numel=cfg.bucket_numel,
                        gradient_accumulation_steps=cfg.gradient_accumulation_steps, micro_batch=cfg.micro_batch,
                        seq_len=seq_len, persistence_threshold=cfg.persistence_threshold,
                        checkpoint_every=cfg.checkpoint_every,
                        unit_classes=unit_classes, device_memory=device_memory, offload=offload)
    report.seconds = time.perf_counter() - t0
    return report


def fit_job(config_path: str, model: str | int, world_size: int, device_memory: int, host_memory: int | None = None,
            disk: int | None = None, *, stage: int | None = None, seq_len: int | None = None,
            unit_classes: Sequence[str] | None = None, ranks_per_node: int = 1,
            bandwidth: tuple[float, float] | None = None, base: Offload | None = None) -> FitReport:
    """``shardwise plan --fit`` as a function: ``model`` is a ``pkg.module:factory`` spec (meta
    device) or a parameter count (analytic). Every stage (or only ``stage``) x offload
    combination, with the config's (or ``base``'s) ratio, buffers and tile size."""
    t0 = time.perf_counter()
    cfg = planning_config(config_path, world_size)
    base = cfg.offload if base is None else base
    stages = (0, 1, 2, 3) if stage is None else (stage,)
    if isinstance(model, (int, float)) and not isinstance(model, bool):
        fit = fit_analytic(int(model), world_size, device_memory, host_memory, disk, base=base, stages=stages,
                           ranks_per_node=ranks_per_node, bandwidth=bandwidth, precision=cfg.precision,
                           optimizer=cfg.optimizer, grad_precision=cfg.grad_precision, bucket_numel=cfg.bucket_numel,
                           gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    else:
        module = build_on_meta(load_factory(model))
        fit = fit_model(module, world_size, device_memory, host_memory, disk, base=base, stages=stages,
                        ranks_per_node=ranks_per_node, bandwidth=bandwidth, precision=cfg.precision,
                        grad_precision=cfg.grad_precision, optimizer=cfg.optimizer, bucket_numel=cfg.bucket_numel,
                        gradient_accumulation_steps=cfg.gradient_accumulation_steps, micro_batch=cfg.micro_batch,
                        seq_len=seq_len, persistence_threshold=cfg.persistence_threshold,
                        checkpoint_every=cfg.checkpoint_every, unit_classes=unit_classes)
    fit.seconds = time.perf_counter() - t0
    return fit


# -- `shardwise plan --fit`: the cheapest stage + offload combination that fits --------------------
@dataclass
class Candidate:
    """One stage x offload combination against the budgets (bytes per rank, per step)."""

    stage: int
    offload: Offload
    device_bytes: int  # model states + working memory + activations, worst rank
    host_bytes: int  # host_offload + swap_buffers, worst rank
    disk_bytes: int  # disk_offload, worst rank
    io_read_bytes: int
    io_write_bytes: int
    host_device_bytes: int
    comm_bytes: int
    report: PlanReport | None = None  # None in analytic mode
    overflow: dict[str, tuple[int, int]] = field(default_factory=dict)  # tier -> (need, budget), per node
    reason: str = ""

    @property
    def fits(self) -> bool:
        return not self.overflow

    @property
    def io_bytes(self) -> int:
        return self.io_read_bytes + self.io_write_bytes

    @property
    def label(self) -> str:
        return f"stage {self.stage}, offload_optimizer {self.offload.optimizer}, offload_param {self.offload.param}"

    def cost(self) -> tuple[int, int, int, int]:
        """Cheapest first: least disk traffic, least host<->device traffic, least communication,
        lowest stage (among those that fit)."""
        return (self.io_bytes, self.host_device_bytes, self.comm_bytes, self.stage)

    def config(self) -> dict[str, Any]:
        """The ``zero_optimization`` keys that select this combination."""
        zero: dict[str, Any] = {"stage": self.stage}
        if self.offload.optimizer != "none":
            zero["offload_optimizer"] = {"device": self.offload.optimizer}
            if self.offload.ratio != 1.0:
                zero["offload_optimizer"]["ratio"] = self.offload.ratio
        if self.offload.param != "none":
            zero["offload_param"] = {"device": self.offload.param}
        return {"zero_optimization": zero}

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "offload_optimizer": self.offload.optimizer,
                "offload_param": self.offload.param, "fits": self.fits, "device_bytes": self.device_bytes,
                "host_bytes": self.host_bytes, "disk_bytes": self.disk_bytes, "io_read_bytes": self.io_read_bytes,
                "io_write_bytes": self.io_write_bytes, "host_device_bytes": self.host_device_bytes,
                "comm_bytes_per_step": self.comm_bytes,
                "overflow": {k: {"need": n, "budget": b, "over": n - b} for k, (n, b) in self.overflow.items()},
                "reason": self.reason}


@dataclass
class FitReport:
    """Every combination, cheapest that fits first (``best``), each other one with its reason."""

    device_memory: int  # per rank
    host_memory: int | None  # per node (ranks_per_node ranks share it); None: not checked
    disk: int | None  # per node; None: not checked
    ranks_per_node: int
    candidates: list[Candidate]
    bandwidth: tuple[float, float] | None = None
    analytic: bool = False
    seconds: float = 0.0

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates and self.candidates[0].fits else None

    def to_json(self) -> dict[str, Any]:
        best = self.best
        return {"budgets": {"device_memory_per_rank": self.device_memory, "host_memory_per_node": self.host_memory,
                            "disk_per_node": self.disk, "ranks_per_node": self.ranks_per_node},
                "recommended": None if best is None else {**best.to_json(), "config": best.config()},
                "candidates": [c.to_json() for c in self.candidates]}


def _io_time(c: Candidate, bandwidth: tuple[float, float] | None) -> str:
    if bandwidth is None or not c.io_bytes:
        return ""
    secs = c.io_read_bytes / (bandwidth[0] * 1e9) + c.io_write_bytes / (bandwidth[1] * 1e9)
    return f" (~{secs:.1f} s of disk I/O per step)"


def rank_candidates(candidates: list[Candidate], device_memory: int, host_memory: int | None, disk: int | None,
                    ranks_per_node: int = 1, bandwidth: tuple[float, float] | None = None) -> list[Candidate]:
    """Check every candidate against the budgets (host and disk per node: ``ranks_per_node``
    ranks share them), sort them cheapest-that-fits first and give each other one its reason."""
    rpn = max(1, ranks_per_node)
    for c in candidates:
        c.overflow = {}
        for tier, need, budget in (("device", c.device_bytes, device_memory),
                                   ("host memory", c.host_bytes * rpn, host_memory),
                                   ("disk", c.disk_bytes * rpn, disk)):
            if budget is not None and need > budget:
                c.overflow[tier] = (need, budget)
    order = {id(c): i for i, c in enumerate(candidates)}
    ranked = sorted(candidates, key=lambda c: (not c.fits, c.cost(), order[id(c)]))
    best = ranked[0] if ranked and ranked[0].fits else None
    per = " per node" if rpn > 1 else ""
    for c in ranked:
        if not c.fits:
            c.reason = "does not fit: " + "; ".join(
                f"{tier} needs {fmt_bytes(n)}{'' if tier == 'device' else per} > {fmt_bytes(b)} "
                f"(over by {fmt_bytes(n - b)})" for tier, (n, b) in c.overflow.items())
        elif c is best:
            c.reason = "recommended: fits, and the cheapest" + _io_time(c, bandwidth)
        else:
            assert best is not None
            if c.io_bytes != best.io_bytes:
                c.reason = (f"fits, but more disk traffic per step: {fmt_bytes(c.io_bytes)} vs "
                            f"{fmt_bytes(best.io_bytes)}{_io_time(c, bandwidth)}")
            elif c.host_device_bytes != best.host_device_bytes:
                c.reason = (f"fits, but more host<->device traffic per step: {fmt_bytes(c.host_device_bytes)} vs "
                            f"{fmt_bytes(best.host_device_bytes)}")
            elif c.comm_bytes != best.comm_bytes:
                c.reason = (f"fits, but more communication per step: {fmt_bytes(c.comm_bytes)} vs "
                            f"{fmt_bytes(best.comm_bytes)}")
            elif c.stage != best.stage:
                c.reason = f"fits at the same traffic, but a higher stage ({c.stage} vs {best.stage})"
            else:
                c.reason = "fits at the same cost as the recommendation (listed after it)"
    return ranked


def _candidate(report: PlanReport, offload: Offload) -> Candidate:
    r = report.with_offload(offload)
    t = r.tiers or {}
    return Candidate(r.stage, offload, r.device_need, t.get("host_offload", 0) + t.get("swap_buffers", 0),
                     t.get("disk_offload", 0), t.get("io_read_bytes", 0), t.get("io_write_bytes", 0),
                     t.get("host_device_bytes", 0), r.comm_bytes_per_step, r)


def fit_model(model: nn.Module, world_size: int, device_memory: int, host_memory: int | None = None,
              disk: int | None = None, *, base: Offload | None = None, stages: Sequence[int] = (0, 1, 2, 3),
              ranks_per_node: int = 1, bandwidth: tuple[float, float] | None = None,
              **plan_kwargs: Any) -> FitReport:
    """Every stage x offload combination of ``model`` (``memory_model.offload_choices``, with
    ``base``'s ratio, buffers and tile size) against the budgets: device memory per rank, host
    memory and disk per node; ``plan_kwargs``: :func:`plan_model`'s options (not
    ``device_memory``). The layout of each stage is computed once."""
    t0 = time.perf_counter()
    candidates = []
    for stage in stages:
        report = plan_model(model, world_size, stage, **plan_kwargs)  # no budget: nothing raises
        report.device_memory = device_memory
        candidates += [_candidate(report, c) for c in offload_choices(stage, base)]
    ranked = rank_candidates(candidates, device_memory, host_memory, disk, ranks_per_node, bandwidth)
    return FitReport(device_memory, host_memory, disk, ranks_per_node, ranked, bandwidth,
                     seconds=time.perf_counter() - t0)


def fit_analytic(n_params: int, world_size: int, device_memory: int, host_memory: int | None = None,
                 disk: int | None = None, *, base: Offload | None = None, stages: Sequence[int] = (0, 1, 2, 3),
                 ranks_per_node: int = 1, bandwidth: tuple[float, float] | None = None, precision: str = "fp32",
                 optimizer: str = "adamw", grad_precision: str | None = None, bucket_numel: int = BUCKET_NUMEL,
                 gradient_accumulation_steps: int = 1) -> FitReport:
    """:func:`fit_model` from a parameter count (no padding, no ``step`` scalars; communication
    as [Note: plan figures] with one bucket of the whole model; stage 2's staging pool from
    ``bucket_numel``; stage 3's gathered units are not known, so not counted)."""
    t0 = time.perf_counter()
    pb, gb, gas = DTYPE_BYTES[precision], DTYPE_BYTES[grad_precision or precision], gradient_accumulation_steps
    n = int(n_params)
    comm = {0: gb * n, 1: (gb + pb) * n, 2: (gas * gb + pb) * n, 3: gas * (2 * pb + gb) * n}
    working = {2: ShardGradSync.POOL_SIZE * min(bucket_numel, n) * gb}
    candidates = []
    for stage in stages:
        for c in offload_choices(stage, base):
            s = model_states(n, world_size, stage, precision, optimizer, grad_precision=grad_precision, offload=c,
                             gradient_accumulation_steps=gas)
            candidates.append(Candidate(stage, c, s["total"] + working.get(stage, 0),
                                        s["host_offload"] + s["swap_buffers"], s["disk_offload"],
                                        s["io_read_bytes"], s["io_write_bytes"], s["host_device_bytes"],
                                        comm[stage]))
    ranked = rank_candidates(candidates, device_memory, host_memory, disk, ranks_per_node, bandwidth)
    return FitReport(device_memory, host_memory, disk, ranks_per_node, ranked, bandwidth, analytic=True,
                     seconds=time.perf_counter() - t0)


def _print_fit(f: FitReport) -> None:
    per = f" per node ({f.ranks_per_node} ranks)" if f.ranks_per_node > 1 else " per rank"
    host = fmt_bytes(f.host_memory) + per if f.host_memory is not None else "not checked"
    disk = fmt_bytes(f.disk) + per if f.disk is not None else "not checked"
    print(f"fit: device {fmt_bytes(f.device_memory)} per rank, host memory {host}, disk {disk}"
          f"{' (analytic)' if f.analytic else ''} ({f.seconds:.1f} s)")
    best = f.best
    if best is None:
        print("nothing fits: every combination overflows a budget (below); use more ranks, a larger device, "
              "more host memory or disk")
    else:
        print(f"recommended: {best.label}")
        print(f"  device {fmt_bytes(best.device_bytes)} per rank; host {fmt_bytes(best.host_bytes)}, disk "
              f"{fmt_bytes(best.disk_bytes)} per rank; per step: disk read {fmt_bytes(best.io_read_bytes)}, write "
              f"{fmt_bytes(best.io_write_bytes)}{_io_time(best, f.bandwidth)}, host<->device "
              f"{fmt_bytes(best.host_device_bytes)}, communication {fmt_bytes(best.comm_bytes)}")
        print(f"  config: {json.dumps(best.config())}")
    print("every other combination:")
    width = max(len(c.label) for c in f.candidates)
    for c in f.candidates:
        if c is not best:
            print(f"  {c.label:<{width}}  {c.reason}")


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
    if r.offload is not None and r.tiers is not None:
        t = r.tiers
        print(f"offload ({r.offload.label}, ratio {r.offload.ratio:g}; max over ranks): host "
              f"{fmt_bytes(t['host_offload'])} + swap buffers {fmt_bytes(t['swap_buffers'])}, disk "
              f"{fmt_bytes(t['disk_offload'])}; per step: disk read {fmt_bytes(t['io_read_bytes'])}, write "
              f"{fmt_bytes(t['io_write_bytes'])}, host<->device {fmt_bytes(t['host_device_bytes'])} "
              "(model states above: device only)")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardwise plan", description="Dry-run a job's partitioning at N ranks "
                                "on this machine (meta device; no storage, no processes).")
    p.add_argument("config", help="DeepSpeed-style JSON config")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="pkg.module:factory or file.py:factory")
    src.add_argument("--params", type=float, help="parameter count, e.g. 3e9 (analytic; with --fit only)")
    add_world_args(p)
    p.add_argument("--stage", type=int, choices=(0, 1, 2, 3), help="override the config's ZeRO stage (3: planning only)")
    p.add_argument("--seq", type=int, help="sequence length: adds an activation estimate at the config's micro-batch")
    p.add_argument("--fetch-units", help="stage 3: comma-separated module class names to use as fetch units")
    p.add_argument("--fit", metavar="DEVICE_MEM",
                   help="recommend the cheapest stage + offload combination whose device bytes per rank fit "
                        "DEVICE_MEM (e.g. 24GB), and say why every other one does not or costs more")
    p.add_argument("--host-memory", metavar="HOST_MEM", help="with --fit: host memory per node (not checked if absent)")
    p.add_argument("--disk", metavar="DISK", help="with --fit: disk space per node for offload (not checked if absent)")
    p.add_argument("--ranks-per-node", type=int,
                   help="ranks sharing one host's memory and disk (default: --gpus-per-node, else 1)")
    add_offload_args(p)
    add_parallel_args(p)
    args = p.parse_args(argv)
    world = world_from_args(args)
    if args.tp or args.pp or getattr(planning_config(args.config, world).parallel, "dp", world) != world:
        return _main_parallel(args, world)
    classes = [c.strip() for c in args.fetch_units.split(",") if c.strip()] if args.fetch_units else None
    overrides = args.offload_ratio is not None or args.sub_group_size is not None
    base = offload_base(args, planning_config(args.config, world)) if overrides else None
    if args.fit:
        rpn = args.ranks_per_node or args.gpus_per_node or 1
        fit = fit_job(args.config, int(args.params) if args.params is not None else args.model, world,
                      parse_bytes(args.fit), parse_bytes(args.host_memory) if args.host_memory else None,
                      parse_bytes(args.disk) if args.disk else None, stage=args.stage, seq_len=args.seq,
                      unit_classes=classes, ranks_per_node=rpn, bandwidth=disk_bandwidth(args), base=base)
        if args.json:
            print(json.dumps(fit.to_json()))
        else:
            _print_fit(fit)
        return 0 if fit.best is not None else 1
    if args.params is not None:
        raise UsageError("--params (analytic) works with --fit; give --model pkg.module:factory to plan a layout")
    if args.host_memory or args.disk:
        raise UsageError("--host-memory and --disk are budgets for --fit DEVICE_MEM")
    report = plan_job(args.config, args.model, world, stage=args.stage, seq_len=args.seq, unit_classes=classes,
                      device_memory=parse_bytes(args.device_memory) if args.device_memory else None,
                      offload=base)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        _print(report)
    return 0


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, help="tensor-parallel size T (tensor_parallel.autotp_size)")
    p.add_argument("--pp", type=int, help="pipeline stages P (pipeline.stages)")
    p.add_argument("--schedule", help="pipeline.schedule (1F1B, GPipe, Interleaved1F1B, ...)")
    p.add_argument("--partition", help="pipeline.partition: parameters, uniform or type:<regex>")


def _main_parallel(args: argparse.Namespace, world: int) -> int:
    """``shardwise plan --tp T --pp P``: [Note: parallel memory model] in planner_parallel.py."""
    from shardwise.planner_parallel import plan_job_parallel, print_parallel

    if args.fit or args.params is not None or args.fetch_units:
        raise UsageError("--fit, --params and --fetch-units plan data parallelism only; drop --tp/--pp")
    r = plan_job_parallel(args.config, args.model, world, tp=args.tp, pp=args.pp, stage=args.stage,
                          schedule=args.schedule, partition=args.partition, seq_len=args.seq,
                          device_memory=parse_bytes(args.device_memory) if args.device_memory else None)
    if args.json:
        print(json.dumps(r.to_json()))
    else:
        print_parallel(r)
    return 0


__all__ = ["PlanError", "UnitTooLargeError", "PlanReport", "Collective", "plan_model", "plan_job", "Candidate",
           "FitReport", "rank_candidates", "fit_model", "fit_analytic", "fit_job"]
