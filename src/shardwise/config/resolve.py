"""The one cross-field step: a validated config plus the world size become a frozen Plan.

Only rules that look at more than one key, or at the world size, live here: the batch
triangle, fp16 vs bf16, stage-dependent defaults, the offload rules (stages, ``nvme_path``)
and the optimizer/scheduler checks owned by ``shardwise.optim``. Everything a single key can
say is checked in ``schema.py``.

[Note: offload rules]
``offload_param`` needs stage 3 (parameters are offloaded shard by shard) and
``offload_optimizer`` needs stage 1 or higher (it moves this rank's optimizer shard; DeepSpeed
refuses stage 0 too). Device ``"nvme"`` needs ``nvme_path``: an existing directory this
process can create files in (write and search permission), checked here, on every rank, and
only for an nvme device; it is resolved to an absolute path (``~`` expanded). DeepSpeed at
stages 1-2 silently turns an optimizer offload to ``"nvme"`` into ``"cpu"``; shardwise does
what was asked. With optimizer offload to nvme, a ``sub_group_size`` over 1e8 elements is
said out loud (a ConfigWarning): every swap buffer holds a tile of up to that many fp32 values.
"""
from __future__ import annotations

import importlib
import os
import re
import warnings
from typing import Any, Optional, Union

from shardwise.config.plan import (ActivationCheckpointingPlan, AioPolicy, BatchPlan, CheckpointPlan,
                                   LossScalePlan, OffloadPlan, OptimizerOffloadPolicy, OptimizerPlan,
                                   ParamOffloadPolicy, Plan, PrecisionPlan, SchedulerPlan, Stage3Policy,
                                   ZeroPlan)
from shardwise.config.schema import (STAGE3_MAX_PENDING_REDUCTIONS, AioSection,
                                     CheckpointSection, ConfigWarning, OffloadOptimizerSection,
                                     OffloadParamSection, OffloadSection, emit_warnings, parse_document,
                                     sorted_problems, with_note)
from shardwise.config.resolve_compile import resolve_compile
from shardwise.config.resolve_observe import resolve_observe
from shardwise.config.resolve_parallel import resolve_parallel
from shardwise.errors import ConfigError, ConfigProblem, UsageError

Source = Union[str, "os.PathLike[str]", dict]
_TB, _MB, _GAS = "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"


def load_config(source: Source, world_size: int, pipeline_stages: int | None = None) -> Plan:
    """Read, validate and resolve a DeepSpeed JSON config (a path or a dict) for ``world_size``
    ranks (one model replica's: pipeline stages x data parallel x tensor parallel; the batch
    triangle is for the data-parallel size). ``pipeline_stages``: a ``PipelineModule``'s
    ``num_stages`` (``initialize`` passes it).

    Raises one :class:`~shardwise.errors.ConfigError` listing every problem in the document,
    each with its JSON path; old DeepSpeed spellings are read as their replacements with a
    :class:`~shardwise.config.schema.ConfigDeprecationWarning`. Nothing here communicates:
    every rank can call it, before any collective.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise UsageError(f"world_size must be a positive integer, got {world_size!r}")
    parsed = parse_document(source)
    emit_warnings(parsed.warnings, stacklevel=2)
    problems = list(parsed.problems)
    plan = None
    if parsed.config is not None:
        plan, more = _resolve(parsed.config, world_size, parsed.broken, pipeline_stages)
        problems += [with_note(p, parsed.notes) for p in more]
    if plan is None and not problems:  # internal invariant; never expected
        problems.append(ConfigProblem("", "the config could not be resolved"))
    if problems or plan is None:
        raise ConfigError(sorted_problems(problems))
    return plan


def plan_for(config: dict, world_size: int = 1) -> Plan:
    """:func:`load_config` of a dict, for tests and tools that need a :class:`Plan` (the plan
    dataclasses have no defaults of their own): with no batch key in ``config``,
    ``train_micro_batch_size_per_gpu`` is 1."""
    if not any(k in config for k in (_TB, _MB, _GAS)):
        config = {_MB: 1, **config}
    return load_config(config, world_size)


def resolve_config(config: Any, world_size: int) -> Plan:
    """Resolve an already validated config (from :func:`parse_config`) for ``world_size``."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise UsageError(f"world_size must be a positive integer, got {world_size!r}")
    plan, problems = _resolve(config, world_size, frozenset())
    if problems or plan is None:
        raise ConfigError(sorted_problems(problems))
    return plan


def _hit(broken: frozenset[str], *paths: str) -> bool:
    """Whether any of ``paths`` is broken: the key itself, a section above it, or a part of
    it (``optimizer.params.betas[0]`` hits ``optimizer.params.betas``)."""
    for b in broken:
        for p in paths:
            if b == p or b.startswith((p + ".", p + "[")) or p.startswith(b + "."):
                return True
    return False


def _lost(broken: frozenset[str], path: str) -> bool:
    """Whether ``path`` itself, or a section above it, is broken."""
    return any(b == path or path.startswith((b + ".", b + "[")) for b in broken)


def _resolve(cfg: Any, world_size: int, broken: frozenset[str],
             pipeline_stages: int | None = None) -> tuple[Optional[Plan], list]:
    """Run every check whose inputs are healthy; a check that reads a ``broken`` key (one
    already reported, now at its default in ``cfg``) is skipped: a verdict on a default the
    user did not write would only add noise. Everything else is still checked, so that one
    error lists every problem of the document (see [Note: one pass, every problem])."""
    problems: list[ConfigProblem] = []
    parallel = resolve_parallel(cfg, world_size, pipeline_stages, problems)
    dp = parallel.dp if parallel is not None else world_size
    results: dict[str, Any] = {
        "parallel": parallel,
        "batch": None if _hit(broken, _TB, _MB, _GAS) else _batch(cfg, dp, problems),
        "precision": _precision(cfg, problems, broken),
        "zero": _zero(cfg.zero_optimization, problems, _predivide(cfg)),
        "optimizer": _spec(cfg.optimizer, "optimizer", problems, broken),
        "scheduler": _spec(cfg.scheduler, "scheduler", problems, broken),
        "checkpoint": _checkpoint(cfg.checkpoint, problems, broken),
        "offload": _offload(cfg, problems, broken),
        "observe": resolve_observe(cfg, problems),
        "compile": resolve_compile(cfg.compile, problems),
    }
    if problems or broken or any(results[k] is None for k in ("batch", "precision", "zero", "parallel")):
        return None, problems
    plan = Plan(world_size=dp, parallel=parallel, batch=results["batch"], zero=results["zero"],
                precision=results["precision"], optimizer=results["optimizer"],
                scheduler=results["scheduler"], gradient_clipping=float(cfg.gradient_clipping),
                steps_per_print=cfg.steps_per_print,
                wall_clock_breakdown=cfg.wall_clock_breakdown,
                checkpoint=results["checkpoint"], comms_timeout_s=cfg.comms_timeout,
                activation_checkpointing=_activation_checkpointing(cfg.activation_checkpointing),
                offload=results["offload"], observe=results["observe"], compile=results["compile"])
    return plan, problems


def _activation_checkpointing(ac: Any) -> ActivationCheckpointingPlan:
    for key in ("contiguous_memory_optimization", "number_checkpoints", "synchronize_checkpoint_boundary",
                "profile"):
        if key in ac.model_fields_set and getattr(ac, key):
            warnings.warn(f"activation_checkpointing.{key} has no effect in shardwise: it tunes DeepSpeed's "
                          "re-entrant checkpoint buffers; shardwise uses torch.utils.checkpoint "
                          "(non-re-entrant)", ConfigWarning, stacklevel=2)
    modules = tuple(ac.modules) if isinstance(ac.modules, list) else ac.modules
    return ActivationCheckpointingPlan(modules=modules, every=ac.every, cpu_checkpointing=ac.cpu_checkpointing,
                                       partition_activations=ac.partition_activations)


def _checkpoint(ck: Any, problems: list[ConfigProblem], broken: frozenset[str]
                ) -> CheckpointPlan:
    if ck is None:  # no section: its defaults
        ck = CheckpointSection()
    for key in ("auto_resume", "save_interval"):
        if getattr(ck, key) and not ck.dir and not _hit(broken, "checkpoint.dir"):
            problems.append(ConfigProblem(f"checkpoint.{key}", "needs checkpoint.dir (where "
                                          "checkpoints are saved and resumed from)",
                                          'add "dir": "path/to/checkpoints"'))
    return CheckpointPlan(keep_last=ck.keep_last, dir=ck.dir, auto_resume=ck.auto_resume,
                          save_interval=ck.save_interval)


# [Note: batch triangle]
# train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps * world size.
# As in DeepSpeed: any two of the three give the third; train alone means gas = 1; micro
# alone means gas = 1; gas alone (or nothing) sets no batch size and is an error. Unlike
# DeepSpeed, a division that leaves a remainder is reported with the user's numbers instead
# of being floored into a smaller batch.


def _batch(cfg: Any, ws: int, problems: list[ConfigProblem]) -> Optional[BatchPlan]:
    tb, mb, gas = (getattr(cfg, k) for k in (_TB, _MB, _GAS))
    w = f"world size ({ws})"

    def whole(total: int, per: int, per_text: str, result: str) -> Optional[int]:
        if total % per == 0:
            return total // per
        lower, upper = (total // per) * per, (total // per + 1) * per
        sizes = " or ".join(str(n) for n in (lower, upper) if n > 0)
        product = "" if per_text == w else f" = {per}"
        problems.append(ConfigProblem(_TB, f"{_TB} ({tb}) must be divisible by {per_text}{product} "
                                           f"to give a whole {result} ({tb} / {per} = "
                                           f"{tb / per:.4g})", f"e.g. set {_TB} to {sizes}"))
        return None

    if tb is not None and mb is not None and gas is not None:
        if tb != mb * gas * ws:
            problems.append(ConfigProblem(_TB, f"{_TB} ({tb}) must equal {_MB} ({mb}) × {_GAS} "
                                               f"({gas}) × {w} = {mb * gas * ws}",
                                          "or give only two of the three and let shardwise "
                                          "compute the third"))
            return None
    elif tb is not None and mb is not None:
        gas = whole(tb, mb * ws, f"{_MB} ({mb}) × {w}", _GAS)
    elif tb is not None and gas is not None:
        mb = whole(tb, gas * ws, f"{_GAS} ({gas}) × {w}", _MB)
    elif mb is not None:
        gas = 1 if gas is None else gas
        tb = mb * gas * ws
    elif tb is not None:  # DeepSpeed: train alone means no accumulation
        gas = 1
        mb = whole(tb, ws, w, f"{_MB} (with {_GAS} = 1)")
    else:
        path = _GAS if gas is not None else _TB
        problems.append(ConfigProblem(path, f"no batch size is given: set {_TB} or {_MB}"
                                      + (f" ({_GAS} alone does not fix the batch size)"
                                         if gas is not None else "")))
        return None
    if mb is None or gas is None:
        return None
    return BatchPlan(train_batch_size=tb, micro_batch_size=mb, gradient_accumulation_steps=gas)


def _precision(cfg: Any, problems: list[ConfigProblem], broken: frozenset[str]
               ) -> Optional[PrecisionPlan]:
    fp16, bf16 = cfg.fp16, cfg.bf16
    switches = _hit(broken, "fp16.enabled", "bf16.enabled")
    if fp16.enabled and bf16.enabled and not switches:
        problems.append(ConfigProblem("fp16.enabled", "fp16 and bf16 are both enabled; enable at "
                                      "most one", "set fp16.enabled or bf16.enabled to false"))
        return None
    compute = "bf16" if bf16.enabled else "fp16" if fp16.enabled else "fp32"
    grads = cfg.data_types.grad_accum_dtype or compute
    if grads not in (compute, "fp32") and not _hit(broken, "data_types.grad_accum_dtype"):
        problems.append(ConfigProblem(
            "data_types.grad_accum_dtype", f"{grads!r} gradients with {compute} parameters: gradients "
            f"can be kept in the compute dtype ({compute}) or in fp32",
            f'remove the key (gradients in {compute}) or set "fp32"'))
        return None
    if not fp16.enabled:
        return PrecisionPlan(compute=compute, grads=grads, nonfinite=cfg.nonfinite, loss_scale=None)
    return PrecisionPlan(compute="fp16", grads=grads, nonfinite=cfg.nonfinite, loss_scale=LossScalePlan(
        static_scale=float(fp16.loss_scale), initial_scale_power=fp16.initial_scale_power,
        loss_scale_window=fp16.loss_scale_window, hysteresis=fp16.hysteresis,
        consecutive_hysteresis=fp16.consecutive_hysteresis,
        min_loss_scale=float(fp16.min_loss_scale)))


def _predivide(cfg: Any) -> float | None:
    """[Note: where gradients are divided] in schema.py: None, or DeepSpeed's predivide factor."""
    factor = float(cfg.gradient_predivide_factor)
    if cfg.prescale_gradients:
        if factor != 1.0:
            warnings.warn("gradient_predivide_factor has no effect with prescale_gradients=true (gradients "
                          "are divided by the data-parallel size before reducing), as in DeepSpeed",
                          ConfigWarning, stacklevel=3)
        return None
    return None if factor == 1.0 else factor


def _zero(zero: Any, problems: list[ConfigProblem], predivide: float | None = None) -> Optional[ZeroPlan]:
    # the schema's default (True: shardwise overlaps at every stage) also for an explicit null
    overlap = zero.overlap_comm if zero.overlap_comm is not None else type(zero).model_fields["overlap_comm"].default
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if getattr(zero, key) < 1:
            problems.append(ConfigProblem(f"zero_optimization.{key}", "must be at least 1 element, got 0",
                                          "remove it to use the default"))
    # tuning knobs whose job shardwise does another way: accepted, but said out loud
    if "allgather_bucket_size" in zero.model_fields_set:
        warnings.warn("zero_optimization.allgather_bucket_size has no effect in shardwise: updated "
                      "parameters are all-gathered per reduce bucket (reduce_bucket_size)", ConfigWarning,
                      stacklevel=2)
    if zero.stage == 3 and "reduce_bucket_size" in zero.model_fields_set:
        warnings.warn("zero_optimization.reduce_bucket_size has no effect at stage 3 in shardwise: "
                      "gradients are reduced one fetch unit at a time (one collective per unit)",
                      ConfigWarning, stacklevel=2)
    if zero.contiguous_gradients is False:
        warnings.warn("zero_optimization.contiguous_gradients=false has no effect in shardwise: "
                      "gradients always live in contiguous flat buffers", ConfigWarning, stacklevel=2)
    return ZeroPlan(stage=zero.stage, reduce_bucket_size=zero.reduce_bucket_size,
                    allgather_bucket_size=zero.allgather_bucket_size, overlap_comm=overlap,
                    contiguous_gradients=zero.contiguous_gradients,
                    reduce_scatter=zero.reduce_scatter, grad_predivide=predivide, stage3=Stage3Policy(
                        # unset: gather one unit ahead (measured fastest; DeepSpeed's 5e7 elements
                        # gathers a 25M model's every unit at once); set: DeepSpeed's meaning
                        prefetch_bucket_size=(zero.stage3_prefetch_bucket_size
                                              if "stage3_prefetch_bucket_size" in zero.model_fields_set else None),
                        param_persistence_threshold=zero.stage3_param_persistence_threshold,
                        max_live_parameters=zero.stage3_max_live_parameters,
                        max_reuse_distance=zero.stage3_max_reuse_distance, overlap_comm=overlap,
                        max_pending_reductions=STAGE3_MAX_PENDING_REDUCTIONS))


_Z = "zero_optimization"
_OPT, _PAR = f"{_Z}.offload_optimizer", f"{_Z}.offload_param"
NVME_TILE_WARN = 100_000_000  # elements: sub_group_size above this with nvme is said out loud


def _offload(cfg: Any, problems: list[ConfigProblem], broken: frozenset[str]) -> OffloadPlan:
    """``Plan.offload`` (see [Note: offload rules]); an absent section is its defaults."""
    zero = cfg.zero_optimization
    opt = zero.offload_optimizer or OffloadOptimizerSection()
    par = zero.offload_param or OffloadParamSection()
    aio, extra = cfg.aio or AioSection(), cfg.offload or OffloadSection()
    stage_known = not _hit(broken, f"{_Z}.stage")
    if par.device != "none" and zero.stage != 3 and stage_known:
        problems.append(ConfigProblem(
            f"{_PAR}.device", f'offload_param.device "{par.device}" needs ZeRO stage 3 (parameters are '
            f"offloaded shard by shard); zero_optimization.stage is {zero.stage}",
            'set zero_optimization.stage to 3, or remove offload_param (or set its device to "none")'))
    if opt.device != "none" and zero.stage == 0 and stage_known:
        problems.append(ConfigProblem(
            f"{_OPT}.device", f'offload_optimizer.device "{opt.device}" needs ZeRO stage 1 or higher (it '
            "moves this rank's shard of the optimizer state; DeepSpeed refuses stage 0 too)",
            'use stage 1: set zero_optimization.stage to 1 (or offload_optimizer.device to "none")'))
    opt_dir = _nvme_dir(opt, _OPT, problems, broken)
    par_dir = _nvme_dir(par, _PAR, problems, broken)
    if (opt.device != "none" and opt.pipeline and not (opt.pipeline_read or opt.pipeline_write)
            and "pipeline" in opt.model_fields_set):
        warnings.warn("zero_optimization.offload_optimizer.pipeline has no effect of its own (DeepSpeed "
                      "derives it from pipeline_read and pipeline_write): set those to overlap swap I/O "
                      "with the step", ConfigWarning, stacklevel=2)
    tile = zero.sub_group_size
    if opt.device == "nvme" and tile > NVME_TILE_WARN and not _hit(broken, f"{_Z}.sub_group_size"):
        per = 4 * tile
        warnings.warn(
            f"zero_optimization.sub_group_size is {tile:,} elements with offload_optimizer.device "
            f'"nvme": each swap buffer holds up to sub_group_size x 4 bytes ({_gb(per)} per buffer, '
            f"x buffer_count {opt.buffer_count} = {_gb(per * opt.buffer_count)} of host memory); "
            "5e7 (200 MB per buffer) works on a 24 GiB machine", ConfigWarning, stacklevel=2)
    return OffloadPlan(
        optimizer=OptimizerOffloadPolicy(
            device=opt.device, nvme_path=opt_dir, pin_memory=opt.pin_memory,
            buffer_count=opt.buffer_count, pipeline_read=opt.pipeline_read,
            pipeline_write=opt.pipeline_write, fast_init=opt.fast_init, ratio=float(opt.ratio)),
        param=ParamOffloadPolicy(
            device=par.device, nvme_path=par_dir, pin_memory=par.pin_memory,
            buffer_count=par.buffer_count, buffer_size=par.buffer_size, max_in_cpu=par.max_in_cpu),
        aio=AioPolicy(block_size=aio.block_size, queue_depth=aio.queue_depth,
                      intra_op_parallelism=aio.intra_op_parallelism, single_submit=aio.single_submit,
                      overlap_events=aio.overlap_events),
        sub_group_size=tile, host_memory_budget=extra.host_memory_budget)


def _gb(n: int) -> str:
    return f"{n / 1e9:.3g} GB"


def _nvme_dir(section: Any, path: str, problems: list[ConfigProblem], broken: frozenset[str]
              ) -> Optional[str]:
    """The absolute ``nvme_path`` of an nvme ``section`` (None for another device), after
    checking that it is a directory this process can create files in."""
    if section.device != "nvme":
        return None
    key = f"{path}.nvme_path"
    if _hit(broken, key, f"{path}.device"):
        return None
    if section.nvme_path is None:
        problems.append(ConfigProblem(key, 'device "nvme" needs nvme_path: the directory the swap '
                                      "files go in", 'add "nvme_path": "/a/directory/on/a/local/nvme"'))
        return None
    given = section.nvme_path
    where = os.path.abspath(os.path.expanduser(given))
    name = f"nvme_path {given!r}" + (f" ({where})" if where != given else "")
    try:
        exists, is_dir = os.path.exists(where), os.path.isdir(where)
        usable = is_dir and os.access(where, os.W_OK | os.X_OK)
    except (OSError, ValueError):  # a name the file system cannot take
        exists = is_dir = usable = False
    if not exists:
        problems.append(ConfigProblem(key, f"{name} does not exist",
                                      f"create it (mkdir -p {where}) on a fast local disk, or fix the path"))
    elif not is_dir:
        problems.append(ConfigProblem(key, f"{name} is not a directory",
                                      "point nvme_path at a directory (the swap files go inside it)"))
    elif not usable:
        problems.append(ConfigProblem(key, f"{name} is not writable by this process (it needs write and "
                                      "search permission to create the swap files)",
                                      "change its owner or mode (chmod u+wx), or choose a directory you "
                                      "can write"))
    return where


def _frozen(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    return value


def _spec(section: Any, name: str, problems: list[ConfigProblem], broken: frozenset[str]) -> Any:
    """OptimizerPlan/SchedulerPlan, after ``shardwise.optim`` checked the type and params
    (a message about a broken key is dropped: that key's problem is already listed)."""
    if section is None:
        return None
    params = dict(section.params or {})
    prefix = f"{name}.params."
    lost = {re.split(r"[.\[]", b[len(prefix):])[0] for b in broken if b.startswith(prefix)}
    if not _lost(broken, f"{name}.type") and not _lost(broken, f"{name}.params"):
        for message in _spec_messages(name, section.type, params):
            if not any(_names(key, message) for key in lost):
                problems.append(ConfigProblem(_spec_path(name, message, params), message))
    cls = OptimizerPlan if name == "optimizer" else SchedulerPlan
    return cls(type=section.type, params=tuple(sorted((k, _frozen(v)) for k, v in params.items())))


def _spec_messages(name: str, type_: str, params: dict) -> list[str]:
    try:  # imported late: optional, and shardwise.optim imports this package's plan module
        optim = importlib.import_module("shardwise.optim")
    except ImportError:
        return []
    check = getattr(optim, f"check_{name}_spec", None)
    if check is None:
        return []
    try:
        return [str(m) for m in check(type_, params)]
    except Exception as exc:  # noqa: BLE001 - a checker bug must still surface as a ConfigError
        return [f"could not check {name} {type_!r}: {type(exc).__name__}: {exc}"]


def _spec_path(name: str, message: str, params: dict) -> str:
    """Best JSON path for a message from ``shardwise.optim`` (its messages carry none)."""
    for key in sorted(params, key=len, reverse=True):
        if _names(key, message):
            return f"{name}.params.{key}"
    missing = re.search(r"needs parameter '(\w+)'", message)
    if missing:
        return f"{name}.params.{missing.group(1)}"
    return f"{name}.type"


def _names(key: Any, message: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(str(key))}(?!\w)", message) is not None


__all__ = ["load_config", "resolve_config", "plan_for"]
