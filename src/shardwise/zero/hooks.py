"""Stage-3 hooks: forward pre/post hooks per fetch unit, saved-tensor hooks, pre-backward hooks,
and the training state they move through. They decide *when* (with the prefetch policy); the
runtime (``zero/stage3.py``) gathers and frees.

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

[Note: DTensor parameters in the hooks]
With tensor parallelism ([Note: tensor-parallel parameters at stage 3] in sharded_params.py)
autograd records the DTensor ops, so what it saves are DTensors (``weight.t()`` of a DTensor
weight) whose *local* tensor is the view into a gathered buffer: they are packed as a
:class:`_Saved` that also keeps the layout, and unpacked as the same DTensor over a view of
the fresh buffer. Their gradients arrive as DTensors: the post-accumulate-grad hook hands the
gradient reduction the local block (redistributed first to the parameter's placements if
autograd produced others, e.g. ``Partial`` under sequence parallelism; every tp rank does it
at the same point of the same graph).
"""
from __future__ import annotations

import enum
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from shardwise.zero.prefetch import PrefetchPolicy
from shardwise.zero.sharded_params import DTensorLayout, ShardedUnit, ShardState, is_dtensor

if TYPE_CHECKING:
    from shardwise.zero.stage3 import Stage3Runtime


class TrainingState(enum.Enum):
    """Where the model is, as the hooks see it. ``FORWARD`` while a forward outside autograd's
    backward runs (nested module calls included); ``BACKWARD`` from the first unit backward
    enters until ``end_backward``; ``IDLE`` otherwise."""

    IDLE = "idle"
    FORWARD = "forward"
    BACKWARD = "backward"


def in_autograd_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class _Saved:
    """A saved tensor that was a view of a gathered buffer (see [Note: saved parameters]);
    ``layout``: it was a DTensor over that view ([Note: DTensor parameters in the hooks])."""

    __slots__ = ("unit", "shard", "size", "stride", "offset", "layout")

    def __init__(self, unit: ShardedUnit, shard: int, t: torch.Tensor, layout: DTensorLayout | None = None):
        self.unit, self.shard = unit, shard
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()
        self.layout = layout


class _LocalGrad:
    """What the gradient reduction reads a DTensor parameter's gradient from: its local block
    (``on_grad`` takes ``.grad`` and sets it to None)."""

    __slots__ = ("grad",)

    def __init__(self, grad: torch.Tensor):
        self.grad = grad


def _local_grad(full: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A DTensor gradient as the local block of the parameter's placements."""
    if is_dtensor(grad):
        if tuple(grad.placements) != tuple(full.placements):
            grad = grad.redistribute(full.device_mesh, full.placements)
        with torch.no_grad():
            grad = grad.to_local()
    return grad


class Stage3Hooks:
    """Installs and runs the hooks of one stage-3 model; asks ``prefetch`` what to gather ahead."""

    def __init__(self, runtime: "Stage3Runtime", prefetch: PrefetchPolicy,
                 externals: dict[int, list[ShardedUnit]]):
        self.rt = runtime
        self.prefetch = prefetch
        self.externals = externals  # using unit index -> the units it uses parameters of
        self.state = TrainingState.IDLE
        self._depth = 0  # nested forward calls of units
        self._bwd_seen: set[int] = set()
        self._bwd_frozen: list[ShardedUnit] = []  # see [Note: frozen units in backward]
        self._packed: dict[int, int] = {}  # unit index -> saved-tensor handles made for it
        self._packed_at: dict[int, int] = {}  # ... when its forward began
        self._saved_hooks: Any = None
        self.handles: list = []

    def install(self) -> None:
        rt = self.rt
        for unit in rt.units:
            if unit.module is None:
                continue
            self.handles.append(unit.module.register_forward_pre_hook(partial(self._pre_forward, unit)))
            self.handles.append(unit.module.register_forward_hook(partial(self._post_forward, unit),
                                                                  always_call=True))
        for unit in rt.all_units():
            for ri, (r, full) in enumerate(zip(unit.records, unit.full)):
                if unit.shards[r.shard].trainable:
                    hook = partial(self._dtensor_grad if r.dtensor is not None else rt.reduction.on_grad, unit, ri)
                    self.handles.append(full.register_post_accumulate_grad_hook(hook))

    def _dtensor_grad(self, unit: ShardedUnit, ri: int, full: torch.Tensor) -> None:
        """Post-accumulate-grad hook of a DTensor parameter ([Note: DTensor parameters in the hooks])."""
        g = full.grad
        if g is None:
            return
        full.grad = None
        self.rt.reduction.on_grad(unit, ri, _LocalGrad(_local_grad(full, g)))

    @property
    def in_forward(self) -> bool:
        return self.state is TrainingState.FORWARD

    # -- forward ----------------------------------------------------------------------------
    def _pre_forward(self, unit: ShardedUnit, module: nn.Module, args: Any) -> None:
        rt = self.rt
        if in_autograd_backward():  # re-entrant activation checkpointing recomputes in backward
            rt.ensure(unit)
            return
        if self._depth == 0:
            self._open_forward()
        self._depth += 1
        self._packed_at[unit.index] = self._packed.get(unit.index, 0)
        self.prefetch.track(unit, torch.is_grad_enabled())
        rt.ensure(unit)
        for shard in unit.shards:
            shard.sync_requires_grad()  # already gathered: a freeze set on a stale placeholder
        unit.users += 1
        for ext in self.externals.get(unit.index, ()):
            rt.ensure(ext)
            ext.users += 1
        self._gather_ahead(self.prefetch.forward_candidates())

    def _post_forward(self, unit: ShardedUnit, module: nn.Module, args: Any, output: Any) -> None:
        if in_autograd_backward():
            return
        rt = self.rt
        grad = torch.is_grad_enabled()
        if grad and self._packed.get(unit.index, 0) == self._packed_at.get(unit.index, 0):
            hook = partial(self._pre_backward, unit)  # see [Note: recompute outside the unit's hooks]
            for t in _grad_tensors(output):
                t.register_hook(hook)
        unit.users -= 1
        for ext in self.externals.get(unit.index, ()):
            ext.users -= 1
            rt.release(ext)
        if not self.prefetch.reused_soon(unit) and not self.prefetch.needed_first_in_backward(unit, grad):
            rt.release(unit)
        self._depth -= 1
        if self._depth == 0:
            self._close_forward()

    def _open_forward(self) -> None:
        self.state = TrainingState.FORWARD
        self.prefetch.open_forward()
        if torch.is_grad_enabled():
            self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._saved_hooks.__enter__()

    def _close_forward(self) -> None:
        if self._saved_hooks is not None:
            hooks, self._saved_hooks = self._saved_hooks, None
            hooks.__exit__(None, None, None)
        rt, grad = self.rt, torch.is_grad_enabled()
        for unit in rt.units:
            unit.users = 0
        for unit in rt.units:
            if not self.prefetch.needed_first_in_backward(unit, grad):
                rt.release(unit)
        self.prefetch.close_forward(grad)
        # a backward that began inside this forward (autograd.grad) is still open
        self.state = TrainingState.BACKWARD if self._bwd_seen else TrainingState.IDLE

    def _gather_ahead(self, upcoming) -> None:
        rt = self.rt
        for nxt in self.prefetch.select(upcoming, rt.live_numel, lambda u: u.state is ShardState.SHARDED):
            rt.gather(nxt)

    # -- saved tensors (see [Note: saved parameters]) ---------------------------------------
    def _pack(self, t: torch.Tensor) -> Any:
        layout, local = None, t
        if is_dtensor(t):  # [Note: DTensor parameters in the hooks]
            layout = DTensorLayout.of(t)
            with torch.no_grad():
                local = t.to_local()
        try:
            hit = self.rt.gathered_at(local)
        except (RuntimeError, NotImplementedError):  # tensors without storage (subclasses)
            return t
        if hit is None:
            return t
        self._packed[hit[0].index] = self._packed.get(hit[0].index, 0) + 1
        return _Saved(hit[0], hit[1], local, layout)

    def _unpack(self, x: Any) -> torch.Tensor:
        if type(x) is not _Saved:
            return x
        unit = x.unit
        if unit.state is not ShardState.GATHERED:
            self.rt.ensure(unit)
        self._enter_backward(unit)
        view = unit.flats[x.shard].as_strided(x.size, x.stride, x.offset)
        return x.layout.wrap(view) if x.layout is not None else view

    # -- backward ---------------------------------------------------------------------------
    def _pre_backward(self, unit: ShardedUnit, grad: torch.Tensor) -> None:
        """A gradient reached one of ``unit``'s outputs (see [Note: recompute outside the
        unit's hooks])."""
        self.rt.ensure(unit)
        for ext in self.externals.get(unit.index, ()):
            self.rt.ensure(ext)
        self._enter_backward(unit)

    def _enter_backward(self, unit: ShardedUnit) -> None:
        if unit.index in self._bwd_seen:
            return
        if self.state is not TrainingState.FORWARD:
            self.state = TrainingState.BACKWARD
        self._bwd_seen.add(unit.index)
        # [Note: frozen units in backward]
        keep = []
        for u in self._bwd_frozen:
            if u is unit or u.users > 0 or u in self.externals.get(unit.index, ()):
                keep.append(u)
            else:
                self.rt.release(u)
        self._bwd_frozen = keep
        if unit.index != 0 and not unit.trainable_now():
            self._bwd_frozen.append(unit)
        self._gather_ahead(self.prefetch.backward_candidates(unit))

    def end_backward(self) -> None:
        """``engine.backward`` finished (its reductions are complete)."""
        self._bwd_seen.clear()
        self._bwd_frozen = []
        if self.state is TrainingState.BACKWARD:
            self.state = TrainingState.IDLE


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


__all__ = ["TrainingState", "Stage3Hooks"]
