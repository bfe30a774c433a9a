"""The config sections that observe a run without changing it: DeepSpeed's monitors
(``tensorboard``, ``csv_monitor``, ``wandb``, ``comet``), ``flops_profiler`` and
``comms_logger``, plus shardwise's ``peak_tflops`` (for MFU). DeepSpeed's keys and defaults
(``deepspeed/monitor/config.py``, ``profiling/config.py``, ``comm/config.py``); what each does
here is in ``shardwise/monitor/`` and ``shardwise/profiling/``. ``resolve.py`` turns them into
``plan.ObservePlan``."""
from typing import Annotated, Any

from pydantic import BeforeValidator

from shardwise.config import ranges as R
from shardwise.config.fields import Bool, Str, _Model, _inert
from shardwise.config.ranges import typed

_OptStr = typed("str", nullable=True)


class _Switched(_Model):
    sw_gate = "enabled"
    enabled: Bool = False


class _WriterSection(_Switched):
    # the directory the files go in, under <output_path>/<job_name>/; "" (DeepSpeed's
    # default): ./runs/<job_name>/ in the working directory (DeepSpeed writes under ~/; shardwise
    # keeps a run's files beside the run, where `shardwise report` finds them)
    output_path: _OptStr = ""
    job_name: Str = "DeepSpeedJobName"


class TensorboardSection(_WriterSection):
    pass


class CsvMonitorSection(_WriterSection):
    pass


class WandbSection(_Switched):
    group: _OptStr = None
    team: _OptStr = None  # W&B's "entity"
    project: _OptStr = "deepspeed"


class CometSection(_Switched):
    samples_log_interval: typed("int", R.STEPS) = 100
    project: _OptStr = None
    workspace: _OptStr = None
    api_key: _OptStr = None
    experiment_name: _OptStr = None
    experiment_key: _OptStr = None
    online: typed("bool", nullable=True) = None
    mode: _OptStr = None


class FlopsProfilerSection(_Switched):
    # extra forward passes counted per step (activation checkpointing recomputes the forward: 1.0)
    recompute_fwd_factor: typed("float", R.NON_NEG) = 0.0
    profile_step: typed("int", R.STEPS) = 1  # the optimizer step (1-based) that is profiled
    module_depth: typed("int", R.COUNT_OR_OFF) = -1  # depth of the per-module table; -1: all
    top_modules: typed("int", R.STEPS) = 1  # modules listed per depth in the summary
    detailed: Bool = True  # the per-module tree as well as the summary
    output_file: _OptStr = None  # None: the log (rank 0)


def _check_ops(value: Any) -> Any:
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return value
    raise ValueError(f'must be a list of collective names such as ["all_reduce"]; got {value!r:.80}')


class CommsLoggerSection(_Switched):
    verbose: Bool = False  # log every collective as it completes (rank 0)
    prof_all: Bool = True  # profile every collective; false: only those in prof_ops
    debug: Bool = _inert(False)  # DeepSpeed adds the caller's name; shardwise always records the op
    prof_ops: Annotated[list[str], BeforeValidator(_check_ops)] = []


__all__ = ["TensorboardSection", "CsvMonitorSection", "WandbSection", "CometSection",
           "FlopsProfilerSection", "CommsLoggerSection"]
