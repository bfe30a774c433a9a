"""Which ranks are alive: the join check at start-up, heartbeats, and naming the rank behind a
failed collective.

[Note: rank health]
Before the process group is built, every rank announces itself in the rendezvous store
(``joined/<r>`` = host, pid, process start time) and waits, bounded by the communication
timeout, for all the others: a rank that never starts is named ("k of N ranks joined; missing
ranks [...]") instead of a hang inside ``init_process_group``. Afterwards a daemon thread bumps
``hb/<r>`` every ``HEARTBEAT_S`` on its own store connection.

When a collective fails (a peer closed its connection, or the timeout ran out) ``suspects()``
names the culprits: ranks on this host are looked up by pid in ``/proc`` (gone, a zombie or a
different process: *exited*; state ``T``/``t``: *stopped*); if that finds nothing, ranks
whose heartbeat does not move within a few intervals are *not responding*. Under torchrun the
store lives in the launcher's agent, so it outlives any worker; when the store itself is
unreachable the message says so (its host, rank 0 or the launcher, is then the likely victim).
Everything here runs only at start-up, on a background thread, or after a failure.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from shardwise.errors import CollectiveError, CollectiveTimeoutError, JoinError

log = logging.getLogger("shardwise")

HEARTBEAT_S = 1.0
SUSPECT_WAIT_S = 3.0  # how long a heartbeat may stand still before a rank is "not responding"
HEARTBEAT_OP_S = 3.0  # timeout of the heartbeat's own store calls (bounds the join at exit)


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks) of a local process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the command name may contain spaces
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _describe_local(info: dict) -> str | None:
    """Why a rank on this host is not taking part, or None if it looks alive."""
    if not os.path.isdir("/proc/self"):
        return None
    stat = _proc_stat(int(info["pid"]))
    where = f"pid {info['pid']} on {info['host']}"
    if stat is None or stat[1] != info.get("start") or stat[0] in ("Z", "X"):
        return f"exited ({where} is gone: killed or crashed)"
    if stat[0] in ("T", "t"):
        return f"is stopped ({where} is in state {stat[0]}: SIGSTOP or a debugger)"
    return None


class RankHealth:
    """Join check, heartbeats and failure diagnosis over the rendezvous store."""

    def __init__(self, store: "dist.Store", rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self._prefix = f"shardwise/{attempt}"
        self._raw = store
        self._store = dist.PrefixStore(self._prefix, store)
        self.host = socket.gethostname()
        self.peers: dict[int, dict] = {}
        # global rank -> its mesh coordinates ("dp=1 tp=0 pp=2"), set when the context's mesh
        # has model-parallel dimensions, so that a failure names where in the mesh a rank sits
        self.coords: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beating = False  # every rank makes the same choice (init_distributed)

    # -- start-up -----------------------------------------------------------------------
    def join(self) -> None:
        """Announce this rank and wait (bounded) for every other one; see [Note: rank health]."""
        me = {"host": self.host, "pid": os.getpid(), "start": (_proc_stat(os.getpid()) or ("", ""))[1]}
        self._store.set(f"joined/{self.rank}", json.dumps(me))
        keys = [f"joined/{r}" for r in range(self.world_size)]
        try:
            self._store.wait(keys, timedelta(seconds=self.timeout_s))
        except Exception as exc:  # noqa: BLE001 - a store timeout; re-raised as a named error
            try:
                joined = [r for r in range(self.world_size) if self._store.check([keys[r]])]
            except Exception:  # noqa: BLE001 - the store went away too
                joined = [self.rank]
            missing = [r for r in range(self.world_size) if r not in joined]
            msg = (f"rank {self.rank}: {len(joined)} of {self.world_size} ranks joined within "
                   f"{self.timeout_s:g} s; missing ranks {missing}. Those processes never reached "
                   "shardwise.initialize() (crashed or stuck at start-up, or not launched); check "
                   "their output, or raise comms_timeout / SHARDWISE_TIMEOUT if start-up is slow.")
            log.error("JoinError: %s", msg)
            raise JoinError(msg, tuple(missing)) from exc
        self.peers = {r: json.loads(self._store.get(k)) for r, k in enumerate(keys)}

    def start_heartbeat(self) -> None:
        """Bump ``hb/<rank>`` every ``HEARTBEAT_S`` on a thread with its own store client; see
        [Note: heartbeat shutdown]."""
        try:
            raw = self._raw.clone()
            raw.set_timeout(timedelta(seconds=HEARTBEAT_OP_S))
            store = dist.PrefixStore(self._prefix, raw)
        except Exception:  # noqa: BLE001 - a store without clone(): no heartbeats, pids still work
            return
        key = f"hb/{self.rank}"
        stop = self._stop

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                try:
                    store.add(key, 1)
                except Exception:  # noqa: BLE001 - the store is gone or slow: the job is ending
                    return

        self._thread = threading.Thread(target=beat, name="shardwise-heartbeat", daemon=True)
        self._thread.start()
        self.beating = True
        atexit.register(self.close)

    # [Note: heartbeat shutdown]
    # The heartbeat thread spends most of its life in ``store.add`` with the GIL released. If
    # it were still there when interpreter shutdown began, returning from the call would try
    # to take the GIL, CPython would end the thread with pthread_exit, and the forced unwind
    # through torch's C++ frames would abort a rank that had finished ("terminate called
    # without an active exception", exit -6). So an exit hook stops and joins it before
    # shutdown; its store client has a short timeout (HEARTBEAT_OP_S) so that the join is
    # bounded even when the store's host is gone or frozen (a call blocked on the job's
    # timeout would outlive the join). The thread is the only user of its client, which is
    # freed on the thread when it ends.
    # Evidence (torch 2.13): the exit aborts once blamed on the heartbeat come from gloo's
    # worker threads freeing Python tensors during shutdown ([Note: tensors outlive gloo's
    # works] in collectives.py): the core dumps of aborted ranks show the aborting thread in
    # ProcessGroupGloo::runLoop -> ~AsyncWork -> decref_pyobject -> take_gil -> pthread_exit
    # -> std::terminate, the main thread in Py_FinalizeEx, and no heartbeat thread (joined).
    # With collectives.py's fix, jobs with the heartbeat running exit cleanly
    # (tests/faults/test_heartbeat_exit.py, heartbeat_scripts/hb_stress.sh).

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=HEARTBEAT_S + HEARTBEAT_OP_S + 1)
            if thread.is_alive():
                log.warning("shardwise: the heartbeat thread did not stop within %g s",
                            HEARTBEAT_S + HEARTBEAT_OP_S + 1)

    def close(self) -> None:
        """At exit: stop the heartbeat and drop our store clients while the interpreter is whole."""
        self.stop()
        self._store = self._raw = None

    # -- after a failure ------------------------------------------------------------------------
    def suspects(self, wait_s: float = SUSPECT_WAIT_S, among: "tuple[int, ...] | None" = None) -> dict[int, str]:
        """``{rank: why}`` for ranks that look dead or stuck (see [Note: rank health]); global
        ranks. ``among``: the global ranks of the group whose collective failed (default: all)."""
        out: dict[int, str] = {}
        members = set(range(self.world_size) if among is None else among)
        for r, info in sorted(self.peers.items()):
            if r != self.rank and r in members and info.get("host") == self.host:
                why = _describe_local(info)
                if why:
                    out[r] = why
        if out or not self.beating:
            return out  # without heartbeats a quiet counter says nothing about a rank
        try:
            store = dist.PrefixStore(self._prefix, self._raw.clone())
            store.set_timeout(timedelta(seconds=2))
            others = [r for r in sorted(members) if r != self.rank]
            first = {r: store.add(f"hb/{r}", 0) for r in others}
            quiet = set(others)
            deadline = time.monotonic() + wait_s
            while quiet and time.monotonic() < deadline:
                time.sleep(0.25)
                quiet = {r for r in quiet if store.add(f"hb/{r}", 0) == first[r]}
            return {r: f"is not responding (no heartbeat for {wait_s:g} s)" for r in sorted(quiet)}
        except Exception as exc:  # noqa: BLE001 - the store is unreachable
            return {-1: f"(the rendezvous store is unreachable: {str(exc).splitlines()[0] if str(exc) else exc!r}; "
                        "its host, the launcher or rank 0, may be gone)"}

    def collective_error(self, op: str, exc: BaseException, among: "tuple[int, ...] | None" = None
                         ) -> CollectiveError:
        return collective_error(self.rank, op, exc, self, among)


def collective_error(rank: int, op: str, exc: BaseException, health: RankHealth | None,
                     among: "tuple[int, ...] | None" = None) -> CollectiveError:
    """The named error for a collective ``op`` that raised ``exc`` on (global) ``rank``; logged
    at once (the launcher may stop this process before the traceback is printed). ``among``:
    the global ranks of the group it ran on (suspects are looked for there); None: all."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    timed_out = "timed out" in text.lower() or "timeout" in text.lower()
    suspects = health.suspects(among=among) if health is not None else {}
    ranks = tuple(r for r in suspects if r >= 0)
    coords = health.coords if health is not None else {}

    def name(r: int) -> str:
        return f"rank {r} ({coords[r]})" if r in coords else f"rank {r}"

    if ranks:
        who = "; ".join(f"{name(r)} {why}" for r, why in suspects.items())
    elif suspects:
        who = suspects[-1]
    else:
        who = "could not tell which rank failed; another rank may have died, stopped, or skipped this call"
    what = f"timed out after {health.timeout_s:g} s" if timed_out and health is not None else \
        ("timed out" if timed_out else "failed")
    msg = (f"{name(rank)}: {op} {what}: {who}. Every rank stops; the launcher's summary names the "
           f"first failure. (torch: {text})")
    if timed_out:
        msg += " If the step is just slow, raise comms_timeout or SHARDWISE_TIMEOUT."
    cls = CollectiveTimeoutError if timed_out else CollectiveError
    log.error("%s: %s", cls.__name__, msg)
    return cls(msg, ranks)
