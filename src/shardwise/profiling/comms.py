"""``comms_logger``: every collective shardwise issues, counted per op and message size, with
its time and bandwidth (DeepSpeed's ``comms_logger`` section and ``log_summary``).

[Note: comms logger]
The collectives of ``shardwise/comm/collectives.py`` report to one process-wide recorder
([Note: collective recorder]); :func:`subscribe` shares it among listeners (this logger, the
wall-clock breakdown) and uninstalls it when the last one leaves, so a run without them pays
nothing. Op names are shardwise's entry points: ``all_reduce``, ``reduce_scatter`` (a gradient
bucket reduced to its owners: ``reduce_to_shard``), ``all_gather`` (``all_gather_shard``: stage
1-2 parameters after the step, stage-3 fetches), ``broadcast``, ``barrier``,
``all_gather_object``, ``broadcast_object``. ``prof_ops`` takes these or DeepSpeed's / torch's
names (:data:`OP_ALIASES`: ``all_gather_into_tensor`` -> ``all_gather``,
``reduce_scatter_tensor`` -> ``reduce_scatter``, ``monitored_barrier`` -> ``barrier``, ...).

Message size is the whole buffer (every rank's chunk), as DeepSpeed reports it for
all-gather / reduce-scatter. Time is from issue to completion on this rank: for an async op
until ``Handle.wait`` returns, so a reduction that overlapped backward counts the overlap too
(an upper bound of the wire time). On CUDA the logger synchronises the device around each op
(as DeepSpeed's does; slower, exact). algbw = bytes / time; busbw scales it as NCCL-tests do,
for the collective that actually moved the data (on gloo a reduce-scatter runs as an
all-reduce: [Note: reduce-to-shard implementation]): all_reduce x 2(n-1)/n, all_gather and
reduce_scatter x (n-1)/n, broadcast x 1. Bandwidths are in GB/s (10^9 bytes per second).

Every rank records; only rank 0 logs (``verbose``: each op as it completes; the summary at
``close()``, or at interpreter exit if the engine was never destroyed: printed once).
"""
from __future__ import annotations

import atexit
import logging
import time
from collections import defaultdict
from typing import Any

from shardwise.comm import collectives
from shardwise.observers import Observer
from shardwise.profiling.timers import device_sync

log = logging.getLogger("shardwise")
_clock = time.perf_counter

OPS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "barrier", "all_gather_object",
       "broadcast_object")

# DeepSpeed's / torch.distributed's names (and shardwise's function names) -> shardwise's op names
OP_ALIASES = {
    "all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce", "inference_all_reduce": "all_reduce",
    "all_reduce_scalar": "all_reduce",
    "reduce_scatter": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_base": "reduce_scatter", "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter_fn": "reduce_scatter", "reduce_scatter_single": "reduce_scatter",
    "reduce_to_shard": "reduce_scatter",
    "all_gather": "all_gather", "all_gather_into_tensor": "all_gather", "all_gather_base": "all_gather",
    "_all_gather_base": "all_gather", "allgather_fn": "all_gather", "all_gather_coalesced": "all_gather",
    "all_gather_single": "all_gather", "all_gather_shard": "all_gather",
    "broadcast": "broadcast", "barrier": "barrier", "monitored_barrier": "barrier",
    "all_gather_object": "all_gather_object",
    "broadcast_object": "broadcast_object", "broadcast_object_list": "broadcast_object",
}


def canonical_op(name: str) -> str | None:
    """shardwise's op name for a ``prof_ops`` entry; None for one shardwise never issues
    (``all_to_all_single``, ``send``, ...)."""
    return OP_ALIASES.get(name.strip().lower())


def bus_factor(op: str, impl: str, n: int) -> float:
    """NCCL-tests' busbw / algbw for ``n`` ranks, for the collective ``impl`` that ran ``op``."""
    if n <= 1 or op == "barrier":
        return 0.0
    if impl == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("all_gather", "all_gather_object", "reduce_scatter"):
        return (n - 1) / n
    return 1.0  # broadcast, broadcast_object


# -- the shared recorder ------------------------------------------------------------------


class _Fanout:
    """The recorder installed in ``collectives``: passes each event to every listener."""

    def __init__(self) -> None:
        self.listeners: list[Any] = []

    def begin(self, op: str, group: Any, impl: str):
        return tuple((lis, lis.begin(op, group, impl)) for lis in self.listeners)

    def end(self, token, nbytes: int, waited_s: float) -> None:
        for lis, t in token:
            lis.end(t, nbytes, waited_s)


_FANOUT = _Fanout()


def subscribe(listener: Any) -> None:
    """Start passing collective events to ``listener`` (``begin(op, group, impl) -> token``,
    ``end(token, nbytes, waited_s)``)."""
    if listener not in _FANOUT.listeners:
        _FANOUT.listeners.append(listener)
    collectives.set_recorder(_FANOUT)


def unsubscribe(listener: Any) -> None:
    if listener in _FANOUT.listeners:
        _FANOUT.listeners.remove(listener)
    if not _FANOUT.listeners and collectives._RECORDER is _FANOUT:
        collectives.set_recorder(None)


# -- the logger ---------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TB"  # pragma: no cover


class _Stat:
    __slots__ = ("count", "time_s", "bus_time_s")

    def __init__(self) -> None:
        self.count = 0
        self.time_s = 0.0
        self.bus_time_s = 0.0  # sum of time / bus factor: busbw = bytes / bus_time


class CommsLogger(Observer):
    """Observer for ``comms_logger``; records from construction to :meth:`close`."""

    def __init__(self, policy: Any, ctx: Any):
        self.policy = policy
        self.rank = ctx.rank
        self.device = ctx.device
        self.wanted: frozenset[str] | None = None  # None: every op
        if not policy.prof_all:
            unknown = [n for n in policy.prof_ops if canonical_op(n) is None]
            if unknown and self.rank == 0:
                log.warning("comms_logger.prof_ops: shardwise never issues %s (it records %s)",
                            unknown, ", ".join(OPS))
            self.wanted = frozenset(c for c in map(canonical_op, policy.prof_ops) if c is not None)
        # op -> message size (bytes) -> stats
        self._stats: dict[str, dict[int, _Stat]] = defaultdict(lambda: defaultdict(_Stat))
        self._closed = False
        subscribe(self)
        atexit.register(self.close)

    # -- the recorder's events
    def begin(self, op: str, group: Any, impl: str):
        if self.wanted is not None and op not in self.wanted:
            return None
        device_sync(self.device)
        return op, impl, group.size, _clock()

    def end(self, token, nbytes: int, waited_s: float) -> None:
        if token is None:
            return
        device_sync(self.device)
        op, impl, n, t0 = token
        dt = _clock() - t0
        st = self._stats[op][int(nbytes)]
        st.count += 1
        st.time_s += dt
        f = bus_factor(op, impl, n)
        st.bus_time_s += dt / f if f else 0.0
        if self.policy.verbose and self.rank == 0:
            alg = nbytes / dt / 1e9 if dt > 0 else 0.0
            log.info("comm op: %s | time (ms): %.3f | msg size: %s | algbw (GB/s): %.4g | busbw (GB/s): %.4g",
                     op, dt * 1e3, fmt_bytes(nbytes), alg, alg * f)

    # -- observer events
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        unsubscribe(self)
        try:
            atexit.unregister(self.close)
        except Exception:  # noqa: BLE001 - interpreter shutting down
            pass
        if self.rank == 0 and self._stats:
            self.log_summary()

    # -- results
    def reset(self) -> None:
        self._stats.clear()

    def summary(self) -> dict[str, dict]:
        """Per op: ``count``, ``bytes`` (total), ``time_s``, ``algbw_GBps``, ``busbw_GBps``
        and ``sizes`` (message size in bytes -> the same fields for that size)."""

        def row(count: int, nbytes: int, t: float, bus_t: float) -> dict:
            return {"count": count, "bytes": nbytes, "time_s": t,
                    "algbw_GBps": nbytes / t / 1e9 if t > 0 else 0.0,
                    "busbw_GBps": nbytes / bus_t / 1e9 if bus_t > 0 else 0.0}

        out: dict[str, dict] = {}
        for op, sizes in self._stats.items():
            per = {size: row(s.count, size * s.count, s.time_s, s.bus_time_s) for size, s in sorted(sizes.items())}
            total = row(sum(r["count"] for r in per.values()), sum(r["bytes"] for r in per.values()),
                        sum(s.time_s for s in sizes.values()), sum(s.bus_time_s for s in sizes.values()))
            out[op] = {**total, "sizes": per}
        return out

    def summary_table(self) -> str:
        head = (f"{'Comm. Op':<20}{'Message Size':>14}{'Count':>8}{'Total Latency(ms)':>19}"
                f"{'Avg Latency(ms)':>17}{'algbw (GB/s)':>14}{'busbw (GB/s)':>14}")
        lines = ["Comms summary (this rank; time from issue to completion)", head]
        for op, s in sorted(self.summary().items()):
            lines.append(f"{op:<20}{'(all)':>14}{s['count']:>8}{s['time_s'] * 1e3:>19.3f}"
                         f"{s['time_s'] * 1e3 / max(s['count'], 1):>17.3f}{s['algbw_GBps']:>14.4g}"
                         f"{s['busbw_GBps']:>14.4g}")
            for size, r in s["sizes"].items():
                lines.append(f"{'':<20}{fmt_bytes(size):>14}{r['count']:>8}{r['time_s'] * 1e3:>19.3f}"
                             f"{r['time_s'] * 1e3 / max(r['count'], 1):>17.3f}{r['algbw_GBps']:>14.4g}"
                             f"{r['busbw_GBps']:>14.4g}")
        return "\n".join(lines)

    def log_summary(self) -> None:
        """Log the summary table (DeepSpeed's ``deepspeed.comm.log_summary``)."""
        log.info("%s", self.summary_table())


def log_summary() -> None:
    """``shardwise.comm.log_summary()`` (DeepSpeed's ``deepspeed.comm.log_summary``): each active
    comms logger's table so far, on rank 0; nothing when ``comms_logger`` is off."""
    for listener in list(_FANOUT.listeners):
        if isinstance(listener, CommsLogger) and listener.rank == 0:
            listener.log_summary()
