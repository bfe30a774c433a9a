"""ZeRO stage 3 at run time: gather a fetch unit before its module runs, free it after, reduce
its gradients to their owners as soon as they are complete, prefetch the next unit.

``apply_stage3(model, groups, policy, dp, dtype)`` shards a plain (fully built) model in place
over the data-parallel group ``dp`` (``ctx.dp``)
and returns the :class:`Stage3Runtime` that owns the hooks. The user's model code knows nothing.

[Note: saved parameters]
Autograd saves parameters for backward (``F.linear`` saves ``weight.t()``, LayerNorm saves the
weight itself). Left alone, those saved tensors would keep every gathered buffer alive until
backward, i.e. the whole model on every rank. While a forward runs, a
``saved_tensors_hooks`` pair is active: a saved tensor whose storage is a gathered buffer is
replaced by a small handle (unit, shape, strides, offset); unpacking it in backward gathers the
unit again if needed and returns the same view of the fresh buffer. So freeing a unit after its
forward is always safe, and backward gathers in whatever order autograd runs (activation
checkpointing, reused modules, branches). The full parameters autograd accumulates into hold a
one-element expanded tensor while freed (see [Note: three objects per parameter]).

[Note: gradient completion]
Each trainable full parameter has a post-accumulate-grad hook that copies its gradient into
the flat staging buffer (gradient dtype) of its shard and drops it. When every parameter of a shard has
reported, the staging buffer is reduced to its owners (async) and the unit is freed; autograd
runs each parameter's accumulation once per backward, after all of its uses, so this is exact
for reused modules and tied weights. What is still partial at the end of backward (parameters
that got no gradient, re-entrant checkpoint regions) is reduced then, in unit order, and
summed into the same owner shard: reduction is linear. Every rank must build the same autograd
graph so that collectives are issued in the same order (as with FSDP and DeepSpeed).

[Note: recompute outside the unit's hooks]
Hugging Face transformers 5 checkpoints a layer's ``forward``, not its ``__call__``
(``GradientCheckpointingLayer``), so the recompute in backward runs the layer's body without
its forward hooks: the unit would be found sharded. So after a unit's forward with gradients
in which autograd saved none of its parameters (what checkpointing does, re-entrant or not; a
plain forward saves them and keeps gathering through saved-tensor handles, unchanged), a hook
is registered on each of its outputs that requires grad; when backward
reaches them, before the layer's own backward (and so before any recompute, re-entrant or
not), the unit and its external units are gathered (FSDP2's pre-backward hook does the same).
Saved-tensor handles still gather whatever autograd unpacks later.

[Note: frozen units in backward]
A parameter frozen after initialize (``requires_grad_(False)``; see [Note: freezing after
initialize] in sharded_optimizer.py) is shown to autograd as a full parameter that does not
require grad; its slot waits for no gradient, a shard with none is never reduced, and the
optimizer skips it. A unit whose parameters are all frozen never completes a reduction, so
nothing would free it in backward (a GAN's frozen discriminator is traversed by the
generator's backward): when backward enters another unit, the frozen units it entered before
are freed (gathered again on demand, which is always correct).

[Note: prefetch]
The first forward with gradients records the order in which units run. In later forwards,
while unit *i* computes, the next unit of that order is gathered asynchronously (FSDP2's
default); with ``stage3_prefetch_bucket_size`` set, the next units up to that many elements
(DeepSpeed's meaning), always within ``stage3_max_live_parameters`` gathered in total. One
unit ahead measured fastest on the 25M GPT (1.00x DDP vs 1.06x with everything ahead and 1.08x
with no prefetch): gathering every unit at once makes a burst of traffic that competes with the
first units' compute. In backward the order is reversed. When a forward leaves the recorded order
(another branch, generation), prefetching stops for that forward and units are gathered on
demand, which is always correct. A unit that the recorded order uses again within
``stage3_max_reuse_distance`` elements is kept gathered after its forward.
"""
from __future__ import annotations

import weakref
from collections import deque
from functools import partial
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from shardwise.comm.buckets import assign_buckets
from shardwise.comm.collectives import Handle, broadcast, reduce_to_shard
from shardwise.comm.context import GroupContext
from shardwise.config.plan import Stage3Policy  # built by config/resolve.py; re-exported here
from shardwise.zero.sharded_params import FlatShard, ParamRecord, ShardedUnit, ShardState
from shardwise.zero.units import ROOT, declared_externals, declared_unit_classes, fetch_units

_NO_SPLIT = 2 ** 62  # one flat buffer per (unit, group, dtype)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class _Saved:
    """A saved tensor that was a view of a gathered buffer (see [Note: saved parameters])."""

    __slots__ = ("unit", "shard", "size", "stride", "offset")

    def __init__(self, unit: ShardedUnit, shard: int, t: torch.Tensor):
        self.unit, self.shard = unit, shard
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


_RUNTIMES: "weakref.WeakSet[Stage3Runtime]" = weakref.WeakSet()


def runtime_of(param: torch.Tensor) -> tuple["Stage3Runtime", ShardedUnit] | None:
    """The live stage-3 runtime and unit that manage ``param`` (placeholder or full), if any."""
    for rt in list(_RUNTIMES):
        unit = rt.unit_of(param)
        if unit is not None:
            return rt, unit
    return None


class Stage3Runtime:
    def __init__(self, root: nn.Module, units: list[ShardedUnit], resident: ShardedUnit | None,
                 dp: GroupContext, policy: Stage3Policy, externals: dict[int, list[ShardedUnit]]):
        self.root = root
        self.units = units  # index 0 is the root unit
        self.resident = resident
        self.dp = dp  # the data-parallel group parameters are sharded over
        self.policy = policy
        self._externals = externals
        self._by_param: dict[int, ShardedUnit] = {}
        for unit in units + ([resident] if resident else []):
            for t in unit.full + unit.placeholders:
                self._by_param[id(t)] = unit
        self._live: dict[int, tuple[ShardedUnit, int]] = {}  # storage ptr -> (unit, shard)
        self._live_numel = 0
        self._live_bytes = 0
        self.gathered_peak = 0  # bytes of gathered (non-resident) buffers, high-water mark
        self._order: list[ShardedUnit] = []
        self._recording = True
        self._bwd_next: dict[int, list[ShardedUnit]] = {}
        self._bwd_seen: set[int] = set()
        self._bwd_frozen: list[ShardedUnit] = []  # see [Note: frozen units in backward]
        self._packed: dict[int, int] = {}  # unit index -> saved-tensor handles made for it
        self._packed_at: dict[int, int] = {}  # ... when its forward began
        self._depth = 0
        self._pos: int | None = 0
        self._saved_hooks: Any = None
        self._pending: deque[tuple[FlatShard, torch.Tensor, Handle]] = deque()
        self._handles = []
        for unit in units:
            if unit.module is None:
                continue
            self._handles.append(unit.module.register_forward_pre_hook(partial(self._pre_forward, unit)))
            self._handles.append(unit.module.register_forward_hook(partial(self._post_forward, unit),
                                                                   always_call=True))
        for unit in units + ([resident] if resident else []):
            for ri, (r, full) in enumerate(zip(unit.records, unit.full)):
                if unit.shards[r.shard].trainable:
                    self._handles.append(full.register_post_accumulate_grad_hook(partial(self._on_grad, unit, ri)))
        _RUNTIMES.add(self)

    # -- lookup -----------------------------------------------------------------------------
    def unit_of(self, param: torch.Tensor) -> ShardedUnit | None:
        return self._by_param.get(id(param))

    def all_units(self) -> list[ShardedUnit]:
        return self.units + ([self.resident] if self.resident else [])

    def shards(self) -> list[FlatShard]:
        return [s for u in self.all_units() for s in u.shards]

    # -- gathering --------------------------------------------------------------------------
    def _gather(self, unit: ShardedUnit) -> None:
        if unit.state is ShardState.SHARDED:
            unit.gather_async()
            for i, flat in enumerate(unit._flats or ()):
                self._live[flat.untyped_storage().data_ptr()] = (unit, i)
            self._live_numel += unit.numel
            self._live_bytes += unit.gathered_bytes()
            self.gathered_peak = max(self.gathered_peak, self._live_bytes)

    def ensure(self, unit: ShardedUnit) -> None:
        """``unit`` gathered and shown to its modules."""
        if unit.state is not ShardState.GATHERED:
            self._gather(unit)
            unit.wait()

    def release(self, unit: ShardedUnit) -> None:
        if unit.resident or unit.state is ShardState.SHARDED or unit.users > 0:
            return
        unit.wait()
        for flat in unit._flats or ():
            self._live.pop(flat.untyped_storage().data_ptr(), None)
        self._live_numel -= unit.numel
        self._live_bytes -= unit.gathered_bytes()
        unit.free()

    def release_all(self) -> None:
        for unit in self.units:
            self.release(unit)

    # -- forward hooks ----------------------------------------------------------------------
    def _pre_forward(self, unit: ShardedUnit, module: nn.Module, args: Any) -> None:
        if _in_backward():  # re-entrant activation checkpointing recomputes in backward
            self.ensure(unit)
            return
        if self._depth == 0:
            self._open_forward()
        self._depth += 1
        self._packed_at[unit.index] = self._packed.get(unit.index, 0)
        self._track(unit)
        self.ensure(unit)
        for shard in unit.shards:
            shard.sync_requires_grad()  # already gathered: a freeze set on a stale placeholder
        unit.users += 1
        for ext in self._externals.get(unit.index, ()):
            self.ensure(ext)
            ext.users += 1
        self._prefetch_forward()

    def _post_forward(self, unit: ShardedUnit, module: nn.Module, args: Any, output: Any) -> None:
        if _in_backward():
            return
        if torch.is_grad_enabled() and self._packed.get(unit.index, 0) == self._packed_at.get(unit.index, 0):
            hook = partial(self._pre_backward, unit)  # see [Note: recompute outside the unit's hooks]
            for t in _grad_tensors(output):
                t.register_hook(hook)
        unit.users -= 1
        for ext in self._externals.get(unit.index, ()):
            ext.users -= 1
            self.release(ext)
        if not self._reused_soon(unit) and not self._needed_first_in_backward(unit):
            self.release(unit)
        self._depth -= 1
        if self._depth == 0:
            self._close_forward()

    def _open_forward(self) -> None:
        self._pos = 0 if not self._recording else None
        if torch.is_grad_enabled():
            self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._saved_hooks.__enter__()

    def _close_forward(self) -> None:
        if self._saved_hooks is not None:
            hooks, self._saved_hooks = self._saved_hooks, None
            hooks.__exit__(None, None, None)
        for unit in self.units:
            unit.users = 0
        for unit in self.units:
            if not self._needed_first_in_backward(unit):
                self.release(unit)
        if self._recording and self._order and torch.is_grad_enabled():
            self._recording = False
            self._plan_backward()

    def _needed_first_in_backward(self, unit: ShardedUnit) -> bool:
        """The root unit (the head runs last) and the last unit of the recorded order are the
        first that backward needs: with gradients on, they stay gathered instead of being freed
        and gathered again at once (FSDP2 keeps its root the same way). Backward frees them
        when their gradients are reduced."""
        if not torch.is_grad_enabled() or self._recording or self._pos is None:
            return False
        return unit.index == 0 or unit is self._order[-1]

    def _track(self, unit: ShardedUnit) -> None:
        if self._recording:
            if torch.is_grad_enabled():
                self._order.append(unit)
            return
        if self._pos is None:
            return
        if self._pos < len(self._order) and self._order[self._pos] is unit:
            self._pos += 1
        else:
            self._pos = None  # off the recorded order: gather on demand for the rest of this forward

    def _prefetch_forward(self) -> None:
        if self._pos is None or self.policy.prefetch_bucket_size == 0:
            return
        self._prefetch(self._order[self._pos:])

    def _prefetch(self, upcoming: Sequence[ShardedUnit]) -> None:
        budget = self.policy.prefetch_bucket_size
        if budget is None:  # the next unit only
            upcoming, budget = upcoming[:1], 1
        for nxt in upcoming:
            if budget <= 0:
                break
            if nxt.state is ShardState.SHARDED:
                if self._live_numel + nxt.numel > self.policy.max_live_parameters:
                    break
                self._gather(nxt)
                budget -= nxt.numel

    def _reused_soon(self, unit: ShardedUnit) -> bool:
        if self._pos is None or self.policy.max_reuse_distance <= 0:
            return False
        distance = 0
        for nxt in self._order[self._pos:]:
            if nxt is unit:
                return True
            distance += nxt.numel
            if distance > self.policy.max_reuse_distance:
                return False
        return False

    def _plan_backward(self) -> None:
        rev: list[ShardedUnit] = []
        for u in reversed(self._order):
            if u.index != 0 and u not in rev:
                rev.append(u)
        self._bwd_next = {0: rev}
        for i, u in enumerate(rev):
            self._bwd_next[u.index] = rev[i + 1:]

    # -- saved tensors (see [Note: saved parameters]) ---------------------------------------
    def _pack(self, t: torch.Tensor) -> Any:
        try:
            hit = self._live.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # tensors without storage (subclasses)
            return t
        if hit is None:
            return t
        self._packed[hit[0].index] = self._packed.get(hit[0].index, 0) + 1
        return _Saved(hit[0], hit[1], t)

    def _unpack(self, x: Any) -> torch.Tensor:
        if type(x) is not _Saved:
            return x
        unit = x.unit
        if unit.state is not ShardState.GATHERED:
            self.ensure(unit)
        self._enter_backward(unit)
        return unit.flats[x.shard].as_strided(x.size, x.stride, x.offset)

    def _pre_backward(self, unit: ShardedUnit, grad: torch.Tensor) -> None:
        """A gradient reached one of ``unit``'s outputs (see [Note: recompute outside the
        unit's hooks])."""
        self.ensure(unit)
        for ext in self._externals.get(unit.index, ()):
            self.ensure(ext)
        self._enter_backward(unit)

    def _enter_backward(self, unit: ShardedUnit) -> None:
        if unit.index in self._bwd_seen:
            return
        self._bwd_seen.add(unit.index)
        # [Note: frozen units in backward]
        keep = []
        for u in self._bwd_frozen:
            if u is unit or u.users > 0 or u in self._externals.get(unit.index, ()):
                keep.append(u)
            else:
                self.release(u)
        self._bwd_frozen = keep
        if unit.index != 0 and not unit.trainable_now():
            self._bwd_frozen.append(unit)
        if self.policy.prefetch_bucket_size != 0:
            self._prefetch(self._bwd_next.get(unit.index, ()))

    # -- gradients (see [Note: gradient completion]) ----------------------------------------
    def _on_grad(self, unit: ShardedUnit, ri: int, full: nn.Parameter) -> None:
        g = full.grad
        if g is None:
            return
        full.grad = None
        r = unit.records[ri]
        shard = unit.shards[r.shard]
        if shard.n_fired == 0:  # the slots that require grad in this backward (the others never fire)
            shard.expected = sum(1 for f in shard.full_params if f.requires_grad) or len(shard.layout.slots)
        if shard.staging is None:
            shard.staging = torch.empty(shard.layout.padded_numel, dtype=shard.grad.dtype, device=g.device)
        view = shard.slot_view(shard.staging, r.slot, r.shape)
        if shard.fired[r.slot]:
            view.add_(g)
        else:
            view.copy_(g)
            shard.fired[r.slot] = 1
            shard.n_fired += 1
        if shard.n_fired == shard.expected:
            self._launch(shard)
            if unit.users == 0 and all(s.staging is None for s in unit.shards):
                self.release(unit)

    def _launch(self, shard: FlatShard) -> None:
        staging, shard.staging = shard.staging, None
        for a, b in shard.gaps:
            staging[a:b].zero_()
        if shard.n_fired < len(shard.layout.slots):  # parameters without a gradient this backward
            for i, slot in enumerate(shard.layout.slots):
                if not shard.fired[i]:
                    staging[slot.offset:slot.offset + slot.numel].zero_()
        shard.fired = bytearray(len(shard.layout.slots))
        shard.n_fired = 0
        handle = reduce_to_shard(staging, self.dp, async_op=True)
        self._pending.append((shard, staging, handle))
        limit = self.policy.max_pending_reductions if self.policy.overlap_comm else 0
        while len(self._pending) > limit:
            self._complete_one()

    def _complete_one(self) -> None:
        shard, staging, handle = self._pending.popleft()
        handle.wait()
        shard.grad.add_(shard.own(staging))

    def finish_backward(self) -> None:
        """End of ``engine.backward``: reduce what is partial, wait, free every gathered unit."""
        for unit in self.all_units():
            for shard in unit.shards:
                if shard.staging is not None:
                    self._launch(shard)
        while self._pending:
            self._complete_one()
        self._bwd_seen.clear()
        self._bwd_frozen = []
        for shard in self.shards():
            if shard.trainable:
                shard.note_backward()
        if self._depth == 0:
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
        from shardwise.comm.collectives import all_gather_shard

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
            if self._depth == 0 or unit.users == 0:
                self.release(unit)


def _grad_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors that require grad in a module's output (tensors, tuples, lists, dicts)."""
    found: list[torch.Tensor] = []
    stack = [output]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            if x.requires_grad:
                found.append(x)
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
    return found


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
                grad_dtype: torch.dtype, *, resident: bool) -> ShardedUnit:
    keys = [(group_of.get(id(p), -1) if p.requires_grad else -1, dtype if p.is_floating_point() else p.dtype,
             dp.device) for _, p in params]
    layouts = assign_buckets([p.numel() for _, p in params], keys, _NO_SPLIT, dp.size) if params else []
    shards, records = [], []
    for si, lay in enumerate(layouts):
        members = [params[s.param_index] for s in lay.slots]
        group, shard_dtype, device = lay.group_key
        shard = FlatShard(si, lay, [p for _, p in members], dp, dtype=shard_dtype, device=device,
                          trainable=group >= 0, resident=resident,
                          grad_dtype=torch.float32 if grad_dtype == torch.float32 else shard_dtype)
        shard.group = group
        shards.append(shard)
        for slot_index, (pname, p) in enumerate(members):
            records.append(ParamRecord(pname, si, slot_index, p.shape, tuple(regs[id(p)])))
    unit = ShardedUnit(index, name, module, shards, records, resident=resident)
    if not resident:
        for r, ph in zip(records, unit.placeholders):
            for mod, attr in r.registrations:
                mod._parameters[attr] = ph
    return unit


def apply_stage3(model: nn.Module, param_groups: Sequence[Sequence[nn.Parameter]], policy: Stage3Policy,
                 dp: GroupContext, dtype: torch.dtype = torch.float32,
                 grad_dtype: torch.dtype = torch.float32) -> Stage3Runtime:
    """Shard ``model``'s parameters into fetch units in place and install the stage-3 hooks.
    Floating-point parameters are kept in ``dtype``, their gradients in ``grad_dtype`` (fp32, or
    the parameter's own dtype). Parameters built under ``zero.Init`` are
    gathered one at a time while their unit's chunk is filled."""
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
                                 grad_dtype, resident=False))
    resident = _build_unit(len(units), "<persistent>", None, small, group_of, regs, dp, dtype, grad_dtype,
                           resident=True) if small else None
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
