"""Frozen policy objects handed to components after the config is validated and resolved.

Components never see the raw JSON dict: each receives only its own policy. Defaults live in
``schema.py`` only: these dataclasses have no defaults of their own, ``resolve.py`` fills every
field, and they carry resolved values only (no ``"auto"``, no ``None`` meaning "use the
default"). Tests build plans through ``shardwise.config.plan_for`` (tests/unit/test_plan_defaults.py
checks both rules).
"""
from __future__ import annotations

from dataclasses import dataclass
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
    params: tuple[tuple[str, Any], ...]  # sorted (key, value) pairs; lists become tuples

    def kwargs(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params}


@dataclass(frozen=True)
class SchedulerPlan:
    """``scheduler {type, params}``; DeepSpeed names or a torch.optim.lr_scheduler class name."""

    type: str
    params: tuple[tuple[str, Any], ...]

    def kwargs(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params}


@dataclass(frozen=True)
class LossScalePlan:
    """fp16 loss scaling. ``static_scale`` > 0 means a fixed scale; 0 means dynamic."""

    static_scale: float
    initial_scale_power: int
    loss_scale_window: int
    hysteresis: int
    consecutive_hysteresis: bool
    min_loss_scale: float


@dataclass(frozen=True)
class PrecisionPlan:
    """Compute dtype and master-weight policy.

    ``compute`` is the dtype of the model's parameters during forward/backward. With
    ``"fp32"`` the parameters *are* the master weights. With ``"bf16"``/``"fp16"`` an fp32
    master copy (sharded per the ZeRO stage) is kept. ``grads`` is the dtype gradients are
    reduced, accumulated and kept in (config ``data_types.grad_accum_dtype``): the compute
    dtype by default, as DeepSpeed's, or fp32.
    """

    compute: Literal["fp32", "bf16", "fp16"]
    loss_scale: LossScalePlan | None  # set iff compute == "fp16"
    # fp32/bf16: what a NaN/inf loss or gradient norm does ("error" raises, "skip" skips the
    # step on every rank); fp16 always skips and backs the loss scale off
    nonfinite: Literal["error", "skip"]
    grads: Literal["fp32", "bf16", "fp16"]  # resolved: the compute dtype unless fp32 is asked for


@dataclass(frozen=True)
class Stage3Policy:
    """What the stage-3 runtime (``zero/stage3.py``) reads, in elements (see [Note: prefetch]
    in ``zero/prefetch.py``); built by ``resolve.py`` and handed to ``apply_stage3`` untouched."""

    prefetch_bucket_size: int | None  # None: the next unit only (config key unset)
    param_persistence_threshold: int  # smaller parameters stay whole on every rank
    max_live_parameters: int
    max_reuse_distance: int
    overlap_comm: bool
    max_pending_reductions: int  # gradient reductions in flight with overlap_comm (not a key)


@dataclass(frozen=True)
class ZeroPlan:
    stage: Literal[0, 1, 2, 3]
    reduce_bucket_size: int  # elements (see schema.py [Note: bucket default])
    allgather_bucket_size: int  # elements
    overlap_comm: bool
    contiguous_gradients: bool
    reduce_scatter: bool
    stage3: Stage3Policy  # the stage3_* keys (read at stage 3 only)
    # what gradients are divided by before the reduction (the rest, dp/f, after it);
    # None: the data-parallel size, all before (see schema.py [Note: where gradients are divided])
    grad_predivide: float | None


@dataclass(frozen=True)
class CheckpointPlan:
    """``checkpoint {keep_last, dir, auto_resume, save_interval}``: retain the newest
    ``keep_last`` committed checkpoints (None keeps all; the newest is never deleted); with
    ``auto_resume`` ``initialize()`` loads the latest commit in ``dir`` when there is one; with
    ``save_interval`` the engine saves to ``dir`` every N optimizer steps."""

    keep_last: int | None
    dir: str | None
    auto_resume: bool
    save_interval: int | None


@dataclass(frozen=True)
class ActivationCheckpointingPlan:
    """``activation_checkpointing``: which modules ``initialize`` checkpoints (``modules``:
    None, ``"blocks"`` or class names; every ``every``-th) and whether the saved inputs go to
    host memory (see ``shardwise/checkpointing.py``)."""

    modules: str | tuple[str, ...] | None
    every: int
    cpu_checkpointing: bool
    partition_activations: bool  # kept inputs split over tp ([Note: partitioned activations] in checkpointing.py)


@dataclass(frozen=True)
class OptimizerOffloadPolicy:
    """``zero_optimization.offload_optimizer``: where the fp32 master (when it is not the
    parameters themselves) and the optimizer state of this rank's chunks live
    (``shardwise/offload/``). ``device`` "none" means resident, and then the other fields are
    unused."""

    device: Literal["none", "cpu", "nvme"]
    nvme_path: str | None  # set iff device == "nvme" (checked to be a writable directory)
    pin_memory: bool  # page-lock host buffers (CUDA only; a no-op on a CPU-only machine)
    buffer_count: int  # swap buffers (one tensor kind of one tile each)
    pipeline_read: bool  # read the next tile while this one steps
    pipeline_write: bool  # leave a tile's write in flight while the next steps
    fast_init: bool  # build the swap files tile by tile, never the whole state in memory
    ratio: float  # fraction of the chunks (by elements, the last ones) offloaded; 1.0: all


@dataclass(frozen=True)
class ParamOffloadPolicy:
    """``zero_optimization.offload_param`` (stage 3 only): where each unit's parameter shard
    lives between its gathers."""

    device: Literal["none", "cpu", "nvme"]
    nvme_path: str | None  # set iff device == "nvme"
    pin_memory: bool
    buffer_count: int  # parameter swap buffers
    buffer_size: int  # elements per parameter swap buffer
    max_in_cpu: int  # elements of parameter shards that may stay in host memory


@dataclass(frozen=True)
class AioPolicy:
    """The top-level ``aio`` section, as shardwise's I/O engine (``offload/aio.py``) reads it."""

    block_size: int  # bytes per request
    queue_depth: int  # requests in flight (= I/O threads)
    intra_op_parallelism: int
    single_submit: bool
    overlap_events: bool


@dataclass(frozen=True)
class OffloadPlan:
    """Everything the offload tiers read: both offload sections, ``aio``, the tile size and
    shardwise's ``offload.host_memory_budget``."""

    optimizer: OptimizerOffloadPolicy
    param: ParamOffloadPolicy
    aio: AioPolicy
    sub_group_size: int  # elements per tile of the offloaded optimizer step
    host_memory_budget: int | None  # bytes every host buffer of the offload path fits in; None: no limit

    @property
    def enabled(self) -> bool:
        return self.optimizer.device != "none" or self.param.device != "none"


@dataclass(frozen=True)
class WriterPolicy:
    """``tensorboard`` / ``csv_monitor``: where rank 0 writes."""

    log_dir: str  # <output_path or ./runs>/<job_name>, absolute


@dataclass(frozen=True)
class WandbPolicy:
    project: str | None
    group: str | None
    team: str | None


@dataclass(frozen=True)
class CometPolicy:
    samples_log_interval: int
    project: str | None
    workspace: str | None
    api_key: str | None
    experiment_name: str | None
    experiment_key: str | None
    online: bool | None
    mode: str | None


@dataclass(frozen=True)
class FlopsProfilerPolicy:
    profile_step: int  # the optimizer step (1-based) that is profiled
    module_depth: int  # -1: every depth
    top_modules: int
    detailed: bool
    output_file: str | None  # None: the log
    recompute_fwd_factor: float


@dataclass(frozen=True)
class CommsLoggerPolicy:
    verbose: bool
    prof_all: bool
    prof_ops: tuple[str, ...]


@dataclass(frozen=True)
class ObservePlan:
    """What observes the run without changing it (``shardwise/monitor``, ``shardwise/profiling``);
    a switched-off section is ``None``."""

    tensorboard: WriterPolicy | None
    csv_monitor: WriterPolicy | None
    wandb: WandbPolicy | None
    comet: CometPolicy | None
    flops_profiler: FlopsProfilerPolicy | None
    comms_logger: CommsLoggerPolicy | None
    peak_tflops: float | None  # one device's peak, for MFU; None: known CUDA devices only

    @property
    def monitors(self) -> bool:
        return any(x is not None for x in (self.tensorboard, self.csv_monitor, self.wandb, self.comet))


@dataclass(frozen=True)
class PipelinePlan:
    """``pipeline``: how a ``PipelineModule`` is split and scheduled (``shardwise/pipe``)."""

    stages: int | None  # None: "auto", the PipelineModule's num_stages
    partition: str  # "parameters" | "uniform" | "type:<regex>"
    seed_layers: bool
    activation_checkpoint_interval: int  # 0: off
    schedule: str  # a torch.distributed.pipelining schedule (schema_parallel.SCHEDULES)
    stages_per_rank: int  # > 1 only for the looped / interleaved / V schedules


@dataclass(frozen=True)
class TensorParallelPlan:
    """``tensor_parallel``: DTensor sharding of the model's layers over the mesh's ``"tp"``."""

    size: int  # 1: off
    tp_plan: tuple[tuple[str, str], ...] | None  # (pattern, style) in the config's order; None: built-in
    preset: str | None  # a built-in plan's name; None: recognised from the model


@dataclass(frozen=True)
class CompilePolicy:
    """The config's ``compile`` section (``shardwise/compile.py``; checked in ``resolve.py``)."""

    enabled: bool  # compile at initialize (engine.compile() works either way)
    backend: str  # a torch.compile backend name, or "package.module:function"
    mode: str | None  # torch.compile's mode (inductor only); None: torch's default
    kwargs: tuple[tuple[str, Any], ...]  # torch.compile's other arguments, sorted (key, value) pairs; no "mode"


@dataclass(frozen=True)
class ParallelPlan:
    """The mesh one model replica spans: world = pp * dp * tp ([Note: parallel context])."""

    pp: int
    dp: int
    tp: int
    pipeline: PipelinePlan
    tensor: TensorParallelPlan


@dataclass(frozen=True)
class Plan:
    """Everything the engine needs, resolved for one world size."""

    world_size: int
    batch: BatchPlan
    zero: ZeroPlan
    precision: PrecisionPlan
    optimizer: OptimizerPlan | None  # None: no optimizer section
    scheduler: SchedulerPlan | None  # None: no scheduler section
    gradient_clipping: float  # 0 disables clipping
    steps_per_print: int
    wall_clock_breakdown: bool
    checkpoint: CheckpointPlan
    activation_checkpointing: ActivationCheckpointingPlan
    comms_timeout_s: float | None  # process-group timeout (None: torch's default)
    offload: OffloadPlan  # zero_optimization.offload_* / sub_group_size, aio, offload
    observe: ObservePlan  # monitors, flops_profiler, comms_logger, peak_tflops
    parallel: ParallelPlan  # pipeline / tensor parallel sizes and policies; dp = world_size
    compile: CompilePolicy  # torch.compile of the blocks
