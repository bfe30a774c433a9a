"""ZeRO stage 3 at run time, assembled: gather a fetch unit before its module runs, free it
after, reduce its gradients to their owners as soon as they are complete, prefetch the next unit.

``apply_stage3(model, groups, policy, dp, dtype)`` shards a plain (fully built) model in place
over the data-parallel group ``dp`` (``ctx.dp``) and returns the :class:`Stage3Runtime`. The
user's model code knows nothing. The runtime owns the units and what is gathered (and holds
units for ``GatheredParameters``); the jobs around it live by noun:

- ``zero/hooks.py``: the forward, saved-tensor and pre-backward hooks and the training state
  (``[Note: saved parameters]``, ``[Note: recompute outside the unit's hooks]``,
  ``[Note: frozen units in backward]``);
- ``zero/prefetch.py``: the pure prefetch policy (``[Note: prefetch]``);
- ``zero/reduction.py``: staging and reducing gradients (``[Note: gradient completion]``).
"""
from __future__ import annotations

import weakref
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from shardwise.comm.buckets import assign_buckets
from shardwise.comm.collectives import all_gather_shard, broadcast
from shardwise.comm.context import GroupContext
from shardwise.config.plan import Stage3Policy  # built by config/resolve.py; re-exported here
from shardwise.zero.hooks import Stage3Hooks, TrainingState
from shardwise.zero.prefetch import PrefetchPolicy
from shardwise.zero.reduction import GradReduction
from shardwise.zero.sharded_params import (DTensorLayout, FlatShard, ParamRecord, ShardedUnit, ShardState,
                                           local_value)
from shardwise.zero.units import ROOT, declared_externals, declared_unit_classes, fetch_units

_NO_SPLIT = 2 ** 62  # one flat buffer per (unit, group, dtype)

_RUNTIMES: "weakref.WeakSet[Stage3Runtime]" = weakref.WeakSet()


def runtime_of(param: torch.Tensor) -> tuple["Stage3Runtime", ShardedUnit] | None:
    """The live stage-3 runtime and unit that manage ``param`` (placeholder or full), if any."""
    for rt in list(_RUNTIMES):
        unit = rt.unit_of(param)
        if unit is not None:
            return rt, unit
    return None


class Stage3Runtime:
    """The units of one stage-3 model and what of them is gathered; composes the hooks, the
    prefetch policy and the gradient reduction."""

    def __init__(self, root: nn.Module, units: list[ShardedUnit], resident: ShardedUnit | None,
                 dp: GroupContext, policy: Stage3Policy, externals: dict[int, list[ShardedUnit]]):
        self.root = root
        self.units = units  # index 0 is the root unit
        self.resident = resident
        self.dp = dp  # the data-parallel group parameters are sharded over
        self.policy = policy
        self._by_param: dict[int, ShardedUnit] = {}
        for unit in self.all_units():
            for t in unit.full + unit.placeholders:
                self._by_param[id(t)] = unit
        self._live: dict[int, tuple[ShardedUnit, int]] = {}  # storage ptr -> (unit, shard)
        self.live_numel = 0
        self._live_bytes = 0
        self.gathered_peak = 0  # bytes of gathered (non-resident) buffers, high-water mark
        self.reduction = GradReduction(dp, policy, self.release)
        self.hooks = Stage3Hooks(self, PrefetchPolicy.from_policy(policy), externals)
        self.hooks.install()
        _RUNTIMES.add(self)

    @property
    def state(self) -> TrainingState:
        return self.hooks.state

    # -- lookup -----------------------------------------------------------------------------
    def unit_of(self, param: torch.Tensor) -> ShardedUnit | None:
        return self._by_param.get(id(param))

    def all_units(self) -> list[ShardedUnit]:
        return self.units + ([self.resident] if self.resident else [])

    def shards(self) -> list[FlatShard]:
        return [s for u in self.all_units() for s in u.shards]

    def gathered_at(self, t: torch.Tensor) -> tuple[ShardedUnit, int] | None:
        """(unit, shard index) whose gathered buffer is ``t``'s storage, if any."""
        return self._live.get(t.untyped_storage().data_ptr())

    # -- gathering --------------------------------------------------------------------------
    def gather(self, unit: ShardedUnit) -> None:
        """Start gathering ``unit`` (async) if it is sharded."""
        if unit.state is ShardState.SHARDED:
            unit.gather_async()
            for i, flat in enumerate(unit._flats or ()):
                self._live[flat.untyped_storage().data_ptr()] = (unit, i)
            self.live_numel += unit.numel
            self._live_bytes += unit.gathered_bytes()
            self.gathered_peak = max(self.gathered_peak, self._live_bytes)

    def ensure(self, unit: ShardedUnit) -> None:
        """``unit`` gathered and shown to its modules."""
        if unit.state is not ShardState.GATHERED:
            self.gather(unit)
            unit.wait()

    def release(self, unit: ShardedUnit) -> None:
        if unit.resident or unit.state is ShardState.SHARDED or unit.users > 0:
            return
        unit.wait()
        for flat in unit._flats or ():
            self._live.pop(flat.untyped_storage().data_ptr(), None)
        self.live_numel -= unit.numel
        self._live_bytes -= unit.gathered_bytes()
        unit.free()

    def release_all(self) -> None:
        for unit in self.units:
            self.release(unit)

    # -- the strategy's calls ---------------------------------------------------------------
    def finish_backward(self) -> None:
        """End of ``engine.backward``: reduce what is partial, wait, free every gathered unit."""
        self.reduction.finish(self.all_units())
        self.hooks.end_backward()
        for shard in self.shards():
            if shard.trainable:
                shard.note_backward()
        if not self.hooks.in_forward:
            self.release_all()

    def zero_grads(self) -> None:
        for shard in self.shards():
            if shard.grad is not None:
                shard.grad.zero_()
                shard.reset_step_mask()

    @torch.no_grad()
    def after_step(self) -> None:
        """Resident (persistent) parameters: every rank updated its chunk; make them whole."""
        if self.resident is None:
            return
        handles = [all_gather_shard(s.full_flat, self.dp, async_op=True) for s in self.resident.shards]
        for h in handles:
            h.wait()

    # -- GatheredParameters -----------------------------------------------------------------
    def hold(self, units: Iterable[ShardedUnit]) -> None:
        for unit in units:
            self.ensure(unit)
            unit.users += 1

    @torch.no_grad()
    def unhold(self, units: Iterable[ShardedUnit], modifier_rank: int | None) -> None:
        for unit in units:
            if modifier_rank is not None:
                for shard, flat in zip(unit.shards, unit.flats):
                    broadcast(flat, self.dp, src=modifier_rank)
                    shard.set_from_full(flat)
            unit.users -= 1
            if not self.hooks.in_forward or unit.users == 0:
                self.release(unit)


# -- building -------------------------------------------------------------------------------


def _registrations(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    regs: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                regs.setdefault(id(p), []).append((module, attr))
    return regs


def _build_unit(index: int, name: str, module: nn.Module | None, params: list[tuple[str, nn.Parameter]],
                group_of: dict[int, int], regs: dict[int, list], dp: GroupContext, dtype: torch.dtype,
                grad_dtype: torch.dtype, *, resident: bool, duplicates: frozenset[int] | set[int] = frozenset()
                ) -> ShardedUnit:
    # a flat shard is homogeneous in param group, dtype, device and norm weight ([Note: norm over
    # the mesh] in shardwise/parallel_norm.py: a tp-replicated parameter counts on tp rank 0 only)
    keys = [(group_of.get(id(p), -1) if p.requires_grad else -1, dtype if p.is_floating_point() else p.dtype,
             dp.device, 0.0 if id(p) in duplicates else 1.0) for _, p in params]
    # what a slot holds: the parameter, or its local tp block ([Note: tensor-parallel parameters at stage 3])
    values = [local_value(p) for _, p in params]
    layouts = assign_buckets([v.numel() for v in values], keys, _NO_SPLIT, dp.size) if params else []
    shards, records = [], []
    for si, lay in enumerate(layouts):
        members = [(params[s.param_index], values[s.param_index]) for s in lay.slots]
        group, shard_dtype, device, weight = lay.group_key
        shard = FlatShard(si, lay, [v for _, v in members], dp, dtype=shard_dtype, device=device,
                          trainable=group >= 0, resident=resident,
                          grad_dtype=torch.float32 if grad_dtype == torch.float32 else shard_dtype)
        shard.group = group
        shard.norm_weight = weight
        shards.append(shard)
        for slot_index, ((pname, p), v) in enumerate(members):
            records.append(ParamRecord(pname, si, slot_index, v.shape, tuple(regs[id(p)]), DTensorLayout.of(p)))
    unit = ShardedUnit(index, name, module, shards, records, resident=resident)
    if not resident:
        for r, ph in zip(records, unit.placeholders):
            for mod, attr in r.registrations:
                mod._parameters[attr] = ph
    return unit


def apply_stage3(model: nn.Module, param_groups: Sequence[Sequence[nn.Parameter]], policy: Stage3Policy,
                 dp: GroupContext, dtype: torch.dtype = torch.float32,
                 grad_dtype: torch.dtype = torch.float32, on_shard=None,
                 duplicates: frozenset[int] | set[int] = frozenset()) -> Stage3Runtime:
    """Shard ``model``'s parameters into fetch units in place and install the stage-3 hooks.
    Floating-point parameters are kept in ``dtype``, their gradients in ``grad_dtype`` (fp32, or
    the parameter's own dtype). Parameters built under ``zero.Init`` are
    gathered one at a time while their unit's chunk is filled. ``on_shard(shard)`` is called for
    each flat shard as soon as its unit is built (offload_param moves it out of memory there).
    ``duplicates``: ids of parameters whose gradient another model-parallel rank counts in the
    norm (``shardwise.parallel_norm.duplicate_params``): their shards get ``norm_weight`` 0.
    Tensor-parallel (DTensor) parameters are sharded as their local blocks ([Note:
    tensor-parallel parameters at stage 3] in sharded_params.py)."""
    threshold = policy.param_persistence_threshold
    group_of = {id(p): gi for gi, plist in enumerate(param_groups) for p in plist}
    regs = _registrations(model)
    named = dict(model.named_parameters())
    name_of = {id(p): n for n, p in named.items()}
    modules = dict(model.named_modules())
    units_spec = fetch_units(model, unit_classes=declared_unit_classes(model))
    units: list[ShardedUnit] = []
    small: list[tuple[str, nn.Parameter]] = []
    for spec in units_spec:
        big = []
        for pname in spec.param_names:
            p = named[pname]
            (small if p.numel() < threshold else big).append((pname, p))
        if spec.name != ROOT and not big:
            continue
        units.append(_build_unit(len(units), spec.name, modules[spec.name], big, group_of, regs, dp, dtype,
                                 grad_dtype, resident=False, duplicates=duplicates))
        if on_shard is not None:
            for shard in units[-1].shards:
                on_shard(shard)
    resident = _build_unit(len(units), "<persistent>", None, small, group_of, regs, dp, dtype, grad_dtype,
                           resident=True, duplicates=duplicates) if small else None
    for i, shard in enumerate(s for u in units + ([resident] if resident else []) for s in u.shards):
        shard.index = i  # unique across the model (the checkpoint keys buckets by it)
    externals = _resolve_externals(model, units, name_of)
    return Stage3Runtime(model, units, resident, dp, policy, externals)


def _resolve_externals(model: nn.Module, units: list[ShardedUnit], name_of: dict[int, str]
                       ) -> dict[int, list[ShardedUnit]]:
    """``register_external_parameter(module, param)`` declarations -> {using unit: [owning units]}."""
    unit_of_param = {r.name: u for u in units for r in u.records}
    paths = {id(m): n for n, m in model.named_modules()}
    out: dict[int, list[ShardedUnit]] = {}
    for module, param in declared_externals(model):
        path, pname = paths.get(id(module)), name_of.get(id(param))
        if path is None or pname is None or pname not in unit_of_param:
            continue  # not part of this model, or a persistent (always whole) parameter
        user = max((u for u in units if u.name == ROOT or path == u.name or path.startswith(u.name + ".")),
                   key=lambda u: len(u.name))
        target = unit_of_param[pname]
        if target is not user and target not in out.get(user.index, []):
            out.setdefault(user.index, []).append(target)
    return out


__all__ = ["Stage3Policy", "Stage3Runtime", "apply_stage3", "runtime_of"]
