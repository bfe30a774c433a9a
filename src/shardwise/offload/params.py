"""Stage-3 ``offload_param``: each fetch unit's parameter shard lives in host memory or on disk
between its gathers.

[Note: offloaded parameter shards]
A :class:`~shardwise.zero.sharded_params.FlatShard` normally keeps this rank's chunk of its
unit (``shard``) in device memory. With ``offload_param`` the :class:`ParamTier` owns it:

- ``cpu``: a separate host tensor (pinned on CUDA); a gather copies it into a fresh device
  buffer (on a machine without a GPU that copy stays, so the path is the GPU one);
- ``nvme``: one file per shard (``param<index>.swp`` in the rank's swap directory). A gather
  first reads the shard (asynchronously: the stage-3 prefetch, which issues gathers along
  the recorded unit order ahead of use, thereby prefetches the reads); at one data-parallel
  rank the read buffer *is* the gathered buffer. ``max_in_cpu`` elements of shards (the
  first units) are also kept in host memory, so their gathers read nothing.

Between gathers ``shard`` is a 0-element placeholder. An offloaded shard's optimizer master
is never the shard itself: at fp32 with both ``offload_param`` and ``offload_optimizer`` on
nvme the parameter file *is* the master file (the optimizer's tile walk reads and writes it,
:meth:`ParamTier.chunk_slot`), otherwise the shard gets a separate fp32 master and the
updated values are written back after each step (:meth:`ParamTier.store`; the write is left
in flight, at most ``buffer_count`` at a time, and a later read of the same shard waits
for it).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn

from shardwise.comm.collectives import DONE, all_gather_shard
from shardwise.config.plan import OffloadPlan
from shardwise.errors import ConfigError, ConfigProblem
from shardwise.offload.tiers import ChunkSlot, _pad, _placeholder, budget_check


class _ReadThenGather:
    """A gather handle: wait for the shard's read, then (more than one rank) all-gather it."""

    def __init__(self, read, finish):
        self._read, self._finish, self._done = read, finish, False

    def wait(self) -> None:
        if self._done:
            return
        if self._read is not None:
            self._read.wait()
        h = self._finish()
        if h is not None:
            h.wait()
        self._done = True


class ParamTier:
    def __init__(self, plan: OffloadPlan, rank: int, device: torch.device, io=None):
        self.plan = plan
        self.policy = plan.param
        self.device = device
        self.rank = rank
        self.io = io  # OffloadIO (nvme)
        self.shards: list = []  # adopted, in build order
        self.files: dict[int, object] = {}  # id(shard) -> SwapFile
        self.host: dict[int, torch.Tensor] = {}  # id(shard) -> host copy (cpu tier, or max_in_cpu cache)
        self.pending: "OrderedDict[int, tuple[torch.Tensor, object]]" = OrderedDict()  # id -> (buffer, write)
        self.cached = 0
        self.host_bytes = 0
        # fp32 shards and their masters share the parameter files when the optimizer state is
        # on disk too and all of it is (ratio 1); otherwise each trainable shard gets its own master
        self.shared = (plan.param.device == "nvme" and plan.optimizer.device == "nvme"
                       and plan.optimizer.ratio >= 1.0)

    # -- setup ----------------------------------------------------------------------------------
    def chunk_slot(self, shard) -> ChunkSlot:
        return ChunkSlot(self.files[id(shard)], 0, _pad(shard.numel * 4))

    @torch.no_grad()
    def adopt(self, s) -> None:
        """Move one shard (just built by ``apply_stage3``) out of device memory."""
        from shardwise.offload.aio import SwapFile, pinned_if

        if s.resident:
            return
        n = s.hi - s.lo
        if n > self.policy.buffer_size and self.policy.device == "nvme":
            raise ConfigError([ConfigProblem(
                "zero_optimization.offload_param.buffer_size",
                f"the parameter shard of {s.param_names()[:2]}... has {n} elements on this rank, more than "
                f"buffer_size {self.policy.buffer_size}", f"set buffer_size to at least {n}, or split the "
                "fetch unit (shardwise.zero.set_fetch_units)")])
        if s.trainable and not s.mixed and not self.shared:
            s.opt_param = nn.Parameter(s.shard.detach().clone(), requires_grad=True)  # its own master
            s.mixed = True
        values = s.shard.detach()
        key = id(s)
        if self.policy.device == "cpu":
            self.host_bytes += n * values.element_size()
            budget_check(self.plan, host_bytes=self.host_bytes, what="the parameter shards (offload_param cpu)")
            host = pinned_if(torch.empty(n, dtype=values.dtype, device="cpu"), self.policy.pin_memory)
            host.copy_(values)
            self.host[key] = host
        else:
            f = SwapFile(self.io.dir.file(f"param{len(self.shards)}.swp"), _pad(n * values.element_size()),
                         rank=self.rank)
            self.files[key] = f
            self._write_now(f, values)
            if self.cached + n <= self.policy.max_in_cpu:
                self.cached += n
                self.host[key] = values.to("cpu", copy=True)
        s.param_tier = self
        if s.trainable and not s.mixed:  # shared: the parameter file is the master; no copy in memory
            s.opt_param.data = _placeholder(torch.float32)
        s.shard = _placeholder(values.dtype)
        self.shards.append(s)

    def _bytes(self, s) -> int:
        return (s.hi - s.lo) * s.shard.element_size()

    def _write_now(self, f, values: torch.Tensor) -> None:
        from shardwise.offload.aio import aligned_empty

        nbytes = _pad(values.numel() * values.element_size())
        buf = aligned_empty(nbytes)
        buf[: values.numel() * values.element_size()].copy_(values.reshape(-1).view(torch.uint8))
        self.io.engine.write(f, 0, buf[:nbytes]).wait()

    # -- reads ----------------------------------------------------------------------------------
    def _read(self, s) -> tuple[torch.Tensor, object]:
        """This shard's values (a tensor of its numel) and the handle that fills it (None: ready)."""
        n = s.hi - s.lo
        dtype = s.dtype
        key = id(s)
        if key in self.host:
            return self.host[key], None
        if key in self.pending:  # written after the step, maybe still in flight: the bytes are here
            buf, _ = self.pending[key]
            return buf.view(dtype)[:n], None
        from shardwise.offload.aio import aligned_empty

        es = torch.empty(0, dtype=dtype).element_size()
        buf = aligned_empty(_pad(n * es))
        handle = self.io.engine.read(self.files[key], 0, buf)
        return buf.view(dtype)[:n], handle

    def gather_async(self, s):
        """``FlatShard.gather_async`` for an offloaded shard: (full flat buffer, handle)."""
        values, read = self._read(s)
        device = self.device
        if s.dp.size == 1:
            if read is None:  # a host copy: the gathered buffer is a device copy of it
                flat = torch.empty(s.layout.padded_numel, dtype=s.dtype, device=device)
                flat.copy_(values)
                return flat, DONE
            if values.device != torch.device(device):
                flat = torch.empty(s.layout.padded_numel, dtype=s.dtype, device=device)
                return flat, _ReadThenGather(read, lambda: flat.copy_(values) and None)
            return values, _ReadThenGather(read, lambda: None)
        flat = torch.empty(s.layout.padded_numel, dtype=s.dtype, device=device)

        def finish():
            flat[s.lo:s.hi].copy_(values)
            return all_gather_shard(flat, s.dp, async_op=True)

        return flat, _ReadThenGather(read, finish)

    def values(self, s) -> torch.Tensor:
        """This shard's values, read now (checkpoints, GatheredParameters)."""
        v, h = self._read(s)
        if h is not None:
            h.wait()
        return v

    # -- writes ---------------------------------------------------------------------------------
    @torch.no_grad()
    def store(self, s, values: torch.Tensor) -> None:
        """New values for this shard (after a step, a load or a modification): kept in host
        memory, or written behind (a later read of this shard serves these bytes)."""
        values = values.reshape(-1)
        key = id(s)
        if key in self.host:
            self.host[key].copy_(values)
            if self.policy.device == "cpu":
                return
        from shardwise.offload.aio import aligned_empty

        old = self.pending.pop(key, None)
        if old is not None:
            old[1].wait()
        while len(self.pending) >= max(1, self.policy.buffer_count):
            _, (_, h) = self.pending.popitem(last=False)
            h.wait()
        es = values.element_size()
        buf = aligned_empty(_pad(values.numel() * es))
        buf[: values.numel() * es].copy_(values.to(s.dtype).contiguous().view(torch.uint8))
        self.pending[key] = (buf, self.io.engine.write(self.files[key], 0, buf))

    def masters_written(self, chunks: Sequence, values: Sequence[torch.Tensor]) -> None:
        """The optimizer's tile walk wrote these chunks' masters (= their parameter files)."""
        for s, v in zip(chunks, values):
            if id(s) in self.host:
                self.host[id(s)].copy_(v)

    def flush(self) -> None:
        while self.pending:
            _, (_, h) = self.pending.popitem(last=False)
            h.wait()

    def close(self) -> None:
        self.flush()
        for f in self.files.values():
            f.close()
        self.files.clear()
        if self.io is not None:
            self.io.close()

    def report(self) -> dict[str, int]:
        host = sum(t.numel() * t.element_size() for t in self.host.values())
        disk = sum(s.numel * s.dtype.itemsize for s in self.shards if id(s) in self.files)
        pending = sum(b.numel() for b, _ in self.pending.values())
        return {"host_offload": host, "disk_offload": disk, "swap_buffers": pending}

    def excluded(self) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in self.host.values() if t.numel()}


class InitSpill:
    """Where ``zero.Init(remote_device=...)`` keeps each split parameter's chunk while the
    model is built: host memory (``cpu``; on a machine without a GPU the host is the device,
    and the chunk is still copied, so the path is the GPU one) or one file per chunk in the
    swap directory ``<nvme_path>/shardwise-swap/<job>-init/rank<r>/`` (``nvme``), so that no
    rank holds more of the model in memory than the module being built. Removed when the
    last split parameter is gone (``shardwise.initialize`` re-lays them into fetch units)."""

    def __init__(self, device: str, ctx, pin: bool, nvme_path: str | None, plan: OffloadPlan | None):
        self.device = device
        self.compute = ctx.device
        self.pin = pin
        self.files = 0
        self.io = None
        if device == "nvme":
            from shardwise.offload.tiers import OffloadIO

            self.io = OffloadIO(plan, nvme_path, ctx.rank, job_suffix="-init")

    def put(self, t: torch.Tensor, key=None):
        t = t.detach().reshape(-1)
        if self.device == "cpu":
            from shardwise.offload.aio import pinned_if

            host = pinned_if(torch.empty(t.numel(), dtype=t.dtype, device="cpu"), self.pin)
            host.copy_(t)
            return host
        from shardwise.offload.aio import SwapFile, aligned_empty

        nbytes = _pad(t.numel() * t.element_size())
        if key is not None and key[1] == nbytes:
            f = key[0]
        else:
            f = SwapFile(self.io.dir.file(f"init{self.files}.swp"), nbytes, rank=self.io.dir_rank)
            self.files += 1
        buf = aligned_empty(nbytes)
        buf[: t.numel() * t.element_size()].copy_(t.contiguous().view(torch.uint8))
        self.io.engine.write(f, 0, buf).wait()
        return (f, nbytes, t.dtype, t.numel())

    def get(self, key) -> torch.Tensor:
        if self.device == "cpu":
            return key.to(self.compute, copy=True)
        from shardwise.offload.aio import aligned_empty

        f, nbytes, dtype, numel = key
        buf = aligned_empty(nbytes)
        self.io.engine.read(f, 0, buf).wait()
        return buf.view(dtype)[:numel].to(self.compute)


def make_init_spill(device: str, config, ctx, pin: bool) -> InitSpill:
    """``zero.Init(remote_device=...)``: nvme needs the config's ``offload_param.nvme_path``."""
    plan = None
    path = None
    if config is not None:
        from shardwise.comm.context import expected_world_size
        from shardwise.config import load_config

        plan = load_config(config, world_size=expected_world_size()).offload
        path = plan.param.nvme_path or plan.optimizer.nvme_path
    if device == "nvme" and path is None:
        from shardwise.errors import UsageError

        raise UsageError("zero.Init(remote_device='nvme') needs a config whose zero_optimization.offload_param "
                         "has device 'nvme' and an nvme_path: pass config=ds_config (or config_dict_or_path=)")
    return InitSpill(device, ctx, pin, path, plan)


def make_param_tier(plan: OffloadPlan, rank: int, device: torch.device, io: dict):
    """The stage-3 parameter tier (it adopts each shard as ``apply_stage3`` builds it); None
    without ``offload_param``."""
    if plan.param.device == "none":
        return None
    from shardwise.offload.tiers import open_io

    path = plan.param.nvme_path
    return ParamTier(plan, rank, device, open_io(plan, path, rank, io) if plan.param.device == "nvme" else None)


__all__ = ["ParamTier", "make_param_tier", "InitSpill", "make_init_spill"]

