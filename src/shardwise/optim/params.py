"""Type and range checks of torch optimizer/scheduler parameters given in a JSON config.

[Note: torch parameters are checked by their signature]
A torch class's keyword arguments are checked against their annotations (``int``,
``float | list[float]``, ``tuple[float, float]``, ``Literal[...]``, ``bool | None`` ...),
for required ones as for those with a default, and every number against a range: finite
always (no NaN, no inf, no integer too large for a float), plus the range of its name in
:data:`RANGES` (learning rates, eps, weight decay non-negative; ``step_size``/``T_max``
positive, since torch divides by them at the first ``step()``). So a config that would fail
inside torch, at construction or steps later, fails at load time with the parameter's path.
"""
from __future__ import annotations

import inspect
import math
import numbers
import re
from typing import Any, Optional

from shardwise.config.ranges import FP32_MAX, INT64_MAX, Range, got, show

NON_NEG = Range(0, FP32_MAX)
POSITIVE = Range(0, FP32_MAX, lo_open=True)
UNIT = Range(0, 1)  # a fraction
POS_COUNT = Range(0, INT64_MAX, lo_open=True)
COUNT = Range(0, INT64_MAX)

# parameter name -> range, for torch.optim and torch.optim.lr_scheduler classes (names not
# listed only need to be finite). Lists/tuples (betas, base_lr per group) apply it per item.
RANGES: dict[str, Range] = {
    **dict.fromkeys(("lr", "eps", "weight_decay", "momentum", "dampening", "lr_decay",
                     "initial_accumulator_value", "lambd", "alpha", "t0", "momentum_decay",
                     "gamma", "eta_min", "base_lr", "max_lr", "base_momentum", "max_momentum",
                     "power", "factor", "start_factor", "end_factor", "etas", "step_sizes",
                     "min_lr", "cooldown", "threshold"), NON_NEG),
    **dict.fromkeys(("rho", "pct_start"), UNIT),
    "betas": Range(0, 1),  # torch also wants each < 1; it says so at construction
    **dict.fromkeys(("div_factor", "final_div_factor"), POSITIVE),
    **dict.fromkeys(("step_size", "T_max", "T_0", "T_mult", "step_size_up", "total_steps",
                     "epochs", "steps_per_epoch"), POS_COUNT),
    **dict.fromkeys(("total_iters", "step_size_down", "milestones"), COUNT),
}


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def number_problem(name: str, value: Any, integer: bool = False) -> Optional[str]:
    """What is wrong with ``value`` as the number ``name`` (None: nothing)."""
    if not is_number(value) or (integer and not _integral(value)):
        return f"must be {'an integer' if integer else 'a number'}"
    if isinstance(value, int):
        if abs(value) > INT64_MAX:
            return "must be at most 2**63-1 in size"
    elif not math.isfinite(value):
        return "must be a finite number"
    rng = RANGES.get(name)
    wrong = rng.problem(value) if rng is not None else None
    return f"{wrong} (allowed: {rng.text()})" if wrong else None


def _integral(v: Any) -> bool:
    return isinstance(v, numbers.Integral) or (isinstance(v, float) and math.isfinite(v)
                                               and v.is_integer())


def _split(text: str, sep: str) -> list[str]:
    """Split at ``sep`` outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[(" and 1 or (-1 if ch in "])" else 0)
        if ch == sep and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return parts + [text[start:].strip()]


def _alternatives(annotation: Any) -> Optional[list[str]]:
    """The annotation's alternatives as text (``float | list[float]`` -> 2), or None when
    it says nothing a JSON value can be checked against."""
    if annotation is inspect.Parameter.empty:
        return None
    text = annotation if isinstance(annotation, str) else str(annotation)
    text = re.sub(r"\b(typing|collections\.abc|torch)\.", "", text).replace("<class '", "")
    text = text.replace("'>", "")
    out: list[str] = []
    for alt in _split(text, "|"):
        if alt.startswith("Optional[") and alt.endswith("]"):
            out += ["None"] + (_alternatives(alt[9:-1]) or ["Any"])
        elif alt.startswith("Union[") and alt.endswith("]"):
            for a in _split(alt[6:-1], ","):
                out += _alternatives(a) or ["Any"]
        else:
            out.append(alt)
    return out


def describe(v: Any) -> str:
    """A value for an error message (never raises; see ``shardwise.config.ranges.got``)."""
    return show(v) if isinstance(v, (list, tuple)) else got(v)


def _matches(alt: str, name: str, value: Any) -> Optional[tuple[bool, str]]:
    """None if ``value`` fits the alternative ``alt``; else ``(False, what was wanted)`` or
    ``(True, the whole message)`` for a value of the right type outside its range."""
    if alt in ("None", "NoneType"):
        return None if value is None else (False, "null")
    if alt == "bool":
        return None if isinstance(value, bool) else (False, "true or false")
    if alt in ("int", "float"):
        wrong = number_problem(name, value, integer=alt == "int")
        if wrong is None:
            return None
        if is_number(value) and wrong.startswith("must be an integer"):
            return False, "an integer"
        if is_number(value):
            return True, f"{wrong}, got {got(value)}"
        return False, "an integer" if alt == "int" else "a number"
    if alt == "str":
        return None if isinstance(value, str) else (False, "a string")
    if alt.startswith("Literal["):
        choices = [c.strip().strip("'\"") for c in _split(alt[8:-1], ",")]
        return None if value in choices else (False, " or ".join(repr(c) for c in choices))
    m = re.fullmatch(r"(list|tuple|Iterable|Sequence)\[(.*)\]", alt)
    if m:
        return _items(m.group(1), _split(m.group(2), ","), name, value)
    if alt in ("Tensor", "Optimizer"):
        return False, ""
    return None  # an annotation this checker does not model: accepted


def _items(kind: str, items: list[str], name: str, value: Any) -> Optional[tuple[bool, str]]:
    if not isinstance(value, (list, tuple)):
        return False, "a list"
    if kind == "tuple" and "..." not in items and len(value) != len(items):
        return False, f"a list of {len(items)} values"
    for i, v in enumerate(value):
        subs = _alternatives(items[min(i, len(items) - 1)] if kind == "tuple" else items[0])
        if subs is None or "Any" in subs:
            continue
        found = [_matches(a, name, v) for a in subs]
        if any(f is None for f in found):
            continue
        whole = [f[1] for f in found if f and f[0]]
        if whole:
            return True, f"item [{i}] {whole[0]}"
        return False, f"a list whose every item is {' or '.join(f[1] for f in found if f and f[1])}"
    return None


def value_problem(name: str, value: Any, annotation: Any, default: Any) -> Optional[str]:
    """What is wrong with ``value`` for a torch parameter (None: nothing)."""
    alts = _alternatives(annotation)
    if alts is None:
        alts = _from_default(default)
    if not alts or "Any" in alts or any("Callable" in a for a in alts):
        return None
    found = [_matches(a, name, value) for a in alts]
    if any(f is None for f in found):
        return None
    whole = [f[1] for f in found if f and f[0]]
    if whole:
        return whole[0]
    wants = " or ".join(dict.fromkeys(f[1] for f in found if f and f[1]))
    return f"must be {wants}, got {describe(value)}"


def _from_default(default: Any) -> Optional[list[str]]:
    if default is inspect.Parameter.empty or default is None:
        return None
    if isinstance(default, bool):
        return ["bool"]
    if isinstance(default, numbers.Real):
        return ["float"]
    if isinstance(default, tuple):
        return [f"tuple[{', '.join(['float'] * len(default))}]"]
    if isinstance(default, str):
        return ["str"]
    return None
