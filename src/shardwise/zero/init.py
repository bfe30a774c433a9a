"""``shardwise.zero.Init``: build a model without any rank holding all of it.

[Note: construction under Init]
Under the context, a module's parameters are created and initialised normally (so the random
number stream is consumed exactly as in a plain construction), and as soon as the module is
attached to its parent (``parent.child = module``, ``ModuleList``/``Sequential``
registration; torch's public module-registration hook) every rank keeps only its chunk of
each of those parameters: ``numel / world`` elements, padded. Parameters of modules never
attached to a parent (the root) are split when the context exits. Peak memory per rank is
about ``model / Nd`` plus the largest module built before its parent took it.

A split parameter is an :class:`InitParameter`: full shape, no full values. Later
initialisation code that touches it (``self.apply(self._init_weights)``, ``nn.init.*_``,
``p.data.mul_()``, tying ``head.weight = emb.weight``) still works: each such operation
gathers the parameter (one all-gather; every rank runs the same construction code, so they
stay in step), runs on the whole tensor -- drawing the same random numbers a plain
construction draws -- and keeps this rank's chunk of the result. ``shardwise.initialize``
with ZeRO stage 3 then re-lays the chunks into fetch units one parameter at a time.

Nothing of torch is patched: the two hooks are torch's public global registration hooks,
removed on exit.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.module import (register_module_module_registration_hook,
                                     register_module_parameter_registration_hook)
from torch.utils._pytree import tree_map

from shardwise.comm.collectives import all_gather_shard
from shardwise.comm.context import CommContext, init_context
from shardwise.errors import UsageError
from shardwise.zero.sharded_params import ShardedParameter


class InitParameter(ShardedParameter):
    """A parameter split across ranks during construction under :class:`Init`."""

    chunk: torch.Tensor
    ctx: CommContext

    @staticmethod
    def __new__(cls, name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device,
                requires_grad: bool, chunk: torch.Tensor, ctx: CommContext):
        t = ShardedParameter.__new__(cls, name, shape, dtype, device, requires_grad)
        t.chunk = chunk
        t.ctx = ctx
        return t

    @staticmethod
    def split(t: torch.Tensor, name: str, ctx: CommContext) -> "InitParameter":
        world, rank = ctx.world_size, ctx.rank
        n = t.numel()
        per = -(-n // world)
        chunk = torch.zeros(per, dtype=t.dtype, device=ctx.device)
        lo, hi = min(rank * per, n), min((rank + 1) * per, n)
        chunk[:hi - lo].copy_(t.detach().reshape(-1)[lo:hi])
        return InitParameter(name, t.shape, t.dtype, ctx.device, t.requires_grad, chunk, ctx)

    def full_value(self) -> torch.Tensor:
        """The whole tensor (collective: every rank must call it for the same parameter)."""
        world = self.ctx.world_size
        if world == 1:
            return self.chunk[:self.numel()].view(self.shape)
        flat = torch.empty(self.chunk.numel() * world, dtype=self.dtype, device=self.chunk.device)
        flat.view(world, -1)[self.ctx.rank].copy_(self.chunk)
        all_gather_shard(flat, self.ctx, async_op=False)
        return flat[:self.numel()].view(self.shape)

    def _keep(self, full: torch.Tensor) -> None:
        per, n = self.chunk.numel(), self.numel()
        lo, hi = min(self.ctx.rank * per, n), min((self.ctx.rank + 1) * per, n)
        self.chunk[:hi - lo].copy_(full.reshape(-1)[lo:hi])

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"InitParameter({self.sw_name!r}, shape={tuple(self.shape)}, split across {self.ctx.world_size} ranks)"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.detach.default or func is torch.ops.aten.alias.default:
            src = args[0]  # `.data` / detach share the chunk, as they share storage normally
            return InitParameter(src.sw_name, src.shape, src.dtype, src.device, False, src.chunk, src.ctx)
        seen: dict[int, tuple[InitParameter, torch.Tensor]] = {}

        def whole(a):
            if isinstance(a, InitParameter):
                if id(a) not in seen:
                    seen[id(a)] = (a, a.full_value())
                return seen[id(a)][1]
            return a

        full_args, full_kwargs = tree_map(whole, args), tree_map(whole, kwargs)
        out = func(*full_args, **full_kwargs)
        if func._schema.is_mutable:
            for p, full in seen.values():
                p._keep(full)
        back = {id(full): p for p, full in seen.values()}
        return tree_map(lambda o: back.get(id(o), o) if isinstance(o, torch.Tensor) else o, out)


class Init:
    """Build a model under ``with shardwise.zero.Init(config=...):`` without any rank holding
    all of it (see [Note: construction under Init]). The model must then be passed to
    ``shardwise.initialize`` with ZeRO stage 3. ``enabled=False`` builds normally.
    Requires the process group (torchrun, or ``run_distributed`` in tests)."""

    def __init__(self, config: Any = None, enabled: bool = True, ctx: CommContext | None = None, **_ignored):
        self.enabled = enabled
        self.ctx = ctx
        self._hooks: list = []
        self._modules: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
        self._split_of: dict[int, tuple[weakref.ref, InitParameter]] = {}  # id(original) -> split
        if enabled and config is not None:
            self._check_stage(config)

    @staticmethod
    def _check_stage(config: Any) -> None:
        from shardwise.config import load_config
        from shardwise.comm.context import expected_world_size

        plan = load_config(config, world_size=expected_world_size())
        if plan.zero.stage != 3:
            raise UsageError(f"shardwise.zero.Init builds a model for ZeRO stage 3; the config asks for "
                             f"stage {plan.zero.stage}. Build the model normally, or set "
                             "zero_optimization.stage to 3.")

    def __enter__(self) -> "Init":
        if not self.enabled:
            return self
        if self.ctx is None:
            self.ctx = init_context()
        self._hooks = [register_module_module_registration_hook(self._on_module),
                       register_module_parameter_registration_hook(self._on_param)]
        return self

    def _on_param(self, module: nn.Module, name: str, param: Any) -> None:
        self._modules.add(module)

    def _on_module(self, parent: nn.Module, name: str, child: Any) -> None:
        if isinstance(child, nn.Module):
            self._split(child)

    def _split(self, module: nn.Module) -> None:
        for m in module.modules():
            for attr, p in list(m._parameters.items()):
                if p is not None and not isinstance(p, ShardedParameter):
                    known = self._split_of.get(id(p))
                    if known is None or known[0]() is not p:  # a parameter shared by two modules is split once
                        known = (weakref.ref(p), InitParameter.split(p, f"{type(m).__name__}.{attr}", self.ctx))
                        self._split_of[id(p)] = known
                    m._parameters[attr] = known[1]

    def __exit__(self, exc_type, exc, tb) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if exc_type is None and self.enabled:
            for m in list(self._modules):
                self._split(m)
        self._split_of.clear()


__all__ = ["Init", "InitParameter"]
