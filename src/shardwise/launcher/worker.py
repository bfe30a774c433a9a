"""Runs the training script inside each rank's process, so that its failure is reported.

``shardwise run`` hands torchrun this file as the program and the user's script after it:
``python -u worker.py [--module] SCRIPT [ARGS...]``. It is run by path (not ``-m``), so
starting it imports nothing but the standard library; shardwise and torch are imported only
by the script itself (or, for the error file, after the script has failed).

[Note: launcher failure report]
An exception that escapes the script used to reach the launcher's summary only when the rank
had already called ``init_process_group`` (from then on torch prefixes the traceback's lines
with ``[rankN]:``): a rank that failed before that, or whose output torchrun redirected or
prefixed (``--redirects``, ``--tee``), gave a summary with no exception at all. So here:

1. the traceback is printed by ``sys.excepthook`` (torch's ``[rankN]:`` hook when installed)
   without this file's and runpy's frames, so it reads as if the script had been run directly;
2. the exception is written to torchrun's per-rank error file (``TORCHELASTIC_ERROR_FILE``),
   in the format torch's ``@record`` writes: torchrun's "Root Cause" report then shows the traceback, and
   picks the first failure by the time the exception was raised;
3. one line ``[shardwise rank R] failed: Type: message`` goes to stderr; ``RANK`` comes from
   torchrun's environment, so this works before any process group exists.

The launcher's summary reads 3, else the root cause's traceback from 2, else the ``[rankN]:``
lines. ``SystemExit`` and ``KeyboardInterrupt`` are not reports: they propagate unchanged
(``sys.exit(3)`` still exits with 3).
"""
from __future__ import annotations

import os
import runpy
import sys

MARK = "[shardwise rank {rank}] failed: "


def _trim(tb):
    """The traceback without this file's and runpy's frames (the script's frames remain)."""
    skip = {os.path.abspath(__file__), os.path.abspath(runpy.__file__), "<frozen runpy>"}
    while tb is not None and (tb.tb_frame.f_code.co_filename in skip
                              or os.path.abspath(tb.tb_frame.f_code.co_filename) in skip):
        tb = tb.tb_next
    return tb


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (``module.Type`` outside builtins), at most 300 chars."""
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"
    text = str(exc).strip()
    lines = text.splitlines()
    first = lines[0] if lines else ""
    if len(lines) > 1:
        first += " ..."
    line = f"{name}: {first}" if first else name
    return line if len(line) <= 300 else line[:297] + "..."


def _record(exc: BaseException, tb) -> None:
    """Write torchrun's error file for this rank, in the format torch's ``@record`` writes
    (read back by torchrun's failure report); best effort."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        import json
        import time
        import traceback

        data = {"message": {"message": f"{type(exc).__name__}: {exc}", "extraInfo": {
            "py_callstack": "".join(traceback.format_exception(type(exc), exc, tb)),
            "timestamp": str(int(time.time()))}}}
        # [Note: error file written whole] written aside and renamed: torchrun SIGTERMs the
        # survivors of a failed rank, and one killed halfway through an in-place write left an
        # empty file that made torchrun itself crash reading it (JSONDecodeError in
        # _capture_process_failures; seen in tests/faults/test_fault_launch.py's SIGKILL case)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except Exception:  # noqa: BLE001 - never hide the script's own failure behind ours
        pass


def main(argv: list[str]) -> None:
    module = bool(argv) and argv[0] == "--module"
    if module:
        argv = argv[1:]
    if not argv:
        sys.exit("usage: worker.py [--module] SCRIPT [ARGS...] (started by `shardwise run`)")
    target, args = argv[0], argv[1:]
    sys.argv = [target, *args]
    if os.environ.get("SHARDWISE_LAUNCH_HOST"):
        # [Note: multi-host launch] tells the launcher this rank has started on its host (the
        # launcher reads the rank from torchrun's line prefix and does not show this line)
        sys.stderr.write(f"[shardwise rank {os.environ.get('RANK', '?')}] started\n")
        sys.stderr.flush()
    try:
        if module:
            sys.path[0] = os.getcwd()  # as `python -m` does
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path[0] = os.path.dirname(os.path.realpath(target))  # as `python script.py` does
            runpy.run_path(target, run_name="__main__")
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:  # noqa: BLE001 - reported, then the process exits with 1
        tb = _trim(exc.__traceback__)
        exc.__traceback__ = tb  # the hook prints the exception's own traceback
        _record(exc, tb)
        sys.excepthook(type(exc), exc, tb)
        rank = os.environ.get("RANK", "?")
        try:
            sys.stderr.write(MARK.format(rank=rank) + one_line(exc) + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
