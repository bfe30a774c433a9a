"""Learning-rate schedules from the ``scheduler {type, params}`` config block.

DeepSpeed's schedules (``WarmupLR``, ``WarmupDecayLR``, ``WarmupCosineLR``, ``OneCycle``,
``LRRangeTest``) with DeepSpeed's parameter names and curves, written as
``torch.optim.lr_scheduler.LRScheduler`` subclasses, plus any
``torch.optim.lr_scheduler`` class by its exact name.

[Note: step indexing]
Call ``step()`` once after every optimizer step, as DeepSpeed's engine does. DeepSpeed's
schedules count ``last_batch_iteration`` from -1 and set the lr for index -1 at
construction; torch's ``LRScheduler`` counts ``last_epoch`` from -1 and steps once in its
constructor. So here DeepSpeed's index is ``i = last_epoch - 1``: after ``k`` calls of
``step()`` the lr equals DeepSpeed's after ``k`` calls, for every ``k >= 0``.

The lr in effect at optimizer step 0 (before any ``step()``) is DeepSpeed's construction
value: ``warmup_min_lr`` for WarmupLR/WarmupDecayLR (the warmup curve is also at its start at
index 0), ``cycle_min_lr`` for OneCycle, ``lr_range_test_min_lr`` for LRRangeTest, and **0**
for WarmupCosineLR (DeepSpeed's ratio before the first step is 0, not ``warmup_min_ratio``).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

import torch
from torch.optim.lr_scheduler import LRScheduler

from shardwise.config.plan import SchedulerPlan
from shardwise.errors import ConfigError, UsageError
from shardwise.optim.optimizers import (_check_torch_kwargs, _did_you_mean,
                                        _messages, _problem, _raise_if_any,
                                        _tuples_for_tuple_defaults)
from shardwise.optim.params import COUNT, NON_NEG, POS_COUNT, POSITIVE, describe, number_problem

# DeepSpeed schedule parameters -> kind: "lr" (number >= 0 or per-group list), "count"
# (integer > 0), "size" (number > 0), "int" (integer >= 0), "ratio" (number >= 0), "bool",
# "warmup_type"; a trailing "?" also allows null, a trailing "!" marks it required. Every
# number must also be finite (see [Note: torch parameters are checked by their signature]).
_WARMUP = {"warmup_min_lr": "lr", "warmup_num_steps": "count", "warmup_type": "warmup_type"}
_SPECS: dict[str, dict[str, str]] = {
    "WarmupLR": {**_WARMUP, "warmup_max_lr": "lr?"},
    "WarmupDecayLR": {"total_num_steps": "size!", **_WARMUP, "warmup_max_lr": "lr?"},
    "WarmupCosineLR": {"total_num_steps": "size!", "warmup_min_ratio": "ratio",
                       "warmup_num_steps": "count", "cos_min_ratio": "ratio",
                       "warmup_type": "warmup_type"},
    "OneCycle": {"cycle_min_lr": "lr!", "cycle_max_lr": "lr!", "decay_lr_rate": "ratio",
                 "cycle_first_step_size": "size", "cycle_second_step_size": "size?",
                 "cycle_first_stair_count": "int", "cycle_second_stair_count": "int?",
                 "decay_step_size": "ratio", "cycle_momentum": "bool", "cycle_min_mom": "ratio",
                 "cycle_max_mom": "ratio", "decay_mom_rate": "ratio"},
    "LRRangeTest": {"lr_range_test_min_lr": "lr", "lr_range_test_step_size": "size",
                    "lr_range_test_step_rate": "ratio", "lr_range_test_staircase": "bool"},
}

_KIND_TEXT = {"lr": "a finite number >= 0 or a list of them (one per param group)",
              "count": "a positive integer (at most 2**63-1)",
              "size": "a finite number > 0", "int": "an integer >= 0 (at most 2**63-1)",
              "ratio": "a finite number >= 0", "bool": "true or false",
              "warmup_type": "'log' or 'linear'"}
_KIND_RANGE = {"lr": NON_NEG, "count": POS_COUNT, "size": POSITIVE, "int": COUNT,
               "ratio": NON_NEG}

_RESUME_HINT = "resume by loading the scheduler's state_dict"
# torch.optim.lr_scheduler classes a JSON config cannot drive.
_REFUSED_TORCH = {
    "LambdaLR": "takes a Python callable", "MultiplicativeLR": "takes a Python callable",
    "SequentialLR": "takes other scheduler objects",
    "ChainedScheduler": "takes other scheduler objects",
    "ReduceLROnPlateau": "needs the validation metric passed to every step()",
}


def _value_ok(kind: str, v: Any) -> bool:
    if v is None:
        return kind.endswith("?")
    kind = kind.rstrip("?!")
    if kind in _KIND_RANGE:
        values = v if kind == "lr" and isinstance(v, (list, tuple)) and v else [v]
        integer = kind in ("count", "int")
        return all((isinstance(x, int) or not integer)
                   and number_problem("", x, integer=integer) is None
                   and _KIND_RANGE[kind].problem(x) is None for x in values)
    if kind == "bool":
        return isinstance(v, bool)
    return v in ("log", "linear")  # warmup_type


def _deepspeed_problems(name: str, params: Mapping[str, Any]) -> list:
    spec, owner, path = _SPECS[name], f"scheduler {name!r}", "scheduler.params"
    problems = []
    for key, value in params.items():
        if key == "last_batch_iteration":
            if value != -1:
                problems.append(_problem(f"{path}.{key}", f"{owner}: only "
                                         "'last_batch_iteration': -1 is supported",
                                         _RESUME_HINT))
        elif key not in spec:
            problems.append(_problem(f"{path}.{key}", f"unknown parameter {key!r} for {owner}",
                                     _did_you_mean(key, spec)))
        elif not _value_ok(spec[key], value):
            want = _KIND_TEXT[spec[key].rstrip("?!")]
            problems.append(_problem(f"{path}.{key}", f"{owner} parameter {key!r} must be "
                                     f"{want}, got {describe(value)}"))
    for key, kind in spec.items():
        if kind.endswith("!") and key not in params:
            problems.append(_problem(f"{path}.{key}", f"{owner} needs parameter {key!r}, "
                                     "which is missing"))
    return problems


def _torch_schedulers() -> dict[str, type]:
    mod = torch.optim.lr_scheduler
    return {n: c for n in dir(mod) if not n.startswith("_")
            and isinstance(c := getattr(mod, n), type) and issubclass(c, LRScheduler)
            and c is not LRScheduler}


def _scheduler_problems(type_: Any, params: Any) -> list:
    if not isinstance(type_, str) or not type_:
        return [_problem("scheduler.type", "scheduler type must be a non-empty string, got "
                         f"{describe(type_)}")]
    if not isinstance(params, Mapping):
        return [_problem("scheduler.params", f"scheduler params must be an object, got "
                         f"{describe(params)}")]
    if type_ in _SPECS:
        return _deepspeed_problems(type_, params)
    if type_ in _REFUSED_TORCH:
        return [_problem("scheduler.type", f"torch scheduler {type_!r} is not supported: it "
                         f"{_REFUSED_TORCH[type_]}", "use a DeepSpeed schedule such as "
                         "'WarmupCosineLR' or another torch.optim.lr_scheduler class")]
    classes = _torch_schedulers()
    if type_ not in classes:
        known = set(_SPECS) | set(classes) - set(_REFUSED_TORCH)
        return [_problem("scheduler.type", f"unknown scheduler type {type_!r}; shardwise "
                         "takes DeepSpeed's WarmupLR/WarmupDecayLR/WarmupCosineLR/OneCycle/"
                         "LRRangeTest or a torch.optim.lr_scheduler class name",
                         _did_you_mean(type_, known))]
    problems = []
    if params.get("last_epoch", -1) != -1:
        problems.append(_problem("scheduler.params.last_epoch", f"scheduler {type_!r}: only "
                                 "'last_epoch': -1 is supported", _RESUME_HINT))
    rest = {k: v for k, v in params.items() if k != "last_epoch"}
    return problems + _check_torch_kwargs(f"scheduler {type_!r}", "scheduler.params",
                                          classes[type_], rest, ("optimizer",))


def check_scheduler_spec(type: str, params: dict) -> list[str]:  # noqa: A002 (config name)
    """Problems with ``scheduler {type, params}`` as human-readable messages; ``[]`` if fine.

    Pure: needs no optimizer. :func:`build_scheduler` raises :class:`ConfigError` with the
    same messages.
    """
    return _messages(_scheduler_problems(type, params if params is not None else {}))


# --- DeepSpeed schedules --------------------------------------------------------------


def _per_group(optimizer: torch.optim.Optimizer, value: Any, name: str) -> list[float]:
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError([_problem(f"scheduler.params.{name}", f"{name!r} has "
                                        f"{len(value)} values but the optimizer has {n} "
                                        "param groups")])
        return [float(v) for v in value]
    return [float(value)] * n


def _warmup_gamma(i: int, num_steps: int, warmup_type: str) -> float:
    """Warmup progress in [0, 1] at DeepSpeed batch index ``i >= 0`` (1 after warmup)."""
    if i >= num_steps:
        return 1.0
    if warmup_type == "log":
        return math.log(i + 1) / math.log(num_steps)
    return i / num_steps


def _check(name: str, args: dict[str, Any]) -> None:
    """Validate a constructor's ``locals()`` against DeepSpeed schedule ``name``'s spec."""
    params = {k: v for k, v in args.items() if k not in ("self", "optimizer", "__class__")}
    _raise_if_any(_deepspeed_problems(name, params))


class _DeepSpeedSchedule(LRScheduler):
    """Base: the lr is a closed-form function of DeepSpeed's index ``last_epoch - 1``."""

    def _base(self) -> list[float]:
        return [float(b) for b in self.base_lrs]

    def _lrs_at(self, i: int) -> list[float]:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        return self._lrs_at(self.last_epoch - 1)

    _get_closed_form_lr = get_lr  # used by the deprecated step(epoch)


class WarmupLR(_DeepSpeedSchedule):
    """lr rises from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps`` steps
    ("log": ``log(i+1)/log(W)``, "linear": ``i/W`` of the way), then stays at the max.

    ``warmup_max_lr`` defaults to each param group's lr (DeepSpeed uses the first group's lr
    for every group; the two agree for one group). ``warmup_num_steps`` below 2 is raised to
    2, as in DeepSpeed.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_min_lr: Any = 0.0,
                 warmup_max_lr: Any = None, warmup_num_steps: int = 1000,
                 warmup_type: str = "log", last_batch_iteration: int = -1):
        _check("WarmupLR", locals())
        self.min_lrs = _per_group(optimizer, warmup_min_lr, "warmup_min_lr")
        self.max_lrs = (None if warmup_max_lr is None
                        else _per_group(optimizer, warmup_max_lr, "warmup_max_lr"))
        self.warmup_num_steps, self.warmup_type = max(2, warmup_num_steps), warmup_type
        super().__init__(optimizer, last_epoch=-1)

    def _gamma(self, i: int) -> float:
        return _warmup_gamma(i, self.warmup_num_steps, self.warmup_type)

    def _lrs_at(self, i: int) -> list[float]:
        if i < 0:
            return list(self.min_lrs)
        gamma = self._gamma(i)
        max_lrs = self.max_lrs if self.max_lrs is not None else self._base()
        return [lo + (hi - lo) * gamma for lo, hi in zip(self.min_lrs, max_lrs)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay: ``max(0, (T - i) / max(1, T - W))`` of the way from
    ``warmup_min_lr`` to ``warmup_max_lr``, reaching ``warmup_min_lr`` at
    ``total_num_steps`` T. ``warmup_max_lr`` defaults to 0.001 (DeepSpeed's default here),
    not to the optimizer's lr.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_num_steps: int,
                 warmup_min_lr: Any = 0.0, warmup_max_lr: Any = 0.001,
                 warmup_num_steps: int = 1000, warmup_type: str = "log",
                 last_batch_iteration: int = -1):
        _check("WarmupDecayLR", locals())
        self.total_num_steps = total_num_steps
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps,
                         warmup_type, last_batch_iteration)

    def _gamma(self, i: int) -> float:
        if i < self.warmup_num_steps:
            return super()._gamma(i)
        span = max(1.0, self.total_num_steps - self.warmup_num_steps)
        return max(0.0, (self.total_num_steps - i) / span)


class WarmupCosineLR(_DeepSpeedSchedule):
    """lr = (the optimizer's lr) * ratio: warmup from ``warmup_min_ratio`` to 1 over
    ``warmup_num_steps`` steps ("log" or "linear"), then a half cosine from 1 down to
    ``cos_min_ratio`` at ``total_num_steps``, held there afterwards. The ratio is 0 before
    the first ``step()`` (DeepSpeed's value; see the module note).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_num_steps: int,
                 warmup_min_ratio: float = 0.0, warmup_num_steps: int = 1000,
                 cos_min_ratio: float = 0.0001, warmup_type: str = "log",
                 last_batch_iteration: int = -1):
        _check("WarmupCosineLR", locals())
        self.total_num_steps, self.warmup_num_steps = total_num_steps, max(2, warmup_num_steps)
        self.warmup_min_ratio, self.cos_min_ratio = warmup_min_ratio, cos_min_ratio
        self.warmup_type = warmup_type
        super().__init__(optimizer, last_epoch=-1)

    def ratio_at(self, i: int) -> float:
        """The multiplier of the optimizer's lr at DeepSpeed batch index ``i``."""
        if i < 0:
            return 0.0
        w = self.warmup_num_steps
        if i < w:
            gamma = _warmup_gamma(i, w, self.warmup_type)
            return self.warmup_min_ratio + gamma * (1.0 - self.warmup_min_ratio)
        progress = min(1.0, (i - w + 1) / max(1, self.total_num_steps - w))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def _lrs_at(self, i: int) -> list[float]:
        ratio = self.ratio_at(i)
        return [base * ratio for base in self._base()]


class OneCycle(_DeepSpeedSchedule):
    """One triangular cycle, then decay (DeepSpeed's 1Cycle).

    Over the cycle (``cycle_first_step_size`` up, ``cycle_second_step_size`` down, the
    latter defaulting to the former) the lr goes ``cycle_min_lr`` -> ``cycle_max_lr`` ->
    ``cycle_min_lr``, moving in ``cycle_*_stair_count`` flat stairs per half when > 0.
    After it, the lr is ``cycle_min_lr / (1 + decay_lr_rate * d / decay_step_size)`` for
    the d-th post-cycle step (no decay when either is 0).

    With ``cycle_momentum`` (and an optimizer with ``betas``) beta1 moves inversely,
    ``cycle_max_mom`` -> ``cycle_min_mom`` -> ``cycle_max_mom``, then grows as
    ``cycle_max_mom * (1 + decay_mom_rate * d / decay_step_size)``; before the first
    ``step()`` it is ``cycle_min_mom`` as DeepSpeed sets it. beta2 is left as configured:
    DeepSpeed overwrites it with 0.99, which shardwise does not copy. Optimizers without
    ``betas`` (e.g. SGD) get no momentum cycling, as in DeepSpeed, with a warning.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cycle_min_lr: Any, cycle_max_lr: Any,
                 decay_lr_rate: float = 0.0, cycle_first_step_size: float = 2000,
                 cycle_second_step_size: float | None = None, cycle_first_stair_count: int = 0,
                 cycle_second_stair_count: int | None = None, decay_step_size: float = 0,
                 cycle_momentum: bool = True, cycle_min_mom: float = 0.8,
                 cycle_max_mom: float = 0.9, decay_mom_rate: float = 0.0,
                 last_batch_iteration: int = -1):
        _check("OneCycle", locals())
        self.min_lrs = _per_group(optimizer, cycle_min_lr, "cycle_min_lr")
        self.max_lrs = _per_group(optimizer, cycle_max_lr, "cycle_max_lr")
        self.first_size = float(cycle_first_step_size)
        self.second_size = float(cycle_second_step_size if cycle_second_step_size is not None
                                 else cycle_first_step_size)
        self.total_size = self.first_size + self.second_size
        self.first_stairs = cycle_first_stair_count
        self.second_stairs = (cycle_first_stair_count if cycle_second_stair_count is None
                              else cycle_second_stair_count)
        self.decay_step_size = decay_step_size
        self.decay_lr_rate, self.decay_mom_rate = decay_lr_rate, decay_mom_rate
        self.min_mom, self.max_mom = cycle_min_mom, cycle_max_mom
        self.cycle_momentum = cycle_momentum and "betas" in optimizer.defaults
        if cycle_momentum and not self.cycle_momentum:
            warnings.warn(f"OneCycle: cycle_momentum is off because "
                          f"{type(optimizer).__name__} has no 'betas' (as in DeepSpeed)",
                          stacklevel=2)
        super().__init__(optimizer, last_epoch=-1)

    def _scale(self, i: int) -> float:
        """Position in the cycle at index ``-1 <= i < total_size``: 0 at the ends, 1 at top."""
        offset = (i + 1) % self.total_size
        if offset <= self.first_size:
            stairs, raw = self.first_stairs, offset / self.first_size
            stair_pos = offset * stairs / self.first_size
        else:
            stairs, raw = self.second_stairs, (self.total_size - offset) / self.second_size
            stair_pos = (self.total_size - offset) * stairs / self.second_size
        # Stairs are quantised from the integer offset, as DeepSpeed does, so a float scale a
        # hair under 1.0 at the peak does not drop a whole stair.
        return math.floor(stair_pos) / stairs if stairs > 0 else raw

    def _decay_factor(self, i: int, rate: float) -> float | None:
        if self.decay_step_size == 0 or rate == 0:
            return None
        return 1.0 + rate * (i - self.total_size + 1) / self.decay_step_size

    def _lrs_at(self, i: int) -> list[float]:
        if i < self.total_size:
            scale = self._scale(i)
            return [lo + (hi - lo) * scale for lo, hi in zip(self.min_lrs, self.max_lrs)]
        factor = self._decay_factor(i, self.decay_lr_rate)
        return list(self.min_lrs) if factor is None else [lo / factor for lo in self.min_lrs]

    def momentum_at(self, i: int) -> float:
        """beta1 at DeepSpeed batch index ``i``."""
        if i < 0:
            return self.min_mom
        if i < self.total_size:
            return self.max_mom - (self.max_mom - self.min_mom) * self._scale(i)
        factor = self._decay_factor(i, self.decay_mom_rate)
        return self.max_mom if factor is None else self.max_mom * factor

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        if not self.cycle_momentum:
            return
        beta1 = self.momentum_at(self.last_epoch - 1)
        for group in self.optimizer.param_groups:
            betas = group["betas"]
            if isinstance(betas[0], torch.Tensor):
                betas[0].fill_(beta1)
            else:
                group["betas"] = (beta1, *tuple(betas)[1:])


class LRRangeTest(_DeepSpeedSchedule):
    """lr = ``lr_range_test_min_lr * (1 + step_rate * (i + 1) / step_size)``, the quotient
    floored with ``lr_range_test_staircase`` (DeepSpeed's LR range test)."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_range_test_min_lr: Any = 1e-3,
                 lr_range_test_step_size: float = 2000, lr_range_test_step_rate: float = 1.0,
                 lr_range_test_staircase: bool = False, last_batch_iteration: int = -1):
        _check("LRRangeTest", locals())
        self.min_lrs = _per_group(optimizer, lr_range_test_min_lr, "lr_range_test_min_lr")
        self.step_size, self.step_rate = lr_range_test_step_size, lr_range_test_step_rate
        self.staircase = lr_range_test_staircase
        super().__init__(optimizer, last_epoch=-1)

    def _lrs_at(self, i: int) -> list[float]:
        interval = (i + 1) / self.step_size
        interval = math.floor(interval) if self.staircase else interval
        return [lo * (1.0 + self.step_rate * interval) for lo in self.min_lrs]


_DEEPSPEED_CLASSES: dict[str, type[_DeepSpeedSchedule]] = {
    "WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR,
    "OneCycle": OneCycle, "LRRangeTest": LRRangeTest,
}


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)  # a wrapper exposing .optimizer, as DS does
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    raise UsageError(f"build_scheduler needs a torch.optim.Optimizer (or a wrapper with an "
                     f"'.optimizer' attribute holding one), got {type(optimizer).__name__}")


def build_scheduler(plan: SchedulerPlan, optimizer: Any) -> LRScheduler:
    """Build the lr scheduler ``plan`` describes over ``optimizer``.

    Construction sets the optimizer's lr to the schedule's value for step 0; call
    ``step()`` once after every optimizer step (see the module note on indexing).

    Raises:
        ConfigError: the type or params are not usable (same messages as
            :func:`check_scheduler_spec`), or torch rejected a value.
        UsageError: ``optimizer`` is not a torch optimizer.
    """
    optimizer = _torch_optimizer(optimizer)
    raw = plan.kwargs()
    _raise_if_any(_scheduler_problems(plan.type, raw))
    if plan.type in _DEEPSPEED_CLASSES:
        return _DEEPSPEED_CLASSES[plan.type](optimizer, **raw)
    cls = _torch_schedulers()[plan.type]
    kwargs = _tuples_for_tuple_defaults(cls, raw, ("optimizer",))
    try:
        return cls(optimizer, **kwargs)
    except (ValueError, KeyError, TypeError, OverflowError, ZeroDivisionError) as e:
        raise ConfigError([_problem("scheduler.params", f"torch.optim.lr_scheduler."
                                    f"{plan.type} rejected the parameters: {e}")]) from e
