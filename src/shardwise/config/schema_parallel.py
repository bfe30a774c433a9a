"""The config sections of model parallelism: DeepSpeed's ``pipeline`` and ``tensor_parallel``
(AutoTP) keys, with shardwise's own ``pipeline.schedule`` / ``pipeline.stages_per_rank`` and
``tensor_parallel.tp_plan``. ``resolve_parallel.py`` turns them into ``plan.ParallelPlan``; what
each does is in ``shardwise/pipe/`` and ``shardwise/tensor_parallel/``."""
import re
from typing import Annotated, Any, Literal, Optional

from pydantic import BeforeValidator, Field
from pydantic_core import PydanticCustomError

from shardwise.config import ranges as R
from shardwise.config.fields import Bool, _default_only, _inert, _Model
from shardwise.config.ranges import check_str, typed

# torch.distributed.pipelining's schedules, by shardwise's name (DeepSpeed has only 1F1B)
SCHEDULES = ("1F1B", "GPipe", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble")
MULTI_STAGE_SCHEDULES = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble")
# Hugging Face's tp_plan styles; "colwise_gather_output" (alias "colwise_rep"): a colwise layer
# whose output is gathered (an LM head); "replicate": left whole on every tp rank
TP_STYLES = ("colwise", "rowwise", "sequence_parallel", "colwise_gather_output", "colwise_rep", "replicate")
TP_PRESETS = ("gpt", "gpt_sp", "gpt2", "llama")
MAX_STAGES = 2**16


def _check_stages(v: Any) -> Any:
    if v == "auto":
        return v
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_STAGES:
        raise PydanticCustomError("sw_value", 'expected "auto" or a number of stages from 1 to 65536, got {got}',
                                  {"got": R.got(v)})
    return v


def _check_partition(v: Any) -> Any:
    v = check_str(v)
    if v in ("best", "parameters", "uniform"):
        return v
    if v.lower().startswith("type:"):
        try:
            re.compile(v[5:])
        except re.error as exc:
            raise PydanticCustomError("sw_value", "type:<regex> has an invalid regular expression ({err})",
                                      {"err": str(exc)}) from None
        return v
    raise PydanticCustomError("sw_value", 'expected "parameters", "uniform", "type:<regex>" or "best", got {got}',
                              {"got": R.got(v)})


def _check_tp_plan(v: Any) -> Any:
    if v is None:
        return v
    if not isinstance(v, dict) or not v:
        raise PydanticCustomError("sw_type", "expected an object {{module-name pattern: style}}, got {got}",
                                  {"got": R.got(v)})
    for pattern, style in v.items():
        if not isinstance(pattern, str) or not pattern:
            raise PydanticCustomError("sw_value", "a tp_plan pattern must be a non-empty string, got {got}",
                                      {"got": R.got(pattern)})
        if style not in TP_STYLES:
            raise PydanticCustomError("sw_value", "tp_plan[{p}]: expected one of {styles}, got {got}",
                                      {"p": repr(pattern), "styles": ", ".join(TP_STYLES), "got": R.got(style)})
    return v


class PipelineSection(_Model):
    # DeepSpeed's keys. "auto": the PipelineModule's num_stages
    stages: Annotated[Any, BeforeValidator(_check_stages)] = "auto"
    # how layers are split over stages ("best": DeepSpeed's default, read as "parameters")
    partition: Annotated[str, BeforeValidator(_check_partition)] = "best"
    seed_layers: Bool = False
    activation_checkpoint_interval: typed("int", R.Range(0, R.INT64_MAX)) = 0
    # DeepSpeed's activation/gradient partitioning of the tensors sent between stages over its
    # model-parallel ranks: a transfer optimisation; torch's stages send whole tensors (same result)
    pipe_partitioned: Bool = _inert(True)
    grad_partitioned: Bool = _inert(True)
    use_reentrant: Bool = _inert(True)  # shardwise checkpoints layers with use_reentrant=False
    # shardwise: the torch.distributed.pipelining schedule, and stages per rank for the looped ones
    schedule: Annotated[Literal[SCHEDULES], BeforeValidator(check_str)] = "1F1B"
    stages_per_rank: typed("int", R.STEPS) = 1


class _TpSubsection(_Model):  # DeepSpeed's older spelling of the tensor-parallel size and groups
    tp_size: typed("int", R.STEPS) = _default_only(1)
    tp_grain_size: typed("int", R.STEPS) = _default_only(1)
    mpu: Any = _default_only(None)
    tp_group: Any = _default_only(None)


class TensorParallelSection(_Model):
    sw_gate = "autotp_size"
    autotp_size: typed("int", R.Range(0, 2**20)) = 0  # 0 or 1: off
    # shardwise (Hugging Face's tp_plan vocabulary): {"blocks.*.attn.q": "colwise", ...}; null:
    # the built-in plan of preset_model, or of the model's class
    tp_plan: Annotated[Optional[dict], BeforeValidator(_check_tp_plan)] = None
    preset_model: Annotated[Optional[Literal[TP_PRESETS]], BeforeValidator(check_str)] = None
    # DeepSpeed's other AutoTP keys: accepted at their defaults
    enabled: Bool = _inert(False)
    dtype: Any = _inert(None)
    tp_overlap_comm: Bool = _default_only(False)
    vocab_parallel_lm_head: Bool = _default_only(False)
    vocab_parallel_ce_backend: Any = _default_only("torch")
    tp: _TpSubsection = Field(default_factory=_TpSubsection)
    injection_policy_tuple: Any = _default_only(None)
    partition_config: Optional[dict] = _default_only(None)
    keep_module_on_host: Bool = _default_only(False)
    replace_with_kernel_inject: Bool = _default_only(False)
    kernel_inject: Bool = _default_only(False)
    tp_grain_size: typed("int", R.STEPS) = _default_only(1)
