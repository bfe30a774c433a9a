"""Where the optimizer's tensors live between steps: the device (resident), host memory, or disk.

[Note: offload tiers]
A strategy's chunks (``OptimizerChunk``: a flat bucket at stages 1-2, a flat shard at stage 3)
each have one ``opt_param`` that the user's torch optimizer steps. Offload moves two kinds of
tensors of a chunk out of device memory:

- the fp32 master (``opt_param`` itself) when it is a separate tensor (bf16/fp16 compute); at
  fp32 the master *is* the parameters and stays where they are;
- every optimizer-state tensor with one value per element (Adam's ``exp_avg`` and
  ``exp_avg_sq``, SGD's ``momentum_buffer``, Adagrad's ``sum``); scalars (``step``) stay.

``offload_optimizer.ratio`` r offloads the last chunks (in step order) holding a share r of
this rank's elements; the others stay resident and step first, with no I/O.

:class:`HostTier` (``device: cpu``): each offloaded chunk gets a separate fp32 master in host
memory (pinned on CUDA), also at fp32, so the optimizer steps in host memory; gradients are
copied to the host, the updated master back into the device parameters (``mixed`` is set:
the chunk's master is a separate tensor). On a machine without a GPU the host *is* the
device: the separate buffers are kept anyway, so the path is the one a GPU machine runs.

:class:`DiskTier` (``device: nvme``): see [Note: the tile walk] in ``offload/step.py``.
Between steps the optimizer state of an offloaded chunk (and its master, when swapped) is a
0-element placeholder, so ``memory_report`` counts only what is resident.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from shardwise.config.plan import OffloadPlan
from shardwise.errors import ConfigError, ConfigProblem
from shardwise.offload.ioerrors import OffloadIOError

log = logging.getLogger("shardwise")
PAGE = 4096
_SAID_HOST_IS_DEVICE = False


def offloaded_chunks(chunks: Sequence, ratio: float) -> list[bool]:
    """Per chunk: offloaded. The last chunks holding a share ``ratio`` of the elements
    (rounded to whole chunks, at least one chunk when ratio > 0 and there is any)."""
    total = sum(c.numel for c in chunks)
    if ratio >= 1.0:
        return [True] * len(chunks)
    want = ratio * total
    out = [False] * len(chunks)
    acc = 0
    for i in range(len(chunks) - 1, -1, -1):
        if acc >= want:
            break
        out[i] = True
        acc += chunks[i].numel
    return out


def elementwise_keys(state: dict, numel: int) -> list[str]:
    """The optimizer-state keys of one tensor that have one value per element."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.numel() == numel and numel > 0]


def _placeholder(dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(0, dtype=dtype)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ResidentTier:
    """No offload: everything stays where the strategy put it."""

    device = "none"

    def __init__(self, chunks: Sequence):
        self.chunks = list(chunks)
        self.offloaded = [False] * len(self.chunks)

    def prepare(self) -> None:
        pass

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step_chunks(self, optimizer, chunks, grads, frozen) -> None:
        step_together(optimizer, chunks, grads, frozen)

    def prefetch(self) -> None:
        pass

    @contextlib.contextmanager
    def materialized(self) -> Iterator[None]:
        yield

    def absorb(self) -> None:
        pass

    def report(self) -> dict[str, int]:
        """``memory_report``'s offload keys (host_offload, disk_offload, swap_buffers); none
        without offload, as ``shardwise estimate`` without an offload choice."""
        return {}

    def excluded(self) -> set[int]:
        """Storage pointers of tensors that are not in device memory (not counted there)."""
        return set()

    def close(self) -> None:
        pass


def step_together(optimizer: torch.optim.Optimizer, chunks: Sequence, grads: Sequence, frozen: Sequence[bool]) -> None:
    """One ``optimizer.step()`` over ``chunks``: each gets its gradient (None when frozen:
    torch's optimizers then skip it entirely), the others of the optimizer have none."""
    if not chunks:
        return
    for b, g, skip in zip(chunks, grads, frozen):
        b.opt_param.grad = None if skip else g
    try:
        optimizer.step()
    finally:
        for b in chunks:
            b.opt_param.grad = None
    for b in chunks:
        b.copy_master_to_params()


class HostTier(ResidentTier):
    """``offload_optimizer.device: cpu``: masters and optimizer state of the offloaded
    chunks in host memory (see [Note: offload tiers])."""

    device = "cpu"

    def __init__(self, chunks: Sequence, plan: OffloadPlan, device: torch.device):
        super().__init__(chunks)
        self.plan = plan
        self.compute_device = device
        self.offloaded = offloaded_chunks(self.chunks, plan.optimizer.ratio)

    def prepare(self) -> None:
        """Before the optimizer exists: give each offloaded chunk its host master."""
        global _SAID_HOST_IS_DEVICE
        if self.compute_device.type == "cpu" and not _SAID_HOST_IS_DEVICE:
            _SAID_HOST_IS_DEVICE = True
            log.info("offload_optimizer.device=cpu on a machine without an accelerator: the device is the "
                     "host, so offload saves no memory here; shardwise keeps the separate host buffers anyway "
                     "(the code path a GPU machine runs)")
        from shardwise.offload.aio import pinned_if

        pin = self.plan.optimizer.pin_memory
        for b, off in zip(self.chunks, self.offloaded):
            if not off:
                continue
            src = b.opt_param.detach()
            host = pinned_if(torch.empty(src.shape, dtype=torch.float32, device="cpu"), pin)
            host.copy_(src)
            b.opt_param = nn.Parameter(host, requires_grad=True)
            b.mixed = True  # the master is a separate tensor now: copied back after each step
        budget_check(self.plan, host_bytes=self._host_bytes(states=2), what="the host masters and Adam's state")

    def _host_bytes(self, states: int) -> int:
        return sum(b.numel * 4 * (1 + states) for b, off in zip(self.chunks, self.offloaded) if off)

    def _host_tensors(self) -> Iterator[torch.Tensor]:
        opt = getattr(self, "optimizer", None)
        for b, off in zip(self.chunks, self.offloaded):
            if not off:
                continue
            yield b.opt_param.detach()
            if opt is not None:
                yield from (v for v in opt.state.get(b.opt_param, {}).values() if isinstance(v, torch.Tensor))

    def report(self) -> dict[str, int]:
        return {"host_offload": sum(_nbytes(t) for t in self._host_tensors()), "disk_offload": 0, "swap_buffers": 0}

    def excluded(self) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in self._host_tensors() if t.numel()}


def budget_check(plan: OffloadPlan, *, host_bytes: int, what: str, advice: str = "") -> None:
    """``offload.host_memory_budget``: the host buffers the offload path allocates fit in it."""
    budget = plan.host_memory_budget
    if budget is None or host_bytes <= budget:
        return
    raise ConfigError([ConfigProblem(
        "offload.host_memory_budget",
        f"{what} need {host_bytes / 1e9:.3f} GB of host memory on this rank, more than the budget "
        f"{budget / 1e9:.3f} GB", advice or "raise the budget, use offload_optimizer.device \"nvme\", or "
                                           "more data-parallel ranks")])


@dataclass
class ChunkSlot:
    """Where one offloaded chunk's tensors of one kind live in the tier's file of that kind."""

    file: object  # the SwapFile
    offset: int  # bytes, page-aligned
    nbytes: int  # the chunk's bytes, padded to a page


def _pad(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


class DiskTier(ResidentTier):
    """``offload_optimizer.device: nvme``: masters (when separate) and optimizer state of the
    offloaded chunks in files under ``nvme_path``; the step walks tiles through a bounded
    buffer pool (``offload/step.py``)."""

    device = "nvme"

    def __init__(self, chunks: Sequence, plan: OffloadPlan, rank: int, io: "OffloadIO", params=None):
        super().__init__(chunks)
        self.plan = plan
        self.rank = rank
        self.io = io
        self.engine = io.engine
        self.offloaded = offloaded_chunks(self.chunks, plan.optimizer.ratio)
        self.off_chunks = [b for b, o in zip(self.chunks, self.offloaded) if o]
        self.files: dict[str, object] = {}  # kind -> SwapFile
        self.slots: dict[str, list[ChunkSlot]] = {}  # kind -> per offloaded chunk
        self.dtypes: dict[str, torch.dtype] = {}
        self.keys: list[str] | None = None  # optimizer-state kinds, learned at the first step
        self.master_written = None  # callback(chunks, values) after a tile's masters are written
        # the master is swapped when it is a separate tensor (bf16/fp16, or made separate), or
        # when it is the parameter shard and that lives on disk: fp32 with offload_param nvme
        # too, where the parameter files are the masters ([Note: offloaded parameter shards])
        shared = params is not None and params.shared
        self.master_in_params = [shared and not c.mixed and getattr(c, "param_tier", None) is params
                                 for c in self.off_chunks]
        self.master_for = [c.mixed or p for c, p in zip(self.off_chunks, self.master_in_params)]
        self.swap_master = any(self.master_for)
        if self.swap_master:
            own = [c.mixed and not p for c, p in zip(self.off_chunks, self.master_in_params)]
            self.ensure_file("master", torch.float32, own)
            self.slots["master"] = [params.chunk_slot(c) if p else cs for c, p, cs in
                                    zip(self.off_chunks, self.master_in_params, self.slots["master"])]
            if any(self.master_in_params):
                self.master_written = params.masters_written
        from shardwise.offload.step import TileWalk

        self.walk = TileWalk(self)
        weakref.finalize(self, DiskTier._close_files, self.files)

    @staticmethod
    def _close_files(files) -> None:
        for f in files.values():
            f.close()

    def close(self) -> None:
        self.walk.drain()
        DiskTier._close_files(self.files)
        self.files.clear()
        self.io.close()

    # -- layout -------------------------------------------------------------------------------
    def kinds(self) -> list[str]:
        """The tensor kinds swapped per chunk, in file order."""
        return (["master"] if self.swap_master else []) + list(self.keys or [])

    def ensure_file(self, kind: str, dtype: torch.dtype, which: Sequence[bool] | None = None) -> None:
        """The swap file of ``kind``: every offloaded chunk (or those ``which`` marks) at a
        page-aligned offset; none marked: no file, empty slots."""
        if kind in self.slots:
            return
        from shardwise.offload.aio import SwapFile

        es = torch.empty(0, dtype=dtype).element_size()
        which = which if which is not None else [True] * len(self.off_chunks)
        sizes = [_pad(b.numel * es) if w else 0 for b, w in zip(self.off_chunks, which)]
        f = None
        if any(which):
            f = SwapFile(self.io.dir.file(f"{kind}.swp"), max(sum(sizes), PAGE), rank=self.rank)
            self.files[kind] = f
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.slots[kind] = [ChunkSlot(f, o, n) for o, n in zip(offsets, sizes)]
        self.dtypes[kind] = dtype

    def learn(self, state: dict, numel: int) -> None:
        """Note the per-element kinds of one chunk's optimizer state (a file for each new one)."""
        for kind in elementwise_keys(state, numel):
            if self.keys is None:
                self.keys = []
            if kind not in self.keys:
                self.keys.append(kind)
                self.ensure_file(kind, state[kind].dtype)

    def prepare(self) -> None:
        """Before the optimizer exists: masters that live on disk are written there (those in
        the parameter files are there already) and dropped."""
        if self.swap_master:
            self.walk.write_tensors({"master": [b.opt_param.detach() if m and not p else None for b, m, p in
                                                zip(self.off_chunks, self.master_for, self.master_in_params)]})
            for b, m in zip(self.off_chunks, self.master_for):
                if m:
                    b.opt_param.data = _placeholder(torch.float32)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        kinds = (1 if self.swap_master else 0) + guess_state_kinds(optimizer)
        self.walk.expected_kinds = max(1, kinds)
        need = self.walk.predicted_pool_bytes(kinds)
        per_slot = need // max(1, self.walk.n_slots())
        budget_check(self.plan, host_bytes=need, what=f"the swap buffers ({self.walk.n_slots()} tiles of "
                     f"{self.walk.tile_numel} elements x {kinds} tensors)",
                     advice=f"each tile's buffers take {per_slot / 1e6:.1f} MB: lower "
                            "offload_optimizer.buffer_count (at least "
                            f"{kinds}: one tile at a time) or zero_optimization.sub_group_size "
                            f"(now {self.plan.sub_group_size}), or raise the budget")

    def step_chunks(self, optimizer, chunks, grads, frozen) -> None:
        self.walk.step(optimizer, chunks, grads, frozen)

    def prefetch(self) -> None:
        self.walk.prefetch()

    # -- checkpoints: everything in memory for the save or the load ---------------------------
    @contextlib.contextmanager
    def materialized(self) -> Iterator[None]:
        """The offloaded state read into ordinary tensors for the duration (checkpoint save);
        afterwards the placeholders are back, the files unchanged."""
        values = self.walk.read_all()
        opt = self.optimizer
        try:
            for j, b in enumerate(self.off_chunks):
                if self.master_for[j]:
                    b.opt_param.data = values["master"][j]
                st = opt.state.get(b.opt_param)
                for k in self.keys or []:
                    if st is not None and values[k][j] is not None:
                        st[k] = values[k][j]
            yield
        finally:
            self._unbind()

    def _unbind(self) -> None:
        opt = self.optimizer
        for b, m in zip(self.off_chunks, self.master_for):
            if m:
                b.opt_param.data = _placeholder(torch.float32)
            st = opt.state.get(b.opt_param)
            for k in self.keys or []:
                if st is not None and k in st:
                    st[k] = _placeholder(self.dtypes[k])

    def absorb(self) -> None:
        """After a checkpoint load wrote ordinary tensors into the masters and the optimizer
        state: move them to the files."""
        self.walk.drain()
        opt = self.optimizer
        tensors: dict[str, list] = {}
        if self.swap_master:  # (those in the parameter files: the load wrote them there)
            tensors["master"] = [b.opt_param.detach() if m and not p else None for b, m, p in
                                 zip(self.off_chunks, self.master_for, self.master_in_params)]
        states = [opt.state.get(b.opt_param, {}) for b in self.off_chunks]
        for b, st in zip(self.off_chunks, states):
            self.learn(st, b.numel)
        self.walk.has = [set() for _ in self.off_chunks]
        for k in self.keys or []:
            tensors[k] = [st[k].detach() if k in st and st[k].numel() else None for st in states]
        self.walk.write_tensors(tensors)
        self._unbind()

    # -- reporting ----------------------------------------------------------------------------
    def report(self) -> dict[str, int]:
        disk = 0
        for j, b in enumerate(self.off_chunks):
            own_master = self.master_for[j] and not self.master_in_params[j]  # (else: the param tier's bytes)
            kinds = (["master"] if own_master else []) + sorted(self.walk.has[j])
            disk += sum(b.numel * torch.empty(0, dtype=self.dtypes[k]).element_size() for k in kinds)
        return {"host_offload": 0, "disk_offload": disk, "swap_buffers": self.walk.pool_bytes()}


def guess_state_kinds(optimizer: torch.optim.Optimizer) -> int:
    """Per-element state tensors the optimizer will create (for sizing before the first step)."""
    g = optimizer.defaults
    name = type(optimizer).__name__
    if name in ("Adam", "AdamW"):
        return 3 if g.get("amsgrad") else 2
    if name == "SGD":
        return 1 if g.get("momentum", 0) else 0
    if name == "RMSprop":
        return 1 + bool(g.get("momentum", 0)) + bool(g.get("centered"))
    if name in ("Adagrad", "Adamax", "Adadelta", "NAdam", "RAdam", "ASGD"):
        return 1 if name in ("Adagrad", "ASGD") else 2
    return 2


class OffloadIO:
    """One rank's swap directory and I/O engine under one ``nvme_path`` (shared by the
    optimizer and parameter tiers when both name the same path); removed at a clean exit."""

    def __init__(self, plan: OffloadPlan, nvme_path: str, rank: int, job_suffix: str = ""):
        from shardwise.offload.aio import IOEngine
        from shardwise.offload.swapdir import SwapDirectory, default_job_name

        job = default_job_name() + job_suffix
        try:
            self.dir = SwapDirectory(nvme_path, job=job, rank=rank)
        except OffloadIOError as e:
            if "this process" not in str(e):
                raise
            import gc

            gc.collect()  # an earlier engine of this process that is garbage but not yet collected
            try:
                self.dir = SwapDirectory(nvme_path, job=job, rank=rank)
            except OffloadIOError:
                raise OffloadIOError(f"rank {rank}: an earlier engine of this process still uses the swap directory "
                                     f"under {nvme_path} (job {job!r}): call engine.destroy() on it first, or give "
                                     "this one its own nvme_path or job name (SHARDWISE_JOB)", rank=rank,
                                     path=nvme_path) from None
        self.dir_rank = rank
        self.engine = IOEngine(threads=plan.aio.queue_depth * plan.aio.intra_op_parallelism,
                               block_size=plan.aio.block_size, rank=rank)
        self._finalizer = weakref.finalize(self, OffloadIO._cleanup, self.engine, self.dir)

    def close(self) -> None:
        """Stop the I/O threads and remove the swap directory (idempotent; also at exit)."""
        self._finalizer()

    @staticmethod
    def _cleanup(engine, directory) -> None:
        try:
            engine.close()
        finally:
            directory.cleanup()


def make_tier(plan: OffloadPlan, chunks: Sequence, device: torch.device, rank: int, io: dict | None = None,
              params=None):
    """The tier ``offload_optimizer.device`` asks for, over this rank's trainable chunks
    (``io``: the OffloadIO per nvme_path already open; ``params``: the ParamTier, stage 3)."""
    kind = plan.optimizer.device
    if kind == "cpu":
        return HostTier(chunks, plan, device)
    if kind == "nvme":
        return DiskTier(chunks, plan, rank, open_io(plan, plan.optimizer.nvme_path, rank, io), params)
    return ResidentTier(chunks)


def open_io(plan: OffloadPlan, path: str, rank: int, cache: dict | None) -> OffloadIO:
    if cache is None:
        return OffloadIO(plan, path, rank)
    if path not in cache:
        cache[path] = OffloadIO(plan, path, rank)
    return cache[path]


__all__ = ["ResidentTier", "HostTier", "DiskTier", "OffloadIO", "make_tier", "open_io", "offloaded_chunks", "elementwise_keys",
           "step_together", "budget_check"]
