"""Build a ``torch.optim`` optimizer from the ``optimizer {type, params}`` config block.

Accepted ``type`` values:

* DeepSpeed's names, case-insensitive as DeepSpeed lowercases them: ``Adam``, ``AdamW``,
  ``Adagrad`` and (torch's) ``SGD``. They take DeepSpeed's parameter names and meaning.
* Any ``torch.optim`` optimizer class by its exact name (``RMSprop``, ``NAdam``, ...) with
  the keyword arguments of its constructor, as DeepSpeed passes them through.

[Note: DeepSpeed Adam]
DeepSpeed builds ``FusedAdam(adam_w_mode=...)`` for ``Adam``/``AdamW`` (``torch.optim``
when ``torch_adam: true``). ``adam_w_mode`` defaults to True, so DeepSpeed's ``"Adam"`` is
AdamW (decoupled weight decay) unless ``"adam_w_mode": false``; ``"AdamW"`` is AdamW
whatever ``adam_w_mode`` says. FusedAdam's ``weight_decay`` defaults to 0 where
``torch.optim.AdamW``'s defaults to 0.01, so 0 is passed unless ``torch_adam`` is true (then
DeepSpeed hands the params to torch unchanged and torch's default applies). FusedAdam's
AdamW step (``p -= lr * (adam_update + weight_decay * p)``) is ``torch.optim.AdamW``'s.
``bias_correction: false`` has no torch equivalent and is refused; ``set_grad_none`` only
changes how ``zero_grad`` clears memory and is accepted and ignored.

[Note: DeepSpeed Lamb and 1-bit optimizers]
``Lamb`` (DeepSpeed's FusedLamb; ``FusedLamb`` too) is :class:`shardwise.optim.lamb.Lamb`,
with FusedLamb's parameters. Its trust ratio is per model tensor, but the engine's optimizer
steps flat buckets (stage 0 too), so it is exact only once the strategy binds each bucket's
layout to it (``bind_flat_chunks``, [Note: LAMB over flat buffers]); until then
(``LAMB_IN_ENGINE`` False) the config's ``Lamb`` is refused rather than run as a per-bucket
LAMB. ``OneBitAdam``, ``ZeroOneAdam`` and ``OneBitLamb`` compress the gradient all-reduce
(1-bit signs with error feedback, after uncompressed warm-up steps): that needs a compressed
collective inside the gradient reduction, which shardwise does not have; they are refused
with the uncompressed optimizer that has their convergence behaviour.
"""
from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from shardwise.config.plan import OptimizerPlan
from shardwise.errors import ConfigError, ConfigProblem
from shardwise.optim.params import describe, is_number, value_problem

# --- helpers shared with schedulers.py ------------------------------------------------


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"did you mean 'X'?"`` for the closest choice (case-insensitive first), else ``""``."""
    choices = sorted(set(choices))
    folded = {c.lower(): c for c in choices}
    if name.lower() in folded:
        return f"did you mean {folded[name.lower()]!r}?"
    close = difflib.get_close_matches(name.lower(), list(folded), n=1, cutoff=0.6)
    return f"did you mean {folded[close[0]]!r}?" if close else ""


def _problem(path: str, message: str, hint: str = "") -> ConfigProblem:
    return ConfigProblem(path, message, hint)


def _messages(problems: list[ConfigProblem]) -> list[str]:
    """Human-readable messages (no JSON path: each names its type and parameter)."""
    return [f"{p.message} ({p.hint})" if p.hint else p.message for p in problems]


def _raise_if_any(problems: list[ConfigProblem]) -> None:
    if problems:
        raise ConfigError(problems)


_is_number = is_number  # shared with schedulers.py


def _constructor_params(cls: type, skip: tuple[str, ...]) -> dict[str, inspect.Parameter]:
    """Keyword-usable constructor parameters of a torch class, minus ``skip``."""
    sig = inspect.signature(cls.__init__)
    return {
        n: p
        for n, p in sig.parameters.items()
        if n != "self"
        and n not in skip
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def _check_torch_kwargs(owner: str, path: str, cls: type, params: Mapping[str, Any],
                        skip: tuple[str, ...], extra: Iterable[str] = ()) -> list[ConfigProblem]:
    """Unknown, missing-required, callable-only and mistyped parameters of a torch class."""
    known = _constructor_params(cls, skip)
    allowed = set(known) | set(extra)
    problems = []
    for name, value in params.items():
        if name not in known:
            if name not in allowed:
                problems.append(_problem(f"{path}.{name}", f"unknown parameter {name!r} for "
                                         f"{owner}", _did_you_mean(name, allowed)))
            continue
        annotation = known[name].annotation
        if "Callable" in str(annotation):
            problems.append(_problem(f"{path}.{name}", f"{owner} parameter {name!r} takes a "
                                     "Python callable, which a JSON config cannot express"))
            continue
        bad = value_problem(name, value, annotation, known[name].default)
        if bad:
            problems.append(_problem(f"{path}.{name}", f"{owner} parameter {name!r} {bad}"))
    for name, p in known.items():
        if p.default is inspect.Parameter.empty and name not in params:
            problems.append(_problem(f"{path}.{name}",
                                     f"{owner} needs parameter {name!r}, which is missing"))
    return problems


def _tuples_for_tuple_defaults(cls: type, kwargs: dict[str, Any], skip: tuple[str, ...]
                               ) -> dict[str, Any]:
    """JSON lists -> tuples where the torch default is a tuple (``betas``, ``etas`` ...)."""
    known = _constructor_params(cls, skip)
    return {k: (tuple(v) if isinstance(v, list) and k in known
                and isinstance(known[k].default, tuple) else v) for k, v in kwargs.items()}


# --- names ----------------------------------------------------------------------------

# DeepSpeed-specific optimizers (deepspeed/runtime/config.py DEEPSPEED_OPTIMIZERS and the
# deepspeed.ops classes people put in configs), lowercased -> display name.
_NOT_IMPLEMENTED = {
    n.lower(): n
    for n in ("MuAdam", "MuAdamW", "MuSGD",
              "Lion", "Muon", "CPUAdam", "DeepSpeedCPUAdam", "FusedAdam",
              "FusedLion", "DeepSpeedCPUAdagrad", "DeepSpeedCPULion", "ZenFlowCPUAdam")
}

# [Note: DeepSpeed Lamb and 1-bit optimizers]
_LAMB_NAMES = ("lamb", "fusedlamb")
# True once strategy.py binds the buckets' layouts to the optimizer (bind_flat_chunks)
LAMB_IN_ENGINE = True
_LAMB_REFUSAL = (
    "DeepSpeed's Lamb scales each parameter's update by its own trust ratio ||w|| / ||update||, but "
    "shardwise's optimizer steps flat buckets that hold many parameters (at every ZeRO stage, 0 included) "
    "and the engine does not yet tell the optimizer where each parameter lies in them, so it would compute "
    "one ratio per bucket: not LAMB")
_LAMB_HINT = ("use 'AdamW' (or 'Adam'); shardwise.optim.Lamb is exact on a plain model's parameters "
              "outside the engine")
_ONE_BIT = {
    "onebitadam": ("OneBitAdam", "Adam"),
    "zerooneadam": ("ZeroOneAdam", "Adam"),
    "onebitlamb": ("OneBitLamb", "Lamb"),
}

# torch.optim classes that cannot run under a sharded engine step.
_REFUSED_TORCH = {
    "LBFGS": "needs a closure that re-evaluates the loss inside step(), which the engine's "
             "step does not provide",
    "SparseAdam": "needs sparse gradients, which ZeRO's flat gradient buffers never hold",
    "Adafactor": "factors the second moment of each matrix by its rows and columns, but the engine steps "
                 "flat 1-D buckets, where torch's Adafactor falls back to an unfactored second moment: "
                 "a different optimizer, silently",
}

# DeepSpeed's Adam extras (FusedAdam / DeepSpeedCPUAdam constructor) on top of torch's.
_ADAM_EXTRAS = ("adam_w_mode", "torch_adam", "bias_correction", "set_grad_none")
_PARAMS_ARG = ("params",)


def _torch_optimizers() -> dict[str, type]:
    return {
        n: c for n in dir(torch.optim)
        if isinstance(c := getattr(torch.optim, n), type)
        and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer
    }


def _known_names() -> list[str]:
    names = set(_torch_optimizers()) - set(_REFUSED_TORCH) - {"Muon"}
    return sorted(names | {"Adam", "AdamW", "SGD", "Adagrad", "Lamb"})


def _resolve(type_: str) -> tuple[str, Any]:
    """(kind, what): ("adam", is_adamw_name) | ("torch", cls) | ("todo", display name) |
    ("refused", (name, reason)) | ("unknown", hint)."""
    lower = type_.lower()
    if lower in ("adam", "adamw"):
        return "adam", lower == "adamw"
    if lower in _LAMB_NAMES:
        from shardwise.optim.lamb import Lamb

        return "lamb", Lamb
    if lower in _ONE_BIT:
        return "onebit", _ONE_BIT[lower]
    if lower == "sgd":
        return "torch", torch.optim.SGD
    if lower == "adagrad":
        return "torch", torch.optim.Adagrad
    if lower in _NOT_IMPLEMENTED:
        return "todo", _NOT_IMPLEMENTED[lower]
    if type_ in _REFUSED_TORCH:
        return "refused", (type_, _REFUSED_TORCH[type_])
    classes = _torch_optimizers()
    if type_ in classes:
        return "torch", classes[type_]
    return "unknown", _did_you_mean(type_, _known_names())


# --- validation -----------------------------------------------------------------------


def _adam_problems(owner: str, params: Mapping[str, Any]) -> list[ConfigProblem]:
    path = "optimizer.params"
    problems = []
    if "max_grad_norm" in params:
        problems.append(_problem(f"{path}.max_grad_norm", "'max_grad_norm' is not an optimizer "
                                 "parameter", "set the top-level 'gradient_clipping' instead"))
    if "decoupled_weight_decay" in params:
        problems.append(_problem(f"{path}.decoupled_weight_decay", f"{owner} takes "
                                 "'adam_w_mode' for decoupled weight decay",
                                 "use 'adam_w_mode' or type 'AdamW'"))
    rest = {k: v for k, v in params.items()
            if k not in ("max_grad_norm", "decoupled_weight_decay")}
    for name in _ADAM_EXTRAS:
        if name in rest and not isinstance(rest[name], bool):
            problems.append(_problem(f"{path}.{name}", f"{owner} parameter {name!r} must be "
                                     f"true or false, got {describe(rest[name])}"))
    if rest.get("bias_correction") is False:
        problems.append(_problem(f"{path}.bias_correction", "'bias_correction': false (Adam "
                                 "without bias correction) is not available in torch.optim",
                                 "remove it to get the default, bias-corrected Adam"))
    torch_kw = {k: v for k, v in rest.items() if k not in _ADAM_EXTRAS}
    problems += _check_torch_kwargs(owner, path, torch.optim.AdamW, torch_kw, _PARAMS_ARG)
    return problems


def _optimizer_problems(type_: Any, params: Any) -> list[ConfigProblem]:
    if not isinstance(type_, str) or not type_:
        return [_problem("optimizer.type", f"optimizer type must be a non-empty string, "
                         f"got {describe(type_)}")]
    if not isinstance(params, Mapping):
        return [_problem("optimizer.params", f"optimizer params must be an object, got "
                         f"{describe(params)}")]
    kind, what = _resolve(type_)
    owner = f"optimizer {type_!r}"
    if kind == "unknown":
        return [_problem("optimizer.type", f"unknown optimizer type {type_!r}; shardwise "
                         "takes DeepSpeed's Adam/AdamW/SGD/Adagrad or a torch.optim class name",
                         what)]
    if kind == "todo":
        return [_problem("optimizer.type", f"DeepSpeed optimizer {what!r} is not implemented "
                         "by shardwise yet", "use 'AdamW' instead")]
    if kind == "refused":
        name, reason = what
        return [_problem("optimizer.type", f"torch.optim.{name} is not supported: it {reason}",
                         "use 'AdamW' or another torch.optim optimizer")]
    if kind == "adam":
        return _adam_problems(owner, params)
    if kind == "lamb":
        return _lamb_problems(owner, what, params)
    if kind == "onebit":
        name, instead = what
        instead = instead if instead != "Lamb" or LAMB_IN_ENGINE else "AdamW"
        # (no parameter names in the text: resolve.py would take one for the problem's JSON path)
        return [_problem("optimizer.type", f"DeepSpeed's {name} is not supported: it compresses the gradient "
                         "all-reduce to 1 bit per element with error feedback (after uncompressed warm-up "
                         "steps), which needs a compressed collective inside the gradient reduction; "
                         "shardwise reduces gradients with plain all-reduce / reduce-scatter",
                         f'use "type": "{instead}" with the same hyper-parameters, minus the 1-bit-only ones '
                         f"(warm-up, compression and communication-backend settings): the uncompressed optimizer "
                         f"that {name} approximates, so the same convergence without the bandwidth saving")]
    return _check_torch_kwargs(owner, "optimizer.params", what, params, _PARAMS_ARG)


def _lamb_problems(owner: str, cls: type, params: Mapping[str, Any]) -> list[ConfigProblem]:
    path = "optimizer.params"
    problems = []
    if params.get("max_grad_norm", 0) not in (0, 0.0):
        problems.append(_problem(f"{path}.max_grad_norm", f"{owner}: 'max_grad_norm' is not applied by the "
                                 "optimizer", "set the top-level 'gradient_clipping' instead"))
    if params.get("amsgrad", False) is not False:
        problems.append(_problem(f"{path}.amsgrad", f"{owner}: amsgrad is not part of LAMB (nor of DeepSpeed's "
                                 "FusedLamb)", "remove it"))
    rest = {k: v for k, v in params.items() if k not in ("max_grad_norm", "amsgrad")}
    problems += _check_torch_kwargs(owner, path, cls, rest, _PARAMS_ARG)
    if not problems and not LAMB_IN_ENGINE:
        problems.append(_problem("optimizer.type", f"{owner} is not supported yet: {_LAMB_REFUSAL}", _LAMB_HINT))
    return problems


def check_optimizer_spec(type: str, params: dict) -> list[str]:  # noqa: A002 (config name)
    """Problems with ``optimizer {type, params}`` as human-readable messages; ``[]`` if fine.

    Pure: builds nothing. :func:`build_optimizer` raises :class:`ConfigError` with the same
    messages.
    """
    return _messages(_optimizer_problems(type, params if params is not None else {}))


# --- building -------------------------------------------------------------------------


def _tensors_of(item: Any) -> list[torch.Tensor]:
    if isinstance(item, torch.Tensor):
        return [item]
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
        return [item[1]]  # (name, tensor), as torch >= 2.6 optimizers accept
    return []


def _materialize(params: Any) -> tuple[Any, list[torch.Tensor]]:
    """Turn a (possibly one-shot) iterable into lists; return it and every tensor in it."""
    if isinstance(params, torch.Tensor):
        return params, [params]  # torch raises its own TypeError for a bare tensor
    items, tensors = [], []
    for item in params:
        if isinstance(item, Mapping):
            group_params = item.get("params", [])
            group_params = ([group_params] if isinstance(group_params, torch.Tensor)
                            else list(group_params))
            item = {**item, "params": group_params}
            for p in group_params:
                tensors += _tensors_of(p)
        else:
            tensors += _tensors_of(item)
        items.append(item)
    return items, tensors


@functools.lru_cache(maxsize=None)
def _fused_works(cls: type, device: str, dtype: torch.dtype) -> bool:
    """Whether ``cls(fused=True)`` can step a ``dtype`` tensor on ``device``.

    Probed with a throwaway 2-element tensor rather than inferred from the torch version:
    fused support differs by optimizer, device and release (CPU fused Adam/AdamW arrived in
    torch 2.4, CPU fused SGD/Adagrad later, Adagrad had no CUDA fused kernel at first), and
    torch checks the device lazily in step(), not at construction. Any failure means "no".
    """
    try:
        p = torch.zeros(2, device=device, dtype=dtype, requires_grad=True)
        p.grad = torch.zeros_like(p)
        cls([p], fused=True).step()
        return True
    except Exception:  # noqa: BLE001 - a probe: unsupported shows up as many error types
        return False


_FUSABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


def _kernel_choice(cls: type, tensors: list[torch.Tensor], kwargs: Mapping[str, Any]
                   ) -> dict[str, Any]:
    """``{"fused": True}`` where torch's fused kernel can run, ``{"foreach": True}`` on CUDA
    otherwise, ``{}`` (torch's default) when the user chose or nothing fits."""
    if cls not in _FUSABLE or "fused" in kwargs or "foreach" in kwargs:
        return {}
    if kwargs.get("differentiable") or not tensors:
        return {}
    devices = {str(t.device) for t in tensors}
    if len(devices) != 1 or not all(torch.is_floating_point(t) for t in tensors):
        return {}
    device = devices.pop()
    if torch.device(device).type not in ("cpu", "cuda"):
        return {}
    if all(_fused_works(cls, device, dt) for dt in {t.dtype for t in tensors}):
        return {"fused": True}
    return {"foreach": True} if torch.device(device).type == "cuda" else {}


def _adam_class_and_kwargs(is_adamw_name: bool, params: Mapping[str, Any]
                           ) -> tuple[type, dict[str, Any]]:
    kwargs = {k: v for k, v in params.items() if k not in _ADAM_EXTRAS}
    torch_adam = params.get("torch_adam", False)
    decoupled = is_adamw_name or params.get("adam_w_mode", True)
    if "weight_decay" not in kwargs and not torch_adam:
        kwargs["weight_decay"] = 0.0  # FusedAdam's default (see the note at the top)
    return (torch.optim.AdamW if decoupled else torch.optim.Adam), kwargs


def build_optimizer(plan: OptimizerPlan, params: Any) -> torch.optim.Optimizer:
    """Build the optimizer ``plan`` describes over ``params``.

    ``params`` is what a torch optimizer takes: an iterable of tensors or of param-group
    dicts. Adam/AdamW/SGD/Adagrad use torch's fused kernel when every parameter is a
    floating-point tensor on one CPU or CUDA device and the config sets neither ``fused``
    nor ``foreach``; where the fused kernel is unavailable (older torch, other dtype) they
    fall back to ``foreach`` on CUDA and torch's default elsewhere.

    Raises:
        ConfigError: the type or params are not usable (same messages as
            :func:`check_optimizer_spec`), or torch rejected a value.
    """
    raw = plan.kwargs()
    _raise_if_any(_optimizer_problems(plan.type, raw))
    kind, what = _resolve(plan.type)
    if kind == "adam":
        cls, kwargs = _adam_class_and_kwargs(what, raw)
    elif kind == "lamb":
        cls, kwargs = what, {k: v for k, v in raw.items() if k not in ("max_grad_norm", "amsgrad")}
    else:
        cls, kwargs = what, dict(raw)
    kwargs = _tuples_for_tuple_defaults(cls, kwargs, _PARAMS_ARG)
    items, tensors = _materialize(params)
    kernel = _kernel_choice(cls, tensors, kwargs)
    try:
        try:
            return cls(items, **kwargs, **kernel)
        except (TypeError, RuntimeError):
            if not kernel:
                raise
            # This torch lacks the kernel option for this optimizer/device: torch's default.
            return cls(items, **kwargs)
    except (ValueError, RuntimeError, OverflowError, ZeroDivisionError) as e:
        raise ConfigError([_problem("optimizer.params", f"torch.optim.{cls.__name__} "
                                    f"rejected the parameters: {e}")]) from e
