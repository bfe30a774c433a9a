"""JSON scalar types and the allowed range of every numeric config key.

[Note: every number has a range]
A value that type-checks can still be unusable: ``initial_scale_power: 1e20`` makes
``2 ** power`` run until memory is gone, ``comms_timeout: 1e300`` overflows ``timedelta``,
a negative bucket size or a NaN learning rate trains nothing. So every numeric key of the
schema is declared with one of the named ranges below (hand-written fields in
``schema.py``, catalogue entries in ``schema_keys.py`` through :data:`KINDS`), checked by
the one validator :func:`typed` builds, and refused with the key's path and the range.
Each range is written once, here.

The helpers here never raise on odd input: huge integers (more digits than ``int`` will
print), non-JSON Python objects and self-containing dicts are described, not printed.
"""
from __future__ import annotations

import decimal
import json
import math
import re
from typing import Annotated, Any, NamedTuple, Optional

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

INT64_MAX = 2**63 - 1
FP32_MAX = 3.4028234663852886e38  # a larger number becomes inf in an fp32 tensor
MAX_SCALE_POWER = 64  # fp16 loss scale 2**64 is far beyond any useful scale
MAX_BATCH = 2**31 - 1  # samples per batch (and accumulation steps)
MAX_ELEMENTS = 2**40  # elements in one bucket/threshold (~1.1e12; 4 TiB of fp32)
MAX_TIMEOUT_S = 365 * 24 * 3600  # one year: far below timedelta's and torch's limits
MAX_DEPTH = 32  # nesting levels of a config document (DeepSpeed's are at most ~5)
MAX_DIGITS = 4000  # integer literals longer than this are refused, not parsed


class Range(NamedTuple):
    """``lo <= value <= hi`` (``lo < value`` when ``lo_open``)."""

    lo: float
    hi: float
    lo_open: bool = False

    def text(self) -> str:
        return f"{_num(self.lo)} {'<' if self.lo_open else '<='} value <= {_num(self.hi)}"

    def problem(self, v: Any) -> Optional[str]:
        """None when ``v`` (an int or a finite float) is inside, else what is wrong."""
        if v < self.lo or (self.lo_open and v == self.lo):
            rel = "greater than" if self.lo_open else "greater than or equal to"
            return f"must be {rel} {_num(self.lo)}"
        if v > self.hi:
            return f"must be less than or equal to {_num(self.hi)}"
        return None


def _num(v: float) -> str:
    if v == INT64_MAX:
        return "2**63-1"
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e16:
        return str(int(v))
    return f"{v:.3g}" if abs(v) >= 1e16 else repr(v)


# --- the named ranges ---------------------------------------------------------------------

BATCH = Range(0, MAX_BATCH, lo_open=True)  # batch sizes, accumulation steps
STEPS = Range(0, INT64_MAX, lo_open=True)  # step counts and intervals
ELEMENTS = Range(0, MAX_ELEMENTS)  # bucket sizes and thresholds, in elements
SCALE_POWER = Range(0, MAX_SCALE_POWER)  # fp16 initial_scale_power
SCALE = Range(0, 2.0**MAX_SCALE_POWER)  # fp16 loss_scale (0: dynamic)
POS_SCALE = Range(0, 2.0**MAX_SCALE_POWER, lo_open=True)  # fp16 min_loss_scale
NON_NEG = Range(0, FP32_MAX)  # gradient_clipping and other non-negative reals
TIMEOUT = Range(0, MAX_TIMEOUT_S, lo_open=True)  # comms_timeout, seconds
COUNT_OR_OFF = Range(-1, INT64_MAX)  # DeepSpeed's "-1 = off/all" integers
# offload (zero_optimization.offload_optimizer / offload_param / sub_group_size, aio, offload)
MAX_IO_QUEUE = 1024  # aio.queue_depth and intra_op_parallelism: each request in flight is a thread
MAX_BLOCK = 2**30  # aio.block_size, bytes (DeepSpeed's default is 1 MiB)
BLOCK_ALIGN = 4096  # aio.block_size is a whole number of pages (O_DIRECT I/O)
BUFFERS = Range(1, MAX_BATCH)  # swap-buffer counts
POS_ELEMENTS = Range(1, MAX_ELEMENTS)  # offload_param.buffer_size, elements
# zero_optimization.sub_group_size, elements per tile: no upper bound of its own, as DeepSpeed
# configs write 1e14 for "one tile" (the Hugging Face ZeRO-3 template)
TILE = Range(1, INT64_MAX)
FRACTION = Range(0, 1, lo_open=True)  # offload_optimizer.ratio
UNIT = Range(0, 1)  # offload_optimizer.cpuadam_cores_perc
IO_QUEUE = Range(1, MAX_IO_QUEUE)
BLOCK = Range(BLOCK_ALIGN, MAX_BLOCK)
BYTES = Range(0, INT64_MAX, lo_open=True)  # offload.host_memory_budget
TFLOPS = Range(0, 1e9, lo_open=True)  # peak_tflops, per device
PREDIVIDE = Range(0, 2.0**31, lo_open=True)  # gradient_predivide_factor

# Catalogue type names (``schema_keys``) -> (scalar kind, range). A catalogue integer whose
# DeepSpeed default is -1 (meaning "off" or "all") is declared "int-1".
KINDS: dict[str, tuple[str, Optional[Range]]] = {
    "int": ("int", Range(0, INT64_MAX)),
    "int-1": ("int", COUNT_OR_OFF),
    "elements": ("int", ELEMENTS),
    "float": ("float", NON_NEG),
    "bool": ("bool", None),
    "str": ("str", None),
}


# --- describing values (never raises) --------------------------------------------------------


class HugeInt(str):
    """A JSON integer literal over :data:`MAX_DIGITS` digits, kept as text (see ``_load``)."""


def parse_int(text: str) -> Any:
    """``json.loads(parse_int=...)``: Python refuses to parse ints over 4300 digits."""
    return HugeInt(text) if len(text) > MAX_DIGITS else int(text)


def got(v: Any) -> str:
    """What the user wrote, for an error message."""
    if isinstance(v, HugeInt):
        return f"an integer of {len(v.lstrip('-'))} digits"
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    if isinstance(v, str):
        text = json.dumps(v if len(v) < 40 else v[:36] + "...")
        return f"the string {text}"
    if isinstance(v, int):
        if v.bit_length() > 200:
            return f"an integer of about {int(v.bit_length() * math.log10(2)) + 1} digits"
        return f"the number {v!r}"
    if isinstance(v, float):
        return f"the number {v!r}"
    return {dict: "an object", list: "a list"}.get(type(v), f"a {type(v).__name__}")


def show(v: Any) -> str:
    """``v`` as JSON when short and printable, else :func:`got`'s description."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer() and abs(v) >= 1e3:
        v = int(v)
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 200:
        return got(v)
    try:
        text = json.dumps(v, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        return got(v)
    return text if not isinstance(v, (dict, list)) or len(text) < 30 else got(v)


# --- strict JSON scalar types, with ranges ------------------------------------------------------


def _fail(expected: str, v: Any) -> PydanticCustomError:
    return PydanticCustomError("sw_type", "expected {expected}, got {got}",
                               {"expected": expected, "got": got(v)})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(v: Any) -> int:
    # DeepSpeed configs write sizes as 5e8: an integral JSON float is an integer.
    if _is_int(v):
        return v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    raise _fail("an integer", v)


def check_float(v: Any) -> float:
    if _is_int(v):
        if abs(v) > FP32_MAX:  # also keeps float() from overflowing
            raise _fail("a finite number", v)
        return float(v)
    if isinstance(v, float) and math.isfinite(v):
        return float(v)
    raise _fail("a finite number", v)


def check_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise _fail("true or false", v)


def check_str(v: Any) -> str:
    if isinstance(v, str) and not isinstance(v, HugeInt):
        return v
    raise _fail("a string", v)


def check_path(v: Any) -> str:
    """A file-system path: a non-empty string without NUL bytes."""
    v = check_str(v)
    if not v or "\x00" in v:
        raise PydanticCustomError("sw_value", "must be a file-system path (non-empty, no NUL "
                                  "byte), got {got}", {"got": got(v)})
    return v


# offload.host_memory_budget: decimal and binary units, case-insensitive, optional space
BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BYTES_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]{1,4}))?\s*([A-Za-z]*)\s*")
BYTES_FORMS = ('an integer, or a string such as "12GB", "512MiB", "1.5e9" or "24 GiB" (KB, MB, GB, TB: '
               "powers of 1000; KiB, MiB, GiB, TiB: powers of 1024; any case)")


def check_bytes(v: Any) -> int:
    """A size in bytes: an integer (an integral JSON float too, as for every integer key) or a
    string of a number and an optional unit (:data:`BYTE_UNITS`); rounded to whole bytes."""
    if not isinstance(v, str) or isinstance(v, HugeInt):
        try:
            return check_int(v)
        except PydanticCustomError:
            raise PydanticCustomError("sw_type", "expected a number of bytes: {forms}, got {got}",
                                      {"forms": BYTES_FORMS, "got": got(v)}) from None
    match = _BYTES_RE.fullmatch(v) if len(v) <= 64 else None
    unit = BYTE_UNITS.get(match.group(3).lower()) if match else None
    if match is None or unit is None:
        raise PydanticCustomError("sw_value", "expected a number of bytes: {forms}, got {got}",
                                  {"forms": BYTES_FORMS, "got": got(v)})
    number = decimal.Decimal(match.group(1)).scaleb(int(match.group(2) or 0)) * unit
    if number > INT64_MAX:  # also keeps a 1e9999 from becoming a huge integer
        return INT64_MAX + 1  # refused by the range, with the user's text
    return int(number.to_integral_value(rounding=decimal.ROUND_HALF_EVEN))


CHECKS = {"int": (check_int, int), "float": (check_float, float),
          "bool": (check_bool, bool), "str": (check_str, str), "path": (check_path, str),
          "bytes": (check_bytes, int)}


def _ranged(check: Any, rng: Optional[Range], multiple: Optional[int] = None) -> Any:
    if rng is None:
        return check

    def validate(v: Any) -> Any:
        value = check(v)
        wrong = rng.problem(value)
        if wrong:
            raise PydanticCustomError("sw_range", "{wrong}, got {got} (allowed: {allowed})",
                                      {"wrong": wrong, "got": got(v), "allowed": rng.text()})
        if multiple is not None and value % multiple:
            lower = value // multiple * multiple
            near = " or ".join(str(n) for n in (lower, lower + multiple) if rng.problem(n) is None)
            raise PydanticCustomError("sw_range", "must be a multiple of {m}, got {got} (e.g. {near})",
                                      {"m": multiple, "got": got(v), "near": near})
        return value
    return validate


def typed(kind: str, rng: Optional[Range] = None, nullable: bool = False,
          multiple: Optional[int] = None) -> Any:
    """``Annotated`` type for a JSON scalar ``kind`` ("int", ...) inside ``rng`` (and a
    ``multiple`` of an integer, where given), optionally ``null``-able. Numeric kinds must be
    given a range (see [Note: every number has a range])."""
    check, base = CHECKS[kind]
    if kind in ("int", "float", "bytes") and rng is None:
        raise TypeError(f"a numeric config key needs a range ({kind})")
    validate = _ranged(check, rng, multiple)
    if not nullable:
        return Annotated[base, BeforeValidator(validate)]
    return Annotated[Optional[base], BeforeValidator(lambda v: None if v is None else validate(v))]


def catalogue_type(name: str) -> Any:
    """Annotation for a catalogue type name (``"int"``, ``"float?"``, ``"elements"`` ...)."""
    nullable, name = name.endswith("?"), name.rstrip("?")
    kind, rng = KINDS[name]
    return typed(kind, rng, nullable=nullable)


__all__ = ["Range", "KINDS", "typed", "catalogue_type", "got", "show", "parse_int", "HugeInt",
           "check_int", "check_str", "check_bytes", "BYTE_UNITS", "MAX_DEPTH", "INT64_MAX", "FP32_MAX"]
