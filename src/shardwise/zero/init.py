"""``shardwise.zero.Init``: build a model without any rank holding all of it.

[Note: construction under Init]
Under the context, a module's parameters are created and initialised normally (so the random
number stream is consumed exactly as in a plain construction), and as soon as the module is
attached to its parent (``parent.child = module``, ``ModuleList``/``Sequential``
registration; torch's public module-registration hook) every rank keeps only its chunk of
each of those parameters: ``numel / world`` elements, padded. Parameters of modules never
attached to a parent (the root) are split when the context exits; a parameter registered on
a module that is already split (``module.weight = nn.Parameter(...)``, weights loaded by
``from_pretrained``) is split as it is registered. Peak memory per rank is about
``model / Nd`` plus the largest module built before its parent took it.

Rank 0's values win: before a module's parameters are split, each of them and each of the
module's buffers is broadcast from rank 0 (in place, one tensor at a time, small ones batched),
so ranks that built with different seeds end up with rank 0's model, and no rank ever holds
more than one module whole.

Meta tensors (``from_pretrained`` builds on the meta device, then loads) are left as they are
until a real tensor replaces them; that one is split then.

A split parameter is an :class:`InitParameter`: full shape, no full values. Later
initialisation code that touches it (``self.apply(self._init_weights)``, ``nn.init.*_``,
``p.data.mul_()``, tying ``head.weight = emb.weight``) still works: each such operation
gathers the parameter (one all-gather; every rank runs the same construction code, so they
stay in step), runs on the whole tensor -- drawing the same random numbers a plain
construction draws -- and, when the operation wrote into it, takes rank 0's result (a
broadcast) and keeps this rank's chunk of it. ``p.data = tensor`` (Hugging Face's
``resize_token_embeddings``) re-splits the parameter at the new shape from rank 0's
``tensor``. Inside ``shardwise.zero.GatheredParameters`` the parameter is held whole on
every rank instead (no collectives per operation; see :meth:`InitParameter.hold`).
``shardwise.initialize`` with ZeRO stage 3 then re-lays the chunks into fetch units one
parameter at a time.

Nothing of torch is patched: the three hooks are torch's public global registration hooks,
removed on exit.
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
import torch.nn as nn
from torch.nn.modules.module import (register_module_buffer_registration_hook,
                                     register_module_module_registration_hook,
                                     register_module_parameter_registration_hook)
from torch.utils._pytree import tree_map

from shardwise.comm.collectives import all_gather_shard, broadcast
from shardwise.comm.context import ParallelContext, init_context
from shardwise.errors import UsageError
from shardwise.zero.sharded_params import ShardedParameter

_BATCH_BYTES = 1 << 20  # tensors smaller than this are broadcast together, larger ones in place


def _is_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


@torch.no_grad()
def broadcast_from_rank0(tensors: Iterable[torch.Tensor], ctx: ParallelContext) -> None:
    """Give every tensor rank 0's values, in place (collective: same tensors, same order on
    every rank of the data-parallel group ``ctx.dp``). Large contiguous tensors are broadcast in
    their own storage (no copy); small ones are packed as bytes into one buffer per ~1 MiB."""
    dp = ctx.dp
    if dp.size == 1:
        return
    batch: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        nonlocal batch, size
        if not batch:
            return
        flat = torch.cat([t.detach().contiguous().to(dp.device).reshape(-1).view(torch.uint8) for t in batch])
        broadcast(flat, dp, src=0)
        off = 0
        for t in batch:
            n = t.numel() * t.element_size()
            t.copy_(flat[off:off + n].view(t.dtype).view(t.shape))
            off += n
        batch, size = [], 0

    for t in tensors:
        n = t.numel() * t.element_size()
        if n >= _BATCH_BYTES and t.is_contiguous() and t.device == dp.device:
            d = t.detach()
            broadcast(d.view(torch.uint8) if d.dtype == torch.bool else d, dp, src=0)
            continue
        batch.append(t)
        size += n
        if size >= _BATCH_BYTES:
            flush()
    flush()


class _Store:
    """What aliases of one split parameter share (``p.data``, ``p.detach()`` share it, as they
    share storage normally): this rank's chunk, and the whole tensor while it is held. With
    ``Init(remote_device=...)`` the chunk lives in a spill (host memory or a file, see
    ``offload/params.py``'s ``InitSpill``) and is read back when used."""

    __slots__ = ("_chunk", "held", "holds", "spill", "key")

    def __init__(self, chunk: torch.Tensor | None, spill: Any = None):
        self.held: torch.Tensor | None = None
        self.holds = 0
        self.spill = spill
        self.key: Any = None
        self._chunk: torch.Tensor | None = None
        self.chunk = chunk

    @property
    def chunk(self) -> torch.Tensor | None:
        if self.key is not None:
            return self.spill.get(self.key)
        return self._chunk

    @chunk.setter
    def chunk(self, t: torch.Tensor | None) -> None:
        if self.spill is not None and t is not None:
            self.key, self._chunk = self.spill.put(t, self.key), None
        else:
            self.key, self._chunk = None, t

    def has_chunk(self) -> bool:
        return self.key is not None or self._chunk is not None

    def writable(self) -> torch.Tensor | None:
        """A tensor to cut a new chunk into (None: allocate; a spilled chunk is replaced)."""
        return self._chunk if self.key is None else None


def _chunk_of(full: torch.Tensor, ctx: ParallelContext, into: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's padded chunk of ``full`` (written into ``into`` when it has the right size);
    split over the data-parallel group."""
    n = full.numel()
    dp = ctx.dp
    per = -(-n // dp.size)
    if into is None or into.numel() != per or into.dtype != full.dtype:
        into = torch.zeros(per, dtype=full.dtype, device=dp.device)
    lo, hi = min(dp.rank * per, n), min((dp.rank + 1) * per, n)
    into[:hi - lo].copy_(full.detach().reshape(-1)[lo:hi])
    return into


class InitParameter(ShardedParameter):
    """A parameter split across ranks during construction under :class:`Init`."""

    store: _Store
    ctx: ParallelContext

    @staticmethod
    def __new__(cls, name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device,
                requires_grad: bool, chunk: "torch.Tensor | _Store | None", ctx: ParallelContext):
        t = ShardedParameter.__new__(cls, name, shape, dtype, device, requires_grad)
        t.store = chunk if isinstance(chunk, _Store) else _Store(chunk)
        t.ctx = ctx
        return t

    @staticmethod
    def split(t: torch.Tensor, name: str, ctx: ParallelContext, spill: Any = None) -> "InitParameter":
        """Keep this rank's chunk of ``t`` (``t`` as it is on this rank: see
        :func:`broadcast_from_rank0` for making it rank 0's first), in ``spill`` if given."""
        out = InitParameter(name, t.shape, t.dtype, ctx.device, t.requires_grad, _Store(_chunk_of(t, ctx), spill),
                            ctx)
        for k, v in getattr(t, "__dict__", {}).items():  # e.g. transformers' `_is_hf_initialized`
            if k not in out.__dict__:
                out.__dict__[k] = v
        return out

    @property
    def chunk(self) -> torch.Tensor:
        if not self.store.has_chunk():  # re-bound while held: the chunk is cut when released
            raise RuntimeError(f"{self.sw_name}: no chunk while held after `.data = ...`")
        return self.store.chunk

    def _alias(self) -> "InitParameter":
        return InitParameter(self.sw_name, self.shape, self.dtype, self.device, False, self.store, self.ctx)

    def full_value(self) -> torch.Tensor:
        """The whole tensor (collective unless held: every rank must call it for the same parameter)."""
        if self.store.held is not None:
            return self.store.held
        chunk, dp = self.chunk, self.ctx.dp
        if dp.size == 1:
            return chunk[:self.numel()].view(self.shape)
        flat = torch.empty(chunk.numel() * dp.size, dtype=self.dtype, device=chunk.device)
        flat.view(dp.size, -1)[dp.rank].copy_(chunk)
        all_gather_shard(flat, dp, async_op=False)
        return flat[:self.numel()].view(self.shape)

    def _keep(self, full: torch.Tensor) -> None:
        """``full`` was written: take rank 0's version and keep this rank's chunk of it."""
        if self.store.held is not None:
            return  # held: the write went into the held tensor; released later
        if self.ctx.dp.size > 1:
            full = full.contiguous()
            broadcast(full.view(torch.uint8) if full.dtype == torch.bool else full, self.ctx.dp, src=0)
        self.store.chunk = _chunk_of(full, self.ctx, into=self.store.writable())

    # -- `p.data` / `p.data = t` ---------------------------------------------------------------
    @property
    def data(self) -> "InitParameter":  # type: ignore[override]
        return self._alias()

    @data.setter
    def data(self, new: torch.Tensor) -> None:
        """Re-bind to ``new`` (any shape): another split parameter's chunk, or a whole tensor,
        which is split from rank 0's values (held: kept whole until released)."""
        if isinstance(new, InitParameter):
            store = new.store
        elif isinstance(new, ShardedParameter):
            raise UsageError(f"{self.sw_name}: cannot set .data to {new!r}")
        elif self.store.held is not None:
            store = _Store(None, self.store.spill)
            store.held, store.holds = new.detach().to(self.ctx.device), self.store.holds
        else:
            full = new.detach().to(self.ctx.device)
            if self.ctx.dp.size > 1:
                full = full.clone()
                broadcast_from_rank0([full], self.ctx)
            store = _Store(_chunk_of(full, self.ctx), self.store.spill)
        meta = ShardedParameter(self.sw_name, new.shape, new.dtype, self.device, False)
        torch._C.TensorBase.data.__set__(self, meta)  # the new shape / dtype; requires_grad is kept
        self.store = store

    # -- GatheredParameters ----------------------------------------------------------------------
    def hold(self) -> None:
        """Gather once (collective) and keep the whole tensor on this rank until :meth:`release`;
        meanwhile operations read and write it locally (no collectives)."""
        if self.store.holds == 0:
            self.store.held = self.full_value().clone()
        self.store.holds += 1

    @torch.no_grad()
    def release(self, modifier_rank: int | None) -> None:
        """End a :meth:`hold`. With ``modifier_rank=r``, rank r's whole tensor is broadcast and
        every rank keeps its chunk of it; without, changes are discarded (a ``.data`` re-bind
        inside the hold is kept, from rank 0's tensor)."""
        store = self.store
        store.holds -= 1
        if store.holds > 0:
            return
        held, store.held = store.held, None
        if modifier_rank is None and store.has_chunk():
            return
        src = 0 if modifier_rank is None else modifier_rank
        held = held.contiguous()
        if self.ctx.dp.size > 1:
            broadcast(held.view(torch.uint8) if held.dtype == torch.bool else held, self.ctx.dp, src=src)
        store.chunk = _chunk_of(held, self.ctx, into=store.writable())

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"InitParameter({self.sw_name!r}, shape={tuple(self.shape)}, split across {self.ctx.dp.size} ranks)"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.detach.default or func is torch.ops.aten.alias.default:
            return args[0]._alias()  # `.detach()` shares the chunk, as it shares storage normally
        seen: dict[int, tuple[InitParameter, torch.Tensor]] = {}  # by store: aliases are one tensor

        def whole(a):
            if isinstance(a, InitParameter):
                key = id(a.store)
                if key not in seen:
                    seen[key] = (a, a.full_value())
                return seen[key][1]
            return a

        full_args, full_kwargs = tree_map(whole, args), tree_map(whole, kwargs)
        out = func(*full_args, **full_kwargs)
        for p in _written(func, args, kwargs):
            p._keep(seen[id(p.store)][1])
        back = {id(full): p for p, full in seen.values()}
        return tree_map(lambda o: back.get(id(o), o) if isinstance(o, torch.Tensor) else o, out)


def _written(func, args, kwargs) -> list[InitParameter]:
    """The InitParameter arguments ``func`` writes into (from its schema), once each."""
    if not func._schema.is_mutable:
        return []
    out: dict[int, InitParameter] = {}
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        v = args[i] if i < len(args) else kwargs.get(a.name)
        for t in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(t, InitParameter):
                out.setdefault(id(t.store), t)
    return list(out.values())


class Init:
    """Build a model under ``with shardwise.zero.Init(config=...):`` without any rank holding
    all of it (see [Note: construction under Init]). The model must then be passed to
    ``shardwise.initialize`` with ZeRO stage 3. ``enabled=False`` builds normally.
    Requires the process group (torchrun, or ``run_distributed`` in tests)."""

    def __init__(self, config: Any = None, enabled: bool = True, ctx: ParallelContext | None = None, *,
                 remote_device: str | None = None, pin_memory: bool = False, config_dict_or_path: Any = None,
                 **_ignored):
        config = config if config is not None else config_dict_or_path  # DeepSpeed's name for it
        self.enabled = enabled
        self.ctx = ctx
        if remote_device not in (None, "none", "cpu", "nvme"):
            raise UsageError(f"zero.Init(remote_device={remote_device!r}): use None, 'cpu' or 'nvme'")
        self.remote_device = None if remote_device == "none" else remote_device
        self.pin_memory = pin_memory
        self.config = config
        self.spill: Any = None  # where split chunks live with remote_device (made on entry)
        self._hooks: list = []
        # modules seen registering a parameter / buffer, in registration order (the same on
        # every rank: the exit pass issues collectives in this order)
        self._modules: dict[int, weakref.ref] = {}
        self._attached: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # split already
        self._split_of: dict[int, tuple[weakref.ref, InitParameter]] = {}  # id(original) -> split
        self._synced: dict[int, weakref.ref] = {}  # buffers already broadcast from rank 0
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
        if self.remote_device is not None:
            from shardwise.offload.params import make_init_spill

            self.spill = make_init_spill(self.remote_device, self.config, self.ctx, self.pin_memory)
        self._hooks = [register_module_module_registration_hook(self._on_module),
                       register_module_parameter_registration_hook(self._on_param),
                       register_module_buffer_registration_hook(self._on_buffer)]
        return self

    def _track(self, module: nn.Module) -> None:
        ref = self._modules.get(id(module))
        if ref is None or ref() is not module:
            self._modules[id(module)] = weakref.ref(module)

    def _on_param(self, module: nn.Module, name: str, param: Any) -> Any:
        self._track(module)
        if (module in self._attached and isinstance(param, torch.Tensor)
                and not isinstance(param, ShardedParameter) and not _is_meta(param)):
            if self._known_split(param) is None:
                broadcast_from_rank0([param], self.ctx)
            return self._split_param(param, f"{type(module).__name__}.{name}")
        return None

    def _on_buffer(self, module: nn.Module, name: str, buf: Any) -> None:
        self._track(module)
        if module in self._attached and isinstance(buf, torch.Tensor) and not _is_meta(buf):
            broadcast_from_rank0([buf], self.ctx)
            self._synced[id(buf)] = weakref.ref(buf)

    def _on_module(self, parent: nn.Module, name: str, child: Any) -> None:
        if isinstance(child, nn.Module):
            self._split(child)

    def _known_split(self, p: torch.Tensor) -> InitParameter | None:
        known = self._split_of.get(id(p))
        return known[1] if known is not None and known[0]() is p else None

    def _split_param(self, p: torch.Tensor, label: str) -> InitParameter:
        split = self._known_split(p)  # a parameter shared by two modules is split once
        if split is None:
            split = InitParameter.split(p, label, self.ctx, self.spill)
            self._split_of[id(p)] = (weakref.ref(p), split)
        return split

    def _split(self, module: nn.Module) -> None:
        params: dict[int, torch.Tensor] = {}
        bufs: dict[int, torch.Tensor] = {}
        for m in module.modules():
            self._attached.add(m)
            for p in m._parameters.values():
                if (p is not None and not isinstance(p, ShardedParameter) and not _is_meta(p)
                        and self._known_split(p) is None):
                    params.setdefault(id(p), p)
            for b in m._buffers.values():
                if b is not None and not _is_meta(b):
                    ref = self._synced.get(id(b))
                    if ref is None or ref() is not b:
                        bufs.setdefault(id(b), b)
        broadcast_from_rank0(list(params.values()) + list(bufs.values()), self.ctx)
        for b in bufs.values():
            self._synced[id(b)] = weakref.ref(b)
        for m in module.modules():
            for attr, p in list(m._parameters.items()):
                if p is not None and not isinstance(p, ShardedParameter) and not _is_meta(p):
                    m._parameters[attr] = self._split_param(p, f"{type(m).__name__}.{attr}")

    def __exit__(self, exc_type, exc, tb) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if exc_type is None and self.enabled:
            for ref in list(self._modules.values()):
                m = ref()
                if m is not None:
                    self._split(m)
        self._modules.clear()
        self._split_of.clear()
        self._synced.clear()


__all__ = ["Init", "InitParameter", "broadcast_from_rank0"]
