"""Tensor parallelism: DTensor ``parallelize_module`` over the mesh's ``"tp"`` dimension.

[Note: tensor parallelism]
``apply_tensor_parallel`` runs first in ``compose`` (before activation checkpointing and the
ZeRO strategy): it picks a plan ([Note: tp plans] in plans.py: the config's ``tp_plan``, the
``preset_model``'s built-in plan, or the one recognised from the model's class), checks it
(every pattern matches a module; sharded sizes and head counts divide by tp), and calls
``parallelize_module(model, ctx.mesh["tp"], ...)``. Sharded parameters become DTensor
parameters whose local tensor is this rank's shard. A tied weight (embedding / LM head) stays
ONE parameter: ``parallelize_module`` replaces each module's parameter separately, so the
holders are re-pointed to the first holder's DTensor afterwards (their styles must shard it
alike, which the built-in plans do: vocabulary-parallel embedding, column-parallel head).

ZeRO then works on LOCAL tensors ([Note: DTensor parameters in flat buckets] in
zero/flat_bucket.py): flat buffers hold each rank's shards, gradients are reduced over dp only
(the tp ranks of one dp group hold different shards), and the gradient norm is summed over tp
with replicated parameters counted on tp rank 0 only (:func:`replicated_duplicates`).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.nn as nn

from shardwise.errors import ConfigError, ConfigProblem, UsageError
from shardwise.tensor_parallel.plans import (PRESETS, Assignment, first_unplanned, match_plan, recognise,
                                              shardable)

__all__ = ["apply_tensor_parallel", "parallelize", "replicated_duplicates", "is_dtensor", "local_tensor", "local_numel",
           "local_shape", "wrap_local", "rebind_local", "local_grad", "PRESETS"]


# -- DTensor helpers the ZeRO code uses (public DTensor API only) ------------------------------
def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@torch.no_grad()
def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a DTensor, ``t`` itself otherwise."""
    return t.to_local() if is_dtensor(t) else t


def local_shape(t: torch.Tensor) -> torch.Size:
    return local_tensor(t).shape


def local_numel(t: torch.Tensor) -> int:
    return local_tensor(t).numel()


def wrap_local(like: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """``view`` (shaped like ``like``'s local tensor) as a DTensor laid out like ``like``;
    ``view`` itself when ``like`` is a plain tensor. No communication (``run_check=False``)."""
    if not is_dtensor(like):
        return view
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(view, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


@torch.no_grad()
def rebind_local(p: nn.Parameter, view: torch.Tensor) -> None:
    """Make ``p``'s (local) values live in ``view`` (same shape as its local tensor), keeping
    the Python object ``p`` (every reference to it: modules, ties, param groups, hooks).

    Plain parameter: ``p.data = view``. DTensor parameter: ``.data`` does not reach its local
    tensor, so ``p`` is swapped (``torch.utils.swap_tensors``, what ``nn.Module._apply`` does for
    tensor subclasses) with a new DTensor parameter built on ``view``."""
    if not is_dtensor(p):
        p.data = view
        return
    fresh = nn.Parameter(wrap_local(p, view), requires_grad=p.requires_grad)
    # swap_tensors exchanges __dict__ too: what scripts attached to p (attributes, Python-level
    # tensor hooks) stays with p
    fresh.__dict__.update(p.__dict__)
    torch.utils.swap_tensors(p, fresh)


def local_grad(p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The local gradient of ``p``'s shard: a DTensor gradient laid out like ``p`` (a
    ``Partial`` one, e.g. a sequence-parallel norm's, is summed over tp here)."""
    if not is_dtensor(grad):
        return grad
    if tuple(grad.placements) != tuple(p.placements):
        grad = grad.redistribute(p.device_mesh, p.placements)
    return grad.to_local()


# -- the gradient norm ([Note: norm over the mesh] in parallel_norm.py) -------------------------
def _replicated(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import Replicate

    return not is_dtensor(p) or all(isinstance(pl, Replicate) for pl in p.placements)


def replicated_duplicates(module: nn.Module, ctx: Any) -> set[int]:
    """Ids of parameters whose gradient is identical on every tp rank (counted on tp rank 0 only):
    plain parameters (whole on every tp rank, fed whole activations) and Replicate DTensors
    (their gradient is made Replicate, i.e. summed over tp where DTensor gives a Partial one)."""
    if ctx.tp.size <= 1 or ctx.tp.rank == 0:
        return set()
    return {id(p) for p in module.parameters() if _replicated(p)}


# -- applying a plan ----------------------------------------------------------------------------
def _plan_for(model: nn.Module, policy: Any) -> tuple[tuple[tuple[str, str], ...], str]:
    """(the plan, the config path it came from)."""
    if policy.tp_plan:
        return tuple(policy.tp_plan), "tensor_parallel.tp_plan"
    name = policy.preset
    if name is None:
        name = recognise(model)
        if name is not None:  # a class of that name (nanoGPT's GPT is not the example's): its layout too
            try:
                match_plan(model, PRESETS[name])
            except ConfigError:
                name = None
    if name is not None:
        if name not in PRESETS:
            raise ConfigError([ConfigProblem("tensor_parallel.preset_model", f"unknown preset {name!r}",
                                             f"use one of {', '.join(sorted(PRESETS))}")])
        return PRESETS[name], f"tensor_parallel.preset_model={name!r} (built-in plan)"
    found = first_unplanned(model)
    what = (f"its module {found[0]!r} ({type(found[1]).__name__}) is covered by no plan" if found
            else "it has no Linear or Embedding module to shard")
    raise ConfigError([ConfigProblem(
        "tensor_parallel.tp_plan",
        f"autotp_size={policy.size} but shardwise has no built-in tensor-parallel plan for "
        f"{type(model).__name__}: {what}",
        f"set tensor_parallel.preset_model to one of {', '.join(p for p in PRESETS if p != 'gpt_sp')} "
        f"if the model is one of those, or give tensor_parallel.tp_plan, e.g. "
        f"{{{found[0] if found else 'layers.*.fc1'!r}: 'colwise', ...}} (colwise / rowwise / "
        "sequence_parallel per Linear/Embedding; unlisted modules stay replicated)")])


def _tied_holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    holders: dict[int, list[tuple[str, nn.Module, str]]] = defaultdict(list)
    seen: set[tuple[int, str]] = set()
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            if (id(mod), pname) in seen:
                continue
            seen.add((id(mod), pname))
            holders[id(p)].append((mname, mod, pname))
    return {k: v for k, v in holders.items() if len(v) > 1}


def _retie(ties: dict, where: str) -> None:
    """One DTensor per tied weight again (see [Note: tensor parallelism])."""
    for holders in ties.values():
        current = [getattr(mod, pname) for _, mod, pname in holders]
        if all(c is current[0] for c in current):
            continue
        names = [f"{m}.{p}" if m else p for m, _, p in holders]
        dts = [c for c in current if is_dtensor(c)]
        layouts = {tuple(c.placements) if is_dtensor(c) else "replicated (unplanned)" for c in current}
        if len(dts) != len(current) or len(layouts) != 1:
            detail = ", ".join(f"{n}: {tuple(c.placements) if is_dtensor(c) else 'not sharded'}"
                               for n, c in zip(names, current))
            raise ConfigError([ConfigProblem(
                where, f"the tied parameter {' = '.join(names)} would be laid out differently by its "
                       f"holders ({detail}); a tied weight must stay one tensor",
                "plan every holder so that it is sharded alike (an Embedding 'rowwise' and the tied "
                "Linear head 'colwise_gather_output' both shard the vocabulary rows), or leave all "
                "of them unplanned")])
        for _, mod, pname in holders:
            mod.register_parameter(pname, dts[0])


def _check_sizes(assignments: list[Assignment], tp: int, where: str) -> None:
    from shardwise.tensor_parallel.styles import sharded_dims

    for a in assignments:
        if a.style in ("colwise", "rowwise", "colwise_gather_output", "rowwise_from_replicated") \
                and not shardable(a.module):
            raise ConfigError([ConfigProblem(
                f"{where}[{a.pattern!r}]", f"{a.name!r} is a {type(a.module).__name__}; {a.style!r} "
                "applies to Linear, Embedding and Conv1D modules only",
                "use 'sequence_parallel' for a norm, or narrow the pattern")])
        for what, size in sharded_dims(a.style, a.module):
            if size % tp:
                raise ConfigError([ConfigProblem(
                    f"{where}[{a.pattern!r}]", f"{a.name!r} ({type(a.module).__name__}) has {what}={size}, "
                    f"not divisible by the tensor-parallel size {tp}",
                    "choose tensor_parallel.autotp_size dividing it, or leave the module replicated")])


def _check_heads(model: nn.Module, assignments: list[Assignment], tp: int, where: str) -> None:
    """Attention runs with the local head count: every tp rank must get whole heads."""
    names = {a.name for a in assignments if a.style == "colwise"}
    attrs = ("n_head", "num_heads", "num_attention_heads", "num_key_value_heads")
    sources = [(n, m) for n, m in model.named_modules()
               if any(c.startswith(n + ".") and c.count(".") == n.count(".") + 1 for c in names) or not n]
    cfg = getattr(model, "config", None)
    if cfg is not None and any("attn" in n or "attention" in n for n in names):  # heads are sharded
        sources.append(("config", cfg))
    for n, src in sources:
        for attr in attrs:
            v = getattr(src, attr, None)
            if isinstance(v, int) and not isinstance(v, bool) and v % tp:
                raise ConfigError([ConfigProblem(
                    where, f"{(n or type(model).__name__)}.{attr}={v} is not divisible by the "
                           f"tensor-parallel size {tp}: attention runs with the local head count",
                    "choose tensor_parallel.autotp_size dividing the number of (key/value) heads")])


def _already_parallel(model: nn.Module) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def _check_used_on_some_stage(model: nn.Module, plan, where: str, ctx: Any) -> None:
    """Under pipeline parallelism each rank holds one stage: a tp_plan pattern that matches a
    module on no stage is the ``ConfigError`` a single model gets (raised on every rank alike)."""
    from shardwise.comm.collectives import all_gather_object

    mine = {a.pattern for a in match_plan(model, plan, where=where, allow_unused=True)}
    used = set().union(*all_gather_object(sorted(mine), ctx.pp))
    unused = [pat for pat, _ in plan if pat not in used]
    if unused:
        raise ConfigError([ConfigProblem(f"{where}[{unused[0]!r}]", "the pattern matches no module on any "
                                         f"of the {ctx.pp.size} pipeline stages",
                                         "patterns are dotted module names with '*' for one name component "
                                         "(in a PipelineModule the first component is the layer index: "
                                         "'*.attn.q'); fix or remove the pattern")])


def parallelize(model: nn.Module, plan, tp_size: int, tp_mesh, *, where: str = "tensor_parallel.tp_plan",
                allow_unused: bool = False) -> None:
    """Check ``plan`` (``(pattern, style)`` pairs, [Note: tp plans]) against ``model`` and apply it
    with ``parallelize_module`` over ``tp_mesh`` (a 1-D DeviceMesh of ``tp_size`` ranks); tied
    weights stay one DTensor. No other communication than DTensor's own distribution."""
    from torch.distributed.tensor.parallel import parallelize_module

    from shardwise.tensor_parallel.styles import make_style

    assignments = match_plan(model, plan, where=where, allow_unused=allow_unused)
    _check_sizes(assignments, tp_size, where)
    _check_heads(model, assignments, tp_size, where)
    sp = any(a.style == "sequence_parallel" for a in assignments)
    styles = {}
    for a in assignments:
        style = make_style(a.style, a.module, sp)
        if style is not None:
            styles[a.name] = style
    ties = _tied_holders(model)
    parallelize_module(model, tp_mesh, styles)
    _retie(ties, where)


def _sync_replicated(model: nn.Module, ctx: Any) -> None:
    """Plain (non-DTensor) parameters and buffers are replicated over tp: make them tp rank 0's,
    as ``parallelize_module`` does for every DTensor (it distributes tp rank 0's tensor). The
    strategy's start-up broadcast then makes each tp coordinate agree over dp."""
    from shardwise.comm.replicate import broadcast_tensors

    seen: set[int] = set()
    plain = []
    for t in [*model.parameters(), *model.buffers()]:
        if t is None or is_dtensor(t) or t.is_meta or not t.numel() or id(t) in seen:
            continue
        if type(t).__name__ == "ShardedParameter":  # zero.Init placeholders hold no values here
            continue
        seen.add(id(t))
        plain.append(t)
    broadcast_tensors(plain, ctx.tp, src=0)


def apply_tensor_parallel(model: nn.Module, policy: Any, ctx: Any) -> None:
    """Shard ``model``'s layers over ``ctx.tp`` per ``policy`` (a ``TensorParallelPlan``);
    see [Note: tensor parallelism]. A model whose parameters already are DTensors (the script
    called ``parallelize_module`` itself, on the mesh it passes to initialize) is not planned
    again. Either way its plain parameters and buffers become tp rank 0's."""
    if policy is None or policy.size <= 1:
        return
    from shardwise.zero.sharded_params import ShardedParameter

    if any(isinstance(p, ShardedParameter) for p in model.parameters()):  # every rank alike
        raise UsageError("a model built under shardwise.zero.Init cannot be tensor-parallel: zero.Init splits "
                         "every parameter over all ranks before parallelize_module could shard it over tp. "
                         "Build the model normally (each layer is sharded over tp as initialize applies the "
                         "plan), or set tensor_parallel.autotp_size to 0")
    tp = ctx.tp
    if tp.size != policy.size:
        raise UsageError(f"tensor_parallel.autotp_size={policy.size} but the context's tp dimension has "
                         f"{tp.size} ranks; build the context with init_context(tp={policy.size})")
    if ctx.mesh is None or "tp" not in (ctx.mesh.mesh_dim_names or ()):
        raise UsageError("tensor parallelism needs a device mesh with a 'tp' dimension "
                         "(init_context(tp=N) builds one)")
    if not _already_parallel(model):
        plan, where = _plan_for(model, policy)
        staged = getattr(ctx, "pp", None) is not None and ctx.pp.size > 1
        if staged:  # one pipeline stage: a pattern must match on some stage, not on each
            _check_used_on_some_stage(model, plan, where, ctx)
        parallelize(model, plan, tp.size, ctx.mesh["tp"], where=where, allow_unused=staged)
    _sync_replicated(model, ctx)
