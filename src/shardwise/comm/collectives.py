"""Typed wrappers over torch.distributed collectives.

Each function takes the :class:`CommContext` explicitly and returns a :class:`Handle` that is
already complete when the world size is 1 (no process group) or the call was synchronous.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from shardwise.comm.context import CommContext

# torch >= 2.13 renamed the tensor-in/tensor-out collectives and warns on the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Handle:
    """An in-flight collective. ``wait()`` is idempotent."""

    __slots__ = ("_work",)

    def __init__(self, work=None):
        self._work = work

    def wait(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None

    @property
    def done(self) -> bool:
        return self._work is None


DONE = Handle()


def all_reduce(t: torch.Tensor, ctx: CommContext, *, op: str = "sum", async_op: bool = False) -> Handle:
    """Reduce ``t`` in place over all ranks (``op`` is ``"sum"`` or ``"max"``)."""
    if not ctx.is_distributed:
        return DONE
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    work = dist.all_reduce(t, op=reduce_op, group=ctx.group, async_op=async_op)
    return Handle(work) if async_op else DONE


def all_reduce_scalar(value: float, ctx: CommContext, *, op: str = "sum") -> float:
    """All-reduce one Python float (an fp64 tensor on the context's device)."""
    if not ctx.is_distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    all_reduce(t, ctx, op=op)
    return float(t.item())


def reduce_to_shard(flat: torch.Tensor, ctx: CommContext, *, async_op: bool = True) -> Handle:
    """Sum ``flat`` over ranks so that this rank's chunk of it holds the sum.

    ``flat.numel()`` must be a multiple of the world size; rank r's chunk is
    ``flat.view(world, -1)[r]``. The other chunks hold unspecified values afterwards.
    See [Note: reduce-to-shard implementation] in context.py for the gloo choice.
    """
    if not ctx.is_distributed:
        return DONE
    if ctx.reduce_scatter_via_all_reduce:
        return all_reduce(flat, ctx, async_op=async_op)
    chunk = flat.view(ctx.world_size, -1)[ctx.rank]
    work = _reduce_scatter_single(chunk, flat, group=ctx.group, async_op=async_op)
    return Handle(work) if async_op else DONE


def all_gather_shard(flat: torch.Tensor, ctx: CommContext, *, async_op: bool = True) -> Handle:
    """Fill every chunk of ``flat`` from its owner (rank r owns ``flat.view(world, -1)[r]``)."""
    if not ctx.is_distributed:
        return DONE
    chunk = flat.view(ctx.world_size, -1)[ctx.rank]
    work = _all_gather_single(flat, chunk, group=ctx.group, async_op=async_op)
    return Handle(work) if async_op else DONE


# -- control-plane helpers (small Python objects; checkpoint agreement) ------------------


def all_gather_object(obj, ctx: CommContext) -> list:
    """Every rank's ``obj`` (picklable, small), in rank order."""
    if not ctx.is_distributed:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=ctx.group)
    return out


def broadcast_object(obj, ctx: CommContext, src: int = 0):
    """``obj`` from rank ``src`` on every rank."""
    if not ctx.is_distributed:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src, group=ctx.group)
    return box[0]


def barrier(ctx: CommContext, timeout_s: float | None = None) -> None:
    """Wait for every rank. With ``timeout_s`` (gloo), a rank that does not arrive in time is a
    :class:`~shardwise.errors.CollectiveTimeoutError` naming the missing ranks, not a hang.

    [Note: monitored barrier] ``monitored_barrier`` exists on gloo only; on NCCL the plain
    barrier is used and the process group's own timeout bounds the wait.
    """
    if not ctx.is_distributed:
        return
    if timeout_s is None or ctx.backend != "gloo":
        dist.barrier(group=ctx.group)
        return
    import re
    from datetime import timedelta

    from shardwise.errors import CollectiveTimeoutError

    try:
        dist.monitored_barrier(group=ctx.group, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as exc:
        text = str(exc)
        m = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text)
        missing = tuple(int(r) for r in re.findall(r"\d+", m.group(1))) if m else ()
        if not missing and ctx.rank != 0:
            missing = (0,)  # rank 0 runs the barrier; a non-zero rank only sees rank 0 gone
        raise CollectiveTimeoutError(
            f"rank {ctx.rank}: ranks {list(missing) or '?'} did not reach the barrier within "
            f"{timeout_s:g} s ({text.strip().splitlines()[0] if text.strip() else 'timeout'})",
            missing,
        ) from exc
