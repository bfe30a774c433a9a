"""Runs torchrun on one host of a multi-host ``shardwise run`` and cleans up after it.

``python agent.py HOST -- TORCHRUN_COMMAND...``; started by ssh or the launcher command, by path
(standard library only, like worker.py).

[Note: host agent]
torchrun starts each worker in a session of its own, so when torchrun itself dies (SIGKILL,
OOM killer) its workers live on: on other hosts their peers keep training with them and nothing
ends the job. This wrapper makes the host's fate one:

1. it is a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``): workers orphaned by a dead
   torchrun are re-parented to it, and once torchrun has exited it sends them SIGTERM, then
   SIGKILL after 3 s, and reaps them;
2. SIGTERM / SIGHUP / SIGINT are forwarded to torchrun (which stops its workers);
3. when its stdin reaches end of file (the launcher, or the ssh connection to it, is gone; the
   launcher keeps a pipe open to every host) it stops torchrun as in 2. ``--no-stdin-watch``
   turns that off for launch commands that do not forward stdin;
4. it prints ``[shardwise agent] HOST: started torchrun, pid P`` once torchrun is started (the
   launcher takes it as "this host's agent is up" and does not show it);
5. if torchrun died of a signal it prints ``[shardwise agent] HOST: torchrun (pid P) was killed
   by SIGNAME`` and exits with 128 + the signal number; otherwise with torchrun's exit code.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

MARK = "[shardwise agent] "
STARTED = "started torchrun, pid"
PR_SET_CHILD_SUBREAPER = 36


def _subreaper() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except Exception:  # noqa: BLE001 - not Linux: orphans go to init, as without the wrapper
        pass


def _children() -> set[int]:
    out: set[int] = set()
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children", encoding="ascii") as f:
                out.update(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _end_orphans(grace: float = 3.0) -> None:
    """[Note: host agent] 1: every process left under this one gets SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        left = _children()
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap()
            if not _children():
                return
            time.sleep(0.05)
    _reap()


def main(argv: list[str]) -> int:
    watch_stdin = True
    if argv and argv[0] == "--no-stdin-watch":
        watch_stdin, argv = False, argv[1:]
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: agent.py [--no-stdin-watch] HOST -- COMMAND... (started by `shardwise run`)\n")
        return 2
    host, cmd = argv[0], argv[2:]
    _subreaper()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    sys.stderr.write(f"{MARK}{host}: {STARTED} {proc.pid}\n")  # read (and not shown) by the launcher
    sys.stderr.flush()
    stopping = threading.Event()

    def stop(signum=signal.SIGTERM, _frame=None) -> None:
        if stopping.is_set():
            return  # torchrun has it already: a second SIGTERM would cut its own shutdown short
        stopping.set()
        if proc.poll() is None:
            try:
                proc.send_signal(signum)
            except OSError:
                pass

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, stop)

    if watch_stdin:
        def watch() -> None:
            try:
                while os.read(0, 4096):
                    pass
            except OSError:
                pass
            if proc.poll() is None:
                sys.stderr.write(f"{MARK}{host}: the launcher is gone (stdin closed): stopping torchrun\n")
                sys.stderr.flush()
                stop()

        threading.Thread(target=watch, daemon=True).start()
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:  # pragma: no cover - the handler above takes SIGINT
            continue
    _end_orphans()
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        if not stopping.is_set():
            sys.stderr.write(f"{MARK}{host}: torchrun (pid {proc.pid}) was killed by {name}\n")
            sys.stderr.flush()
        return 128 - code
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
