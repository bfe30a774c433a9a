"""Where rank 0 writes the monitor's events: TensorBoard, CSV (DeepSpeed's ``csv_monitor``
layout), Weights & Biases, Comet, and ``run.jsonl`` (read by ``shardwise report``).

Every writer takes the same ``(tag, value, samples)`` events once per interval
([Note: monitor metrics]); ``begin(start_samples, meta)`` comes first, once the engine's first
step says where the run starts (0, or a resumed checkpoint's sample count).
"""
from __future__ import annotations

import csv
import json
import os
import socket
import time
from typing import Any, Iterable

from shardwise.errors import ShardwiseError

Event = tuple[str, float, int]  # (tag, value, samples)
RUN_LOG = "run.jsonl"


class MonitorError(ShardwiseError):
    """A monitor could not be set up or written (directory, W&B/Comet start), or ``shardwise
    report`` found nothing to report."""


def ensure_dir(path: str, key: str) -> str:
    """``path`` created and writable, else a :class:`MonitorError` naming the config key."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise MonitorError(f"{key}: cannot create the log directory {path!r} ({exc.strerror}). Set "
                           f"{key.split('.')[0]}.output_path to a writable directory.") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise MonitorError(f"{key}: the log directory {path!r} is not writable. Set "
                           f"{key.split('.')[0]}.output_path to a writable directory.")
    return path


class Writer:
    """One destination. ``begin`` once, ``write`` per interval, ``close`` once (idempotent)."""

    name = "writer"

    def begin(self, start_samples: int, meta: dict) -> None:
        pass

    def write(self, events: list[Event], summary: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardWriter(Writer):
    """``tensorboard``: one scalar per tag, x-axis = samples (``global_step``), in ``log_dir``.
    A resumed run purges the events its checkpoint had not reached (TensorBoard's
    ``purge_step``), so the curve continues instead of doubling back."""

    name = "tensorboard"

    def __init__(self, log_dir: str):
        self.log_dir = ensure_dir(log_dir, "tensorboard.output_path")
        self._w = None

    def begin(self, start_samples: int, meta: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir=self.log_dir, purge_step=start_samples + 1)

    def write(self, events: list[Event], summary: dict) -> None:
        for tag, value, samples in events:
            self._w.add_scalar(tag, value, global_step=samples)
        self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None


def csv_filename(tag: str) -> str:
    """DeepSpeed's file name for a tag: ``Train/Samples/lr`` -> ``Train_Samples_lr.csv``."""
    return tag.replace("/", "_").replace(" ", "_") + ".csv"


class CsvWriter(Writer):
    """``csv_monitor``, laid out as DeepSpeed's: one ``<tag with _ for />.csv`` per tag in
    ``log_dir``, header ``step,<last part of the tag>``, one ``samples,value`` row per interval.
    A run from sample 0 starts the files afresh; a resumed run appends."""

    name = "csv_monitor"

    def __init__(self, log_dir: str):
        self.log_dir = ensure_dir(log_dir, "csv_monitor.output_path")
        self._append = False
        self._started: set[str] = set()

    def begin(self, start_samples: int, meta: dict) -> None:
        self._append = start_samples > 0

    def write(self, events: list[Event], summary: dict) -> None:
        for tag, value, samples in events:
            path = os.path.join(self.log_dir, csv_filename(tag))
            first = tag not in self._started
            mode = "a" if (self._append or not first) else "w"
            header = first and (mode == "w" or not os.path.exists(path) or os.path.getsize(path) == 0)
            with open(path, mode, newline="") as f:
                w = csv.writer(f)
                if header:
                    w.writerow(["step", tag.split("/")[-1]])
                w.writerow([samples, repr(float(value))])
            self._started.add(tag)


class RunLogWriter(Writer):
    """``run.jsonl`` in ``log_dir``: a ``start`` line per run (world size, parameters, config,
    where it starts) and an ``interval`` line per write with every tag's value, whatever other
    writer is on; ``shardwise report`` reads it."""

    name = "run_log"

    def __init__(self, log_dir: str, key: str = "tensorboard.output_path"):
        self.log_dir = ensure_dir(log_dir, key)
        self.path = os.path.join(self.log_dir, RUN_LOG)
        self._f = None
        # lines of runs that share the directory (a test beside a demo) interleave; each line
        # names its run, and the report follows one
        self.run_id = f"{socket.gethostname()}:{os.getpid()}:{time.time():.3f}"

    def _line(self, obj: dict) -> None:
        self._f.write(json.dumps(obj, allow_nan=True) + "\n")
        self._f.flush()

    def begin(self, start_samples: int, meta: dict) -> None:
        self._f = open(self.path, "a")
        self._line({"event": "start", "run": self.run_id, "time": time.time(), "start_samples": start_samples,
                    **meta})

    def write(self, events: list[Event], summary: dict) -> None:
        self._line({"event": "interval", "run": self.run_id, **summary, "time": time.time(),
                    "scalars": {tag: float(value) for tag, value, _ in events}})

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class WandbWriter(Writer):
    """``wandb``: ``wandb.init(project, group, entity=team, dir=log_dir)`` on rank 0; each
    interval is one ``wandb.log({tag: value}, step=samples)``."""

    name = "wandb"

    def __init__(self, policy: Any, log_dir: str):
        import wandb

        ensure_dir(log_dir, "wandb")
        try:
            self.run = wandb.init(project=policy.project, group=policy.group, entity=policy.team,
                                  dir=log_dir)
        except Exception as exc:  # noqa: BLE001 - wandb raises many kinds (network, auth)
            raise MonitorError(f"wandb: wandb.init(project={policy.project!r}, entity={policy.team!r}) "
                               f"failed: {exc}. Log in with `wandb login`, set WANDB_MODE=offline, or set "
                               "wandb.enabled to false.") from exc

    def write(self, events: list[Event], summary: dict) -> None:
        self.run.log({tag: value for tag, value, _ in events}, step=int(summary["samples"]))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class CometWriter(Writer):
    """``comet``: ``comet_ml.start(...)`` on rank 0; a tag is logged when at least
    ``samples_log_interval`` samples passed since it was last logged (DeepSpeed's rule).
    Not exercised by the tests (comet_ml is not installed there)."""

    name = "comet"

    def __init__(self, policy: Any):
        import comet_ml

        self.every = policy.samples_log_interval
        self._last: dict[str, int] = {}
        try:
            kw = {k: getattr(policy, k) for k in ("api_key", "project", "workspace", "experiment_key",
                                                  "mode", "online") if getattr(policy, k) is not None}
            self.exp = comet_ml.start(**kw)
            if policy.experiment_name:
                self.exp.set_name(policy.experiment_name)
        except Exception as exc:  # noqa: BLE001
            raise MonitorError(f"comet: comet_ml.start() failed: {exc}. Check comet.api_key / "
                               "comet.workspace, or set comet.enabled to false.") from exc

    def write(self, events: list[Event], summary: dict) -> None:
        for tag, value, samples in events:
            if samples - self._last.get(tag, -self.every) >= self.every:
                self.exp.log_metric(tag, value, step=samples)
                self._last[tag] = samples

    def close(self) -> None:
        if self.exp is not None:
            self.exp.end()
            self.exp = None


def make_writers(obs: Any) -> list[Writer]:
    """Rank 0's writers for ``plan.observe``: each switched-on monitor, plus ``run.jsonl`` in
    each distinct TensorBoard / CSV directory (or ``./runs/DeepSpeedJobName`` when only W&B /
    Comet are on, where W&B's files go too)."""
    writers: list[Writer] = []
    dirs: list[tuple[str, str]] = []
    if obs.tensorboard is not None:
        writers.append(TensorBoardWriter(obs.tensorboard.log_dir))
        dirs.append((obs.tensorboard.log_dir, "tensorboard.output_path"))
    if obs.csv_monitor is not None:
        writers.append(CsvWriter(obs.csv_monitor.log_dir))
        if obs.csv_monitor.log_dir not in (d for d, _ in dirs):
            dirs.append((obs.csv_monitor.log_dir, "csv_monitor.output_path"))
    if not dirs:
        dirs.append((os.path.abspath(os.path.join("runs", "DeepSpeedJobName")), "wandb"))
    if obs.wandb is not None:
        writers.append(WandbWriter(obs.wandb, dirs[0][0]))
    if obs.comet is not None:
        writers.append(CometWriter(obs.comet))
    writers += [RunLogWriter(d, key) for d, key in dirs]
    return writers


def close_all(writers: Iterable[Writer]) -> None:
    for w in writers:
        w.close()
