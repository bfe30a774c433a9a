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
    # their process group's timeout; torch gives a group made by new_group its default of 30
    # minutes, whatever the world group's timeout. The mesh's pp group is made with the job's
    # timeout (comm/context.py, _timed_mesh); the tie groups, made when the module was built
    # (before the config was read), are made again here with it (comms_timeout /
    # SHARDWISE_TIMEOUT): a stopped peer is then a CollectiveTimeoutError naming it
    from shardwise.comm.context import resolve_timeout, subgroup_contexts

    timeout_s = resolve_timeout(plan.comms_timeout_s)
    per = ctx.world_size // model.num_stages
    if ctx.is_distributed:
        for key, owners in sorted(model._tie_owners.items()):
            if len(owners) > 1:
                groups = [[s * per + j for s in owners] for j in range(per)]
                group = subgroup_contexts(ctx, f"tie:{key}", groups, timeout_s)
                if group is not None:
                    model._tie_groups[key] = group
    return PipeRuntime(model, plan, ctx, pp)


__all__ = ["PipelineModule", "LayerSpec", "TiedLayerSpec", "build_pipeline", "partition_balanced",
           "partition_layers"]
