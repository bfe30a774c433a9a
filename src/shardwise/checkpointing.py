"""Activation checkpointing: DeepSpeed's ``deepspeed.checkpointing`` calls, and the config's
``activation_checkpointing`` section applied to a plain model.

Two ways in, one mechanism (``torch.utils.checkpoint``, non-re-entrant by default):

- model code that calls ``deepspeed.checkpointing.checkpoint(function, *args)`` runs with the
  import changed to ``shardwise.checkpointing``; ``configure(...)`` and ``is_configured()``
  take DeepSpeed's arguments (``checkpoint_in_cpu`` is ``cpu_checkpointing``);
- ``activation_checkpointing.modules`` in the config checkpoints modules without touching the
  model: ``"blocks"`` picks the repeated blocks (the rule stage 3 uses for its fetch units), a
  list picks modules by class name; ``every: k`` checkpoints every k-th of them.
  :func:`apply_activation_checkpointing` wraps each chosen module's ``forward`` (an instance
  attribute), so parameter names, ``state_dict`` keys and stage-3 fetch units are unchanged.
  The module's own hooks run once per call; its submodules' run again when it is recomputed
  (as with transformers' ``gradient_checkpointing_enable``, which checkpoints ``forward``
  too: stage 3 re-gathers a unit whose parameters a recomputation touches).

[Note: cpu checkpointing]
With ``cpu_checkpointing`` the tensors a checkpointed region keeps for its recomputation
(its inputs) are moved to host memory and brought back when the region is recomputed in
backward; on a CPU device this changes nothing. Parameters are never moved: they are not the
region's inputs (a parameter passed as an argument is kept as it is), and stage 3's gathered
parameters are owned by the stage-3 runtime, which frees and re-gathers them.

DeepSpeed's ``partition_activations`` splits checkpoints across tensor-parallel ranks; there
are none yet, so the config refuses it. ``contiguous_memory_optimization``,
``synchronize_checkpoint_boundary``, ``number_checkpoints`` and ``profile`` tune DeepSpeed's
own re-entrant implementation and have no effect here (the config accepts them with a
warning). DeepSpeed's ``model_parallel_cuda_manual_seed`` is not needed: torch's checkpoint
restores the RNG state of the region's devices for the recomputation (dropout matches).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint

from shardwise.config.plan import ActivationCheckpointingPlan
from shardwise.errors import UsageError

log = logging.getLogger("shardwise")


@dataclass
class _Settings:
    configured: bool = False
    cpu_checkpointing: bool = False


# DeepSpeed's configure() is process-wide (model code calls the module-level checkpoint());
# this is the one piece of state it needs
_SETTINGS = _Settings()


def configure(mpu_: Any = None, deepspeed_config: Any = None, partition_activations: bool | None = None,
              contiguous_checkpointing: bool | None = None, num_checkpoints: int | None = None,
              checkpoint_in_cpu: bool | None = None, synchronize: bool | None = None,
              profile: bool | None = None) -> None:
    """DeepSpeed's call. ``checkpoint_in_cpu`` (or the config's ``cpu_checkpointing``) moves
    the regions' saved inputs to host memory; the other tuning arguments have no effect here
    (see the module's docstring); ``partition_activations`` needs tensor parallelism."""
    cpu = None
    if deepspeed_config is not None:
        from shardwise.config import load_config

        policy = load_config(deepspeed_config, world_size=_world()).activation_checkpointing
        cpu = policy.cpu_checkpointing
    if partition_activations:
        raise UsageError("shardwise.checkpointing.configure(partition_activations=True): partitioning "
                         "activations needs tensor parallelism, which shardwise does not have yet; "
                         "leave it False")
    if mpu_ is not None:
        raise UsageError("shardwise.checkpointing.configure(mpu_=...): model-parallel units are not "
                         "supported yet; pass mpu_=None")
    _SETTINGS.configured = True
    _SETTINGS.cpu_checkpointing = bool(checkpoint_in_cpu if checkpoint_in_cpu is not None else cpu)


def is_configured() -> bool:
    """Whether :func:`configure` was called (DeepSpeed's call)."""
    return _SETTINGS.configured


def reset() -> None:
    """DeepSpeed's call between iterations (it frees its contiguous buffers): nothing to do."""


def _world() -> int:
    from shardwise.comm.context import expected_world_size

    return expected_world_size()


def _to(x: Any, device: torch.device | None) -> Any:
    if isinstance(x, torch.Tensor) and not isinstance(x, nn.Parameter):
        return x.to(device) if device is not None else x.to("cpu")
    return x


def checkpoint(function: Callable, *args: Any, use_reentrant: bool = False,
               cpu_checkpointing: bool | None = None, **kwargs: Any) -> Any:
    """Run ``function(*args, **kwargs)`` without keeping its intermediate activations; they are
    recomputed in backward (DeepSpeed's call shape; non-re-entrant unless asked)."""
    offload = _SETTINGS.cpu_checkpointing if cpu_checkpointing is None else cpu_checkpointing
    if offload:  # [Note: cpu checkpointing]
        devices = [a.device if isinstance(a, torch.Tensor) else None for a in args]
        host_args = [_to(a, None) for a in args]

        def on_device(*host: Any, **kw: Any) -> Any:
            return function(*[_to(h, d) if d is not None else h for h, d in zip(host, devices)], **kw)

        return torch_checkpoint.checkpoint(on_device, *host_args, use_reentrant=use_reentrant, **kwargs)
    return torch_checkpoint.checkpoint(function, *args, use_reentrant=use_reentrant, **kwargs)


def checkpointed_modules(model: nn.Module, modules: str | Sequence[str], every: int = 1) -> list[tuple[str, nn.Module]]:
    """The modules ``modules`` selects, every ``every``-th of them (in model order)."""
    from shardwise.zero.units import block_modules

    chosen = block_modules(model, None if modules == "blocks" else list(modules))
    if not chosen:
        raise UsageError(
            f"activation_checkpointing.modules={modules!r} selects no module of {type(model).__name__} "
            "(it has no repeated blocks); name the module classes to checkpoint instead")
    return chosen[every - 1::every]


def apply_activation_checkpointing(model: nn.Module, policy: ActivationCheckpointingPlan, ctx: Any = None) -> nn.Module:
    """Checkpoint the modules the policy selects (composition step 1 of ``initialize``; see
    README "How initialize composes"). Also sets the process-wide ``cpu_checkpointing`` for
    model code that calls :func:`checkpoint` itself. Returns the model, changed in place."""
    if policy.cpu_checkpointing:
        _SETTINGS.cpu_checkpointing = True
    if policy.modules is None:
        return model
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False) is True:
        # a key/value cache grows during the forward, so a recomputed layer would see its own
        # keys twice; transformers turns the cache off under gradient checkpointing for the same
        # reason (it only helps generation)
        config.use_cache = False
        log.warning("activation checkpointing: set %s.config.use_cache = False (a key/value cache "
                    "cannot be recomputed)", type(model).__name__)
    names = []
    for name, module in checkpointed_modules(model, policy.modules, policy.every):
        if "forward" in module.__dict__:
            raise UsageError(f"module '{name}' already has an instance-level forward (checkpointed twice, "
                             "or wrapped by other code); remove activation_checkpointing.modules or the wrapper")
        inner = module.forward  # the bound class method
        cpu = policy.cpu_checkpointing

        @functools.wraps(inner)
        def forward(*args: Any, _inner: Callable = inner, _cpu: bool = cpu, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, cpu_checkpointing=_cpu, **kwargs)

        module.forward = forward
        names.append(name)
    log.debug("activation checkpointing: %d modules (%s%s)", len(names), ", ".join(names[:4]),
              ", ..." if len(names) > 4 else "")
    return model


__all__ = ["apply_activation_checkpointing", "checkpoint", "checkpointed_modules",
           "configure", "is_configured", "reset"]
