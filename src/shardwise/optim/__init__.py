"""Optimizers and learning-rate schedules from DeepSpeed's ``optimizer``/``scheduler`` blocks.

``build_optimizer``/``build_scheduler`` turn resolved plans into torch objects;
``check_optimizer_spec``/``check_scheduler_spec`` validate raw ``{type, params}`` pairs for
the config layer without building anything.
"""
from shardwise.optim.optimizers import build_optimizer, check_optimizer_spec
from shardwise.optim.schedulers import (LRRangeTest, OneCycle, WarmupCosineLR, WarmupDecayLR,
                                        WarmupLR, build_scheduler, check_scheduler_spec)

__all__ = [
    "build_optimizer",
    "build_scheduler",
    "check_optimizer_spec",
    "check_scheduler_spec",
    "WarmupLR",
    "WarmupDecayLR",
    "WarmupCosineLR",
    "OneCycle",
    "LRRangeTest",
]
