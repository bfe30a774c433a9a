"""DeepSpeed's monitors (``tensorboard``, ``csv_monitor``, ``wandb``, ``comet``) as one
observer ([Note: observers]), plus ``run.jsonl`` for ``shardwise report``.

[Note: monitor]
Every rank runs :class:`Monitor`; every ``steps_per_print`` optimizer steps (and for the last,
shorter interval on ``engine.destroy()``) all ranks take part in the interval's two collectives
([Note: monitor metrics]) at the same step, and rank 0 hands the events to its writers
(``writers.py``). Nothing else reads the device: the loss stays a device tensor until then.
The tags are DeepSpeed's (``Train/Samples/train_loss``, ``lr``, ``loss_scale`` with fp16) and
shardwise's (``samples_per_s``, ``tokens_per_s``, ``tflops``, ``mfu``, ``skipped_steps``,
``grad_norm``, ``Memory/rank{r}/{total,rss,max_allocated}_bytes``), x-axis = samples.

Rank 0 opens its writers while the engine is built; if that fails (a directory it cannot
create, ``wandb.init`` refused), every rank raises the same :class:`MonitorError` there, before
training. A writer that fails later (disk full) is dropped with a warning: monitoring never
stops a run. At interpreter exit without ``engine.destroy()`` the files are closed, but a
multi-rank run's last partial interval is not written (its collectives could wait on a rank
that already left).
"""
from __future__ import annotations

import atexit
import logging
import sys
from typing import Any

import torch.nn as nn

from shardwise.comm.collectives import broadcast_object
from shardwise.monitor.metrics import IntervalMetrics
from shardwise.monitor.writers import MonitorError, Writer, close_all, make_writers
from shardwise.observers import Observer

log = logging.getLogger("shardwise")

_CONFIG_FLAGS = ("--config", "--deepspeed_config", "--deepspeed-config", "--ds_config", "--ds-config")


def _config_path_from_argv(argv: list[str]) -> str | None:
    """The script's config argument, if it has one of the usual names (best effort)."""
    for i, arg in enumerate(argv):
        for flag in _CONFIG_FLAGS:
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "="):
                return arg[len(flag) + 1:]
    return None


class Monitor(Observer):
    """The monitors of one engine. ``writers`` is rank 0's list (empty on the other ranks);
    :attr:`last_events` holds the last interval's ``(tag, value, samples)`` on every rank."""

    def __init__(self, obs: Any, steps_per_print: int, module: nn.Module, ctx: Any,
                 writers: list[Writer] | None = None, config_path: str | None = None):
        self.every = int(steps_per_print)
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self.ctx = ctx
        self.metrics = IntervalMetrics(module, ctx, obs.peak_tflops)
        self.writers: list[Writer] = list(writers or [])
        self.config_path = config_path if config_path is not None else _config_path_from_argv(sys.argv[1:])
        self.last_events: list[tuple[str, float, int]] | None = None
        self.intervals = 0  # intervals written
        self._begun = False
        self._closed = False
        atexit.register(self._at_exit)

    # -- events
    def forward_begin(self, inputs: tuple, kwargs: dict) -> None:
        self.metrics.forward_begin(inputs, kwargs)

    def backward_begin(self, loss: Any) -> None:
        self.metrics.backward_begin(loss)

    def step_end(self, record: Any) -> None:
        self.metrics.step_end(record)
        if self.every > 0 and record.step % self.every == 0:
            self._write()

    def close(self) -> None:
        self._close(final=True)

    # -- writing
    def _meta(self) -> dict:
        m = self.metrics
        rec = m.cur.last
        return {"world_size": self.world_size, "dp_size": self.ctx.dp.size, "parameters": m.parameters,
                "train_batch_size": rec.train_batch_size if rec is not None else None,
                "steps_per_print": self.every, "peak_tflops": m.peak_tflops, "device": str(self.ctx.device),
                "config": self.config_path, "writers": [w.name for w in self.writers]}

    def _write(self) -> None:
        meta = self._meta() if not self._begun and self.rank == 0 else None
        events, summary = self.metrics.collect()  # a collective: every rank, same step
        self.last_events = events
        self.intervals += 1
        if self.rank != 0:
            return
        if not self._begun:
            self._begun = True
            self._each("begin", self.metrics.start_samples or 0, meta)
        self._each("write", events, summary)

    def _each(self, method: str, *args: Any) -> None:
        for w in list(self.writers):
            try:
                getattr(w, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a monitor never stops training
                log.warning("monitor %s: %s failed (%s: %s); it writes nothing more in this run",
                            w.name, method, type(exc).__name__, exc)
                self.writers.remove(w)
                try:
                    w.close()
                except Exception:  # noqa: BLE001
                    pass

    def _close(self, final: bool) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            atexit.unregister(self._at_exit)
        except Exception:  # noqa: BLE001 - interpreter shutting down
            pass
        if self.metrics.pending and self._can_collect(final):
            self._write()
        elif self.metrics.pending and self.rank == 0:
            log.warning("monitor: the last %d step(s) were not written: call engine.destroy() on every "
                        "rank before torch.distributed.destroy_process_group()", self.metrics.cur.steps)
        close_all(self.writers)

    def _can_collect(self, final: bool) -> bool:
        if self.world_size == 1:
            return True
        import torch.distributed as dist

        return final and dist.is_available() and dist.is_initialized()

    def _at_exit(self) -> None:
        self._close(final=False)


def make_monitor(obs: Any, steps_per_print: int, module: nn.Module, ctx: Any) -> Monitor:
    """The :class:`Monitor` for ``plan.observe`` (every rank calls it: rank 0 opens the writers
    and tells the others whether that worked)."""
    writers: list[Writer] = []
    error = None
    if ctx.rank == 0:
        try:
            writers = make_writers(obs)
        except MonitorError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported on every rank, not only rank 0
            error = f"monitor setup failed on rank 0: {type(exc).__name__}: {exc}"
    if ctx.world_size > 1:
        error = broadcast_object(error, ctx.world)
    if error is not None:
        close_all(writers)
        raise MonitorError(error if ctx.rank == 0 else f"(on rank 0) {error}")
    return Monitor(obs, steps_per_print, module, ctx, writers)


__all__ = ["Monitor", "MonitorError", "make_monitor"]
