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

[Note: offload in the memory model]
With an :class:`Offload` choice (``zero_optimization.offload_optimizer`` / ``offload_param`` /
``sub_group_size``), the five keys above count only what stays in *device* memory, and three
more say where the rest went, per rank, in bytes (as ``memory_report()`` reports them):
``host_offload`` (masters, optimizer state and parameter shards kept in host memory by
offload), ``disk_offload`` (bytes in the swap files) and ``swap_buffers`` (host bytes of the
swap-buffer pools). Notation: Ψ_s = this rank's trainable chunk elements (the optimizer's
chunks: one per bucket at stages 1-2, one per trainable flat buffer at stage 3); K = fp32
state tensors per element (:data:`OPTIMIZER_STATES`); p = compute-dtype bytes; g = gradient
bytes; mixed = the compute dtype is not fp32.

The layout mirrors the runtime (``offload/tiers.py``, ``offload/step.py``, ``offload/params.py``):

- ``offload_optimizer.ratio`` r offloads whole chunks, as ``offloaded_chunks`` does: the last
  chunks (step order) until they hold at least r Ψ_s elements (r = 1: all, r = 0: none), so
  ``off`` is r Ψ_s rounded *up to whole chunks*; given only a parameter count (no chunks)
  off = round(r Ψ_s). res = Ψ_s - off.
- ``cpu``: K*4*off of state and a separate fp32 master 4*off (also at fp32: the host steps its
  own copy) go to ``host_offload``, with the 4-byte ``step`` of each offloaded chunk (it lives
  with the chunk's host master); the device keeps K*4*res and the masters of the resident chunks.
- ``nvme``: K*4*off of state goes to ``disk_offload``, with the separate masters of the
  offloaded chunks (bf16/fp16; at fp32 the master is the parameters and stays where they
  are); ``step`` scalars stay on the device. ``swap_buffers``: tiles of consecutive offloaded
  chunks of up to T = min(sub_group_size, off) elements (at least the largest chunk: a chunk
  is never split); a slot is one page-aligned fp32 buffer of the largest tile per swapped
  kind (kinds = K + [masters swapped]); the pool has max(1, buffer_count // kinds) slots, of
  which one is in use without ``pipeline_read`` / ``pipeline_write`` and as many as there are
  tiles (at most all) with them. 0 when nothing is swapped.
- ``offload_param`` (stage 3 only) takes this rank's shards of every non-resident buffer,
  trainable and frozen (P elements, p*P bytes), out of ``params``; the resident (persistent)
  buffer stays on the device. ``cpu``: p*P in ``host_offload``. ``nvme``: every shard has its
  file, p*P in ``disk_offload``; whole shards, in build order, while they fit in
  ``max_in_cpu`` elements are *also* kept in ``host_offload``; ``swap_buffers`` += the
  write-behind buffers of the last ``buffer_count`` shards written after the step
  (page-aligned). A parameter-offloaded trainable shard always has a separate fp32 master
  (at fp32 too: 4 bytes per element where the optimizer tier keeps masters), except at fp32
  with ``offload_optimizer: nvme`` and ratio 1, where the parameter file *is* the master
  (read and written by the optimizer's tile walk, counted once, in the parameter files).
- Gradients always stay on the device. Given only a parameter count: no padding, no
  ``step``; max_in_cpu at element granularity, the write-behind buffers at most
  buffer_count * buffer_size elements.

Bytes moved per optimizer step (``gas`` = gradient_accumulation_steps micro-steps):
``io_read_bytes`` / ``io_write_bytes`` (disk): the optimizer's swapped kinds of the offloaded
chunks, read and written once each, (K + [masters swapped]) * 4 * off; ``offload_param: nvme``
reads 2 * gas * p * (P - host-held) (the forward and the backward gather of every
micro-step; activation checkpointing's re-gather and shards still in the write-behind buffers
are left out) and writes p * (the trainable shards with a separate master) after the step.
``host_device_bytes`` (copies between host memory and the device; a disk read's hop through
host memory is not counted): optimizer ``cpu``: g * off device -> host (gradients) + p *
off host -> device (updated parameters, except parameter-offloaded shards: stored on the
host side); ``offload_param``: 2 * gas * p * (host-held shard elements) host -> device for the
gathers + p * (stored shards whose master is on the device) back after the step.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Collection, Sequence

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
def norm_key(p: nn.Parameter, duplicates: Collection[int]) -> float:
    """The gradient-norm weight buckets are homogeneous in ([Note: norm over the mesh] in
    shardwise/parallel_norm.py): 0 for a parameter another model-parallel rank counts."""
    return 0.0 if id(p) in duplicates else 1.0


def bucket_layouts(model: nn.Module, world_size: int, bucket_numel: int = BUCKET_NUMEL,
                   duplicates: Collection[int] = frozenset()) -> list[BucketLayout]:
    """The buckets :class:`shardwise.strategy.FlatBucketStrategy` builds for ``model`` (one
    param group; all floating-point parameters share the compute dtype and device; keyed by
    norm weight: ``duplicates``, ids of parameters another tp / pp rank counts in the norm)."""
    trainable, _ = trainable_params(model)
    return assign_buckets([p.numel() for p in trainable],
                          [(0, "compute", "device", norm_key(p, duplicates)) for p in trainable],
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
                   unit_classes: Sequence[type | str] | None = None,
                   duplicates: Collection[int] = frozenset()) -> list[Stage3Buffer]:
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
        keys = [(p.requires_grad, norm_key(p, duplicates)) for p in params]
        for lay in assign_buckets([p.numel() for p in params], keys, _NO_SPLIT, world_size, ALIGN):
            out.append(Stage3Buffer(name or ROOT, lay, bool(lay.group_key[0]), resident))
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


# -- offload tiers ([Note: offload in the memory model]) -----------------------------------------
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
PAGE = 4096  # swap buffers are page-aligned (offload/tiers.py)
OFFLOAD_KEYS = ("host_offload", "disk_offload", "swap_buffers")  # memory_report's keys beyond the device ones
TRAFFIC_KEYS = ("io_read_bytes", "io_write_bytes", "host_device_bytes")  # bytes moved per optimizer step


def _schema_default(path: str, fallback: int | float) -> int | float:
    try:  # the offload keys' defaults live in the schema (written once there)
        value = default(path)
    except Exception:  # noqa: BLE001 -- a schema without the key: the documented default
        return fallback
    return fallback if value is None else value


SUB_GROUP_SIZE = int(_schema_default("zero_optimization.sub_group_size", 1_000_000_000))
OPTIMIZER_BUFFER_COUNT = int(_schema_default("zero_optimization.offload_optimizer.buffer_count", 4))
PARAM_BUFFER_COUNT = int(_schema_default("zero_optimization.offload_param.buffer_count", 5))
PARAM_BUFFER_SIZE = int(_schema_default("zero_optimization.offload_param.buffer_size", 100_000_000))
MAX_IN_CPU = int(_schema_default("zero_optimization.offload_param.max_in_cpu", 1_000_000_000))


@dataclass(frozen=True)
class Offload:
    """One offload choice as the memory model reads it: ``offload_optimizer.device`` /
    ``ratio`` / ``buffer_count``, ``offload_param.device`` / ``buffer_count`` / ``buffer_size`` /
    ``max_in_cpu`` and ``zero_optimization.sub_group_size`` (defaults: the schema's)."""

    optimizer: str = "none"
    param: str = "none"
    ratio: float = 1.0
    sub_group_size: int = SUB_GROUP_SIZE
    buffer_count: int = OPTIMIZER_BUFFER_COUNT
    param_buffer_count: int = PARAM_BUFFER_COUNT
    param_buffer_size: int = PARAM_BUFFER_SIZE
    max_in_cpu: int = MAX_IN_CPU
    pipeline_read: bool = False
    pipeline_write: bool = False

    def __post_init__(self) -> None:
        for what, device in (("offload_optimizer", self.optimizer), ("offload_param", self.param)):
            if device not in OFFLOAD_DEVICES:
                raise UsageError(f"{what}.device must be one of {list(OFFLOAD_DEVICES)}, got {device!r}")
        if not 0.0 <= float(self.ratio) <= 1.0:
            raise UsageError(f"offload_optimizer.ratio must be in [0, 1], got {self.ratio!r}")
        if self.sub_group_size < 1:
            raise UsageError(f"sub_group_size must be positive, got {self.sub_group_size!r}")

    @property
    def enabled(self) -> bool:
        return self.optimizer != "none" or self.param != "none"

    def devices(self, optimizer: str, param: str = "none") -> "Offload":
        """This choice with other devices (ratio, buffers and tile size kept)."""
        return replace(self, optimizer=optimizer, param=param)

    def invalid_at(self, stage: int) -> str | None:
        """Why this choice cannot run at ``stage`` (None: it can)."""
        if self.optimizer != "none" and stage < 1:
            return "offload_optimizer needs ZeRO stage >= 1"
        if self.param != "none" and stage != 3:
            return "offload_param needs ZeRO stage 3"
        return None

    @property
    def label(self) -> str:
        return f"optimizer {self.optimizer}, param {self.param}"


def offload_choices(stage: int, base: Offload | None = None) -> list[Offload]:
    """Every valid offload choice at ``stage`` (none first), with ``base``'s ratio, buffers and
    tile size: stage 0 none; stages 1-2 optimizer none / cpu / nvme; stage 3 also every
    offload_param device."""
    base = base or Offload()
    params = OFFLOAD_DEVICES if stage == 3 else ("none",)
    opts = OFFLOAD_DEVICES if stage >= 1 else ("none",)
    return [base.devices(o, q) for o in opts for q in params]


@dataclass(frozen=True)
class RankElements:
    """The element counts of one rank that offload moves around."""

    chunks: tuple[int, ...]  # the optimizer's trainable chunks on this rank, in step order
    sharded: tuple[bool, ...] = ()  # per chunk: a stage-3 shard offload_param moves (not the resident one)
    shards: tuple[tuple[int, bool], ...] = ()  # stage 3: (elements, trainable) of every non-resident shard, build order
    whole_chunks: bool = True  # ratio and max_in_cpu round to whole chunks / shards (False: analytic)
    step_tensors: bool = True  # one 4-byte ``step`` per chunk is counted (False: analytic)

    @property
    def param_shards(self) -> int:
        return sum(n for n, _ in self.shards)

    @property
    def param_shards_trainable(self) -> int:
        return sum(n for n, t in self.shards if t)


def layout_elements(layouts: list[BucketLayout], world_size: int, rank: int = 0) -> RankElements:
    """Stages 1-2: one optimizer chunk per bucket (this rank's range of it)."""
    return RankElements(tuple(hi - lo for lo, hi in (lay.chunk_range(rank, world_size) for lay in layouts)))


def stage3_elements(buffers: list[Stage3Buffer], world_size: int, rank: int = 0) -> RankElements:
    """Stage 3: one optimizer chunk per trainable buffer (the resident one too), in the order
    ``apply_stage3`` builds them; the non-resident buffers' shards are what ``offload_param``
    moves."""
    def chunk(b: Stage3Buffer) -> int:
        lo, hi = b.layout.chunk_range(rank, world_size)
        return hi - lo

    trained = [b for b in buffers if b.trainable]
    return RankElements(tuple(chunk(b) for b in trained), tuple(not b.resident for b in trained),
                        tuple((chunk(b), b.trainable) for b in buffers if not b.resident))


def offloaded_flags(elements: RankElements, ratio: float) -> list[bool]:
    """Per chunk: offloaded by ``offload_optimizer.ratio``: the last chunks until they hold at
    least ``ratio`` of the elements (``offload/tiers.py``'s ``offloaded_chunks``)."""
    chunks = elements.chunks
    if not elements.whole_chunks:  # analytic: (resident, offloaded) pieces, already split by the ratio
        return [i == len(chunks) - 1 and ratio > 0 for i in range(len(chunks))]
    total = sum(chunks)
    if ratio >= 1.0:
        return [True] * len(chunks)
    out, acc = [False] * len(chunks), 0
    for i in range(len(chunks) - 1, -1, -1):
        if acc >= ratio * total:
            break
        out[i] = True
        acc += chunks[i]
    return out


def _pad(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


def tile_pool_bytes(off_chunks: Sequence[int], kinds: int, offload: Offload, whole_chunks: bool = True) -> int:
    """The optimizer's swap buffers (``offload/step.py``'s tile walk): tiles of consecutive
    offloaded chunks up to T = min(sub_group_size, off) elements (at least the largest chunk);
    ``kinds`` page-aligned fp32 buffers of the largest tile per slot; max(1, buffer_count //
    kinds) slots, of which one is in use without ``pipeline_read`` / ``pipeline_write``, else
    as many as there are tiles."""
    off = sum(off_chunks)
    if not off or not kinds:
        return 0
    if not whole_chunks:  # analytic: no chunks, no padding
        size = min(offload.sub_group_size, off)
        tiles, tile_bytes = -(-off // size), 4 * size
    else:
        size = max(min(offload.sub_group_size, off), max(off_chunks))
        groups: list[list[int]] = [[]]
        for n in off_chunks:
            if groups[-1] and sum(groups[-1]) + n > size:
                groups.append([])
            groups[-1].append(n)
        tiles, tile_bytes = len(groups), max(sum(_pad(4 * n) for n in g) for g in groups)
    slots = max(1, offload.buffer_count // kinds)
    used = min(slots, tiles) if offload.pipeline_read or offload.pipeline_write else 1
    return used * kinds * tile_bytes


def offload_states(states: dict[str, int | None], elements: RankElements, offload: Offload, stage: int,
                   precision: str, optimizer: str = "adamw", grad_precision: str | None = None,
                   gradient_accumulation_steps: int = 1) -> dict[str, int | None]:
    """``states`` (one rank's resident bytes, :func:`result`'s keys) with ``offload`` applied:
    the device keys keep what stays on the device, plus :data:`OFFLOAD_KEYS` and
    :data:`TRAFFIC_KEYS` (see [Note: offload in the memory model])."""
    reason = offload.invalid_at(stage)
    if reason:
        raise UsageError(f"{offload.label} at stage {stage}: {reason}")
    zeros = dict.fromkeys(OFFLOAD_KEYS + TRAFFIC_KEYS, 0)
    if not offload.enabled:
        return {**states, **zeros}
    pb, (k, step) = DTYPE_BYTES[precision], states_per_element(optimizer)
    gb = DTYPE_BYTES[grad_precision or precision]
    gas = max(1, int(gradient_accumulation_steps))
    chunks = elements.chunks
    sharded = elements.sharded or (False,) * len(chunks)
    param_off = offload.param != "none"
    # fp32 with both on disk and every chunk offloaded: the parameter files are the masters
    shared = (precision == "fp32" and offload.param == "nvme" and offload.optimizer == "nvme"
              and offload.ratio >= 1.0)
    in_params = [shared and s for s in sharded]
    # a separate fp32 master: bf16/fp16, and at fp32 every parameter-offloaded shard not shared
    separate = [precision != "fp32" or (param_off and s and not p) for s, p in zip(sharded, in_params)]
    off = offloaded_flags(elements, offload.ratio) if offload.optimizer != "none" else [False] * len(chunks)
    off_chunks = [n for n, o in zip(chunks, off) if o]
    steps = 4 if step and k and elements.step_tensors else 0
    host = disk = swap = read = write = h2d = 0
    master = sum(4 * n for n, o, sep in zip(chunks, off, separate) if sep and not o)  # the device's masters
    state = sum(4 * k * n for n, o in zip(chunks, off) if not o) + steps * len(chunks)
    if offload.optimizer == "cpu":  # a host master for every offloaded chunk (also at fp32), its state and step
        host += sum((4 + 4 * k) * n for n in off_chunks) + steps * len(off_chunks)
        state -= steps * len(off_chunks)
        h2d += gb * sum(off_chunks) + pb * sum(n for n, o, s in zip(chunks, off, sharded)
                                               if o and not (param_off and s))
    elif offload.optimizer == "nvme":
        swapped = [o and (sep or p) for o, sep, p in zip(off, separate, in_params)]  # masters read and written
        moved = sum(4 * k * n for n in off_chunks) + sum(4 * n for n, w in zip(chunks, swapped) if w)
        disk += moved - sum(4 * n for n, w, p in zip(chunks, swapped, in_params) if w and p)  # (in the param files)
        read += moved
        write += moved
        swap += tile_pool_bytes(off_chunks, k + (1 if any(swapped) else 0), offload, elements.whole_chunks)
    params = int(states["params"] or 0)
    if param_off and elements.shards:
        total = elements.param_shards
        params -= pb * total
        if offload.param == "cpu":
            cached = total
        elif elements.whole_chunks:  # whole shards in build order while they fit in max_in_cpu
            cached = 0
            for n, _ in elements.shards:
                if cached + n <= offload.max_in_cpu:
                    cached += n
        else:
            cached = min(max(offload.max_in_cpu, 0), total)
        host += pb * cached
        h2d += 2 * gas * pb * cached  # the gathers' copies of host-held shards
        # after the step each parameter-offloaded trainable chunk with a separate master is stored
        # (in step order: the resident chunks first, then the offloaded ones)
        order = [i for i in range(len(chunks)) if not off[i]] + [i for i in range(len(chunks)) if off[i]]
        stored = [i for i in order if sharded[i] and separate[i]]
        h2d += pb * sum(chunks[i] for i in stored if not off[i])  # from a master on the device
        if offload.param == "nvme":
            disk += pb * total  # every shard has its file (the host-held ones too)
            read += 2 * gas * pb * (total - cached)
            write += pb * sum(chunks[i] for i in stored)
            if elements.whole_chunks:  # the write-behind buffers of the last buffer_count stored shards
                last = stored[max(0, len(stored) - max(1, offload.param_buffer_count)):]
                swap += sum(_pad(pb * chunks[i]) for i in last)
            else:  # at most buffer_count shards of at most buffer_size elements
                bound = offload.param_buffer_count * offload.param_buffer_size
                swap += pb * min(sum(chunks[i] for i in stored), bound)
    out = result(params, int(states["grads"] or 0), master, state, states.get("activations"))
    return {**out, "host_offload": host, "disk_offload": disk, "swap_buffers": swap,
            "io_read_bytes": read, "io_write_bytes": write, "host_device_bytes": h2d}


@dataclass(frozen=True)
class RankLayout:
    """One rank's layout at one stage, computed once: its resident bytes (:meth:`states`) and,
    for any number of offload choices, :meth:`with_offload`."""

    stage: int
    world_size: int
    rank: int
    layouts: tuple[BucketLayout, ...] = ()  # stages 0-2
    frozen_numel: int = 0  # stages 0-2
    buffers: tuple[Stage3Buffer, ...] = ()  # stage 3

    def states(self, precision: str, optimizer: str = "adamw", grad_precision: str | None = None,
               activations: int | None = None) -> dict[str, int | None]:
        if self.stage == 3:
            return stage3_buffer_states(list(self.buffers), self.world_size, precision, optimizer, self.rank,
                                        activations, grad_precision)
        return layout_states(list(self.layouts), self.frozen_numel, self.world_size, self.stage, precision,
                             optimizer, self.rank, activations, grad_precision)

    def elements(self) -> RankElements:
        if self.stage == 3:
            return stage3_elements(list(self.buffers), self.world_size, self.rank)
        return layout_elements(list(self.layouts), self.world_size, self.rank)

    def with_offload(self, offload: Offload, precision: str, optimizer: str = "adamw",
                     grad_precision: str | None = None, activations: int | None = None,
                     gradient_accumulation_steps: int = 1) -> dict[str, int | None]:
        return offload_states(self.states(precision, optimizer, grad_precision, activations), self.elements(),
                              offload, self.stage, precision, optimizer, grad_precision,
                              gradient_accumulation_steps)


def rank_layout(model: nn.Module, world_size: int, stage: int, *, rank: int = 0, bucket_numel: int = BUCKET_NUMEL,
                persistence_threshold: int = PERSISTENCE_THRESHOLD,
                unit_classes: Sequence[type | str] | None = None, duplicates: Collection[int] = frozenset()
                ) -> RankLayout:
    """``rank``'s layout of ``model`` at ``stage`` (the strategies' layout calls, nothing allocated)."""
    if stage == 3:
        return RankLayout(3, world_size, rank,
                          buffers=tuple(stage3_buffers(model, world_size, persistence_threshold, unit_classes,
                                                       duplicates)))
    _, frozen = trainable_params(model)
    return RankLayout(stage, world_size, rank, layouts=tuple(bucket_layouts(model, world_size, bucket_numel,
                                                                           duplicates)),
                      frozen_numel=frozen)


# -- one entry point, keyed by stage --------------------------------------------------------------
def _layout_model(stage: int) -> Callable[..., dict[str, int | None]]:
    def states(model: nn.Module, world_size: int, precision: str, optimizer: str, *, rank: int,
               bucket_numel: int, persistence_threshold: int, unit_classes: Sequence[type | str] | None,
               grad_precision: str | None, activations: int | None,
               duplicates: Collection[int] = frozenset()) -> dict[str, int | None]:
        _, frozen = trainable_params(model)
        return layout_states(bucket_layouts(model, world_size, bucket_numel, duplicates), frozen, world_size, stage,
                             precision, optimizer, rank, activations, grad_precision)
    return states


def _stage3_model(model: nn.Module, world_size: int, precision: str, optimizer: str, *, rank: int,
                  bucket_numel: int, persistence_threshold: int, unit_classes: Sequence[type | str] | None,
                  grad_precision: str | None, activations: int | None,
                  duplicates: Collection[int] = frozenset()) -> dict[str, int | None]:
    return stage3_buffer_states(stage3_buffers(model, world_size, persistence_threshold, unit_classes, duplicates),
                                world_size, precision, optimizer, rank, activations, grad_precision)


MEMORY_MODELS: dict[int, Callable[..., dict[str, int | None]]] = {
    0: _layout_model(0), 1: _layout_model(1), 2: _layout_model(2), 3: _stage3_model}


def model_state_bytes(model: nn.Module, world_size: int, stage: int, precision: str = "fp32",
                      optimizer: str = "adamw", *, rank: int = 0, bucket_numel: int = BUCKET_NUMEL,
                      persistence_threshold: int = PERSISTENCE_THRESHOLD,
                      unit_classes: Sequence[type | str] | None = None, grad_precision: str | None = None,
                      activations: int | None = None, offload: Offload | None = None,
                      gradient_accumulation_steps: int = 1,
                      duplicates: Collection[int] = frozenset()) -> dict[str, int | None]:
    """``rank``'s bytes at ``stage`` for ``model`` (see [Note: memory model]); the keys of
    ``memory_report()`` plus ``activations`` (passed through, counted in ``total``). With
    ``offload`` (even ``Offload()``, no offload), the device keys count what stays on the
    device and :data:`OFFLOAD_KEYS` + :data:`TRAFFIC_KEYS` follow ([Note: offload in the memory
    model]; ``gradient_accumulation_steps`` scales the per-micro-step gathers)."""
    if not 0 <= rank < world_size:
        raise UsageError(f"rank must be in [0, {world_size}), got {rank!r}")
    if offload is not None:
        layout = rank_layout(model, world_size, stage, rank=rank, bucket_numel=bucket_numel,
                             persistence_threshold=persistence_threshold, unit_classes=unit_classes,
                             duplicates=duplicates)
        return layout.with_offload(offload, precision, optimizer, grad_precision, activations,
                                   gradient_accumulation_steps)
    return MEMORY_MODELS[stage](model, world_size, precision, optimizer, rank=rank, bucket_numel=bucket_numel,
                                persistence_threshold=persistence_threshold, unit_classes=unit_classes,
                                grad_precision=grad_precision, activations=activations, duplicates=duplicates)


__all__ = ["DTYPE_BYTES", "ALIGN", "BUCKET_NUMEL", "PERSISTENCE_THRESHOLD", "OPTIMIZER_STATES", "MEMORY_MODELS",
           "Stage3Buffer", "bucket_layouts", "layout_states", "stage3_buffers", "stage3_buffer_states",
           "model_state_bytes", "trainable_params", "states_per_element",
           # offload ([Note: offload in the memory model])
           "OFFLOAD_DEVICES", "OFFLOAD_KEYS", "TRAFFIC_KEYS", "SUB_GROUP_SIZE", "OPTIMIZER_BUFFER_COUNT",
           "PARAM_BUFFER_COUNT", "PARAM_BUFFER_SIZE", "MAX_IN_CPU", "Offload", "offload_choices", "RankElements",
           "layout_elements", "stage3_elements", "offloaded_flags", "tile_pool_bytes", "offload_states", "RankLayout",
           "rank_layout", "PAGE"]
