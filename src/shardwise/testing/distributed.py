"""``run_distributed(fn, world_size)``: run ``fn`` on N gloo ranks, with a file store and a hang guard.

- Ranks are started from a fork server (preloaded with torch) so each start costs little
  and no OpenMP state is inherited from the parent.
- The process group uses a ``FileStore`` in a fresh temporary directory: no ports to guess.
- ``fn`` must be importable by module and name (a module-level function). It runs with one
  intra-op thread per rank; its return value (picklable) comes back in rank order.
- If a rank raises, its traceback is raised here as :class:`RankFailedError` naming the rank;
  the other ranks get ``grace_s`` to finish and are then killed. If nothing has finished
  within ``timeout_s``, every rank is killed and the error names the ranks that did not
  report. No test can hang.
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

from shardwise.errors import ShardwiseError


class RankFailedError(ShardwiseError):
    """A rank raised, or ranks did not finish in time, inside ``run_distributed``."""


def _mp_context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch.distributed.tensor"])
    return ctx


def _worker(rank: int, world_size: int, store_path: str, target: tuple[str, str], args: tuple,
            kwargs: dict, sys_path: list[str], pg_timeout_s: float, results) -> None:
    sys.path[:] = sys_path
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        module_name, qualname = target
        fn: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            fn = getattr(fn, part)
        dist.init_process_group(
            "gloo",
            store=dist.FileStore(store_path, world_size),
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout_s),
        )
        out = fn(*args, **kwargs)
        # plain pickle (by value): torch's shared-memory reducers would hand the parent file
        # descriptors of a process that is about to exit
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 180.0,
    pg_timeout_s: float = 60.0,
    grace_s: float = 3.0,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return the results by rank."""
    target = (fn.__module__, fn.__qualname__)
    if "<locals>" in fn.__qualname__ or fn.__module__ == "__main__" and not hasattr(sys.modules["__main__"], "__file__"):
        raise RankFailedError(f"run_distributed needs a module-level function; got {fn.__qualname__}")
    mctx = _mp_context()
    results = mctx.Queue()
    with tempfile.TemporaryDirectory(prefix="shardwise-store-") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            mctx.Process(
                target=_worker,
                args=(r, world_size, store_path, target, args, kwargs, list(sys.path), pg_timeout_s, results),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        outputs: dict[int, Any] = {}
        failure: tuple[int, str] | None = None
        deadline = time.monotonic() + timeout_s
        try:
            while len(outputs) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    rank, ok, payload = results.get(timeout=min(remaining, 0.5))
                except queue_mod.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outputs]
                    if dead and failure is None:
                        failure = (dead[0], f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} without reporting")
                        deadline = min(deadline, time.monotonic() + grace_s)
                    continue
                outputs[rank] = pickle.loads(payload) if ok else payload
                if not ok and failure is None:
                    failure = (rank, payload)
                    deadline = min(deadline, time.monotonic() + grace_s)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=5)
        if failure is not None:
            rank, text = failure
            raise RankFailedError(f"rank {rank} of {world_size} failed in {fn.__qualname__}:\n{text}")
        missing = [r for r in range(world_size) if r not in outputs]
        if missing:
            raise RankFailedError(
                f"ranks {missing} of {world_size} did not finish {fn.__qualname__} within {timeout_s:g} s "
                "(hang guard); all ranks were killed"
            )
        return [outputs[r] for r in range(world_size)]
