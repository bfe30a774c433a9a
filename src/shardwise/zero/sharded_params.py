"""ZeRO stage 3 state: flat shards of parameters, the placeholders a module shows while its
parameters are sharded, and the full parameters it computes with while they are gathered.

[Note: three objects per parameter]
For every parameter of a stage-3 model shardwise keeps:

- a *slot* in one :class:`FlatShard`: the parameters of one fetch unit (and one optimizer
  param group / dtype) are laid out in one flat buffer, padded so that each rank owns an equal
  chunk; a rank stores only its chunk (``shard``, compute dtype) and the optimizer sees only
  ``opt_param`` (the chunk itself for fp32, an fp32 master copy for bf16/fp16);
- a :class:`ShardedParameter` placeholder: what the module holds while the unit is sharded.
  It has the parameter's full logical shape, dtype and ``requires_grad``, so code that
  inspects shapes keeps working, but reading or writing its values raises
  :class:`ShardedParameterError` pointing to ``shardwise.zero.GatheredParameters`` (it is
  never a silently empty tensor);
- a *full* ``nn.Parameter`` (``ShardedUnit.full``): what the module holds while the unit is
  gathered. Its ``.data`` is a view into the gathered flat buffer; when the unit is freed it
  becomes a one-element tensor expanded to the full shape (no memory, right shape, so that
  autograd can still accumulate a late gradient into it). Autograd's graph refers to these
  objects, never to the placeholders or the gathered buffer (see [Note: saved parameters] in
  hooks.py).

A unit is :attr:`ShardState.SHARDED`, ``GATHERING`` (all-gather in flight) or ``GATHERED``;
transitions are checked.

[Note: tensor-parallel parameters at stage 3]
A parameter that tensor parallelism made a DTensor (``parallelize_module``: ``Shard(0)`` for a
colwise weight, ``Shard(1)`` rowwise, ``Replicate()`` a rowwise bias) is sharded over dp *as
its local tp block*: its slot holds ``to_local()`` (this rank's tp shard), the flat shard is
split and all-gathered over ``ctx.dp`` only, so a rank stores 1/(dp*tp) of it. Its record keeps
the DTensor layout (:class:`DTensorLayout`: mesh, placements, global shape and stride); the
placeholder has the global shape and the DTensor's ``device_mesh`` and ``placements``
attributes (metadata: what a checkpoint needs to place its block; it is not a DTensor); the full parameter is an ``nn.Parameter`` DTensor with the
same layout whose local tensor is, while gathered, a view into the gathered flat buffer (and
the one-element expanded tensor while freed). The module thus computes with the DTensors
``parallelize_module`` left, and autograd accumulates DTensor gradients into the same full
parameter objects as for plain parameters. Swapping the local tensor of that persistent
object goes through ``_local_tensor``: ``to_local()`` of a Parameter returns a fresh view
(torch gh-166156) and ``from_local`` per gather would give autograd a new parameter object
each time (the graph of a forward accumulates into the object it saw), so
:func:`show_local` is the one place that reaches into the DTensor.
"""
from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from shardwise.comm.buckets import BucketLayout
from shardwise.comm.collectives import DONE, Handle, all_gather_shard
from shardwise.comm.context import GroupContext
from shardwise.errors import UsageError

def is_dtensor(t: object) -> bool:
    # no DTensor can exist before torch.distributed.tensor is imported (importing it costs ~1 s,
    # paid only by tensor-parallel runs)
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


@dataclass(frozen=True)
class DTensorLayout:
    """How a tensor-parallel parameter is laid out over the mesh (see [Note: tensor-parallel
    parameters at stage 3]): enough to wrap a local block back into the same DTensor."""

    mesh: object  # torch DeviceMesh (the tp mesh parallelize_module used)
    placements: tuple
    shape: torch.Size  # global
    stride: tuple[int, ...]  # global

    @staticmethod
    def of(t: torch.Tensor) -> "DTensorLayout | None":
        if not is_dtensor(t):
            return None
        return DTensorLayout(t.device_mesh, tuple(t.placements), t.shape, tuple(t.stride()))

    def wrap(self, local: torch.Tensor) -> torch.Tensor:
        """``local`` as a DTensor of this layout (no copy, no communication, no autograd edge)."""
        from torch.distributed.tensor import DTensor

        with torch.no_grad():
            return DTensor.from_local(local, self.mesh, self.placements, run_check=False,
                                      shape=self.shape, stride=self.stride)


def local_value(p: torch.Tensor) -> torch.Tensor:
    """What a parameter contributes to a flat shard: its values, or its local tp block."""
    with torch.no_grad():
        return p.to_local().detach() if is_dtensor(p) else p.detach()


def show_local(full: nn.Parameter, local: torch.Tensor) -> None:
    """Point a full parameter at ``local``: its ``.data`` for a plain parameter, its local tp
    block for a DTensor one (see [Note: tensor-parallel parameters at stage 3])."""
    if is_dtensor(full):
        full._local_tensor.data = local  # the persistent object's block; to_local() is a fresh view
    else:
        full.data = local


class ShardedParameterError(UsageError):
    """The values of a stage-3 parameter were used while it is sharded."""


class ShardState(enum.Enum):
    SHARDED = "sharded"
    GATHERING = "gathering"
    GATHERED = "gathered"


class ShardedParameter(torch.Tensor):
    """Stands in a module for a sharded stage-3 parameter: full shape, no values.

    Only metadata works (``shape``, ``dtype``, ``device``, ``numel()``, ``requires_grad``,
    ``detach()``); any operation that would read or write values raises
    :class:`ShardedParameterError`.
    """

    sw_name: str

    @staticmethod
    def __new__(cls, name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device,
                requires_grad: bool):
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device,
                                                requires_grad=requires_grad)
        t.sw_name = name
        t._is_param = True  # isinstance(t, nn.Parameter), as nn.Parameter does for subclasses
        return t

    def __repr__(self, *, tensor_contents=None) -> str:  # noqa: D105 - torch's signature
        return (f"ShardedParameter({self.sw_name!r}, shape={tuple(self.shape)}, dtype={self.dtype}: "
                "sharded by ZeRO stage 3; read it inside shardwise.zero.GatheredParameters)")

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default or func is torch.ops.aten.alias.default:
            src = args[0]
            return ShardedParameter(src.sw_name, src.shape, src.dtype, src.device, False)
        name = next((a.sw_name for a in _flat(args, kwargs) if isinstance(a, ShardedParameter)), "?")
        raise ShardedParameterError(
            f"parameter {name!r} is sharded by ZeRO stage 3 ({func.__name__} needs its values). "
            "Outside the model's forward, read it inside `with shardwise.zero.GatheredParameters("
            "params):` (add modifier_rank=0 to change it); inside forward, a module that uses a "
            "parameter of another fetch unit must declare it with "
            "shardwise.zero.register_external_parameter(module, param).")


def _flat(args, kwargs):
    for a in list(args) + list((kwargs or {}).values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


_EMPTY: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def not_gathered(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A one-element zero tensor expanded to ``shape``: what a full parameter holds while freed."""
    key = (dtype, device)
    if key not in _EMPTY:
        _EMPTY[key] = torch.zeros(1, dtype=dtype, device=device)
    return _EMPTY[key].expand(shape) if len(shape) else _EMPTY[key].view(())


@dataclass(frozen=True)
class ParamRecord:
    """One parameter of a unit: its name, where it lives, and where the module registers it."""

    name: str
    shard: int  # index into ShardedUnit.shards
    slot: int  # index into that shard's layout.slots / params
    shape: torch.Size  # of what the slot holds: the parameter, or its local tp block
    registrations: tuple[tuple[nn.Module, str], ...]  # (module, attribute) pairs (tied weights: several)
    dtensor: DTensorLayout | None = None  # a tensor-parallel parameter's layout

    @property
    def global_shape(self) -> torch.Size:
        """The parameter's logical shape (what the module and the placeholder show)."""
        return self.dtensor.shape if self.dtensor is not None else self.shape


class FlatShard:
    """The parameters of one unit and one (param group, dtype), sharded in one flat buffer.

    An :class:`~shardwise.zero.sharded_optimizer.OptimizerChunk` like
    :class:`~shardwise.zero.flat_bucket.FlatBucket` (``layout``, ``params``, ``lo``, ``hi``,
    ``opt_param``, step masks), so that ``ShardedStep`` and the checkpoint read both alike.
    """

    def __init__(self, index: int, layout: BucketLayout, values: Sequence[torch.Tensor | None], dp: GroupContext,
                 *, dtype: torch.dtype, device: torch.device, trainable: bool, resident: bool,
                 master_dtype: torch.dtype = torch.float32, grad_dtype: torch.dtype = torch.float32):
        self.index = index
        self.layout = layout
        self.dp = dp  # the data-parallel group the shard is split over
        self.dtype = dtype
        self.trainable = trainable
        self.resident = resident
        self.lo, self.hi = layout.chunk_range(dp.rank, dp.size)
        self.params: list[torch.Tensor] = []  # what the module registers (placeholders / full); set by the unit
        # (a zero.Init parameter is gathered by `reshape` here, one parameter at a time)
        full = torch.zeros(layout.padded_numel, dtype=dtype, device=device)
        with torch.no_grad():
            for slot, v in zip(layout.slots, values):
                full[slot.offset:slot.offset + slot.numel].copy_(v.detach().reshape(-1))
        chunk = full[self.lo:self.hi]
        if resident:  # kept whole on every rank (parameters below the persistence threshold)
            self.full_flat: torch.Tensor | None = full
            self.shard = full[self.lo:self.hi]
        else:
            self.full_flat = None
            self.shard = chunk.clone() if dp.size > 1 else chunk
        self.mixed = dtype != master_dtype
        if trainable:
            master = self.shard.detach().to(master_dtype).clone() if self.mixed else self.shard
            self.opt_param = nn.Parameter(master, requires_grad=True)
            # attached to opt_param (or upcast) by ShardedStep at each step ([Note: 16-bit gradients])
            self.grad = torch.zeros(self.hi - self.lo, dtype=grad_dtype, device=device)
        else:
            self.opt_param = None
            self.grad = None
        # gradient staging for the current backward (see zero/reduction.py); allocated uninitialised,
        # so the elements no parameter covers (alignment, padding) are zeroed at launch
        self.gaps: list[tuple[int, int]] = []
        end = 0
        for slot in layout.slots:
            if slot.offset > end:
                self.gaps.append((end, slot.offset))
            end = slot.offset + slot.numel
        if layout.padded_numel > end:
            self.gaps.append((end, layout.padded_numel))
        self.staging: torch.Tensor | None = None
        self.fired = bytearray(len(layout.slots))
        self.n_fired = 0
        self.expected = len(layout.slots)  # slots that get a gradient in this backward
        # [Note: freezing after initialize] (sharded_optimizer.py): per slot, the requires_grad
        # both of the parameter's objects agree on, and whether it was set at a backward of this step
        n = len(layout.slots)
        self.full_params: list[nn.Parameter] = []  # set by the unit
        self.placeholders: list[torch.Tensor] = []
        self.requires_grad = bytearray([1 if trainable else 0]) * n
        self.active = bytearray(n)
        self.backwards = 0  # backwards noted since the last step (0: every slot counts as active)

    holds_full = False  # a rank holds only [lo, hi) of the flat buffer (checkpoint loading reads that)
    # offload_param: the ParamTier that holds ``shard`` between gathers (``shard`` is then a
    # 0-element placeholder; [Note: offloaded parameter shards] in offload/params.py)
    param_tier = None

    # -- freezing ([Note: freezing after initialize] in sharded_optimizer.py) ----------------
    def sync_requires_grad(self) -> bytearray:
        """Per slot, the ``requires_grad`` the user set last on either of the parameter's
        objects (placeholder or full parameter); both are made to agree. Non-trainable shards
        (frozen at initialize: no optimizer state) stay frozen whatever is set."""
        if not self.trainable:
            return self.requires_grad
        agreed = self.requires_grad
        for i, (ph, full) in enumerate(zip(self.placeholders, self.full_params)):
            a, b = ph.requires_grad, full.requires_grad
            new = a if a != agreed[i] else b
            agreed[i] = new
            if a != new:
                ph.requires_grad_(new)
            if b != new:
                full.requires_grad_(new)
        return agreed

    def note_backward(self) -> None:
        """A backward ended: slots whose parameter requires grad now take part in the next step."""
        flags = self.sync_requires_grad()
        for i, f in enumerate(flags):
            if f:
                self.active[i] = 1
        self.backwards += 1

    def step_mask(self) -> bytearray | None:
        """Which slots the next optimizer step updates; None: all of them."""
        return self.active if self.backwards else None

    def reset_step_mask(self) -> None:
        self.active = bytearray(len(self.active))
        self.backwards = 0

    def param_names(self) -> list[str]:
        return [getattr(p, "sw_name", "?") for p in self.placeholders]

    @property
    def numel(self) -> int:
        return self.hi - self.lo

    def slot_view(self, flat: torch.Tensor, slot_index: int, shape: torch.Size) -> torch.Tensor:
        slot = self.layout.slots[slot_index]
        return flat[slot.offset:slot.offset + slot.numel].view(shape)

    def own(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.lo:self.hi]

    def gather_async(self) -> tuple[torch.Tensor, Handle]:
        """A full flat buffer of this shard's parameters and the handle that fills it."""
        if self.param_tier is not None:
            return self.param_tier.gather_async(self)
        if self.full_flat is not None:
            return self.full_flat, DONE
        if self.dp.size == 1:
            return self.shard, DONE
        flat = torch.empty(self.layout.padded_numel, dtype=self.dtype, device=self.shard.device)
        flat[self.lo:self.hi].copy_(self.shard)
        return flat, all_gather_shard(flat, self.dp, async_op=True)

    @torch.no_grad()
    def copy_master_to_params(self) -> None:
        """After an optimizer step with a separate fp32 master: write back in compute dtype."""
        if self.mixed and self.opt_param is not None:
            if self.param_tier is not None:
                self.param_tier.store(self, self.opt_param.detach())
            else:
                self.shard.copy_(self.opt_param.detach())

    @torch.no_grad()
    def load_values(self, values: torch.Tensor) -> None:
        """This rank's chunk, new values (a checkpoint load)."""
        if self.param_tier is not None:
            self.param_tier.store(self, values)
        else:
            self.shard.copy_(values)

    @torch.no_grad()
    def set_from_full(self, flat: torch.Tensor) -> None:
        """Take this rank's chunk (and master) from a full flat buffer (after a modification)."""
        if self.param_tier is not None:
            if self.opt_param is not None and self.opt_param.numel() != self.hi - self.lo:
                raise UsageError("changing a stage-3 parameter inside GatheredParameters(modifier_rank=...) "
                                 "while its optimizer master is offloaded to disk is not supported yet; change "
                                 "it before shardwise.initialize, or load a checkpoint")
            self.param_tier.store(self, flat[self.lo:self.hi])
            if self.mixed and self.opt_param is not None:
                self.opt_param.detach().copy_(flat[self.lo:self.hi])
            return
        if self.full_flat is not None and flat is not self.full_flat:
            self.full_flat.copy_(flat)
        elif self.full_flat is None and flat is not self.shard:
            self.shard.copy_(flat[self.lo:self.hi])
        if self.mixed and self.opt_param is not None:
            self.opt_param.detach().copy_(self.shard)


class ShardedUnit:
    """One fetch unit: its flat shards, its parameters' placeholders and full parameters, and
    whether it is gathered. Holds no policy: the runtime in ``stage3.py`` decides when."""

    def __init__(self, index: int, name: str, module: nn.Module | None, shards: list[FlatShard],
                 records: list[ParamRecord], *, resident: bool = False):
        self.index = index
        self.name = name
        self.module = module
        self.shards = shards
        self.records = records
        self.resident = resident
        self.numel = sum(s.layout.padded_numel for s in shards)
        self.state = ShardState.SHARDED
        self.users = 0  # forward calls in progress
        self._flats: list[torch.Tensor] | None = None
        self._handles: list[Handle] = []
        self.full: list[nn.Parameter] = []
        self.placeholders: list[ShardedParameter] = []
        for r in records:
            s = shards[r.shard]
            requires_grad = s.trainable
            ph = ShardedParameter(r.name, r.global_shape, s.dtype, s.shard.device, requires_grad)
            if r.dtensor is not None:  # a tp parameter's layout stays readable while it is sharded
                ph.device_mesh, ph.placements = r.dtensor.mesh, r.dtensor.placements
            self.placeholders.append(ph)
            empty = not_gathered(r.shape, s.dtype, s.shard.device)
            full = nn.Parameter(r.dtensor.wrap(empty) if r.dtensor is not None else empty,
                                requires_grad=requires_grad)
            self.full.append(full)
        for r, ph, full in zip(records, self.placeholders, self.full):
            s = shards[r.shard]
            for lst in (s.params, s.placeholders, s.full_params):
                while len(lst) <= r.slot:
                    lst.append(None)  # type: ignore[arg-type]
            s.params[r.slot] = full if resident else ph
            s.placeholders[r.slot] = ph
            s.full_params[r.slot] = full
        if resident:
            self.gather_async()
            self.wait()

    # -- state transitions ------------------------------------------------------------------
    def gather_async(self) -> None:
        if self.state is not ShardState.SHARDED:
            raise RuntimeError(f"fetch unit {self.name!r}: gather while {self.state.value}")
        pairs = [s.gather_async() for s in self.shards]
        self._flats = [f for f, _ in pairs]
        self._handles = [h for _, h in pairs]
        self.state = ShardState.GATHERING

    def wait(self) -> None:
        """Finish the gather and show the full parameters to the module."""
        if self.state is ShardState.GATHERED:
            return
        if self.state is not ShardState.GATHERING:
            raise RuntimeError(f"fetch unit {self.name!r}: wait while {self.state.value}")
        for h in self._handles:
            h.wait()
        self._handles = []
        for s in self.shards:
            s.sync_requires_grad()  # a freeze set on the placeholders reaches the full parameters
        for r, full in zip(self.records, self.full):
            show_local(full, self.shards[r.shard].slot_view(self._flats[r.shard], r.slot, r.shape))
            for module, attr in r.registrations:
                module._parameters[attr] = full
        self.state = ShardState.GATHERED

    def trainable_now(self) -> bool:
        """Some parameter of this unit is trainable and currently requires grad."""
        return any(s.trainable and any(s.sync_requires_grad()) for s in self.shards)

    def free(self) -> None:
        """Drop the gathered buffers; the module shows placeholders again."""
        if self.resident or self.state is ShardState.SHARDED:
            return
        self.wait()
        for s in self.shards:
            s.sync_requires_grad()  # and one set on the full parameters reaches the placeholders
        for r, full, ph in zip(self.records, self.full, self.placeholders):
            show_local(full, not_gathered(r.shape, full.dtype, full.device))
            for module, attr in r.registrations:
                module._parameters[attr] = ph
        self._flats = None
        self.state = ShardState.SHARDED

    @property
    def flats(self) -> list[torch.Tensor]:
        if self.state is not ShardState.GATHERED or self._flats is None:
            raise RuntimeError(f"fetch unit {self.name!r} is {self.state.value}, not gathered")
        return self._flats

    def gathered_bytes(self) -> int:
        if self.resident or self._flats is None:
            return 0
        return sum(f.numel() * f.element_size() for f in self._flats)


__all__ = ["ShardState", "ShardedParameter", "ShardedParameterError", "FlatShard", "ShardedUnit",
           "ParamRecord", "DTensorLayout", "not_gathered", "local_value", "show_local", "is_dtensor"]
