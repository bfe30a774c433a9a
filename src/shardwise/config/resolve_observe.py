"""``Plan.observe``: the monitor, profiler and comms-logger sections resolved into frozen
policies (see ``schema_observe.py`` for the keys). A monitor whose library is not installed is
a problem here, before any rank starts training."""
from __future__ import annotations

import importlib.util
import os
from typing import Any

from shardwise.config.plan import (CometPolicy, CommsLoggerPolicy, FlopsProfilerPolicy, ObservePlan,
                                   WandbPolicy, WriterPolicy)
from shardwise.errors import ConfigProblem

# the package each monitor imports, and how to get it
_NEEDS = {"tensorboard": ("tensorboard", "pip install tensorboard (or shardwise[monitor])"),
          "wandb": ("wandb", "pip install wandb"),
          "comet": ("comet_ml", "pip install comet_ml")}


def _installed(section: str, problems: list[ConfigProblem]) -> bool:
    module, how = _NEEDS[section]
    if importlib.util.find_spec(module) is not None:
        return True
    problems.append(ConfigProblem(f"{section}.enabled", f"{section} monitoring needs the '{module}' package, "
                                  "which is not installed", f"{how}, or set {section}.enabled to false"))
    return False


def _writer(sec: Any) -> WriterPolicy:
    base = sec.output_path or "runs"
    return WriterPolicy(log_dir=os.path.abspath(os.path.join(base, sec.job_name)))


def resolve_observe(cfg: Any, problems: list[ConfigProblem]) -> ObservePlan:
    tb, csv, wb, comet = cfg.tensorboard, cfg.csv_monitor, cfg.wandb, cfg.comet
    fp, cl = cfg.flops_profiler, cfg.comms_logger
    return ObservePlan(
        tensorboard=_writer(tb) if tb.enabled and _installed("tensorboard", problems) else None,
        csv_monitor=_writer(csv) if csv.enabled else None,
        wandb=WandbPolicy(project=wb.project, group=wb.group, team=wb.team)
        if wb.enabled and _installed("wandb", problems) else None,
        comet=CometPolicy(samples_log_interval=comet.samples_log_interval, project=comet.project,
                          workspace=comet.workspace, api_key=comet.api_key,
                          experiment_name=comet.experiment_name, experiment_key=comet.experiment_key,
                          online=comet.online, mode=comet.mode)
        if comet.enabled and _installed("comet", problems) else None,
        flops_profiler=FlopsProfilerPolicy(
            profile_step=fp.profile_step, module_depth=fp.module_depth, top_modules=fp.top_modules,
            detailed=fp.detailed, output_file=fp.output_file,
            recompute_fwd_factor=fp.recompute_fwd_factor) if fp.enabled else None,
        comms_logger=CommsLoggerPolicy(verbose=cl.verbose, prof_all=cl.prof_all,
                                       prof_ops=tuple(cl.prof_ops)) if cl.enabled else None,
        peak_tflops=cfg.peak_tflops,
    )
