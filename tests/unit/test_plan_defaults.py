"""One source for defaults: the plan dataclasses have none of their own, ``resolve`` fills every
field, and a config that sets nothing resolves to the schema's defaults."""
from __future__ import annotations

import dataclasses

import pytest

import shardwise.config.plan as plan_module
from shardwise.config import plan_for
from shardwise.config.schema import STAGE3_MAX_PENDING_REDUCTIONS, default
from shardwise.zero.stage3 import Stage3Policy

PLAN_CLASSES = [c for c in vars(plan_module).values()
                if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == plan_module.__name__]

# plan field (dotted) -> schema key whose default it carries (None: the plan's value is given below)
FROM_SCHEMA = {
    "compile.enabled": "compile.enabled",
    "compile.backend": "compile.backend",
    "compile.mode": "compile.mode",
    "zero.stage": "zero_optimization.stage",
    "zero.reduce_bucket_size": "zero_optimization.reduce_bucket_size",
    "zero.allgather_bucket_size": "zero_optimization.allgather_bucket_size",
    "zero.overlap_comm": "zero_optimization.overlap_comm",
    "zero.contiguous_gradients": "zero_optimization.contiguous_gradients",
    "zero.reduce_scatter": "zero_optimization.reduce_scatter",
    "zero.stage3.param_persistence_threshold": "zero_optimization.stage3_param_persistence_threshold",
    "zero.stage3.max_live_parameters": "zero_optimization.stage3_max_live_parameters",
    "zero.stage3.max_reuse_distance": "zero_optimization.stage3_max_reuse_distance",
    "zero.stage3.overlap_comm": "zero_optimization.overlap_comm",
    "precision.nonfinite": "nonfinite",
    "gradient_clipping": "gradient_clipping",
    "steps_per_print": "steps_per_print",
    "wall_clock_breakdown": "wall_clock_breakdown",
    "comms_timeout_s": "comms_timeout",
    "checkpoint.keep_last": "checkpoint.keep_last",
    "checkpoint.dir": "checkpoint.dir",
    "checkpoint.auto_resume": "checkpoint.auto_resume",
    "checkpoint.save_interval": "checkpoint.save_interval",
    "activation_checkpointing.modules": "activation_checkpointing.modules",
    "activation_checkpointing.every": "activation_checkpointing.every",
    "activation_checkpointing.cpu_checkpointing": "activation_checkpointing.cpu_checkpointing",
    "activation_checkpointing.partition_activations": "activation_checkpointing.partition_activations",
    # offload: no offload section, no aio section, no offload.host_memory_budget
    **{f"offload.optimizer.{k}": f"zero_optimization.offload_optimizer.{k}"
       for k in ("device", "nvme_path", "pin_memory", "buffer_count", "pipeline_read", "pipeline_write",
                 "fast_init", "ratio")},
    **{f"offload.param.{k}": f"zero_optimization.offload_param.{k}"
       for k in ("device", "nvme_path", "pin_memory", "buffer_count", "buffer_size", "max_in_cpu")},
    **{f"offload.aio.{k}": f"aio.{k}"
       for k in ("block_size", "queue_depth", "intra_op_parallelism", "single_submit", "overlap_events")},
    "offload.sub_group_size": "zero_optimization.sub_group_size",
    "offload.host_memory_budget": "offload.host_memory_budget",
    "observe.peak_tflops": "peak_tflops",
    **{f"parallel.pipeline.{k}": f"pipeline.{k}" for k in ("seed_layers", "activation_checkpoint_interval",
                                                            "schedule", "stages_per_rank")},
    "parallel.tensor.preset": "tensor_parallel.preset_model",
    "parallel.tensor.tp_plan": "tensor_parallel.tp_plan",
}
# resolved rules, not copies of one key's default
RESOLVED = {
    "compile.kwargs": (),
    "zero.grad_predivide": None,  # prescale_gradients false, gradient_predivide_factor 1.0: 1/dp before
    "zero.stage3.prefetch_bucket_size": None,  # unset: the next unit only (DeepSpeed's 5e7 is not used)
    "zero.stage3.max_pending_reductions": STAGE3_MAX_PENDING_REDUCTIONS,  # not a config key
    "precision.compute": "fp32",  # fp16.enabled and bf16.enabled both default off
    "precision.grads": "fp32",  # data_types.grad_accum_dtype unset: the compute dtype
    "precision.loss_scale": None,  # not fp16
    "optimizer": None, "scheduler": None,  # sections absent
    # every observer is switched off by default (its section's `enabled` is false)
    **{f"observe.{k}": None for k in ("tensorboard", "csv_monitor", "wandb", "comet", "flops_profiler",
                                       "comms_logger")},
    "parallel.pipeline.stages": None,  # "auto": the PipelineModule's num_stages
    "parallel.pipeline.partition": "parameters",  # DeepSpeed's "best"
    "parallel.pp": 1, "parallel.tp": 1,  # no pipeline section, autotp_size 0
    "parallel.tensor.size": 1,
}
NOT_DEFAULTS = {"world_size", "parallel.dp", "batch.train_batch_size", "batch.micro_batch_size",
                "batch.gradient_accumulation_steps"}
LOSS_SCALE = {"static_scale": "fp16.loss_scale", "initial_scale_power": "fp16.initial_scale_power",
              "loss_scale_window": "fp16.loss_scale_window", "hysteresis": "fp16.hysteresis",
              "consecutive_hysteresis": "fp16.consecutive_hysteresis", "min_loss_scale": "fp16.min_loss_scale"}


def leaves(obj, prefix=""):
    """Dotted paths of every non-dataclass field value under ``obj``."""
    out = {}
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            out |= leaves(value, path + ".")
        else:
            out[path] = value
    return out


def test_plan_dataclasses_have_no_defaults():
    assert {c.__name__ for c in PLAN_CLASSES} >= {
        "Plan", "BatchPlan", "ZeroPlan", "Stage3Policy", "PrecisionPlan", "LossScalePlan", "OptimizerPlan",
        "SchedulerPlan", "CheckpointPlan", "ActivationCheckpointingPlan", "OffloadPlan", "OptimizerOffloadPolicy",
        "ParamOffloadPolicy", "AioPolicy"}
    for cls in PLAN_CLASSES:
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, \
                f"{cls.__name__}.{f.name} has a default: defaults live in config/schema.py"
        with pytest.raises(TypeError):
            cls()
    assert Stage3Policy is plan_module.Stage3Policy  # zero/stage3.py re-exports the plan's


def test_every_plan_field_carries_the_schema_default():
    plan = plan_for({})
    got = leaves(plan)
    assert set(got) == set(FROM_SCHEMA) | set(RESOLVED) | NOT_DEFAULTS  # every field is accounted for
    for path, key in FROM_SCHEMA.items():
        assert got[path] == default(key), (path, key)
    for path, value in RESOLVED.items():
        assert got[path] == value, path
    assert got["zero.overlap_comm"] is True  # shardwise overlaps at every stage
    assert not plan.offload.enabled


def test_fp16_loss_scale_carries_the_schema_defaults():
    ls = plan_for({"fp16": {"enabled": True}}).precision.loss_scale
    assert dataclasses.asdict(ls) == {k: default(v) for k, v in LOSS_SCALE.items()}
    assert set(LOSS_SCALE) == {f.name for f in dataclasses.fields(ls)}


def test_stage3_policy_is_resolved_from_the_config():
    z = plan_for({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 3000, "overlap_comm": False,
                                        "stage3_param_persistence_threshold": 7, "stage3_max_live_parameters": 11,
                                        "stage3_max_reuse_distance": 13}}).zero
    assert z.stage3 == Stage3Policy(prefetch_bucket_size=3000, param_persistence_threshold=7, max_live_parameters=11,
                                    max_reuse_distance=13, overlap_comm=False,
                                    max_pending_reductions=STAGE3_MAX_PENDING_REDUCTIONS)
    assert plan_for({"zero_optimization": {"overlap_comm": None}}).zero.overlap_comm is True  # null: the default


def test_plan_for_keeps_a_given_batch():
    assert plan_for({"train_batch_size": 8}, world_size=2).batch.micro_batch_size == 4
    assert plan_for({}).batch.micro_batch_size == 1
