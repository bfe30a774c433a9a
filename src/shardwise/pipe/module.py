"""``PipelineModule``: DeepSpeed's layer-list model, built one pipeline stage per rank.

[Note: pipeline module]
A ``PipelineModule`` is a list of layers (modules, callables, :class:`LayerSpec`,
:class:`TiedLayerSpec`) whose forward contract is DeepSpeed's: each layer's output is the next
layer's input (a tensor or a tuple of tensors). The list is cut into ``num_stages`` contiguous
parts (``partition_method``); this rank builds only its part's ``LayerSpec``s, so no rank ever
holds the whole model. Placement follows the (pp, dp, tp) mesh of the parallel context (pipeline
outermost): stage = global rank // (world size / num_stages).

Names are stable across pipeline sizes: a layer is registered under its *global* index
(``"3.fc.weight"``), a tied layer under ``"tied_modules.<key>"``, so the state dict of one stage
is a subset of what ``num_stages=1`` holds in one process, with the same names and shapes.

[Note: virtual stages]
The looped / interleaved / V schedules put several pipeline stages on one rank. Their placement
decides which layers a rank builds, and the layers are built here (before the config is read),
so ``stages_per_rank`` and ``placement`` ("loop": rank r holds stages r, r+p, ...; "v": rank r
holds r and 2p-1-r) are arguments of the module; ``build_pipeline`` checks that the config's
schedule agrees. Stage ids then index ``num_stages * stages_per_rank`` virtual stages.

[Note: tied layers]
A ``TiedLayerSpec`` key names one module that several stages use (the embedding and the LM
head). Each owning rank builds it once; the ranks owning a key at the same (dp, tp) position form
a tie group (``subgroup_contexts``). The tied attributes start equal (broadcast from the first
owner at construction, before any strategy copies them) and their gradients are summed over the
tie group after the schedule, before the data-parallel reduction; copies on ranks other than the
first owner are :meth:`PipelineModule.tied_duplicates` (left out of the gradient norm).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from shardwise.errors import UsageError

PARTITION_METHODS = ("parameters", "uniform", "type:<regex>")
PLACEMENTS = ("loop", "v")


class LayerSpec:
    """A layer built lazily, only on the stage that owns it: ``LayerSpec(cls, *args, **kwargs)``."""

    def __init__(self, typename: type, *module_args: Any, **module_kwargs: Any):
        if not (isinstance(typename, type) and issubclass(typename, nn.Module)):
            raise UsageError(f"LayerSpec needs an nn.Module class; got {typename!r}")
        self.typename = typename
        self.module_args = module_args
        self.module_kwargs = module_kwargs

    def build(self) -> nn.Module:
        return self.typename(*self.module_args, **self.module_kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.typename.__name__})"


class TiedLayerSpec(LayerSpec):
    """One module shared by several stages under ``key``: ``TiedLayerSpec(key, cls, *args,
    forward_fn=None, tied_weight_attr=["weight"], **kwargs)``. ``forward_fn(module, x)`` replaces
    ``module(x)`` where given (the LM head reusing the embedding's weight)."""

    def __init__(self, key: str, typename: type, *module_args: Any, forward_fn: Callable | None = None,
                 tied_weight_attr: str | Sequence[str] = ("weight",), **module_kwargs: Any):
        super().__init__(typename, *module_args, **module_kwargs)
        if not isinstance(key, str) or not key:
            raise UsageError(f"TiedLayerSpec needs a non-empty string key; got {key!r}")
        self.key = key
        self.forward_fn = forward_fn
        self.tied_weight_attr = [tied_weight_attr] if isinstance(tied_weight_attr, str) else list(tied_weight_attr)


def _attr(module: nn.Module, path: str) -> torch.Tensor:
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _count_params(layer: Any) -> int:
    """Trainable parameters of one layer entry; a spec is built on the meta device to count."""
    if isinstance(layer, LayerSpec):
        with torch.device("meta"):
            module = layer.build()
        return sum(p.numel() for p in module.parameters() if p.requires_grad)
    if isinstance(layer, nn.Module):
        return sum(p.numel() for p in layer.parameters() if p.requires_grad)
    return 0


def _class_name(layer: Any) -> str:
    if isinstance(layer, LayerSpec):
        return layer.typename.__name__
    return type(layer).__name__


def partition_balanced(weights: Sequence[float], parts: int) -> list[int]:
    """Boundaries ``[0, b1, ..., n]`` of ``parts`` non-empty contiguous parts minimising the
    heaviest part; among those, each part takes as many layers as it can (so zero-weight
    layers join the part before them)."""
    n = len(weights)
    if parts < 1:
        raise UsageError(f"cannot split into {parts} stages")
    if n < parts:
        raise UsageError(f"cannot split {n} layers into {parts} pipeline stages: every stage needs a layer")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))

    def greedy(bound: float) -> list[int] | None:
        bounds, start = [0], 0
        for j in range(parts):
            left = parts - j - 1  # parts still to fill after this one, one layer each at least
            if j == parts - 1:
                end = n
                if prefix[end] - prefix[start] > bound + 1e-9:
                    return None
            else:
                end = start + 1
                if prefix[end] - prefix[start] > bound + 1e-9:
                    return None
                while end < n - left and prefix[end + 1] - prefix[start] <= bound + 1e-9:
                    end += 1
            bounds.append(end)
            start = end
        return bounds

    candidates = sorted({prefix[b] - prefix[a] for a in range(n) for b in range(a + 1, n + 1)})
    lo, hi = 0, len(candidates) - 1
    while lo < hi:  # the smallest bottleneck that a greedy fill achieves
        mid = (lo + hi) // 2
        if greedy(candidates[mid]) is not None:
            hi = mid
        else:
            lo = mid + 1
    out = greedy(candidates[lo])
    assert out is not None
    return out


def partition_layers(layers: Sequence[Any], parts: int, method: str) -> list[int]:
    """DeepSpeed's partition methods over ``layers``: boundaries of ``parts`` stages."""
    m = (method or "parameters").strip()
    low = m.lower()
    if low in ("parameters", "best"):  # DeepSpeed's config spells the default "best"
        weights = [_count_params(layer) for layer in layers]
        if not any(weights):
            weights = [1] * len(layers)
    elif low == "uniform":
        weights = [1] * len(layers)
    elif low.startswith("type:"):
        pattern = re.compile(m[5:], re.IGNORECASE)
        weights = [1 if pattern.search(_class_name(layer)) else 0 for layer in layers]
        if not any(weights):
            raise UsageError(f"partition_method={method!r}: no layer's class name matches {m[5:]!r} "
                             f"(classes: {sorted({_class_name(x) for x in layers})})")
    else:
        raise UsageError(f"partition_method={method!r} is not one of {list(PARTITION_METHODS)}")
    return partition_balanced(weights, parts)


@dataclass(frozen=True)
class _Entry:
    index: int  # global layer index
    kind: str  # "module" | "tied" | "callable"
    key: str | None = None  # tied key
    forward_fn: Callable | None = None


class _StageModule(nn.Module):
    """One (virtual) stage's layers, run in order: what torch's ``PipelineStage`` wraps. It
    references the layers of the ``PipelineModule`` (it is not registered inside it, so the
    pipeline module's parameter names stay the global ones)."""

    def __init__(self, owner: "PipelineModule", entries: list[_Entry]):
        super().__init__()
        self._entries = entries
        self.layers = nn.ModuleDict()
        for e in entries:
            if e.kind == "module":
                self.layers[str(e.index)] = owner._layer_modules[e.index]
            elif e.kind == "tied" and e.key not in self.layers:
                self.layers[f"tied_{e.key}"] = owner.tied_modules[e.key]
        self._fns = [owner._layer_fn(e) for e in entries]
        self.__dict__["_owner_ref"] = owner  # not a submodule (its parameters are not the stage's)
        self.checkpoint_interval = 0

    def _run(self, lo: int, hi: int, x: Any) -> Any:
        for fn in self._fns[lo:hi]:
            x = fn(x)
        return x

    def forward(self, *args: Any) -> Any:
        x = args[0] if len(args) == 1 else args
        k = self.checkpoint_interval
        if k <= 0 or not torch.is_grad_enabled():
            return self._run(0, len(self._fns), x)
        owner = self._owner_ref
        for lo in range(0, len(self._fns), k):
            hi = min(lo + k, len(self._fns))
            if owner._checkpointable(self._entries[lo:hi]):
                inputs = x if isinstance(x, tuple) else (x,)
                x = owner._checkpoint_call(lambda *a, lo=lo, hi=hi: self._run(lo, hi, a[0] if len(a) == 1 else a),
                                           *inputs)
            else:
                x = self._run(lo, hi, x)
        return x


class PipelineModule(nn.Module):
    """DeepSpeed's ``PipelineModule`` (see [Note: pipeline module]).

    ``PipelineModule(layers, num_stages=None, topology=None, loss_fn=None, seed_layers=False,
    seed_fn=None, base_seed=1234, partition_method="parameters", activation_checkpoint_interval=0,
    activation_checkpoint_func=None, checkpointable_layers=None)``, plus shardwise's
    ``stages_per_rank=1`` and ``placement="loop"`` for the schedules that hold several stages per
    rank ([Note: virtual stages]). ``topology`` is refused (the context's (pp, dp, tp) mesh is
    the topology). Needs ``torch.distributed`` initialised when ``num_stages > 1``.
    """

    def __init__(self, layers: Sequence[Any], num_stages: int | None = None, topology: Any = None,
                 loss_fn: Callable | None = None, seed_layers: bool = False, seed_fn: Callable | None = None,
                 base_seed: int = 1234, partition_method: str = "parameters",
                 activation_checkpoint_interval: int = 0, activation_checkpoint_func: Callable | None = None,
                 checkpointable_layers: Sequence[str] | None = None, dynamic_shape: bool = False,
                 stages_per_rank: int = 1, placement: str = "loop"):
        super().__init__()
        if topology is not None:
            raise UsageError("PipelineModule(topology=...) is not supported: shardwise lays out (pp, dp, tp) itself "
                             "(pipeline outermost, as DeepSpeed's default topology). Pass num_stages= and set "
                             '"tensor_parallel": {"autotp_size": N} in the config for tensor parallelism.')
        layers = list(layers)
        if not layers:
            raise UsageError("PipelineModule needs at least one layer")
        for i, layer in enumerate(layers):
            if not (isinstance(layer, (LayerSpec, nn.Module)) or callable(layer)):
                raise UsageError(f"PipelineModule layer {i} is a {type(layer).__name__}: each layer must be an "
                                 "nn.Module, a LayerSpec / TiedLayerSpec or a callable")
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 or (dist.is_available() and dist.is_initialized()) else 0
        if num_stages is None:
            if world > 1:
                raise UsageError("PipelineModule(num_stages=None) under torch.distributed: pass num_stages= (the "
                                 "number of pipeline stages; the world size must be a multiple of it)")
            num_stages = 1
        num_stages = int(num_stages)
        if num_stages < 1:
            raise UsageError(f"PipelineModule(num_stages={num_stages}): needs at least 1 stage")
        if num_stages > 1 and not (dist.is_available() and dist.is_initialized()):
            raise UsageError(f"PipelineModule(num_stages={num_stages}) needs torch.distributed initialised first "
                             "(call shardwise.init_distributed() before building the model, as with DeepSpeed)")
        if world % num_stages:
            raise UsageError(f"PipelineModule(num_stages={num_stages}): the job's {world} ranks are not a "
                             f"multiple of it")
        if placement not in PLACEMENTS:
            raise UsageError(f"PipelineModule(placement={placement!r}) must be one of {list(PLACEMENTS)}")
        stages_per_rank = int(stages_per_rank)
        if stages_per_rank < 1 or (placement == "v" and stages_per_rank != 2):
            raise UsageError(f"PipelineModule(stages_per_rank={stages_per_rank}, placement={placement!r}): needs "
                             ">= 1 stages per rank, exactly 2 for the V placement")
        self.num_stages = num_stages  # pipeline ranks (DeepSpeed's num_stages)
        self.stages_per_rank = stages_per_rank
        self.placement = placement
        self.num_virtual_stages = num_stages * stages_per_rank
        self.stage_id = rank // (world // num_stages)
        self.loss_fn = loss_fn
        self.seed_layers = bool(seed_layers)
        self.seed_fn = seed_fn
        self.base_seed = int(base_seed)
        self.partition_method = partition_method
        self.activation_checkpoint_interval = int(activation_checkpoint_interval or 0)
        self.activation_checkpoint_func = activation_checkpoint_func
        self.checkpointable_layers = list(checkpointable_layers) if checkpointable_layers else None
        self._num_layers = len(layers)
        self.parts = partition_layers(layers, self.num_virtual_stages, partition_method)
        self.local_stages = self.stages_of(self.stage_id)

        # which virtual stages use each tie key (known on every rank: the specs are everywhere)
        self._tie_owners: dict[str, list[int]] = {}  # key -> pipeline ranks owning it, sorted
        self._tie_first_layer: dict[str, int] = {}
        for i, layer in enumerate(layers):
            if isinstance(layer, TiedLayerSpec):
                owner = self.rank_of_stage(self.stage_of_layer(i))
                self._tie_first_layer.setdefault(layer.key, i)
                ranks = self._tie_owners.setdefault(layer.key, [])
                if owner not in ranks:
                    ranks.append(owner)
        for ranks in self._tie_owners.values():
            ranks.sort()

        self._layer_modules: dict[int, nn.Module] = {}
        self._callables: dict[int, Callable] = {}
        self.tied_modules = nn.ModuleDict()
        self._tied_specs: dict[str, TiedLayerSpec] = {}
        self._entries: dict[int, list[_Entry]] = {}
        for v in self.local_stages:
            entries = []
            for i in range(self.parts[v], self.parts[v + 1]):
                entries.append(self._build(i, layers[i]))
            self._entries[v] = entries
        self._stage_modules = {v: _StageModule(self, self._entries[v]) for v in self.local_stages}
        self.set_checkpoint_interval(self.activation_checkpoint_interval)
        self._tie_groups: dict[str, Any] = {}
        self._sync_ties(world)

    # -- placement ---------------------------------------------------------------------------
    def rank_of_stage(self, v: int) -> int:
        """The pipeline rank holding virtual stage ``v``."""
        p = self.num_stages
        if self.placement == "v":
            return v if v < p else 2 * p - 1 - v
        return v % p

    def stages_of(self, pp_rank: int) -> list[int]:
        """The virtual stages pipeline rank ``pp_rank`` holds, in increasing order."""
        return sorted(v for v in range(self.num_virtual_stages) if self.rank_of_stage(v) == pp_rank)

    def stage_of_layer(self, index: int) -> int:
        for v in range(self.num_virtual_stages):
            if self.parts[v] <= index < self.parts[v + 1]:
                return v
        raise IndexError(index)

    # -- building ----------------------------------------------------------------------------
    def _seeded(self, index: int, build: Callable[[], Any]) -> Any:
        if not self.seed_layers:
            return build()
        with torch.random.fork_rng(devices=[]):
            (self.seed_fn or torch.manual_seed)(self.base_seed + index)
            return build()

    def _build(self, i: int, layer: Any) -> _Entry:
        if isinstance(layer, TiedLayerSpec):
            if layer.key not in self.tied_modules:
                first = self._tie_first_layer[layer.key]  # every owner builds it alike
                self.tied_modules[layer.key] = self._seeded(first, layer.build)
                self._tied_specs[layer.key] = layer
            return _Entry(i, "tied", layer.key, layer.forward_fn)
        if isinstance(layer, LayerSpec):
            module = self._seeded(i, layer.build)
            self.add_module(str(i), module)
            self._layer_modules[i] = module
            return _Entry(i, "module")
        if isinstance(layer, nn.Module):
            self.add_module(str(i), layer)
            self._layer_modules[i] = layer
            return _Entry(i, "module")
        self._callables[i] = layer
        return _Entry(i, "callable")

    def _layer_fn(self, e: _Entry) -> Callable:
        if e.kind == "module":
            return self._layer_modules[e.index]
        if e.kind == "callable":
            return self._callables[e.index]
        module = self.tied_modules[e.key]
        if e.forward_fn is None:
            return module
        fn = e.forward_fn
        return lambda x: fn(module, x)

    def _checkpointable(self, entries: Sequence[_Entry]) -> bool:
        for e in entries:
            layer = self._layer_modules.get(e.index) if e.kind == "module" else (
                self.tied_modules[e.key] if e.kind == "tied" else None)
            if layer is None:
                continue
            if self.checkpointable_layers is not None:
                if type(layer).__name__ in self.checkpointable_layers:
                    return True
            elif any(True for _ in layer.parameters()):
                return True
        return False

    def _checkpoint_call(self, fn: Callable, *inputs: Any) -> Any:
        if self.activation_checkpoint_func is not None:
            return self.activation_checkpoint_func(fn, *inputs)
        import torch.utils.checkpoint as cp

        return cp.checkpoint(fn, *inputs, use_reentrant=False)

    def _sync_ties(self, world: int) -> None:
        """Tie groups for the keys several pipeline ranks own; tied attributes broadcast from the
        first owner ([Note: tied layers]). Every rank takes part in creating every group."""
        multi = {k: r for k, r in sorted(self._tie_owners.items()) if len(r) > 1}
        if not multi:
            return
        from shardwise.comm.context import init_context, subgroup_contexts
        from shardwise.comm.replicate import broadcast_tensors

        ctx = init_context()
        per = world // self.num_stages  # ranks per stage (dp x tp)
        for key, owners in multi.items():
            groups = [[s * per + j for s in owners] for j in range(per)]
            group = subgroup_contexts(ctx, f"tie:{key}", groups)
            if group is not None and key in self.tied_modules:
                self._tie_groups[key] = group
                broadcast_tensors(self._tied_tensors(key), group, src=0)

    def _tied_tensors(self, key: str) -> list[torch.Tensor]:
        module = self.tied_modules[key]
        return [_attr(module, a) for a in self._tied_specs[key].tied_weight_attr]

    # -- DeepSpeed's surface and what the engine asks --------------------------------------------
    def tied_duplicates(self) -> list[nn.Parameter]:
        """Tied parameters on a rank that is not their key's first owner: another rank counts
        their (summed) gradient in the norm ([Note: norm over the mesh] in parallel_norm.py)."""
        out = []
        for key, group in self._tie_groups.items():
            if group.rank != 0:
                out.extend(t for t in self._tied_tensors(key) if isinstance(t, nn.Parameter))
        return out

    def tie_groups(self) -> dict[str, Any]:
        """key -> this rank's tie GroupContext (keys this rank shares with another stage)."""
        return dict(self._tie_groups)

    def tied_parameters(self, key: str) -> list[torch.Tensor]:
        return self._tied_tensors(key)

    def stage_module(self, v: int) -> nn.Module:
        return self._stage_modules[v]

    def stage_modules(self) -> list[nn.Module]:
        return [self._stage_modules[v] for v in self.local_stages]

    def set_checkpoint_interval(self, interval: int) -> None:
        self.activation_checkpoint_interval = int(interval)
        for m in self._stage_modules.values():
            m.checkpoint_interval = self.activation_checkpoint_interval

    def num_layers(self) -> int:
        return self._num_layers

    def stage_layers(self, v: int | None = None) -> range:
        """Global indices of the layers of virtual stage ``v`` (default: this rank's first)."""
        v = self.local_stages[0] if v is None else v
        return range(self.parts[v], self.parts[v + 1])

    def forward(self, *args: Any) -> Any:
        """The whole model in one process (``num_stages == 1`` and one stage per rank); a
        pipeline runs its stages through the engine's ``train_batch`` / ``eval_batch``."""
        if self.num_virtual_stages != 1:
            raise UsageError("PipelineModule.forward() runs the whole model and only works with one stage; with "
                             f"{self.num_virtual_stages} stages use engine.train_batch() / engine.eval_batch()")
        return self._stage_modules[0](*args)

    def extra_repr(self) -> str:
        return (f"num_stages={self.num_stages}, stage_id={self.stage_id}, layers={self._num_layers}, "
                f"parts={self.parts}")
