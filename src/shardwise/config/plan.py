"""Frozen policy objects handed to components after the config is validated and resolved.

Components never see the raw JSON dict: each receives only its own policy. Defaults live in
``schema.py``; these dataclasses carry resolved values only (no ``"auto"``, no ``None``
meaning "use the default").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class BatchPlan:
    """The resolved batch triangle: train = micro * gas * world_size."""

    train_batch_size: int
    micro_batch_size: int  # per rank ("train_micro_batch_size_per_gpu")
    gradient_accumulation_steps: int


@dataclass(frozen=True)
class OptimizerPlan:
    """``optimizer {type, params}``; ``type`` is a DeepSpeed name or a torch.optim class name."""

    type: str
    params: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs; lists become tuples

    def kwargs(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params}


@dataclass(frozen=True)
class SchedulerPlan:
    """``scheduler {type, params}``; DeepSpeed names or a torch.optim.lr_scheduler class name."""

    type: str
    params: tuple[tuple[str, Any], ...] = ()

    def kwargs(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params}


@dataclass(frozen=True)
class LossScalePlan:
    """fp16 loss scaling. ``static_scale`` > 0 means a fixed scale; 0 means dynamic."""

    static_scale: float = 0.0
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: float = 1.0


@dataclass(frozen=True)
class PrecisionPlan:
    """Compute dtype and master-weight policy.

    ``compute`` is the dtype of the model's parameters during forward/backward. With
    ``"fp32"`` the parameters *are* the master weights. With ``"bf16"``/``"fp16"`` an fp32
    master copy (sharded per the ZeRO stage) is kept. ``grads`` is the dtype gradients are
    reduced, accumulated and kept in (config ``data_types.grad_accum_dtype``): the compute
    dtype by default, as DeepSpeed's, or fp32.
    """

    compute: Literal["fp32", "bf16", "fp16"] = "fp32"
    loss_scale: LossScalePlan | None = None  # set iff compute == "fp16"
    # fp32/bf16: what a NaN/inf loss or gradient norm does ("error" raises, "skip" skips the
    # step on every rank); fp16 always skips and backs the loss scale off
    nonfinite: Literal["error", "skip"] = "error"
    grads: Literal["fp32", "bf16", "fp16"] | None = None  # None: the compute dtype


@dataclass(frozen=True)
class ZeroPlan:
    stage: Literal[0, 1, 2, 3] = 0
    reduce_bucket_size: int = 2_000_000  # elements (see schema.py [Note: bucket default])
    allgather_bucket_size: int = 500_000_000  # elements
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_scatter: bool = True
    # stage 3 (elements; see [Note: prefetch] in zero/stage3.py)
    prefetch_bucket_size: int | None = None  # None: the next unit only (see [Note: prefetch])
    param_persistence_threshold: int = 0
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000


@dataclass(frozen=True)
class CheckpointPlan:
    """``checkpoint {keep_last, dir, auto_resume, save_interval}``: retain the newest
    ``keep_last`` committed checkpoints (None keeps all; the newest is never deleted); with
    ``auto_resume`` ``initialize()`` loads the latest commit in ``dir`` when there is one; with
    ``save_interval`` the engine saves to ``dir`` every N optimizer steps."""

    keep_last: int | None = None
    dir: str | None = None
    auto_resume: bool = False
    save_interval: int | None = None


@dataclass(frozen=True)
class ActivationCheckpointingPlan:
    """``activation_checkpointing``: which modules ``initialize`` checkpoints (``modules``:
    None, ``"blocks"`` or class names; every ``every``-th) and whether the saved inputs go to
    host memory (see ``shardwise/checkpointing.py``)."""

    modules: str | tuple[str, ...] | None = None
    every: int = 1
    cpu_checkpointing: bool = False


@dataclass(frozen=True)
class Plan:
    """Everything the engine needs, resolved for one world size."""

    world_size: int
    batch: BatchPlan
    zero: ZeroPlan = field(default_factory=ZeroPlan)
    precision: PrecisionPlan = field(default_factory=PrecisionPlan)
    optimizer: OptimizerPlan | None = None
    scheduler: SchedulerPlan | None = None
    gradient_clipping: float = 1.0  # 0 disables clipping (the schema's default, as DeepSpeed's)
    steps_per_print: int = 10
    wall_clock_breakdown: bool = False
    checkpoint: CheckpointPlan = field(default_factory=CheckpointPlan)
    activation_checkpointing: ActivationCheckpointingPlan = field(default_factory=ActivationCheckpointingPlan)
    comms_timeout_s: float | None = None  # process-group timeout (None: torch's default)
