"""Pipeline parallelism: DeepSpeed's ``PipelineModule`` API on ``torch.distributed.pipelining``.

- :class:`PipelineModule`, :class:`LayerSpec`, :class:`TiedLayerSpec` (``module.py``): the layer
  list, split over stages, each rank building only its own ([Note: pipeline module]).
- :func:`build_pipeline`: torch ``PipelineStage``s and the configured schedule over the stage
  the strategy holds (``runtime.py``, [Note: pipeline gradients]).
- ``PipelineEngine`` (``engine.py``): ``train_batch`` / ``eval_batch``.
"""
from __future__ import annotations

import warnings
from typing import Any

from shardwise.errors import UsageError
from shardwise.pipe.module import LayerSpec, PipelineModule, TiedLayerSpec, partition_balanced, partition_layers


def build_pipeline(model: Any, strategy: Any, plan: Any, ctx: Any) -> Any:
    """The pipeline runtime for ``model`` when it is a ``PipelineModule``, else None."""
    if not isinstance(model, PipelineModule):
        return None
    from shardwise.pipe.runtime import PipeRuntime, check_plan

    pp = ctx.pp
    check_plan(model, plan, pp)
    if model.num_virtual_stages > 1 and (not hasattr(strategy, "pipeline_absorb_grads")
                                         or getattr(strategy, "stage", None) not in (0, 1)):
        raise UsageError(f"pipeline parallelism runs with ZeRO stages 0 and 1 only (as DeepSpeed); this strategy is "
                         f"stage {getattr(strategy, 'stage', '?')}")
    pipe_plan = plan.parallel.pipeline
    if pipe_plan.activation_checkpoint_interval and not model.activation_checkpoint_interval:
        model.set_checkpoint_interval(pipe_plan.activation_checkpoint_interval)  # the config's key
    for key, mine in (("seed_layers", model.seed_layers),):
        if getattr(pipe_plan, key) and not mine:
            warnings.warn(f"the config's pipeline.{key} is set but the PipelineModule was built without it; the "
                          f"layers are built when the module is made, so pass PipelineModule(..., {key}=True)",
                          UserWarning, stacklevel=3)
    # [Note: pipeline groups and timeouts] the sends / receives between stages wait as long as
    # their process group's timeout; torch gives a group made by new_group (the mesh's sub-groups
    # included) its default of 30 minutes, whatever the world group's timeout. So the pipeline and
    # tie groups are made here with the job's timeout (comms_timeout / SHARDWISE_TIMEOUT): a
    # stopped peer is then a CollectiveTimeoutError naming it, within the timeout
    from shardwise.comm.context import resolve_timeout

    timeout_s = resolve_timeout(plan.comms_timeout_s)
    pp = _timed_group(ctx, "pp", _pp_groups(ctx, model.num_stages), timeout_s) or pp
    if pp.global_ranks != ctx.pp.global_ranks:
        raise UsageError(f"pipeline group {pp.global_ranks} differs from the mesh's {ctx.pp.global_ranks}")
    per = ctx.world_size // model.num_stages
    for key, owners in sorted(model._tie_owners.items()):
        if len(owners) > 1:
            group = _timed_group(ctx, f"tie:{key}", [[s * per + j for s in owners] for j in range(per)], timeout_s)
            if group is not None:
                model._tie_groups[key] = group
    return PipeRuntime(model, plan, ctx, pp)


def _pp_groups(ctx: Any, num_stages: int) -> list[list[int]]:
    """One pipeline group per (dp, tp) position: the mesh's layout, pipeline outermost."""
    per = ctx.world_size // num_stages
    return [[s * per + j for s in range(num_stages)] for j in range(per)]


def _timed_group(ctx: Any, name: str, groups: list[list[int]], timeout_s: float | None) -> Any:
    """``subgroup_contexts`` with a timeout: every rank makes every group, in order; returns this
    rank's GroupContext (with the context's health, so a failure names the rank behind it)."""
    from datetime import timedelta

    import torch.distributed as dist

    from shardwise.comm.context import GroupContext

    if not ctx.is_distributed:
        return None
    kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    mine = None
    for ranks in groups:
        ranks = sorted(int(r) for r in ranks)
        group = dist.new_group(ranks, **kwargs)
        if ctx.rank in ranks:
            mine = GroupContext(name, group, ranks.index(ctx.rank), len(ranks), tuple(ranks), ctx.device,
                                ctx.backend, ctx.policy, ctx.health)
    return mine


__all__ = ["PipelineModule", "LayerSpec", "TiedLayerSpec", "build_pipeline", "partition_balanced",
           "partition_layers"]
