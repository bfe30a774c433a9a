"""``Plan.parallel``: the pipeline and tensor-parallel sections resolved for a world size.

The config's world (the ranks one model replica spans) is ``pp * dp * tp``: ``tp`` is
``tensor_parallel.autotp_size`` (0 and 1: off), ``pp`` the PipelineModule's ``num_stages`` or
``pipeline.stages``; the batch triangle is then resolved for ``dp`` ([Note: parallel context]).
"""
from __future__ import annotations

from typing import Any

from shardwise.config.plan import ParallelPlan, PipelinePlan, TensorParallelPlan
from shardwise.config.schema_parallel import MULTI_STAGE_SCHEDULES
from shardwise.errors import ConfigProblem


def resolve_parallel(cfg: Any, world_size: int, pipeline_stages: int | None,
                     problems: list[ConfigProblem]) -> ParallelPlan | None:
    pipe, tp_sec = cfg.pipeline, cfg.tensor_parallel
    stages = None if pipe.stages == "auto" else int(pipe.stages)
    if pipeline_stages is not None and stages is not None and stages != pipeline_stages:
        problems.append(ConfigProblem("pipeline.stages", f"is {stages} but the PipelineModule was built with "
                                      f"num_stages={pipeline_stages}", 'set pipeline.stages to "auto" or to '
                                      f"{pipeline_stages}"))
        return None
    pp = pipeline_stages or stages or 1
    tp = max(1, int(tp_sec.autotp_size))
    per_rank = pipe.stages_per_rank
    if pipe.schedule in MULTI_STAGE_SCHEDULES and per_rank < 2:
        problems.append(ConfigProblem("pipeline.stages_per_rank", f"is {per_rank} but schedule {pipe.schedule!r} "
                                      "runs several stages per rank", "set pipeline.stages_per_rank to 2 (or more), "
                                      'or use schedule "1F1B" or "GPipe"'))
    elif pipe.schedule not in MULTI_STAGE_SCHEDULES and per_rank != 1:
        problems.append(ConfigProblem("pipeline.stages_per_rank", f"is {per_rank} but schedule {pipe.schedule!r} "
                                      "runs one stage per rank", 'set it to 1, or use schedule "Interleaved1F1B"'))
    if pipe.schedule == "ZBVZeroBubble" and per_rank != 2:
        problems.append(ConfigProblem("pipeline.stages_per_rank", "ZBVZeroBubble places exactly 2 stages per rank "
                                      f"(a V), got {per_rank}", "set pipeline.stages_per_rank to 2"))
    if world_size % (pp * tp):
        where = "tensor_parallel.autotp_size" if tp > 1 else "pipeline.stages"
        problems.append(ConfigProblem(where, f"pipeline stages x tensor parallel = {pp} x {tp} = {pp * tp} does not "
                                      f"divide the {world_size} ranks", f"use a world size that is a multiple of "
                                      f"{pp * tp}, or change the sizes"))
        return None
    zero_stage = cfg.zero_optimization.stage
    if pp > 1 and zero_stage >= 2:
        # [Note: ZeRO with pipelining] torch's schedules run every micro-batch's backward inside
        # one step(): stage 2 would reduce gradients per micro-batch (gradient_accumulation_steps
        # times the communication of stage 1) and stage 3 would gather every parameter per
        # micro-batch in forward and backward; DeepSpeed refuses both for the same reason
        problems.append(ConfigProblem("zero_optimization.stage", f"ZeRO stage {zero_stage} with pipeline "
                                      f"parallelism ({pp} stages) is not supported: the pipeline runs every "
                                      "micro-batch's backward in one schedule step, so stage 2 would reduce "
                                      "gradients once per micro-batch and stage 3 gather every parameter per "
                                      "micro-batch (DeepSpeed refuses both too)", "use ZeRO stage 0 or 1 with "
                                      "pipeline parallelism"))
        return None
    tp_plan = tuple(tp_sec.tp_plan.items()) if tp_sec.tp_plan else None
    partition = "parameters" if pipe.partition == "best" else pipe.partition
    return ParallelPlan(
        pp=pp, dp=world_size // (pp * tp), tp=tp,
        pipeline=PipelinePlan(stages=stages, partition=partition, seed_layers=pipe.seed_layers,
                              activation_checkpoint_interval=pipe.activation_checkpoint_interval,
                              schedule=pipe.schedule, stages_per_rank=per_rank),
        tensor=TensorParallelPlan(size=tp, tp_plan=tp_plan, preset=tp_sec.preset_model))
