"""Fetch units for ZeRO stage 3: which parameters are gathered together (pure; no storage).

[Note: fetch units]
A fetch unit is a group of parameters that stage 3 keeps in one flat, sharded buffer and
all-gathers as a whole just before its module runs (FSDP2's ``fully_shard`` per block). The
default grouping follows how transformers are written:

- every child of an ``nn.ModuleList`` / ``nn.Sequential`` that holds at least two children
  with parameters (the "blocks") is one unit, named by its module path (``blocks.0``);
  blocks are not searched further;
- every other parameter (embeddings, final norm, head, ...) belongs to the root unit,
  named ``""``;
- a parameter reachable from more than one unit (tied weights) belongs to the root unit,
  so each parameter lives in exactly one unit;
- with ``unit_classes`` (DeepSpeed's ``set_fetch_units``-style list of module classes or
  class names) the units are instead the outermost modules of those classes; a name that no
  module in the model has is an error (:class:`UnknownUnitClassError`) instead of a silently
  unsharded model.

Units are listed in module registration order, root first. Only names and element counts are
read, so this runs on a model built on the meta device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch.nn as nn

from shardwise.errors import UsageError

ROOT = ""


class UnknownUnitClassError(UsageError):
    """``unit_classes`` names a module class that does not occur in the model."""


@dataclass(frozen=True)
class FetchUnit:
    name: str  # module path; "" for the root unit
    param_names: tuple[str, ...]  # fully qualified, in registration order
    numel: int  # elements of the unit's (unique) parameters
    persistent_numel: int = 0  # of which in parameters below the persistence threshold


def _has_params(m: nn.Module) -> bool:
    return next(m.parameters(), None) is not None


def _block_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            children = [(n, c) for n, c in module.named_children() if _has_params(c)]
            if len(children) >= 2:
                found.extend((f"{prefix}{n}", c) for n, c in children)
                return
        for n, c in module.named_children():
            visit(f"{prefix}{n}.", c)

    visit("", model)
    return found


def _class_modules(model: nn.Module, unit_classes: Sequence[type | str]) -> list[tuple[str, nn.Module]]:
    wanted_types = tuple(c for c in unit_classes if isinstance(c, type))
    wanted_names = {c for c in unit_classes if isinstance(c, str)}
    present = {type(m).__name__ for m in model.modules()} | {
        t.__name__ for m in model.modules() for t in type(m).__mro__}
    unknown = sorted(wanted_names - present)
    missing_types = [t.__name__ for t in wanted_types if not any(isinstance(m, t) for m in model.modules())]
    if unknown or missing_types:
        raise UnknownUnitClassError(
            f"fetch unit classes {unknown + missing_types} do not occur in {type(model).__name__}; "
            f"module classes with parameters are: "
            f"{sorted({type(m).__name__ for m in model.modules() if _has_params(m)})}")
    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for n, c in module.named_children():
            if isinstance(c, wanted_types) or type(c).__name__ in wanted_names:
                found.append((f"{prefix}{n}", c))
            else:
                visit(f"{prefix}{n}.", c)

    visit("", model)
    return found


def block_modules(model: nn.Module, unit_classes: Sequence[type | str] | None = None) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of the blocks (see [Note: fetch units]) or of the outermost modules
    of ``unit_classes``, in registration order; also what activation checkpointing wraps."""
    return _class_modules(model, unit_classes) if unit_classes else _block_modules(model)


def fetch_units(model: nn.Module, *, unit_classes: Sequence[type | str] | None = None,
                persistence_threshold: int = 0, trainable_only: bool = False) -> list[FetchUnit]:
    """Group ``model``'s parameters into fetch units (see [Note: fetch units]).

    ``persistence_threshold``: parameters with fewer elements are counted in
    ``persistent_numel`` (DeepSpeed's ``stage3_param_persistence_threshold``: kept whole on
    every rank instead of being fetched).
    """
    blocks = block_modules(model, unit_classes)
    prefixes = [(f"{n}.", n) for n, _ in blocks]
    reach: dict[int, set[str]] = {}  # id(param) -> units whose modules reach it
    params: dict[int, tuple[str, nn.Parameter]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        params.setdefault(id(p), (name, p))  # first name wins, as in named_parameters()
        unit = next((u for pre, u in prefixes if name.startswith(pre)), ROOT)
        reach.setdefault(id(p), set()).add(unit)
    order = [ROOT] + [n for n, _ in blocks]
    members: dict[str, list[tuple[str, nn.Parameter]]] = {n: [] for n in order}
    for pid, (name, p) in params.items():
        if trainable_only and not p.requires_grad:
            continue
        units_of = reach[pid]
        members[next(iter(units_of)) if len(units_of) == 1 else ROOT].append((name, p))
    units = []
    for n in order:
        ps = members[n]
        if n != ROOT and not ps:
            continue
        units.append(FetchUnit(n, tuple(x for x, _ in ps), sum(p.numel() for _, p in ps),
                               sum(p.numel() for _, p in ps if p.numel() < persistence_threshold)))
    return units


# -- user declarations (read when stage 3 is applied) -----------------------------------------
DECLARATIONS_ATTR = "_shardwise_stage3_declarations"


@dataclass
class Stage3Declarations:
    """What the user declared about one module for stage 3, kept on the module instance itself
    (``module.__dict__[DECLARATIONS_ATTR]``, so it lives and dies with the module, and is copied
    with it): read by ``apply_stage3``, the memory model and the planner."""

    unit_classes: tuple | None = None  # set_fetch_units(model, ...): on the model
    external_params: list = field(default_factory=list)  # register_external_parameter(module, ...)


def _declarations(module: nn.Module, *, create: bool = False) -> Stage3Declarations | None:
    found = module.__dict__.get(DECLARATIONS_ATTR)
    if found is None and create:
        found = module.__dict__[DECLARATIONS_ATTR] = Stage3Declarations()
    return found


def set_fetch_units(model: nn.Module, unit_classes: Sequence[type | str]) -> None:
    """Make every outermost module of these classes (or class names) one stage-3 fetch unit
    of ``model`` (instead of the children of ``nn.ModuleList``/``nn.Sequential``). Call before
    ``shardwise.initialize``. A class that does not occur in the model is an error then."""
    if isinstance(unit_classes, (type, str)):
        unit_classes = [unit_classes]
    _declarations(model, create=True).unit_classes = tuple(unit_classes)


def set_z3_leaf_modules(model: nn.Module, leaf_module_classes: Sequence[type | str]) -> list[nn.Module]:
    """DeepSpeed's call: stage 3 gathers each module of these classes whole, never part by part
    (mixture-of-experts layers whose experts run data-dependently). Here: the fetch units become
    the outermost modules of these classes or of the model's default block classes, so a leaf
    inside a block is gathered with its block and one outside any block is a unit of its own.
    Returns the modules of these classes, as DeepSpeed does. Call before ``initialize``."""
    if isinstance(leaf_module_classes, (type, str)):
        leaf_module_classes = [leaf_module_classes]
    wanted = tuple(leaf_module_classes)
    names = {c if isinstance(c, str) else c.__name__ for c in wanted}
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found:
        raise UnknownUnitClassError(f"set_z3_leaf_modules: no module of class {sorted(names)} in the "
                                    f"{type(model).__name__}; pass classes the model contains")
    blocks = tuple(dict.fromkeys(type(m) for _, m in _block_modules(model)))
    set_fetch_units(model, blocks + wanted)
    return found


def declared_unit_classes(model: nn.Module) -> tuple | None:
    found = _declarations(model)
    return found.unit_classes if found is not None else None


def register_external_parameter(module: nn.Module, param: nn.Parameter) -> None:
    """Declare that ``module``'s forward uses ``param`` although another fetch unit owns it
    (e.g. ``F.linear(x, self.other.weight)`` across units): stage 3 then gathers the owner's
    unit whenever ``module``'s unit runs. Inside one unit nothing needs declaring."""
    _declarations(module, create=True).external_params.append(param)


def declared_externals(model: nn.Module) -> list[tuple[nn.Module, nn.Parameter]]:
    out = []
    for m in model.modules():
        found = _declarations(m)
        if found is not None:
            out.extend((m, p) for p in found.external_params)
    return out


__all__ = ["FetchUnit", "UnknownUnitClassError", "fetch_units", "ROOT", "set_fetch_units",
           "register_external_parameter"]
