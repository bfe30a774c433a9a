"""The pydantic schema of DeepSpeed's JSON config, and the checks that need only the document.

[Note: one pass, every problem]
``parse_document`` never stops at the first problem. It runs, in order: load (file or dict,
duplicate keys), ``"auto"`` detection, old-spelling normalisation, pydantic validation of
the whole document (``extra="forbid"`` at every level: unknown keys are errors), and the
not-implemented walk. Each step records :class:`ConfigProblem` s and the JSON paths it
found broken; the document is then validated again without just those keys (a whole
section only when the section itself is broken), so that ``resolve.py`` still runs every
cross-field check whose inputs are healthy, inside a broken section too. An unreadable
switch of an implemented section (``fp16.enabled: "true"``) is read as "on" for the
not-implemented walk. The caller raises one :class:`ConfigError` with everything: fixing
one problem never reveals the next. Numbers have ranges (``ranges.py``) and every section
is closed (``schema_keys.Section``); loading never raises (``load.py``).

[Note: known, accepted, refused]
Every DeepSpeed key is known (here or in ``schema_keys.py``). A key shardwise implements is
typed and used. A key it does not implement is accepted only while it asks for nothing (its
DeepSpeed default, or its section's switch is off); otherwise it is refused with "shardwise
does not implement yet" (and why, where there is more to say: ``aio.use_gds`` is CUDA-only).
Defaults are written once, here and in ``schema_keys.py``.
"""
import copy
import difflib
import warnings
from typing import Annotated, Any, Literal, NamedTuple, Optional

from pydantic import BeforeValidator, Field, ValidationError, create_model

from shardwise.config import ranges as R
from shardwise.config import schema_keys as K
from shardwise.config import schema_observe as O
from shardwise.config.schema_compile import CompileSection
from shardwise.config import schema_parallel as PAR
from shardwise.config.load import join as _join
from shardwise.config.load import load as _load
from shardwise.config.load import report_duplicates as _duplicates
from shardwise.config.ranges import check_int, check_str, got, show, typed
from shardwise.config.schema_keys import (ConfigDeprecationWarning, ConfigWarning, Warn,
                                          normalise)
from shardwise.config.fields import (Bool, Str, _Batch, _Elements, _Model, _OptPath, _OptSteps, _Steps,
                                     _annotation, _catalogue_field, _default_only, _inert)
from shardwise.errors import ConfigError, ConfigProblem

NOT_IMPLEMENTED = "shardwise does not implement yet"
AUTO_UNRESOLVED = 'shardwise does not fill in "auto" values'
UNKNOWN_KEY = "unknown key"


class OptimizerSection(_Model):
    type: Str
    params: Optional[dict[str, Any]] = None
    legacy_fusion: Bool = _default_only(False)


class SchedulerSection(_Model):
    type: Str
    params: Optional[dict[str, Any]] = None


class FP16Section(_Model):
    sw_gate = "enabled"
    enabled: Bool = False
    loss_scale: typed("float", R.SCALE) = 0.0  # 0 selects dynamic loss scaling
    initial_scale_power: typed("int", R.SCALE_POWER) = 16
    loss_scale_window: _Steps = 1000
    hysteresis: _Steps = 2
    consecutive_hysteresis: Bool = False
    min_loss_scale: typed("float", R.POS_SCALE) = 1.0
    auto_cast: Bool = _default_only(False)
    fp16_master_weights_and_grads: Bool = _default_only(False)
    fused_mode: Bool = _inert(True)  # old key: picked DeepSpeed's fused/unfused fp16 optimizer


class BF16Section(_Model):
    sw_gate = "enabled"
    enabled: Bool = False
    immediate_grad_update: Bool = _inert(False)  # DeepSpeed's own default changed over time
    check_grad_overflow: Bool = _default_only(False)
    bf16_master_weights_and_grads: Bool = _default_only(False)
    bf16_optimizer_states: Bool = _default_only(False)


# [Note: offload keys]
# zero_optimization.offload_optimizer / offload_param / sub_group_size and the top-level aio
# section, as shardwise's offload tiers (shardwise/offload/) read them through
# plan.OffloadPlan; defaults are DeepSpeed 0.19's. resolve.py holds the rules across keys
# (stages, nvme_path). Unlike DeepSpeed, which at stages 1-2 silently turns an optimizer
# offload to "nvme" into "cpu", shardwise does what is asked at every stage.

_Device = Annotated[Literal["none", "cpu", "nvme"], BeforeValidator(check_str)]
_Buffers = typed("int", R.BUFFERS)


class _OffloadBase(_Model):
    """What both offload sections share. ``device`` switches the section on: while it is
    "none" the other keys change nothing (see [Note: known, accepted, refused])."""

    sw_gate = "device"
    device: _Device = "none"
    # the directory the swap files go in: read with device "nvme" only, which needs it (an
    # existing, writable directory; resolved to an absolute path)
    nvme_path: _OptPath = None
    # page-lock the host buffers (CUDA only). Default true as DeepSpeed's since 0.19 (its PR #8207)
    pin_memory: Bool = True


class OffloadOptimizerSection(_OffloadBase):
    buffer_count: _Buffers = 4  # swap buffers (nvme)
    pipeline_read: Bool = False  # nvme: read the next tile while this one steps
    pipeline_write: Bool = False  # nvme: leave a tile's write in flight while the next steps
    # DeepSpeed derives it (pipeline_read or pipeline_write) and ignores what is written here:
    # accepted with any value; it has no effect of its own here either
    pipeline: Bool = _inert(False)
    fast_init: Bool = False  # nvme: build the swap files tile by tile
    ratio: typed("float", R.FRACTION) = 1.0  # share of the optimizer state offloaded (last chunks)
    super_offload: Bool = _default_only(False, why="SuperOffload, DeepSpeed's optimizer offload "
                                        "for NVIDIA Grace-Hopper superchips only")
    # DeepSpeedCPUAdam tuning (gradient conversion on the host; share of the host cores its
    # kernel uses): shardwise steps a torch optimizer on the host, so these have no effect here
    convert_grad_on_cpu: Bool = _inert(True)
    cpuadam_cores_perc: typed("float", R.UNIT) = _inert(0.8)


class OffloadParamSection(_OffloadBase):  # stage 3 only (resolve.py)
    buffer_count: _Buffers = 5  # parameter swap buffers (nvme)
    buffer_size: typed("int", R.POS_ELEMENTS) = 100_000_000  # elements per swap buffer
    max_in_cpu: _Elements = 1_000_000_000  # elements of shards also kept in host memory (nvme)


class AioSection(_Model):
    """Read by shardwise's threaded pread/pwrite engine (``offload/aio.py``): queue_depth x
    intra_op_parallelism requests of block_size bytes in flight."""

    block_size: typed("int", R.BLOCK, multiple=R.BLOCK_ALIGN) = 1_048_576  # bytes per request
    queue_depth: typed("int", R.IO_QUEUE) = 8
    intra_op_parallelism: typed("int", R.IO_QUEUE) = 1
    # libaio submission and event tuning: no effect on pread/pwrite threads
    single_submit: Bool = _inert(False)
    overlap_events: Bool = _inert(True)
    thread_count: typed("int", R.KINDS["int"][1]) = _inert(1)  # old key DeepSpeed no longer reads
    use_gds: Bool = _default_only(False, why="GPUDirect Storage is CUDA-only; shardwise's I/O "
                                  "engine uses pread/pwrite")


class OffloadSection(_Model):
    # shardwise: bytes every host buffer of the offload path must fit in; null: no limit. An
    # integer or a string such as "12GB", "512MiB", "1.5e9", "24 GiB" (ranges.check_bytes)
    host_memory_budget: typed("bytes", R.BYTES, nullable=True) = None


class _ZeroBase(_Model):
    stage: Annotated[Literal[0, 1, 2, 3], BeforeValidator(check_int)] = 0
    # [Note: bucket default] DeepSpeed's default is 5e8 elements; for shardwise the bucket is
    # the unit of overlap, and one 5e8 bucket would hold a whole small model and reduce only
    # after backward. 2e6 elements (8 MB fp32) measured best at 1M and 25M (benchmarks/README.md).
    reduce_bucket_size: _Elements = 2_000_000  # elements
    allgather_bucket_size: _Elements = 500_000_000  # elements
    # shardwise overlaps gradient reduction with backward at every stage (DeepSpeed by default
    # only at stage 3); false reduces after backward; an explicit null reads as this default
    overlap_comm: typed("bool", nullable=True) = True
    contiguous_gradients: Bool = True
    reduce_scatter: Bool = True
    offload_optimizer: Optional[OffloadOptimizerSection] = None  # see [Note: offload keys]
    offload_param: Optional[OffloadParamSection] = None
    # elements per tile of the offloaded optimizer step (DeepSpeed's default)
    sub_group_size: typed("int", R.TILE) = 1_000_000_000


# Not a config key: how many stage-3 gradient reductions may be in flight with overlap_comm
# (zero/stage3.py); resolve.py puts it into the Stage3Policy.
STAGE3_MAX_PENDING_REDUCTIONS = 2


ZeroSection = create_model("ZeroSection", __base__=_ZeroBase, **{
    k: _catalogue_field(f"zero_{k}", e) for k, e in K.ZERO.items()})


class _CheckpointBase(_Model):
    keep_last: _OptSteps = None  # shardwise: retain the newest N
    # shardwise: where automatic saves go / resume comes from (see checkpoint.dir in README)
    dir: _OptPath = None
    auto_resume: Bool = False  # shardwise: initialize() loads the latest commit in `dir`
    save_interval: _OptSteps = None  # shardwise: save every N steps


CheckpointSection = create_model("CheckpointSection", __base__=_CheckpointBase, **{
    k: _catalogue_field(f"checkpoint_{k}", e) for k, e in K.CHECKPOINT.items()})


_OptStr = _annotation("str?")


def _check_modules(value: Any) -> Any:
    if value is None or value == "blocks":
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return value
    raise ValueError(f'must be "blocks" or a non-empty list of module class names, {R.got(value)}')


class ActivationCheckpointingSection(_Model):
    # DeepSpeed's keys (see shardwise/checkpointing.py for what each does here)
    partition_activations: Bool = False  # split the kept inputs over tp (no effect at tp 1)
    cpu_checkpointing: Bool = False
    contiguous_memory_optimization: Bool = _inert(False)  # tune DeepSpeed's re-entrant path:
    number_checkpoints: typed("int", R.STEPS, nullable=True) = _inert(None)  # no effect here
    synchronize_checkpoint_boundary: Bool = _inert(False)
    profile: Bool = _inert(False)
    # shardwise: checkpoint without touching model code. "blocks": every repeated block (the
    # rule of stage 3's fetch units); a list: the outermost modules of these class names
    modules: Annotated[Optional[Any], BeforeValidator(_check_modules)] = None
    every: _Steps = 1  # every k-th selected module


class DataTypesSection(_Model):
    # the dtype gradients are reduced, accumulated and kept in; null: the compute dtype, as
    # DeepSpeed does (bf16 training keeps bf16 gradients); "fp32" keeps them in fp32
    grad_accum_dtype: Optional[Annotated[Literal["fp32", "fp16", "bf16"], BeforeValidator(check_str)]] = None
    param_dtype: _OptStr = _default_only(None)
    buffer_dtype: _OptStr = _default_only(None)


class _TopLevel(_Model):
    train_batch_size: _Batch = None
    train_micro_batch_size_per_gpu: _Batch = None
    gradient_accumulation_steps: _Batch = None
    optimizer: Optional[OptimizerSection] = None
    scheduler: Optional[SchedulerSection] = None
    fp16: FP16Section = Field(default_factory=FP16Section)
    bf16: BF16Section = Field(default_factory=BF16Section)
    zero_optimization: ZeroSection = Field(default_factory=ZeroSection)  # type: ignore[valid-type]
    checkpoint: Optional[CheckpointSection] = None  # type: ignore[valid-type]
    data_types: DataTypesSection = Field(default_factory=DataTypesSection)
    activation_checkpointing: ActivationCheckpointingSection = Field(default_factory=ActivationCheckpointingSection)
    # 0 disables clipping. Default 1.0 as DeepSpeed's since 0.19 (its PR #8068): the same config
    # that clips there clips here
    gradient_clipping: typed("float", R.NON_NEG) = 1.0
    # [Note: where gradients are divided] DeepSpeed's keys: true divides by the data-parallel
    # size before reducing; a factor f divides by f before and by dp/f after. Unset (false, 1.0),
    # shardwise divides before (folded into the loss scale: the same mean, and safer for fp16
    # sums than DeepSpeed's default of dividing after)
    prescale_gradients: Bool = False
    gradient_predivide_factor: typed("float", R.PREDIVIDE) = 1.0
    steps_per_print: _Steps = 10
    wall_clock_breakdown: Bool = False
    # shardwise: process-group timeout in seconds (None: torch's default); SHARDWISE_TIMEOUT wins
    comms_timeout: typed("float", R.TIMEOUT, nullable=True) = None
    # shardwise: a NaN/inf loss or gradient norm outside fp16: "error" (raise) or "skip" the step
    nonfinite: Annotated[Literal["error", "skip"], BeforeValidator(check_str)] = "error"
    aio: Optional[AioSection] = None  # see [Note: offload keys]
    offload: Optional[OffloadSection] = None  # shardwise: offload.host_memory_budget
    # model parallelism (schema_parallel.py)
    pipeline: PAR.PipelineSection = Field(default_factory=PAR.PipelineSection)
    tensor_parallel: PAR.TensorParallelSection = Field(default_factory=PAR.TensorParallelSection)
    # observers of the run (schema_observe.py)
    tensorboard: O.TensorboardSection = Field(default_factory=O.TensorboardSection)
    csv_monitor: O.CsvMonitorSection = Field(default_factory=O.CsvMonitorSection)
    wandb: O.WandbSection = Field(default_factory=O.WandbSection)
    comet: O.CometSection = Field(default_factory=O.CometSection)
    flops_profiler: O.FlopsProfilerSection = Field(default_factory=O.FlopsProfilerSection)
    comms_logger: O.CommsLoggerSection = Field(default_factory=O.CommsLoggerSection)
    compile: CompileSection = Field(default_factory=CompileSection)  # schema_compile.py
    # shardwise: one device's peak dense TFLOPS in the compute dtype, for the monitors' MFU;
    # null: looked up for known CUDA devices, else MFU is not reported
    peak_tflops: typed("float", R.TFLOPS, nullable=True) = None


DeepSpeedConfig = create_model("DeepSpeedConfig", __base__=_TopLevel, **{
    k: _catalogue_field(k, e) for k, e in K.TOP_LEVEL.items()})
DeepSpeedConfig.__doc__ = "A validated DeepSpeed config document (every section, defaults filled)."


def default(path: str) -> Any:
    """The schema's default of the key at dotted ``path`` (``"zero_optimization.reduce_bucket_size"``):
    for code outside the config (the estimator, the planner) that needs a default without a
    config document, so that each default is written once."""
    model: Any = DeepSpeedConfig
    *sections, key = path.split(".")
    for name in sections:
        model = _submodel(model.model_fields[name])
    field = model.model_fields[key]
    return field.get_default(call_default_factory=True)


def _field_kind(field: Any) -> Optional[str]:
    extra = field.json_schema_extra
    return extra.get("sw") if isinstance(extra, dict) else None


def _submodel(field: Any) -> Optional[type[_Model]]:
    """The model class of a nested-object field (through ``Optional``), else None."""
    stack = [field.annotation]
    while stack:
        ann = stack.pop()
        if isinstance(ann, type) and issubclass(ann, _Model):
            return ann
        stack.extend(getattr(ann, "__args__", ()))
    return None


# --- loading -------------------------------------------------------------------------------


# --- "auto" ---------------------------------------------------------------------------------


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == "auto"


def _remove_auto(value: Any, model: Optional[type[_Model]], path: str,
                 out: list[ConfigProblem]) -> None:
    """Report and delete every unresolved ``"auto"`` (where DeepSpeed's default is not "auto")."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            if _is_auto(item):
                out.append(_auto_problem(_join(path, i), None))
            else:
                _remove_auto(item, None, _join(path, i), out)
        return
    if not isinstance(value, dict):
        return
    for key in list(value):
        field = model.model_fields.get(key) if model is not None else None
        if model is not None and field is None:
            continue  # an unknown key: reported as such, with its did-you-mean
        if _is_auto(value[key]) and not (field is not None and field.default == "auto"):
            out.append(_auto_problem(_join(path, key), field))
            del value[key]
        else:
            _remove_auto(value[key], _submodel(field) if field else None, _join(path, key), out)


def _auto_problem(path: str, field: Any) -> ConfigProblem:
    default = field.default if field is not None else None
    todo = ("set true or false" if isinstance(default, bool) else
            "set a value" if isinstance(default, str) else "set a number")
    return ConfigProblem(path, f'"auto" is left unresolved: {AUTO_UNRESOLVED} (the Hugging Face '
                               f"Trainer does); {todo}")


# --- pydantic errors -> problems --------------------------------------------------------------


def _loc_path(loc: tuple) -> str:
    path = ""
    for key in loc:
        path = _join(path, key)
    return path


def _model_at(loc: tuple) -> Optional[type[_Model]]:
    model: Optional[type[_Model]] = DeepSpeedConfig
    for key in loc:
        field = model.model_fields.get(key) if model is not None else None
        model = _submodel(field) if field is not None else None
    return model


def _where_else(key: str) -> list[str]:
    """Paths of the sections (other than the one at hand) that know ``key``."""
    found, stack = [], [("", DeepSpeedConfig)]
    while stack:
        path, model = stack.pop()
        for name, field in model.model_fields.items():
            sub = _submodel(field)
            if name == key:
                found.append(path or "the top level")
            if sub is not None:
                stack.append((_join(path, name), sub))
    return sorted(found)


def closest(key: str, known: list[str]) -> Optional[str]:
    """The known key ``key`` most likely meant: same letters in another case first
    (``TRAIN_BATCH_SIZE``), else the closest spelling, compared case-insensitively."""
    folded = {k.lower(): k for k in sorted(known, reverse=True)}
    if key.lower() in folded:
        return folded[key.lower()]
    close = difflib.get_close_matches(key.lower(), list(folded), n=1, cutoff=0.6)
    return folded[close[0]] if close else None


def _unknown_key_hint(loc: tuple) -> str:
    key, model = str(loc[-1]), _model_at(loc[:-1])
    known = list(model.model_fields) if model is not None else []
    if not loc[:-1]:
        known += [k for s, k in K.RENAMED if not s] + list(K.TOP_LEVEL_MOVED)
    elif loc[0] == "zero_optimization" and len(loc) == 2:
        known += list(K.ZERO_SYNONYMS) + ["cpu_offload", "cpu_offload_param"]
    close = closest(key, known)
    elsewhere = [p for p in _where_else(key) if p != _loc_path(loc[:-1])]
    # a key of exactly one other section is misplaced, not misspelt ("offload_optimizer" at
    # the top level is not "optimizer"), unless it is a key of this section in another case
    if close and (len(elsewhere) != 1 or close.lower() == key.lower()):
        return f"did you mean '{close}'?"
    if loc[0] in ("optimizer", "scheduler") and len(loc) == 2 and len(elsewhere) != 1:
        return f"{loc[0]} settings go inside '{loc[0]}.params'"
    if len(elsewhere) == 1:
        return f"'{key}' belongs in '{elsewhere[0]}'" if elsewhere[0] != "the top level" else \
            f"'{key}' belongs at the top level"
    return f"known keys here: {', '.join(sorted(known))}" if 0 < len(known) <= 12 else ""


def _schema_problems(err: ValidationError) -> list[ConfigProblem]:
    out = []
    for e in err.errors(include_url=False):
        loc, kind, given = tuple(e["loc"]), e["type"], e.get("input")
        path, hint = _loc_path(loc), ""
        if kind == "extra_forbidden":
            message, hint = f"{UNKNOWN_KEY} '{loc[-1]}'", _unknown_key_hint(loc)
        elif kind == "missing":
            message = "required key is missing"
        elif kind in ("model_type", "dict_type", "model_attributes_type"):
            message = f"expected an object {{...}}, got {got(given)}"
        elif kind == "list_type":
            message = f"expected a list, got {got(given)}"
        elif kind.startswith("sw_"):
            message = e["msg"]
        else:
            message = f"{e['msg'].replace('Input should be', 'must be')}, got {got(given)}"
        out.append(ConfigProblem(path, message, hint))
    return out


# --- not implemented ------------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    return a == b


def _refuse(path: str, value: Any, default: Any, why: str | None = None) -> ConfigProblem:
    fix = "remove it" if default is None else f"remove it or set it to {show(default)}"
    what = "this section" if isinstance(value, dict) else show(value)
    because = f" ({why})" if why else ""
    return ConfigProblem(path, f"{what} asks for a DeepSpeed option {NOT_IMPLEMENTED}{because}; {fix}")


def _unimplemented(model: type[_Model], raw: dict, path: str, skip: set[str],
                   out: list[ConfigProblem]) -> None:
    fields = model.model_fields
    if model.sw_gate is not None:
        gate = fields[model.sw_gate]
        value = raw.get(model.sw_gate, gate.default)
        refused_gate = _field_kind(gate) == "default"
        if _join(path, model.sw_gate) in skip:
            if refused_gate:
                return  # unreadable, and refused whenever it is on: nothing more to say
            # unreadable but implemented: check the rest as if on (see [Note: one pass...])
        elif _same(value, gate.default):
            return  # switched off: the other keys have no effect
        elif refused_gate:
            out.append(_refuse(_join(path, model.sw_gate), value, gate.default, model.sw_why))
            return
    for key, value in raw.items():
        field, sub_path = fields.get(key), _join(path, key)
        if field is None or sub_path in skip or key == model.sw_gate:
            continue
        kind, sub = _field_kind(field), _submodel(field)
        extra = field.json_schema_extra or {}
        accept = extra.get("sw_accept", [field.default])
        if kind == "presence" and value is not None:
            out.append(_refuse(sub_path, value, None, getattr(sub, "sw_why", None)))
        elif kind == "default" and not any(_same(value, a) for a in accept):
            out.append(_refuse(sub_path, value, field.default, extra.get("sw_why")))
        elif sub is not None and isinstance(value, dict) and kind != "presence":
            _unimplemented(sub, value, sub_path, skip, out)


# --- the whole document ---------------------------------------------------------------------


class ParsedDocument(NamedTuple):
    """What the document alone says: the config (broken keys left at their defaults; None if
    nothing could be read), every problem, the JSON paths of the broken keys, and the
    warnings to emit."""

    config: Optional[Any]  # a DeepSpeedConfig
    problems: list[ConfigProblem]
    broken: frozenset[str]
    warnings: Warn
    notes: dict[str, str]  # JSON path -> where its value came from (an old spelling)


def parse_document(source: Any) -> ParsedDocument:
    """Run every document-level check (see [Note: one pass, every problem])."""
    problems: list[ConfigProblem] = []
    doc = _load(source, problems)
    if doc is None:
        return ParsedDocument(None, problems, frozenset(), [], {})
    unreadable = {p.path for p in problems}
    _duplicates(doc, "", problems)
    found_auto: list[ConfigProblem] = []
    _remove_auto(doc, DeepSpeedConfig, "", found_auto)
    notes, warns = normalise(doc, problems)
    try:
        DeepSpeedConfig.model_validate(doc)
        schema: list[ConfigProblem] = []
    except ValidationError as err:
        schema = _schema_problems(err)
    _unimplemented(DeepSpeedConfig, doc, "", {p.path for p in schema}, problems)
    config, removed = _healthy(doc)
    broken = unreadable | removed | {p.path for p in found_auto + schema}
    everything = [with_note(p, notes) for p in problems + found_auto + schema]
    return ParsedDocument(config, everything, frozenset(broken), warns, notes)


def _healthy(doc: dict) -> tuple[Optional[Any], set[str]]:
    """The document validated without its broken keys (each falls back to its default), so
    that ``resolve.py`` can run every cross-field check whose inputs are healthy; and the
    JSON paths removed. A key is removed where it is broken: its section only when the
    section itself is (a required key missing, not an object)."""
    healthy, removed = copy.deepcopy(doc), set()
    for _ in range(R.MAX_DEPTH):
        try:
            return DeepSpeedConfig.model_validate(healthy), removed
        except ValidationError as err:
            errors = err.errors(include_url=False)
        progress = False
        for e in errors:
            loc = list(e["loc"])
            cut = next((i for i, k in enumerate(loc) if not isinstance(k, str)), len(loc))
            loc = loc[:cut] if cut < len(loc) else (loc[:-1] if e["type"] == "missing" else loc)
            parent = healthy
            for key in loc[:-1]:
                parent = parent.get(key) if isinstance(parent, dict) else None
            if loc and isinstance(parent, dict) and loc[-1] in parent:
                del parent[loc[-1]]
                removed.add(_loc_path(tuple(loc)))
                progress = True
        if not progress:
            break
    return None, removed


def with_note(problem: ConfigProblem, notes: dict[str, str]) -> ConfigProblem:
    """``problem`` with the note of its path (``ParsedDocument.notes``) added to its hint."""
    for path, note in notes.items():
        if problem.path == path or problem.path.startswith(path + "."):
            hint = f"{problem.hint}; {note}" if problem.hint else note
            return ConfigProblem(problem.path, problem.message, hint)
    return problem


def sorted_problems(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    """Problems in a stable order: document-wide ones first, then by JSON path."""
    return sorted(problems, key=lambda p: (p.path != "", p.path))


def emit_warnings(warns: Warn, stacklevel: int) -> None:
    for message, category in warns:
        warnings.warn(message, category, stacklevel=stacklevel + 1)


def parse_config(source: Any) -> Any:
    """Validate a DeepSpeed config (path or dict) on its own and return the pydantic model.

    Raises one :class:`ConfigError` listing every problem. Rules that need the world size
    (the batch triangle) are left to :func:`shardwise.config.load_config`.
    """
    parsed = parse_document(source)
    emit_warnings(parsed.warnings, stacklevel=2)
    if parsed.problems:
        raise ConfigError(sorted_problems(parsed.problems))
    return parsed.config


__all__ = ["DeepSpeedConfig", "ZeroSection", "FP16Section", "BF16Section", "OptimizerSection",
           "SchedulerSection", "ParsedDocument", "parse_document", "parse_config",
           "sorted_problems", "emit_warnings", "with_note", "default", "OffloadOptimizerSection",
           "OffloadParamSection", "AioSection", "OffloadSection", "STAGE3_MAX_PENDING_REDUCTIONS",
           "ConfigWarning", "ConfigDeprecationWarning", "NOT_IMPLEMENTED", "AUTO_UNRESOLVED",
           "UNKNOWN_KEY"]
