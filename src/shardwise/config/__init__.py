"""DeepSpeed-compatible config: JSON -> pydantic schema -> one resolve step -> frozen Plan.

``load_config(source, world_size)`` is the entry point: it validates the whole document,
raises one :class:`~shardwise.errors.ConfigError` listing every problem (JSON path, what was
expected, "did you mean" for unknown keys), and returns a frozen :class:`Plan`.
"""
from shardwise.config.plan import (ActivationCheckpointingPlan, AioPolicy, BatchPlan, CheckpointPlan,
                                   LossScalePlan, OffloadPlan, OptimizerOffloadPolicy, OptimizerPlan,
                                   ParamOffloadPolicy, Plan, PrecisionPlan, SchedulerPlan, Stage3Policy,
                                   ZeroPlan)
from shardwise.config.resolve import load_config, plan_for, resolve_config
from shardwise.config.schema import (AUTO_UNRESOLVED, NOT_IMPLEMENTED, UNKNOWN_KEY,
                                     ConfigDeprecationWarning, ConfigWarning, DeepSpeedConfig,
                                     parse_config)

__all__ = [
    "load_config",
    "plan_for",
    "parse_config",
    "resolve_config",
    "DeepSpeedConfig",
    "ConfigWarning",
    "ConfigDeprecationWarning",
    "NOT_IMPLEMENTED",
    "AUTO_UNRESOLVED",
    "UNKNOWN_KEY",
    "Plan",
    "BatchPlan",
    "ZeroPlan",
    "PrecisionPlan",
    "LossScalePlan",
    "OptimizerPlan",
    "SchedulerPlan",
    "CheckpointPlan",
    "ActivationCheckpointingPlan",
    "Stage3Policy",
    "OffloadPlan",
    "OptimizerOffloadPolicy",
    "ParamOffloadPolicy",
    "AioPolicy",
]
