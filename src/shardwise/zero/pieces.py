"""What a strategy holds, as pieces of the model's tensors: the seam between the strategies and
the checkpoint code.

[Note: state pieces]
A checkpoint is about the tensors of ``model.state_dict()`` (tied names counted once), not
about buckets or shards. A strategy describes its state as :class:`StatePiece` objects: for
one tensor (``name``) and one *kind* (``"param"``: the weights, fp32 masters for bf16/fp16;
or an optimizer-state key such as ``"exp_avg"``), a *region* of the global tensor that this
rank holds and writes: an n-d block (``offsets`` and ``block`` shape within the global shape:
the tensor-parallel local shard of a DTensor parameter, else the whole tensor) and the
elements ``[start, stop)`` of that block's row-major flattening (the ZeRO chunk of the flat
buffer holding the local shard; [Note: n-d pieces] in checkpoint/nd.py); with the tensor's
global shape, its dtype in the module, its optimizer param group (None: a frozen parameter or
a buffer) and its optimizer scalars (``step``). ``strategy.state_pieces(module)`` lists them,
each element of each tensor on exactly one rank of the whole mesh; ``strategy.scalar_state()``
is the loss scaler's state.

Loading, ``strategy.load_pieces(module, source, ...)`` asks a :class:`PieceSource` (the
checkpoint's reader) for just the ranges its own layout needs, checks that the saved tensors
fit, assembles the new state in fresh buffers and returns the function that writes them into
its storage (the checkpoint's phase 2, [Note: load in two phases]). Nothing in ``checkpoint/``
reads buckets, shards, the loss scaler or ``optimizer.state``.

Both strategy families keep trainable parameters in flat buffers (:class:`FlatBucket` at
stages 0-2, :class:`~shardwise.zero.sharded_params.FlatShard` at stage 3) and step one
``opt_param`` per buffer, this rank's range ``[lo, hi)`` of it (the whole bucket at stage 0).
Saving, rank r writes the part of every parameter that falls in *its chunk*
``chunk_range(r, world)`` (at stage 0 every rank holds everything, so the writes are spread
the same way), read from ``opt_param`` and from its optimizer state; frozen parameters and
buffers are written whole (their local block under tp) by dp rank 0 (frozen stage-3
parameters are gathered around it, :func:`whole_others`). Loading, stages 0-2 need every
parameter whole in ``param_flat`` and the optimizer state of their own ``[lo, hi)``; stage 3
reads only its own ``[lo, hi)`` of both (:func:`load_flat_pieces` with ``whole=False``).

[Note: pieces on a mesh]
Under tensor and pipeline parallelism a rank writes only what it uniquely holds
(:func:`tensor_block`): a DTensor's local block once per distinct block (the rank whose
coordinate is 0 on every non-"dp" mesh dimension where the DTensor is ``Replicate``); a
plain tensor, which tp replicates, on tp rank 0 only; a tied copy of a weight that another
pipeline stage owns (``module.tied_duplicates()``) not at all: ``PipelineModule`` names it
``tied_modules.<key>...`` on every stage, so the owner's piece has the same name (a module
that names its copies otherwise says whose they are with ``tied_aliases()``, and the
manifest records them as aliases; :func:`tied_aliases`). A pipeline stage's module holds only its stage's names;
its pieces are those names'. The ZeRO chunking over dp is unchanged: it ranges over the flat
buffer of local shards, so each chunk is a range within a block. Loading reads, for each
parameter, its own block (whole at stages 0-2, the rank's range of it at stage 3) from
whatever tiling the checkpoint has; a source with ``partial = True`` (a pipeline stage) may
hold names the module lacks.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch
import torch.nn as nn

from shardwise.errors import CheckpointError

PARAM = "param"  # the kind of a tensor's values (weights or fp32 master weights)


def piece_key(name: str, kind: str) -> str:
    """The key a piece is stored under: ``param:<name>``, ``optim.<kind>:<name>``."""
    return f"param:{name}" if kind == PARAM else f"optim.{kind}:{name}"


@dataclass(frozen=True)
class StatePiece:
    """One range of one kind of one tensor, as one rank holds it (see [Note: state pieces])."""

    name: str  # canonical name in model.state_dict()
    kind: str  # PARAM, or the optimizer state's key ("exp_avg", "momentum_buffer", ...)
    key: str  # piece_key(name, kind)
    global_shape: tuple[int, ...]
    elements: tuple[int, int]  # [start, stop) of the flattened block (the whole tensor by default)
    tensor: torch.Tensor  # the stop - start values, 1-D (a view where the strategy can give one)
    model_dtype: torch.dtype  # the tensor's dtype in the module (compute dtype for parameters)
    group: int | None  # optimizer param group; None: frozen parameter or buffer
    scalars: Mapping[str, dict] = field(default_factory=dict)  # the tensor's optimizer scalars (JSON specs)
    offsets: tuple[int, ...] | None = None  # the block's offsets in the global tensor (None: all 0)
    block: tuple[int, ...] | None = None  # the block's shape (None: the global shape, the whole tensor)

    @property
    def trainable(self) -> bool:
        return self.group is not None

    @property
    def block_offsets(self) -> tuple[int, ...]:
        return tuple(self.offsets) if self.offsets is not None else (0,) * len(self.global_shape)

    @property
    def block_shape(self) -> tuple[int, ...]:
        return tuple(self.block) if self.block is not None else tuple(self.global_shape)


class PieceSource(Protocol):
    """Where ``load_pieces`` reads from (the checkpoint's ``PieceReader``)."""

    layout: str  # "saved at world size 2, ZeRO stage 1, float32": for messages

    @property
    def tensors(self) -> Mapping[str, Mapping[str, Any]]:
        """Per saved tensor: ``shape``, ``trainable``, ``group``, ``optimizer_state`` (kinds),
        ``optimizer_scalars`` (JSON specs as :func:`split_state` makes them)."""

    def read(self, name: str, kind: str, start: int, stop: int,
             block: tuple[tuple[int, ...], tuple[int, ...]] | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened ``kind`` of tensor ``name`` (of the
        flattening of ``block`` = ``(offsets, shape)`` within it when given), verified; a
        name may be an alias of a saved tensor (a tied copy)."""

    # optional: ``aliases`` ({name: saved name}) and ``partial`` (True: the module is one
    # pipeline stage, the checkpoint may hold names it lacks)


def source_entry(source: PieceSource, name: str) -> Mapping[str, Any] | None:
    """The saved entry of ``name`` (following an alias), or None."""
    saved = source.tensors
    if name in saved:
        return saved[name]
    target = (getattr(source, "aliases", None) or {}).get(name)
    return saved.get(target) if target is not None else None


# -- tensors on a mesh ([Note: pieces on a mesh]) ------------------------------------------------


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (``t`` itself otherwise)."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t


def is_dtensor(t) -> bool:
    return getattr(t, "placements", None) is not None and getattr(t, "device_mesh", None) is not None


def tensor_block(t: torch.Tensor, tp_rank: int = 0) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], bool]:
    """``(global shape, offsets, local shape, unique)`` of ``t`` on this rank: a DTensor's local
    block (Shard(d) placements, uneven splits included) and whether this rank is the one that
    writes it (coordinate 0 on every non-"dp" mesh dimension where ``t`` is replicated); a plain
    tensor is its whole self, written by tp rank 0 (``tp_rank``)."""
    shape = tuple(int(d) for d in t.shape)
    if not is_dtensor(t):
        return shape, (0,) * len(shape), shape, tp_rank == 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = t.device_mesh, tuple(t.placements)
    if any(getattr(pl, "is_partial", lambda: False)() for pl in placements):
        raise CheckpointError(f"a DTensor of shape {list(shape)} has a Partial placement {placements}: its values "
                              "are not reduced, checkpoints store Shard / Replicate tensors only")
    local, offsets = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    coord = mesh.get_coordinate() or [0] * mesh.ndim
    names = mesh.mesh_dim_names or (None,) * mesh.ndim
    unique = all(c == 0 for c, pl, n in zip(coord, placements, names) if not pl.is_shard() and n != "dp")
    return shape, tuple(int(o) for o in offsets), tuple(int(d) for d in local), unique


def mesh_rank(ctx, dim: str) -> int:
    """This rank's coordinate on mesh dimension ``dim`` (0 when the mesh lacks it)."""
    g = (getattr(ctx, "dims", None) or {}).get(dim)
    return g.rank if g is not None else 0


def mesh_size(ctx, dim: str) -> int:
    g = (getattr(ctx, "dims", None) or {}).get(dim)
    return g.size if g is not None else 1


def duplicate_ids(module: nn.Module) -> set[int]:
    """Ids of the tied copies this pipeline stage holds of weights another stage owns."""
    tied = getattr(module, "tied_duplicates", None)
    return {id(p) for p in tied()} if callable(tied) else set()


def tied_aliases(module: nn.Module) -> dict[str, str | None]:
    """``{name: owner's name or None}`` for the tied copies this stage does not write: the
    owner's name from ``module.tied_aliases()`` when the module gives it, else None (the owning
    stage saves it under the same name)."""
    dups = duplicate_ids(module)
    if not dups:
        return {}
    given = getattr(module, "tied_aliases", None)
    given = dict(given()) if callable(given) else {}
    canonical, _ = state_names(module)
    return {n: given.get(n) for n, t in canonical.items() if id(t) in dups}


# -- the module's tensors ----------------------------------------------------------------------


def state_names(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``model.state_dict()`` as ``{canonical name: tensor}`` plus ``{alias: canonical}`` for
    tensors reachable under two names (tied weights)."""
    canonical: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
            canonical[name] = t
    return canonical, aliases


@dataclass(frozen=True)
class Region:
    """One trainable parameter's place in a flat buffer (bucket or shard) on this rank."""

    name: str
    bucket: Any  # FlatBucket (stages 0-2) or FlatShard (stage 3)
    slot_index: int
    offset: int  # in the buffer's flat layout
    numel: int  # of the local block (the whole tensor unless tensor parallel)
    shape: tuple[int, ...]  # the global shape
    group: int  # optimizer param group
    offsets: tuple[int, ...] = ()  # the local block in the global tensor ([Note: pieces on a mesh])
    local_shape: tuple[int, ...] = ()

    @property
    def block(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """``(offsets, local shape)``, or None for the whole tensor."""
        if self.local_shape == self.shape and not any(self.offsets):
            return None
        return self.offsets, self.local_shape

    def clip(self, lo: int, hi: int) -> tuple[int, int]:
        """The element range ``[a, b)`` of this parameter inside buffer range ``[lo, hi)``."""
        a = max(lo, self.offset) - self.offset
        b = min(hi, self.offset + self.numel) - self.offset
        return (a, b) if a < b else (0, 0)

    def opt_slice(self, tensor: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Elements ``[a, b)`` of this parameter in a tensor shaped like ``opt_param``."""
        start = self.offset + a - self.bucket.lo
        return tensor[start:start + (b - a)]


def regions(module: nn.Module, buckets: list) -> list[Region]:
    canonical, _ = state_names(module)
    by_id = {id(t): n for n, t in canonical.items()}
    out = []
    for bucket in buckets:
        group = bucket.layout.group_key[0]
        for i, (slot, p) in enumerate(zip(bucket.layout.slots, bucket.params)):
            name = by_id.get(id(p))
            if name is None:
                raise CheckpointError(
                    f"a trainable parameter of shape {tuple(p.shape)} is not in model.state_dict(); "
                    "checkpoints cover the engine's module only")
            gshape, offsets, local, _ = tensor_block(p)
            n = 1
            for d in local:
                n *= d
            if n != slot.numel:
                raise CheckpointError(f"parameter {name!r}: its bucket slot holds {slot.numel} elements, its local "
                                      f"block {list(local)} (global shape {list(gshape)}) has {n}")
            out.append(Region(name, bucket, i, slot.offset, slot.numel, gshape, group, offsets, local))
    return out


@contextmanager
def whole_others(module: nn.Module, trainable: set[str], modifier_rank: int | None = None):
    """Frozen parameters that ZeRO stage 3 shards, gathered for the duration (every rank must
    enter; a no-op at stages 0-2). Inside, :func:`other_tensors` sees whole tensors."""
    from shardwise.zero.gathered import GatheredParameters
    from shardwise.zero.sharded_params import ShardedParameter

    canonical, _ = state_names(module)
    sharded = [t for n, t in canonical.items() if n not in trainable and isinstance(t, ShardedParameter)]
    if not sharded:
        yield
        return
    with GatheredParameters(sharded, modifier_rank=modifier_rank):
        yield


def other_tensors(module: nn.Module, trainable: set[str]) -> dict[str, torch.Tensor]:
    """Frozen parameters and persistent buffers (saved whole by rank 0)."""
    canonical, _ = state_names(module)
    return {n: t for n, t in canonical.items() if n not in trainable}


# -- optimizer state -----------------------------------------------------------------------------


def split_state(optimizer: torch.optim.Optimizer, bucket) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer state of ``bucket.opt_param``: per-element tensors and scalars."""
    elementwise: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    n = bucket.numel
    for key, value in optimizer.state.get(bucket.opt_param, {}).items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.numel() == n:
            elementwise[key] = value.detach().reshape(-1)
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            scalars[key] = {"tensor": True, "dtype": str(value.dtype).removeprefix("torch."),
                            "shape": list(value.shape), "value": value.item()}
        elif isinstance(value, (bool, int, float)) and not (isinstance(value, float) and not math.isfinite(value)):
            scalars[key] = {"tensor": False, "value": value}
        else:
            what = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(
                f"optimizer state {key!r} of {type(optimizer).__name__} is {what}; shardwise checkpoints "
                f"optimizer state that has one value per parameter element (shape ({n},)) or is a scalar")
    return elementwise, scalars


def scalar_value(spec: Mapping[str, Any], device: torch.device) -> Any:
    if not spec["tensor"]:
        return spec["value"]
    dtype = getattr(torch, spec["dtype"])
    return torch.tensor(spec["value"], dtype=dtype, device=device).reshape(spec["shape"])


# -- saving: the pieces of both strategy families ------------------------------------------------


def flat_state_pieces(strategy, module: nn.Module) -> list[StatePiece]:
    """The pieces a flat-buffer strategy (stages 0-3) writes on this rank: its chunk
    ``chunk_range(rank, world)`` of every trainable parameter's local block (values from
    ``opt_param``, and each per-element optimizer state), plus every frozen parameter and
    buffer (its local block) on dp rank 0; on a mesh only what this rank uniquely holds
    ([Note: pieces on a mesh]). Every rank must call it (frozen stage-3 parameters are gathered)."""
    ctx = strategy.ctx
    dp = ctx.dp
    rank, world = dp.rank, dp.size
    tp_rank = mesh_rank(ctx, "tp")
    buckets, optimizer = strategy.buckets, strategy.optimizer
    regs = regions(module, buckets)
    dups = duplicate_ids(module)
    split = {b.index: split_state(optimizer, b) for b in buckets}
    out: list[StatePiece] = []
    for reg in regs:
        p = reg.bucket.params[reg.slot_index]
        if id(p) in dups or not tensor_block(p, tp_rank)[3]:
            continue  # a tied copy another stage writes; a block another tp rank writes
        elementwise, scalars = split[reg.bucket.index]
        lo, hi = reg.bucket.layout.chunk_range(rank, world)
        a, b = reg.clip(lo, hi)
        if a == b and not (reg.numel == 0 and rank == 0):  # an empty tensor: described once, by rank 0
            continue
        block = reg.block
        common = dict(name=reg.name, global_shape=reg.shape, elements=(a, b),
                      model_dtype=p.dtype, group=reg.group, scalars=scalars,
                      offsets=block[0] if block else None, block=block[1] if block else None)
        out.append(StatePiece(kind=PARAM, key=piece_key(reg.name, PARAM),
                              tensor=reg.opt_slice(reg.bucket.opt_param.detach(), a, b), **common))
        for kind, t in elementwise.items():
            out.append(StatePiece(kind=kind, key=piece_key(reg.name, kind), tensor=reg.opt_slice(t, a, b), **common))
    trainable = {r.name for r in regs}
    with whole_others(module, trainable):
        if rank == 0:
            for name, t in other_tensors(module, trainable).items():
                if id(t) in dups:
                    continue
                gshape, offsets, local, unique = tensor_block(t, tp_rank)
                if not unique:
                    continue
                whole = local == gshape
                values = local_tensor(t).detach().reshape(-1).clone()
                out.append(StatePiece(name=name, kind=PARAM, key=piece_key(name, PARAM), global_shape=gshape,
                                      elements=(0, values.numel()), tensor=values, model_dtype=t.dtype, group=None,
                                      offsets=None if whole else offsets, block=None if whole else local))
    return out


# -- loading ---------------------------------------------------------------------------------------


def _check_fit(strategy, source: PieceSource, regs: list[Region], others: dict[str, torch.Tensor],
               with_optimizer: bool) -> None:
    """The saved tensors are the module's (names, shapes; a pipeline stage's module may hold a
    subset: ``source.partial``); with optimizer state, the same parameters are trainable and in
    the same param groups."""
    saved = source.tensors
    aliases = getattr(source, "aliases", None) or {}
    here = {r.name: list(r.shape) for r in regs} | {n: list(t.shape) for n, t in others.items()}
    found = {n: source_entry(source, n) for n in here}
    missing = sorted(n for n, e in found.items() if e is None)
    reached = {n for n in here} | {aliases[n] for n in here if n in aliases}
    unexpected = [] if getattr(source, "partial", False) else sorted(set(saved) - reached)
    shapes = [f"{n}: saved {e['shape']}, model {here[n]}" for n, e in sorted(found.items())
              if e is not None and e["shape"] != here[n]]
    current = f"loading at world size {strategy.ctx.dp.size}, ZeRO stage {strategy.stage}"
    coords = getattr(strategy.ctx, "coords", None)
    where = coords() if callable(coords) else ""
    if where:
        current += f", on {where}"
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"not in the model: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append("shape differs: " + "; ".join(shapes[:8]))
        raise CheckpointError(f"the checkpoint does not match the model ({source.layout}; {current}): "
                              + " | ".join(parts))
    if with_optimizer:
        trainable = {r.name for r in regs}
        frozen_diff = sorted(n for n in here if found[n]["trainable"] != (n in trainable))
        moved = [r.name for r in regs if found[r.name]["group"] not in (None, r.group)]
        if frozen_diff or moved:
            raise CheckpointError(f"parameters changed trainable/param-group membership since the save "
                                  f"({(frozen_diff + moved)[:8]}); pass load_optimizer_states=False")


def _stage_scaler(scaler, state: Mapping[str, Any] | None) -> Callable[[], None]:
    if not state:
        return lambda: None
    try:
        copy.copy(scaler).load_state_dict(state)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint's training state does not fit this engine: loss_scaler: not a "
                              f"state of {type(scaler).__name__} ({exc}). Pass load_module_only=True to load the "
                              "weights only, or load another checkpoint") from None
    return lambda: scaler.load_state_dict(state)


def _read(source: PieceSource, name: str, kind: str, a: int, b: int, block) -> torch.Tensor:
    """``source.read`` with the block argument only where there is one (sources written before
    n-d pieces take four arguments)."""
    if block is None:
        return source.read(name, kind, a, b)
    return source.read(name, kind, a, b, block=block)


def load_flat_pieces(strategy, module: nn.Module, source: PieceSource, *, whole: bool, optimizer: bool = True,
                     scalar_state: Mapping[str, Any] | None = None) -> Callable[[], None]:
    """Phase 1 of a load into a flat-buffer strategy: check, read and assemble; touches
    nothing. ``whole``: the strategy keeps every parameter whole in ``param_flat`` (stages 0-2),
    else only its ``[lo, hi)`` in ``shard`` (stage 3). Returns phase 2, which writes the new
    buffers into the strategy's storage, restores the loss scaler (``scalar_state``, if given)
    and calls ``after_load`` / ``zero_grad``; it cannot meet bad input."""
    buckets, opt = strategy.buckets, strategy.optimizer
    regs = regions(module, buckets)
    others = other_tensors(module, {r.name for r in regs})
    _check_fit(strategy, source, regs, others, optimizer)
    saved = {n: source_entry(source, n) for n in [r.name for r in regs] + list(others)}
    by_bucket: dict[int, list[Region]] = {}
    for r in regs:
        by_bucket.setdefault(r.bucket.index, []).append(r)
    flats: dict[int, torch.Tensor] = {}
    masters: dict[int, torch.Tensor] = {}
    states: dict[int, dict[str, Any]] = {}
    for bucket in buckets:
        flat = torch.zeros_like(bucket.param_flat) if whole else \
            torch.zeros(bucket.hi - bucket.lo, dtype=bucket.shard.dtype, device=bucket.shard.device)
        # bucket.numel, not opt_param's: an offloaded master is a placeholder between steps
        master = torch.zeros(bucket.numel, dtype=bucket.opt_param.dtype, device=bucket.opt_param.device) \
            if bucket.mixed else None
        bregs = by_bucket.get(bucket.index, [])
        keys = {tuple(saved[r.name]["optimizer_state"]) for r in bregs}
        scalars = {str(sorted(saved[r.name]["optimizer_scalars"].items())) for r in bregs}
        if optimizer and (len(keys) > 1 or len(scalars) > 1):
            raise CheckpointError(f"parameters {[r.name for r in bregs][:4]} ... have different optimizer "
                                  "state kinds or step counts in the checkpoint; they cannot share a "
                                  "bucket: pass load_optimizer_states=False")
        state_keys = list(keys.pop()) if keys else []
        new_state: dict[str, torch.Tensor | None] = {k: None for k in state_keys}
        for r in bregs:
            a, b = r.clip(bucket.lo, bucket.hi)
            if whole:
                full = _read(source, r.name, PARAM, 0, r.numel, r.block)
                flat[r.offset:r.offset + r.numel] = full.to(flat.dtype)
                mine = full[a:b]
            elif a < b:
                mine = _read(source, r.name, PARAM, a, b, r.block)
                r.opt_slice(flat, a, b).copy_(mine)
            if a == b:
                continue
            if master is not None:
                r.opt_slice(master, a, b).copy_(mine)
            if not optimizer:
                continue
            for k in state_keys:
                piece = _read(source, r.name, k, a, b, r.block)
                if new_state[k] is None:
                    new_state[k] = torch.zeros(bucket.numel, dtype=piece.dtype)
                r.opt_slice(new_state[k], a, b).copy_(piece)
        flats[bucket.index] = flat
        if master is not None:
            masters[bucket.index] = master
        if optimizer:
            device = bucket.opt_param.device
            state = {k: scalar_value(v, device) for k, v in saved[bregs[0].name]["optimizer_scalars"].items()} \
                if bregs else {}
            for k, t in new_state.items():
                state[k] = (t if t is not None else torch.zeros(bucket.numel)).to(device)
            states[bucket.index] = state
    new_others = {}
    for name, t in others.items():
        gshape, offsets, local, _ = tensor_block(t)
        block = None if local == gshape else (offsets, local)
        new_others[name] = _read(source, name, PARAM, 0, local_tensor(t).numel(), block).reshape(local)
    restore_scaler = _stage_scaler(strategy.scaler, scalar_state)
    trainable = {r.name for r in regs}

    @torch.no_grad()
    def apply() -> None:
        for bucket in buckets:
            if whole:
                bucket.param_flat.copy_(flats[bucket.index])
            else:
                bucket.load_values(flats[bucket.index])  # (an offloaded shard: to its tier)
            if bucket.index in masters:
                if bucket.opt_param.numel() == bucket.numel:
                    bucket.opt_param.detach().copy_(masters[bucket.index])
                else:  # an offloaded master's placeholder: the tier takes it over (after_load)
                    bucket.opt_param.data = masters[bucket.index]
            if optimizer:
                opt.state.pop(bucket.opt_param, None)
                if states[bucket.index]:
                    opt.state[bucket.opt_param] = states[bucket.index]
        with whole_others(module, trainable, modifier_rank=0):  # stage 3: frozen ones
            canonical, _ = state_names(module)
            for name, t in new_others.items():
                local_tensor(canonical[name]).detach().copy_(t)
        strategy.after_load()
        strategy.zero_grad()
        restore_scaler()

    return apply


__all__ = ["PARAM", "StatePiece", "PieceSource", "piece_key", "state_names", "Region", "regions", "whole_others",
           "source_entry", "local_tensor", "is_dtensor", "tensor_block", "mesh_rank", "mesh_size", "duplicate_ids",
           "tied_aliases",
           "other_tensors", "split_state", "scalar_value", "flat_state_pieces", "load_flat_pieces"]
