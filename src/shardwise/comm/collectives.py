"""Typed wrappers over torch.distributed collectives.

Each function takes the :class:`~shardwise.comm.context.GroupContext` it runs on (``ctx.dp``,
``ctx.world``; see [Note: parallel context]) and returns a :class:`Handle` that is already
complete when the group has one rank (or no process group) or the call was synchronous. Ranks
are group ranks: chunk ``r`` of a flat buffer belongs to group rank ``r``; ``src`` is a group
rank, converted to the global rank torch wants here.
"""
from __future__ import annotations

import pickle
import time
from collections import deque
from contextlib import contextmanager

import torch
import torch.distributed as dist

from shardwise.comm.context import GroupContext
from shardwise.comm.health import collective_error
from shardwise.errors import CollectiveError, CollectiveTimeoutError, UsageError

# torch >= 2.13 renamed the tensor-in/tensor-out collectives and warns on the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# [Note: collective failures]
# A collective that raises (a peer closed its connection, the timeout ran out) is re-raised as
# a CollectiveError / CollectiveTimeoutError naming the op, this rank and the ranks found dead
# or stuck (see [Note: rank health] in health.py). Every torch.distributed call of this module
# goes through `_guard`, and async ones through Handle.wait.


def _failure(g: GroupContext, op: str, exc: BaseException) -> CollectiveError:
    among = None if g.is_world else g.global_ranks
    if not g.is_world:
        op = f"{op} on group {g.name!r} (ranks {list(g.global_ranks)})"
    if g.health is not None:
        return g.health.collective_error(op, exc, among=among)
    return collective_error(g.global_rank(g.rank), op, exc, None)


@contextmanager
def _guard(g: GroupContext, op: str):
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as exc:  # DistBackendError, DistStoreError, gloo's errors
        raise _failure(g, op, exc) from exc


# [Note: tensors outlive gloo's works]
# A gloo worker thread drops its reference to a finished collective's tensors after the caller
# has been told the work is done. If Python dropped its own references first (a temporary view
# such as ``flat.view(world, -1)[rank]``), the worker thread holds the last one and must take
# the GIL to free the tensor's Python object. When that happens after the main thread began
# interpreter shutdown, CPython ends the worker thread inside C++ code and the process aborts
# ("terminate called without an active exception", exit -6) after a run that succeeded (seen
# in a core dump: c10d::ProcessGroupGloo::runLoop -> ~AsyncAllgatherWork -> decref_pyobject ->
# take_gil -> pthread_exit). So an exit hook (`quiesce`, registered by comm/context.py) gives
# worker threads a moment, with the GIL free, before shutdown begins; and small tensors handed
# to a collective here (object collectives, scalars: typically a program's last collectives)
# stay referenced in `_RECENT`, a bounded ring, so the worker never needs the GIL for them.
# Large buffers are not kept: that would hold freed stage-3 buffers alive (memory).
# Object collectives are implemented here because torch's use temporary views.
_RECENT: deque = deque(maxlen=64)
_KEEP_MAX_BYTES = 1 << 20


def _keep(*tensors: torch.Tensor) -> None:
    if all(t.untyped_storage().nbytes() <= _KEEP_MAX_BYTES for t in tensors):
        _RECENT.append(tensors)


def quiesce(seconds: float = 0.1) -> None:
    """At exit: let gloo worker threads release finished works while the interpreter is whole."""
    time.sleep(seconds)


# [Note: collective recorder]
# One optional process-wide recorder sees every collective issued here (the comms logger and
# the wall-clock breakdown; shardwise/profiling/comms.py shares it among them). Before a
# collective is issued: ``token = recorder.begin(op, group, impl)``; once it has completed:
# ``recorder.end(token, nbytes, waited_s)``: a synchronous call when it returns, an async one
# when Handle.wait returns (``waited_s``: seconds this rank was blocked in the call or in the
# wait). ``op`` is the entry point's name (all_reduce, reduce_scatter for reduce_to_shard,
# all_gather for all_gather_shard, broadcast, barrier, all_gather_object, broadcast_object);
# ``impl`` the torch collective that moves the data, which differs on gloo ([Note:
# reduce-to-shard implementation], [Note: all-gather implementation]); ``nbytes`` the whole
# buffer (all ranks' chunks). The collectives inside a composite op (the reduce-to-shard's
# all-reduce, the object collectives' gathers and broadcasts) are not reported on their own.
# Unset (None, the default) a collective pays one global read; a group of one rank issues
# nothing and reports nothing.
_RECORDER = None
_composite = 0  # > 0 while a composite op issues its inner collectives


def set_recorder(recorder):
    """Install the process-wide collective recorder (``None``: none); returns the previous one.
    See [Note: collective recorder]."""
    global _RECORDER
    previous, _RECORDER = _RECORDER, recorder
    return previous


def _begin(op: str, g: GroupContext, impl: str, nbytes: int):
    r = _RECORDER
    if r is None or _composite:
        return None
    return r, r.begin(op, g, impl), time.perf_counter(), nbytes


def _end(rec, waited_s: float | None = None, nbytes: int | None = None) -> None:
    r, token, t0, n = rec
    r.end(token, n if nbytes is None else nbytes, time.perf_counter() - t0 if waited_s is None else waited_s)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _issued(work, g: GroupContext, name: str, async_op: bool, rec) -> "Handle":
    if async_op:
        return Handle(work, g, name, rec)
    if rec is not None:
        _end(rec)
    return DONE


class Handle:
    """An in-flight collective. ``wait()`` is idempotent."""

    __slots__ = ("_work", "_ctx", "_op", "_rec")

    def __init__(self, work=None, ctx: GroupContext | None = None, op: str = "collective", rec=None):
        self._work = work
        self._ctx = ctx
        self._op = op
        self._rec = rec  # [Note: collective recorder]

    def wait(self) -> None:
        if self._work is not None:
            work, self._work = self._work, None
            rec, self._rec = self._rec, None
            t0 = time.perf_counter() if rec is not None else 0.0
            if self._ctx is None:
                work.wait()
            else:
                with _guard(self._ctx, self._op):
                    work.wait()
            if rec is not None:
                _end(rec, time.perf_counter() - t0)

    @property
    def done(self) -> bool:
        return self._work is None


DONE = Handle()


def all_reduce(t: torch.Tensor, g: GroupContext, *, op: str = "sum", async_op: bool = False) -> Handle:
    """Reduce ``t`` in place over the group's ranks (``op`` is ``"sum"`` or ``"max"``)."""
    if not g.is_distributed:
        return DONE
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    name = f"all_reduce({t.numel()} elements)"
    _keep(t)
    rec = _begin("all_reduce", g, "all_reduce", _nbytes(t))
    with _guard(g, name):
        work = dist.all_reduce(t, op=reduce_op, group=g.group, async_op=async_op)
    return _issued(work, g, name, async_op, rec)


def all_reduce_scalar(value: float, g: GroupContext, *, op: str = "sum") -> float:
    """All-reduce one Python float (an fp64 tensor on the context's device)."""
    if not g.is_distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=g.device)
    all_reduce(t, g, op=op)
    return float(t.item())


def reduce_to_shard(flat: torch.Tensor, g: GroupContext, *, async_op: bool = True) -> Handle:
    """Sum ``flat`` over the group so that this rank's chunk of it holds the sum.

    ``flat.numel()`` must be a multiple of the group size; group rank r's chunk is
    ``flat.view(size, -1)[r]``. The other chunks hold unspecified values afterwards.
    See [Note: reduce-to-shard implementation] in context.py for the gloo choice.
    """
    if not g.is_distributed:
        return DONE
    global _composite
    if g.policy.reduce_scatter_via_all_reduce:
        rec = _begin("reduce_scatter", g, "all_reduce", _nbytes(flat))
        _composite += 1
        try:
            handle = all_reduce(flat, g, async_op=async_op)
        finally:
            _composite -= 1
        if rec is not None:
            if handle.done:
                _end(rec)
            else:
                handle._rec = rec
        return handle
    chunk = flat.view(g.size, -1)[g.rank]
    name = f"reduce_scatter({flat.numel()} elements)"
    _keep(flat, chunk)
    rec = _begin("reduce_scatter", g, "reduce_scatter", _nbytes(flat))
    with _guard(g, name):
        work = _reduce_scatter_single(chunk, flat, group=g.group, async_op=async_op)
    return _issued(work, g, name, async_op, rec)


class _Works:
    """Several in-flight works behind one ``wait()`` (gloo all-gather by broadcasts)."""

    __slots__ = ("works",)

    def __init__(self, works):
        self.works = works

    def wait(self) -> None:
        for w in self.works:
            w.wait()


def all_gather_shard(flat: torch.Tensor, g: GroupContext, *, async_op: bool = True) -> Handle:
    """Fill every chunk of ``flat`` from its owner (group rank r owns ``flat.view(size, -1)[r]``).
    On gloo every rank broadcasts its chunk (see [Note: all-gather implementation])."""
    if not g.is_distributed:
        return DONE
    chunks = flat.view(g.size, -1)
    chunk = chunks[g.rank]
    name = f"all_gather({flat.numel()} elements)"
    if g.policy.all_gather_via_broadcast:
        parts = chunks.unbind(0)
        _keep(flat, *parts)
        rec = _begin("all_gather", g, "broadcast", _nbytes(flat))
        with _guard(g, name):
            works = [dist.broadcast(parts[r], src=g.global_rank(r), group=g.group, async_op=True)
                     for r in range(g.size)]
        handle = Handle(_Works(works), g, name, rec)
        if not async_op:
            handle.wait()
            return DONE
        return handle
    _keep(flat, chunk)
    rec = _begin("all_gather", g, "all_gather", _nbytes(flat))
    with _guard(g, name):
        work = _all_gather_single(flat, chunk, group=g.group, async_op=async_op)
    return _issued(work, g, name, async_op, rec)


def broadcast(t: torch.Tensor, g: GroupContext, *, src: int = 0) -> None:
    """Copy ``t`` from group rank ``src`` into ``t`` on every rank of the group (synchronous)."""
    if not g.is_distributed:
        return
    name = f"broadcast({t.numel()} elements, src={src})"
    _keep(t)
    rec = _begin("broadcast", g, "broadcast", _nbytes(t))
    with _guard(g, name):
        dist.broadcast(t, src=g.global_rank(src), group=g.group)
    if rec is not None:
        _end(rec)


# -- control-plane helpers (small Python objects; checkpoint agreement) ------------------


def _payload(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def all_gather_object(obj, g: GroupContext) -> list:
    """Every group rank's ``obj`` (picklable, small), in group-rank order (see [Note: tensors outlive
    gloo's works] for why this is not ``dist.all_gather_object``)."""
    if not g.is_distributed:
        return [obj]
    data = _payload(obj)
    global _composite
    rec = _begin("all_gather_object", g, "all_gather", 0)
    _composite += 1
    try:
        with _guard(g, "all_gather_object"):
            sizes = torch.zeros(g.size, dtype=torch.int64, device=g.device)
            sizes[g.rank] = data.numel()
            all_gather_shard(sizes, g, async_op=False)
            longest = int(sizes.max())
            flat = torch.zeros(g.size * longest, dtype=torch.uint8, device=g.device)
            flat[g.rank * longest:g.rank * longest + data.numel()] = data.to(g.device)
            all_gather_shard(flat, g, async_op=False)
    finally:
        _composite -= 1
    if rec is not None:
        _end(rec, nbytes=_nbytes(sizes) + _nbytes(flat))
    host = flat.cpu()
    return [pickle.loads(host[r * longest:r * longest + int(n)].numpy().tobytes())
            for r, n in enumerate(sizes.tolist())]


def broadcast_object(obj, g: GroupContext, src: int = 0):
    """``obj`` from group rank ``src`` on every rank of the group."""
    if not g.is_distributed:
        return obj
    data = _payload(obj) if g.rank == src else None
    global _composite
    rec = _begin("broadcast_object", g, "broadcast", 0)
    _composite += 1
    try:
        with _guard(g, f"broadcast_object(src={src})"):
            size = torch.tensor([data.numel() if data is not None else 0], dtype=torch.int64, device=g.device)
            broadcast(size, g, src=src)
            buf = data.to(g.device) if data is not None else \
                torch.empty(int(size.item()), dtype=torch.uint8, device=g.device)
            broadcast(buf, g, src=src)
    finally:
        _composite -= 1
    if rec is not None:
        _end(rec, nbytes=_nbytes(size) + _nbytes(buf))
    return pickle.loads(buf.cpu().numpy().tobytes())


def barrier(g: GroupContext, timeout_s: float | None = None) -> None:
    """Wait for every rank of the group. With ``timeout_s`` (gloo), a rank that does not arrive in time is a
    :class:`~shardwise.errors.CollectiveTimeoutError` naming the missing ranks, not a hang.

    [Note: monitored barrier] ``monitored_barrier`` exists on gloo only; on NCCL the plain
    barrier is used and the process group's own timeout bounds the wait.
    """
    if not g.is_distributed:
        return
    rec = _begin("barrier", g, "barrier", 0)
    if timeout_s is None or g.backend != "gloo":
        with _guard(g, "barrier"):
            dist.barrier(group=g.group)
        if rec is not None:
            _end(rec)
        return
    import re
    from datetime import timedelta

    t0 = time.monotonic()
    try:
        dist.monitored_barrier(group=g.group, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as exc:
        elapsed = time.monotonic() - t0
        text = str(exc)
        m = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text)
        if m is None and elapsed < timeout_s:
            # [Note: monitored barrier] not a timeout: a peer closed its connection (it exited,
            # crashed or gave up) before arriving. Say so, with the time actually waited.
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            suspects = g.health.suspects(among=None if g.is_world else g.global_ranks) if g.health is not None else {}
            ranks = tuple(r for r in suspects if r >= 0)
            who = ("; ".join(f"rank {r} {why}" for r, why in suspects.items()) if suspects else
                   "a peer closed its connection (it exited, crashed or gave up)")
            err = CollectiveError(
                f"rank {g.global_rank(g.rank)}: {who}, {elapsed:.1f} s into the barrier (which waits up to "
                f"{timeout_s:g} s) (torch: {first})", ranks)
            err.peer_detail = who  # read by peer_exit_text
            raise err from exc
        # torch names group ranks; the error names global ones
        missing = tuple(g.global_rank(int(r)) for r in re.findall(r"\d+", m.group(1)) if int(r) < g.size) if m else ()
        if not missing and g.rank != 0:
            missing = (g.global_rank(0),)  # group rank 0 runs the barrier; the others only see it gone
        raise CollectiveTimeoutError(
            f"rank {g.global_rank(g.rank)}: ranks {list(missing) or '?'} did not reach the barrier within "
            f"{timeout_s:g} s ({text.strip().splitlines()[0] if text.strip() else 'timeout'})",
            missing,
        ) from exc
    if rec is not None:
        _end(rec)


def require_all_ranks(g: GroupContext, call: str, timeout_s: float, error: type = UsageError) -> None:
    """Bounded wait for an API every rank must call together (``save_checkpoint``, ...).

    A rank that does not arrive within ``timeout_s`` is named in ``error`` ("``call`` must be
    called on every rank: rank(s) [...] did not call it") instead of leaving the others hanging
    in the collective that follows. See [Note: monitored barrier].
    """
    t0 = time.monotonic()
    try:
        barrier(g, timeout_s=timeout_s)
    except CollectiveTimeoutError as exc:
        missing = list(exc.missing_ranks) or "?"
        raise error(f"{call} must be called on every rank: rank(s) {missing} did not call it within "
                    f"{timeout_s:g} s (rank {g.global_rank(g.rank)} is waiting). Call it on all ranks, not only "
                    "on rank 0.") from exc
    except CollectiveError as exc:  # a peer is gone: not a timeout (see barrier)
        raise error(f"{call}: {peer_exit_text(exc)} {time.monotonic() - t0:.1f} s after rank "
                    f"{g.global_rank(g.rank)} called it; it must be called on every rank, and that rank's own "
                    "output says why it stopped") from exc


def peer_exit_text(exc: CollectiveError) -> str:
    """``rank(s) [1] exited without completing the call (why)``, from :func:`barrier`'s error."""
    ranks = list(exc.failed_ranks) or "?"
    return f"rank(s) {ranks} exited without completing the call ({getattr(exc, 'peer_detail', exc)})"
