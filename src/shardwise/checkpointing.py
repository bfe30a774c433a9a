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

[Note: partitioned activations]
With ``partition_activations`` and tensor parallelism (``ctx.tp.size > 1``) each checkpointed
region keeps only 1/tp of its tensor inputs (DeepSpeed's ``partition_activations``): the
inputs of a tensor-parallel block (the residual stream) are the same on every tp rank, so each
rank keeps its contiguous 1/tp of the flattened tensor and the recomputation in backward
all-gathers them over tp first. It rides on torch's non-re-entrant checkpoint: the region
receives a :class:`_Partitioned` stand-in for each such input; the first (forward) call hands
the region the real tensor, so autograd's edges into it are the ordinary ones (no extra
communication for its gradient), then drops it; a recomputation rebuilds it from the
all-gathered slices (``requires_grad`` as the original, so the recomputed graph saves the same
tensors). What is partitioned: plain floating-point tensors of at least tp elements among the
positional arguments; DTensors (already laid out over the mesh: sequence parallelism),
parameters, integer tensors and keyword arguments are kept as they are. A rank's inputs that
differ across tp would be wrong to partition: that is the caller's contract, as in DeepSpeed.
With ``cpu_checkpointing`` too, the slice is what goes to host memory. With tp == 1 the key is
accepted and has no effect (DeepSpeed, without a model-parallel unit, partitions into one
piece), with a warning; re-entrant checkpoints (``use_reentrant=True``) are not partitioned
(a warning, once).

``contiguous_memory_optimization``,
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
    partition_activations: bool = False
    tp: Any = None  # the GroupContext activations are partitioned over (set at initialize when tp > 1)
    warned_reentrant: bool = False


# DeepSpeed's configure() is process-wide (model code calls the module-level checkpoint());
# this is the one piece of state it needs
_SETTINGS = _Settings()


def configure(mpu_: Any = None, deepspeed_config: Any = None, partition_activations: bool | None = None,
              contiguous_checkpointing: bool | None = None, num_checkpoints: int | None = None,
              checkpoint_in_cpu: bool | None = None, synchronize: bool | None = None,
              profile: bool | None = None) -> None:
    """DeepSpeed's call. ``checkpoint_in_cpu`` (or the config's ``cpu_checkpointing``) moves
    the regions' saved inputs to host memory; ``partition_activations`` keeps 1/tp of them
    under tensor parallelism ([Note: partitioned activations]); the other tuning arguments have
    no effect here (see the module's docstring)."""
    cpu = partition = None
    if deepspeed_config is not None:
        from shardwise.config import load_config

        policy = load_config(deepspeed_config, world_size=_world()).activation_checkpointing
        cpu = policy.cpu_checkpointing
        partition = getattr(policy, "partition_activations", False)
    if mpu_ is not None:
        raise UsageError("shardwise.checkpointing.configure(mpu_=...): Megatron model-parallel units are not "
                         "supported; pass mpu_=None: the tensor-parallel group comes from the engine's mesh "
                         "(the config's tensor_parallel.autotp_size)")
    _SETTINGS.configured = True
    _SETTINGS.cpu_checkpointing = bool(checkpoint_in_cpu if checkpoint_in_cpu is not None else cpu)
    # [Note: partitioned activations]: over the tp group of the engine's mesh (no effect at tp 1)
    _SETTINGS.partition_activations = bool(partition_activations if partition_activations is not None
                                           else partition)


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


class _Partitioned:
    """One checkpointed input, kept as this tp rank's 1/tp slice ([Note: partitioned activations])."""

    __slots__ = ("tensor", "slice", "group", "numel", "shape", "dtype", "device", "requires_grad")

    def __init__(self, t: torch.Tensor, group: Any, offload: bool):
        self.tensor: torch.Tensor | None = t  # until the forward call has used it
        self.group = group
        self.numel, self.shape, self.dtype, self.device = t.numel(), t.shape, t.dtype, t.device
        self.requires_grad = t.requires_grad
        per = -(-self.numel // group.size)
        lo = min(group.rank * per, self.numel)
        hi = min(lo + per, self.numel)
        mine = torch.zeros(per, dtype=t.dtype, device=t.device)
        with torch.no_grad():
            mine[:hi - lo].copy_(t.detach().reshape(-1)[lo:hi])
        self.slice = mine.to("cpu") if offload else mine

    def value(self) -> torch.Tensor:
        """The whole input: the original in the forward call, all-gathered in a recomputation."""
        if self.tensor is not None:
            t, self.tensor = self.tensor, None
            return t
        from shardwise.comm.collectives import all_gather_shard

        per = self.slice.numel()
        flat = torch.empty(per * self.group.size, dtype=self.dtype, device=self.device)
        chunk = flat.view(self.group.size, per)[self.group.rank]
        chunk.copy_(self.slice)
        all_gather_shard(flat, self.group, async_op=False)
        return flat[:self.numel].view(self.shape).requires_grad_(self.requires_grad)

    @property
    def kept_bytes(self) -> int:
        return self.slice.numel() * self.slice.element_size()


def _partitionable(a: Any, group: Any) -> bool:
    """A plain floating-point tensor (an async-collective result counts: its values are plain)
    with at least one element per tp rank; not a DTensor, not a parameter."""
    from shardwise.zero.sharded_params import is_dtensor

    return (isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) and not is_dtensor(a)
            and a.is_floating_point() and a.numel() >= group.size)


def _partitioned_checkpoint(function: Callable, args: tuple, kwargs: dict, group: Any, offload: bool,
                            use_reentrant: bool) -> Any:
    slots = tuple(_Partitioned(a, group, offload) if _partitionable(a, group) else a for a in args)

    def region(*inputs: Any, **kw: Any) -> Any:
        return function(*[x.value() if isinstance(x, _Partitioned) else x for x in inputs], **kw)

    return torch_checkpoint.checkpoint(region, *slots, use_reentrant=use_reentrant, **kwargs)


def checkpoint(function: Callable, *args: Any, use_reentrant: bool = False,
               cpu_checkpointing: bool | None = None, partition_activations: bool | None = None,
               **kwargs: Any) -> Any:
    """Run ``function(*args, **kwargs)`` without keeping its intermediate activations; they are
    recomputed in backward (DeepSpeed's call shape; non-re-entrant unless asked). With
    ``partition_activations`` (default: the configured one) and tensor parallelism, the kept
    inputs are split over tp ([Note: partitioned activations])."""
    offload = _SETTINGS.cpu_checkpointing if cpu_checkpointing is None else cpu_checkpointing
    partition = _SETTINGS.partition_activations if partition_activations is None else partition_activations
    group = _SETTINGS.tp
    if partition and group is not None and group.size > 1:
        if not use_reentrant:
            return _partitioned_checkpoint(function, args, kwargs, group, offload, use_reentrant)
        if not _SETTINGS.warned_reentrant:
            _SETTINGS.warned_reentrant = True
            log.warning("partition_activations: re-entrant checkpoints (use_reentrant=True) are not partitioned; "
                        "use the default use_reentrant=False")
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
    tp = getattr(ctx, "tp", None) if ctx is not None else None
    _SETTINGS.tp = tp if tp is not None and tp.size > 1 else None
    partition = bool(getattr(policy, "partition_activations", False))
    if partition:  # [Note: partitioned activations]
        _SETTINGS.partition_activations = True
        if _SETTINGS.tp is None:
            log.warning("activation_checkpointing.partition_activations has no effect without tensor parallelism "
                        "(tensor_parallel.autotp_size > 1): there is nothing to partition the checkpoints over")
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
        def forward(*args: Any, _inner: Callable = inner, _cpu: bool = cpu, _part: bool = partition,
                    **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, cpu_checkpointing=_cpu, partition_activations=_part, **kwargs)

        module.forward = forward
        names.append(name)
    log.debug("activation checkpointing: %d modules (%s%s)", len(names), ", ".join(names[:4]),
              ", ..." if len(names) > 4 else "")
    return model


__all__ = ["apply_activation_checkpointing", "checkpoint", "checkpointed_modules",
           "configure", "is_configured", "reset"]
