"""Per-rank memory of ZeRO stages 0-3, before launch: ``model_states()`` and ``shardwise estimate``.

[Note: estimate semantics]
The figures are what :meth:`shardwise.Engine.memory_report` measures after a step, per rank,
in bytes, exactly: given a model (an ``nn.Module``, ideally on the meta device, or a factory),
they come from ``shardwise.memory_model`` (see [Note: memory model] there), which lays the
model out with the strategies' own code; ``shardwise plan`` uses the same functions.

The gradient dtype (``grad_precision``) is the compute dtype unless the config's
``data_types.grad_accum_dtype`` asks for fp32, so mixed-precision Adam costs DeepSpeed's
16Ψ / 4Ψ+12Ψ/N / 2Ψ+14Ψ/N / 16Ψ/N at stages 0-3. Given only a parameter count (analytic),
padding and the ``step`` scalars are left out.

Offload (``zero_optimization.offload_optimizer`` / ``offload_param``): ``model_states(...,
offload=Offload(...))`` and :func:`offload_table` (every choice that can run, what ``shardwise
estimate`` prints after the per-stage table and ``--json`` adds as ``"offload"``) count the
device bytes in the same keys plus ``host_offload``, ``disk_offload``, ``swap_buffers`` and the
bytes moved per optimizer step; see [Note: offload in the memory model]. The predicted I/O
time is read / R + write / W, with ``--disk-bandwidth R[,W]`` (GB/s) or ``--measure-disk DIR``
(``shardwise.offload.aio.measure_bandwidth``).

[Note: activation estimate]
For transformers only: the bytes autograd keeps from one micro-batch's forward for its
backward (what ``saved_tensors_hooks`` sees, each storage once). A pre-norm block with fused
attention (torch's ``scaled_dot_product_attention``, no attention matrix kept) and no dropout
keeps 16 ``s*b*h`` tensors' worth in the compute dtype: its input, the two norm outputs, Q, K,
V, the attention output (its head merge is a view), the residual sum, the MLP's 4h input and
GELU output (under tensor parallelism: ``memory_model_parallel.block_activation_bytes``) (Korthikanti et al. 2022's 34 ``sbh`` bytes at 16-bit, less the dropout masks
and the ``5 a s / h`` attention matrix that fused kernels do not store), plus fp32 norm
statistics (``4 s b``) and the attention's log-sum-exp (``a s b``). A checkpointed block keeps
only its input (``s*b*h``); its 16 are rebuilt for one block at a time during backward (a
transient of one block, not counted). Outside the blocks: the final norm's input and output,
the fp32 log-softmax of the logits (``s*b*vocab*4``), the token ids and targets and the
loss's 4-byte total weight. Models with dropout
keep a 1-byte mask per dropped element more. Measured on the example GPT within 1% at fp32
(tests/unit/test_activation_estimate.py). ``None`` when micro-batch, sequence length or the
model's shape is not known.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence, Union

import torch
import torch.nn as nn

from shardwise.errors import UsageError
from shardwise.memory_model import (ALIGN, BUCKET_NUMEL, DTYPE_BYTES, OPTIMIZER_STATES, PERSISTENCE_THRESHOLD,
                                    Offload, RankElements, bucket_layouts, layout_states, model_state_bytes,
                                    offload_choices, offload_states, result, states_per_element, trainable_params)
from shardwise.memory_model_parallel import transformer_activation_bytes

FIELDS = ("params", "grads", "master_params", "optimizer_state", "activations", "total")
ModelLike = Union[int, float, nn.Module, Callable[[], nn.Module]]


@dataclass(frozen=True)
class TransformerShape:
    layers: int
    hidden: int
    heads: int
    vocab: int | None = None


def transformer_shape(model: nn.Module) -> TransformerShape | None:
    """Read layers / hidden / heads / vocab from ``model.config`` (Hugging Face) or ``model.cfg``."""
    for attr in ("config", "cfg"):
        c = getattr(model, attr, None)
        if c is None:
            continue

        def get(*names: str) -> int | None:
            return next((getattr(c, n) for n in names if isinstance(getattr(c, n, None), int)), None)

        shape = (get("n_layer", "num_hidden_layers", "n_layers", "num_layers"),
                 get("d_model", "hidden_size", "n_embd", "dim"), get("n_head", "num_attention_heads", "n_heads"))
        if all(shape):
            return TransformerShape(*shape, vocab=get("vocab_size"))
    return None


def activation_bytes(shape: TransformerShape | None, micro_batch: int | None, seq_len: int | None,
                     precision: str = "fp32", checkpoint_every: int = 0) -> int | None:
    """Activation bytes one micro-batch keeps for backward (see [Note: activation estimate]);
    ``checkpoint_every=k`` (config ``activation_checkpointing {modules: "blocks", every: k}``):
    every k-th block keeps only its input; 0: no checkpointing."""
    if shape is None or not micro_batch or not seq_len:
        return None
    kept = shape.layers // checkpoint_every if checkpoint_every > 0 else 0
    return transformer_activation_bytes(shape.layers, seq_len, micro_batch, shape.hidden, shape.heads, shape.vocab,
                                        DTYPE_BYTES[precision], kept)


def _check(world_size: int, stage: int, precision: str) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise UsageError(f"world_size must be a positive integer, got {world_size!r}")
    if stage not in (0, 1, 2, 3):
        raise UsageError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
    if precision not in DTYPE_BYTES:
        raise UsageError(f"precision must be one of {sorted(DTYPE_BYTES)}, got {precision!r}")


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Call ``factory()`` with the meta device as default: shapes only, no storage."""
    with torch.device("meta"):
        return factory()


def sharded_numel(numel: int, world_size: int) -> int:
    """Per-rank chunk of a flat buffer of ``numel`` elements padded like a bucket."""
    multiple = world_size * ALIGN
    return max(-(-numel // multiple) * multiple, multiple) // world_size


def unit_padded_numel(param_numels: list[int] | int, world_size: int) -> int:
    """Elements of one stage-3 flat buffer: parameters at 16-element-aligned offsets, padded
    to a multiple of ``world_size * 16`` (as ``comm.buckets.assign_buckets`` lays it out). An
    int is taken as one parameter."""
    numels = [param_numels] if isinstance(param_numels, int) else list(param_numels)
    used = 0
    for n in reversed(numels):
        used = -(-used // ALIGN) * ALIGN + n
    return sharded_numel(used, world_size) * world_size


def stage3_states(unit_numels: list[list[int]] | list[int], persistent_numel: int | list[int], frozen_numel: int,
                  world_size: int, precision: str, optimizer: str = "adamw",
                  activations: int | None = None, grad_precision: str | None = None) -> dict[str, int | None]:
    """Stage 3 bytes per rank from element counts: every fetch unit one flat buffer sharded
    like a bucket; the persistent (small) parameters one more buffer kept whole, its gradients
    and optimizer state sharded; frozen parameters sharded without padding. Per-unit parameter
    lists give the trainable layout; plain counts ignore alignment. Given a model, use
    :func:`model_states` (``shardwise.memory_model``: the engine's exact layout)."""
    pb, (k, step) = DTYPE_BYTES[precision], states_per_element(optimizer)
    gb = DTYPE_BYTES[grad_precision or precision]
    chunk = sum(unit_padded_numel(n, world_size) // world_size for n in unit_numels)
    n_buffers = len(unit_numels)
    persistent = persistent_numel if isinstance(persistent_numel, list) else (
        [persistent_numel] if persistent_numel else [])
    p_chunk = unit_padded_numel(persistent, world_size) // world_size if persistent else 0
    n_buffers += 1 if persistent else 0
    trained = chunk + p_chunk
    params = pb * (chunk + p_chunk * world_size + -(-frozen_numel // world_size))
    master = 4 * trained if precision != "fp32" else 0
    state = 4 * k * trained + (4 * n_buffers if step and k else 0)
    return result(params, gb * trained, master, state, activations)


def model_states(model: ModelLike, world_size: int, stage: int, precision: str = "fp32", optimizer: str = "adamw",
                 bucket_numel: int = BUCKET_NUMEL, *, micro_batch: int | None = None, seq_len: int | None = None,
                 shape: TransformerShape | None = None, persistence_threshold: int = PERSISTENCE_THRESHOLD,
                 persistent_numel: int = 0, grad_precision: str | None = None,
                 checkpoint_every: int = 0, rank: int = 0,
                 unit_classes: Sequence[type | str] | None = None, offload: Offload | None = None,
                 gradient_accumulation_steps: int = 1) -> dict[str, int | None]:
    """Per-rank bytes ``{"params", "grads", "master_params", "optimizer_state", "activations",
    "total"}`` of one ZeRO stage (see [Note: estimate semantics]).

    ``model``: a parameter count (analytic), an ``nn.Module`` (ideally on the meta device) or a
    zero-argument factory (built on the meta device). ``activations`` needs ``micro_batch``,
    ``seq_len`` and a transformer ``shape`` (read from the model when not given); else None.
    ``persistent_numel`` (count only) is the stage-3 replicated part. ``grad_precision``: the
    gradient dtype (default: ``precision``; "fp32" for ``data_types.grad_accum_dtype: "fp32"``).
    ``checkpoint_every``: activation checkpointing of every k-th block (0: none). ``rank``: whose
    chunks are counted (given a model); ``unit_classes``: stage 3's fetch-unit classes (default:
    those declared with ``set_fetch_units``, else the blocks). ``offload``: an offload choice
    (``shardwise.memory_model.Offload``); then the device keys count only what stays on the
    device and ``host_offload``, ``disk_offload``, ``swap_buffers`` and the bytes moved per step
    (``io_read_bytes``, ``io_write_bytes``, ``host_device_bytes``; ``gradient_accumulation_steps``
    micro-steps) follow ([Note: offload in the memory model]).
    """
    _check(world_size, stage, precision)
    if grad_precision is not None and grad_precision not in (precision, "fp32"):
        raise UsageError(f"grad_precision {grad_precision!r} with {precision} parameters: use {precision!r} or 'fp32'")
    if isinstance(model, (int, float)) and not isinstance(model, bool):
        return _analytic(int(model), world_size, stage, precision, optimizer,
                         activation_bytes(shape, micro_batch, seq_len, precision, checkpoint_every), persistent_numel,
                         grad_precision, offload, gradient_accumulation_steps)
    if not isinstance(model, nn.Module):
        model = build_on_meta(model)
    act = activation_bytes(shape or transformer_shape(model), micro_batch, seq_len, precision, checkpoint_every)
    return model_state_bytes(model, world_size, stage, precision, optimizer, rank=rank, bucket_numel=bucket_numel,
                             persistence_threshold=persistence_threshold, unit_classes=unit_classes,
                             grad_precision=grad_precision, activations=act, offload=offload,
                             gradient_accumulation_steps=gradient_accumulation_steps)


def _analytic(n: int, world: int, stage: int, precision: str, optimizer: str, act: int | None,
              persistent: int, grad_precision: str | None, offload: Offload | None = None,
              gas: int = 1) -> dict[str, int | None]:
    pb, (k, _) = DTYPE_BYTES[precision], states_per_element(optimizer)
    gb = DTYPE_BYTES[grad_precision or precision]
    shard = -(-n // world)
    opt = n if stage == 0 else shard
    params = pb * (shard + persistent) if stage == 3 else pb * n
    grads = gb * (shard if stage in (2, 3) else n)
    states = result(params, grads, 4 * opt if precision != "fp32" else 0, 4 * k * opt, act)
    if offload is None:
        return states
    # the shard as two pieces, resident and offloaded: round(ratio * shard) elements (no chunks to
    # round to); at stage 3 one parameter shard, the persistent part stays resident
    moved = round(offload.ratio * opt) if offload.optimizer != "none" else 0
    elements = RankElements((opt - moved, moved), (stage == 3,) * 2, ((shard, True),) if stage == 3 else (),
                            whole_chunks=False, step_tensors=False)
    return offload_states(states, elements, offload, stage, precision, optimizer, grad_precision, gas)


def estimate_all(model: ModelLike, world_size: int, **kwargs: Any) -> dict[str, Any]:
    """``{"world_size": N, "stages": {"0": {...}, ..., "3": {...}}}``: what ``--json`` prints.
    A factory is built once."""
    if callable(model) and not isinstance(model, nn.Module):
        model = build_on_meta(model)
    return {"world_size": world_size,
            "stages": {str(s): model_states(model, world_size, s, **kwargs) for s in range(4)}}


def offload_table(model: ModelLike, world_size: int, base: Offload | None = None, *,
                  stages: Sequence[int] = (0, 1, 2, 3), **kwargs: Any) -> list[dict[str, Any]]:
    """One row per stage x ``offload_optimizer.device`` x ``offload_param.device`` that can run
    (``memory_model.offload_choices``; ``base`` gives ratio, buffers and tile size): ``{"stage",
    "offload_optimizer", "offload_param"}`` + :func:`model_states`' keys with offload (device
    bytes, ``host_offload``, ``disk_offload``, ``swap_buffers``, bytes moved per step). ``kwargs``:
    :func:`model_states`' options. A factory is built once."""
    if callable(model) and not isinstance(model, nn.Module):
        model = build_on_meta(model)
    return [{"stage": s, "offload_optimizer": c.optimizer, "offload_param": c.param,
             **model_states(model, world_size, s, offload=c, **kwargs)}
            for s in stages for c in offload_choices(s, base)]


# -- disk bandwidth: predicted I/O time of an offloaded step ------------------------------------
def parse_bandwidth(text: str) -> tuple[float, float]:
    """``--disk-bandwidth``: ``"0.5"`` (GB/s, reads and writes) or ``"0.8,0.4"`` (read, write)."""
    parts = [x.strip().removesuffix("GB/s").strip() for x in (text or "").split(",")]
    try:
        values = [float(x) for x in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or any(v <= 0 for v in values):
        raise UsageError(f"cannot read {text!r} as a disk bandwidth; write GB/s for both, e.g. 0.5, or "
                         "read,write, e.g. 0.8,0.4")
    return (values[0], values[-1])


def measure_disk(directory: str) -> tuple[float, float]:
    """(read, write) GB/s of ``directory`` measured with shardwise's own I/O engine."""
    try:
        from shardwise.offload.aio import measure_bandwidth
    except ImportError as exc:
        raise UsageError(f"--measure-disk needs shardwise.offload.aio.measure_bandwidth ({exc}); give "
                         "--disk-bandwidth GB/s instead") from None
    if not os.path.isdir(directory):
        raise UsageError(f"--measure-disk {directory!r}: not a directory")
    read, write = measure_bandwidth(directory)
    return float(read), float(write)


def io_seconds(row: dict[str, Any], bandwidth: tuple[float, float] | None) -> float | None:
    """Predicted disk time of one optimizer step: read / R + write / W (GB/s = 1e9 B/s); None
    without a bandwidth. Host<->device copies are not included."""
    if bandwidth is None:
        return None
    return row["io_read_bytes"] / (bandwidth[0] * 1e9) + row["io_write_bytes"] / (bandwidth[1] * 1e9)


def disk_bandwidth(args: argparse.Namespace) -> tuple[float, float] | None:
    """``--disk-bandwidth`` if given, else ``--measure-disk DIR`` measured, else None."""
    if getattr(args, "disk_bandwidth", None):
        return parse_bandwidth(args.disk_bandwidth)
    if getattr(args, "measure_disk", None):
        return measure_disk(args.measure_disk)
    return None


def add_offload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offload-ratio", type=float,
                   help="offload_optimizer.ratio for the offload rows (overrides the config; default 1)")
    p.add_argument("--sub-group-size", type=int, help="zero_optimization.sub_group_size (elements per swap tile)")
    p.add_argument("--disk-bandwidth", help="disk GB/s for the predicted I/O time: one figure, or READ,WRITE")
    p.add_argument("--measure-disk", metavar="DIR",
                   help="measure the disk bandwidth in DIR (without --disk-bandwidth)")


def offload_base(args: argparse.Namespace, cfg: "PlanningConfig | None") -> Offload:
    """The config's offload settings (ratio, buffers, tile size) with the command line's overrides."""
    base = cfg.offload if cfg else Offload()
    changes: dict[str, Any] = {}
    if getattr(args, "offload_ratio", None) is not None:
        changes["ratio"] = args.offload_ratio
    if getattr(args, "sub_group_size", None) is not None:
        changes["sub_group_size"] = args.sub_group_size
    return replace(base, **changes) if changes else base


# -- inputs shared with `shardwise plan` ------------------------------------------------------
def parse_bytes(text: str) -> int:
    """``"80GB"`` (10^9), ``"80GiB"`` (2^30), ``"512MB"``, ``"1.5e10"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?|B)?\s*", text or "")
    units = {"": 1, "B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    try:
        return int(float(m.group(1)) * units[(m.group(2) or "").removesuffix("B")])
    except (AttributeError, KeyError, ValueError):
        raise UsageError(f"cannot read {text!r} as a memory size; write e.g. 80GB, 80GiB or 512MB") from None


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _on_path(folder: str) -> None:
    if folder not in sys.path:
        sys.path.insert(0, folder)


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """``pkg.module:factory`` or ``path/to/file.py:factory`` -> the callable."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--model {spec!r}: write pkg.module:factory or path/to/file.py:factory")
    try:
        if module_name.endswith(".py"):
            name = os.path.splitext(os.path.basename(module_name))[0]
            loader = importlib.util.spec_from_file_location(name, module_name)
            if loader is None or not os.path.isfile(module_name):
                raise ImportError(f"no file {module_name}")
            _on_path(os.path.dirname(os.path.abspath(module_name)))
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            _on_path(os.getcwd())
            module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"--model {spec!r}: {exc}") from None
    if not callable(factory):
        raise UsageError(f"--model {spec!r}: {attr} is not callable")
    return factory


def hf_factory(config_path: str) -> Callable[[], nn.Module]:
    """A factory for the causal-LM a Hugging Face ``config.json`` describes (needs transformers)."""
    try:
        import transformers
    except ImportError:
        raise UsageError("--hf-config needs the `transformers` package (pip install transformers); "
                         "or give --params N or --model pkg.module:factory") from None
    cfg = transformers.AutoConfig.from_pretrained(config_path)
    return lambda: transformers.AutoModelForCausalLM.from_config(cfg)


@dataclass(frozen=True)
class PlanningConfig:
    """What planning reads from a DeepSpeed config resolved at N ranks."""

    stage: int
    precision: str
    grad_precision: str
    optimizer: str
    bucket_numel: int
    micro_batch: int
    gradient_accumulation_steps: int
    persistence_threshold: int
    checkpoint_every: int  # activation checkpointing of every k-th block; 0: none
    # zero_optimization.offload_optimizer / offload_param / sub_group_size (none when absent)
    offload: Offload = field(default_factory=Offload)
    parallel: Any = None  # the plan's ParallelPlan (pp, dp, tp, pipeline, tensor)
    partition_activations: bool = False  # activation_checkpointing.partition_activations


def _offload_from_plan(plan: Any) -> Offload | None:
    """The validated config's offload sections (``Plan.offload``), None where the plan has none."""
    off = getattr(plan, "offload", None)
    if off is None:
        return None
    try:
        opt, par = off.optimizer, off.param
        return Offload(str(opt.device), str(par.device), float(opt.ratio), int(off.sub_group_size),
                       int(opt.buffer_count), int(par.buffer_count), int(par.buffer_size), int(par.max_in_cpu),
                       bool(getattr(opt, "pipeline_read", False)), bool(getattr(opt, "pipeline_write", False)))
    except AttributeError:  # an older / partial plan: read the document instead
        return None


def _offload_from_doc(doc: dict[str, Any]) -> Offload:
    """The offload sections read from the raw config document (where the validated config does
    not carry them): devices, ratio, buffers, ``max_in_cpu``, ``pipeline_read`` / ``pipeline_write``
    (or ``pipeline``) and ``sub_group_size``; a missing
    or unreadable value takes the schema's default, a legacy ``cpu_offload: true`` means
    ``offload_optimizer.device: cpu``."""
    zero = doc.get("zero_optimization") if isinstance(doc, dict) else None
    zero = zero if isinstance(zero, dict) else {}

    def section(name: str) -> dict[str, Any]:
        v = zero.get(name)
        return v if isinstance(v, dict) else {}

    def num(d: dict[str, Any], key: str, fallback: Any, kind: type = int) -> Any:
        try:
            return kind(float(d[key])) if kind is int else kind(d[key])
        except (KeyError, TypeError, ValueError):
            return fallback

    def device(d: dict[str, Any], legacy: bool) -> str:
        v = d.get("device")
        v = "none" if v is None else str(v).lower()
        if v == "none" and legacy:
            v = "cpu"
        return v if v in ("none", "cpu", "nvme") else "none"

    opt, par, dflt = section("offload_optimizer"), section("offload_param"), Offload()
    return Offload(device(opt, zero.get("cpu_offload") is True),
                   device(par, zero.get("cpu_offload_param") is True or zero.get("cpu_offload_params") is True),
                   min(1.0, max(0.0, num(opt, "ratio", dflt.ratio, float))),
                   max(1, num(zero, "sub_group_size", dflt.sub_group_size)),
                   max(1, num(opt, "buffer_count", dflt.buffer_count)),
                   max(1, num(par, "buffer_count", dflt.param_buffer_count)),
                   max(1, num(par, "buffer_size", dflt.param_buffer_size)),
                   max(0, num(par, "max_in_cpu", dflt.max_in_cpu)),
                   opt.get("pipeline_read") is True or opt.get("pipeline") is True,
                   opt.get("pipeline_write") is True or opt.get("pipeline") is True)


def planning_config(path: str, world_size: int, *, tp: int | None = None, pp: int | None = None) -> PlanningConfig:
    """Resolve a config at ``world_size`` with ``shardwise.config.load_config`` (so batch sizes
    that do not divide at N raise its ConfigError). The offload settings come from the
    validated plan's ``offload`` when it has one, else from the raw document. ``tp`` / ``pp``
    override ``tensor_parallel.autotp_size`` / ``pipeline.stages``."""
    from shardwise.config import load_config

    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read config {path}: {exc}") from None
    if tp is not None:
        doc["tensor_parallel"] = {**(doc.get("tensor_parallel") or {}), "autotp_size": tp}
    if pp is not None:
        doc["pipeline"] = {**(doc.get("pipeline") or {}), "stages": pp}
    plan = load_config(doc, world_size=world_size)
    offload = _offload_from_plan(plan) or _offload_from_doc(doc)
    stage, threshold = plan.zero.stage, plan.zero.stage3.param_persistence_threshold
    opt = plan.optimizer.type if plan.optimizer is not None else "adamw"
    if opt.lower() == "sgd" and not dict(plan.optimizer.params).get("momentum"):
        opt = "sgd-nomomentum"
    return PlanningConfig(stage, plan.precision.compute, plan.precision.grads, opt, plan.zero.reduce_bucket_size,
                          plan.batch.micro_batch_size, plan.batch.gradient_accumulation_steps, int(threshold),
                          plan.activation_checkpointing.every if plan.activation_checkpointing.modules else 0,
                          offload, getattr(plan, "parallel", None),
                          bool(getattr(plan.activation_checkpointing, "partition_activations", False)))


def add_world_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world-size", type=int, help="number of ranks N")
    p.add_argument("--nodes", type=int, help="with --gpus-per-node: N = nodes x gpus per node")
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--device-memory", help="memory per device, e.g. 80GB (10^9) or 80GiB (2^30)")
    p.add_argument("--json", action="store_true", help="print JSON (bytes per rank)")


def world_from_args(args: argparse.Namespace) -> int:
    if args.world_size is not None:
        n = args.world_size
    elif args.nodes is not None and args.gpus_per_node is not None:
        n = args.nodes * args.gpus_per_node
    else:
        raise UsageError("give --world-size N, or --nodes A and --gpus-per-node B")
    if n < 1:
        raise UsageError(f"world size must be positive, got {n}")
    return n


# -- `shardwise estimate` ---------------------------------------------------------------------
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardwise estimate",
                                description="Per-rank memory of ZeRO stages 0-3 (model states + activations).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--params", type=float, help="parameter count, e.g. 7e9 (analytic)")
    src.add_argument("--model", help="pkg.module:factory or file.py:factory (built on the meta device)")
    src.add_argument("--hf-config", help="a Hugging Face config.json (needs transformers)")
    add_world_args(p)
    p.add_argument("--config", help="DeepSpeed-style JSON: precision, optimizer, bucket size, micro-batch")
    p.add_argument("--precision", choices=sorted(DTYPE_BYTES), help="overrides the config (default fp32)")
    p.add_argument("--micro-batch", type=int, help="micro-batch per rank, for the activation estimate")
    p.add_argument("--seq", type=int, help="sequence length, for the activation estimate")
    for name in ("layers", "hidden", "heads", "vocab"):
        p.add_argument(f"--{name}", type=int, help=f"transformer {name} (with --params, for activations)")
    add_offload_args(p)
    p.add_argument("--tp", type=int, help="tensor-parallel size T (per-rank bytes on a pp x dp x tp mesh; default: "
                   "the config's tensor_parallel.autotp_size, else 1)")
    p.add_argument("--pp", type=int, help="pipeline stages P (default: the config's pipeline.stages, else 1)")
    args = p.parse_args(argv)
    world = world_from_args(args)
    cfg = planning_config(args.config, world, tp=args.tp, pp=args.pp) if args.config else None
    base = offload_base(args, cfg)
    bandwidth = disk_bandwidth(args)
    kwargs: dict[str, Any] = {"precision": args.precision or (cfg.precision if cfg else "fp32"),
                              "micro_batch": args.micro_batch or (cfg.micro_batch if cfg else None),
                              "seq_len": args.seq}
    if cfg:
        kwargs |= {"optimizer": cfg.optimizer, "bucket_numel": cfg.bucket_numel,
                   "persistence_threshold": cfg.persistence_threshold, "checkpoint_every": cfg.checkpoint_every}
        if cfg.grad_precision == "fp32":  # data_types.grad_accum_dtype: "fp32"; else the compute dtype
            kwargs["grad_precision"] = "fp32"
    if args.layers and args.hidden and args.heads:
        kwargs["shape"] = TransformerShape(args.layers, args.hidden, args.heads, args.vocab)
    if args.params is not None:
        model: ModelLike = int(args.params)
        kwargs.pop("persistence_threshold", None)
    else:
        model = build_on_meta(load_factory(args.model) if args.model else hf_factory(args.hf_config))
    mem = parse_bytes(args.device_memory) if args.device_memory else None
    par = getattr(cfg, "parallel", None)
    tp, pp = (par.tp, par.pp) if par is not None else (args.tp or 1, args.pp or 1)
    if tp > 1 or pp > 1:
        from shardwise.planner_parallel import estimate_parallel, print_estimate_parallel

        kwargs.pop("shape", None)
        out = estimate_parallel(model, world, tp, pp, gradient_accumulation_steps=(
            cfg.gradient_accumulation_steps if cfg else 1), **kwargs)
        print(json.dumps(out)) if args.json else print_estimate_parallel(out, mem)
        return 0
    out = estimate_all(model, world, **kwargs)
    gas = cfg.gradient_accumulation_steps if cfg else 1
    tiers = [{**r, "io_seconds": io_seconds(r, bandwidth)}
             for r in offload_table(model, world, base, gradient_accumulation_steps=gas, **kwargs)]
    out["offload"] = {"ratio": base.ratio, "sub_group_size": base.sub_group_size,
                      "gradient_accumulation_steps": gas,
                      "disk_bandwidth_gbps": None if bandwidth is None else {"read": bandwidth[0],
                                                                             "write": bandwidth[1]},
                      "rows": tiers}
    if args.json:
        print(json.dumps(out))
        return 0
    n = model if isinstance(model, int) else sum(q.numel() for q in model.parameters())
    grads = kwargs.get("grad_precision") or kwargs["precision"]
    print(f"{n / 1e9:.3f} B parameters, {world} ranks, {kwargs['precision']} (gradients {grads}), "
          f"optimizer {kwargs.get('optimizer', 'adamw')}; bytes per rank")
    cols = ("stage",) + FIELDS + (("fits",) if mem else ())
    rows = [[s] + [fmt_bytes(v[f]) for f in FIELDS] + ([str(v["total"] <= mem).lower()] if mem else [])
            for s, v in out["stages"].items()]
    widths = [max(len(str(c)), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    for line in [list(cols)] + rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))
    if mem:
        print("fits: total <= " + fmt_bytes(mem))
    print()
    print_offload_table(tiers, base, bandwidth, mem)
    return 0


def _table(cols: Sequence[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    for line in [list(cols)] + rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))


def print_offload_table(rows: list[dict[str, Any]], base: Offload, bandwidth: tuple[float, float] | None,
                        device_memory: int | None = None) -> None:
    """Per rank and offload choice: bytes on the device, in host memory and on disk; bytes moved
    per optimizer step; the predicted disk time when a bandwidth is known."""
    print(f"offload (offload_optimizer.ratio {base.ratio:g}, sub_group_size {base.sub_group_size:,}); "
          "bytes per rank; moved per optimizer step")
    cols = ["stage", "optimizer", "param", "device", "host", "(swap buf)", "disk", "disk read", "disk write",
            "host<->dev"] + (["io time"] if bandwidth else []) + (["fits"] if device_memory else [])
    lines = [[str(r["stage"]), r["offload_optimizer"], r["offload_param"], fmt_bytes(r["total"]),
              fmt_bytes(r["host_offload"] + r["swap_buffers"]), fmt_bytes(r["swap_buffers"]),
              fmt_bytes(r["disk_offload"]), fmt_bytes(r["io_read_bytes"]), fmt_bytes(r["io_write_bytes"]),
              fmt_bytes(r["host_device_bytes"])]
             + ([f"{r['io_seconds']:.2f} s" if r["io_seconds"] else "-"] if bandwidth else [])
             + ([str(r["total"] <= device_memory).lower()] if device_memory else []) for r in rows]
    _table(cols, lines)
    print("device: model states + activations left on the device; host: host_offload + swap buffers")
    if bandwidth:
        print(f"io time: disk read / {bandwidth[0]:g} GB/s + disk write / {bandwidth[1]:g} GB/s "
              "(host<->device copies not included)")


__all__ = ["model_states", "estimate_all", "activation_bytes", "transformer_shape", "TransformerShape",
           "bucket_layouts", "layout_states", "stage3_states", "planning_config", "PlanningConfig",
           "offload_table", "parse_bandwidth", "measure_disk", "io_seconds", "disk_bandwidth", "Offload",
           # re-exported from shardwise.memory_model
           "DTYPE_BYTES", "ALIGN", "OPTIMIZER_STATES", "PERSISTENCE_THRESHOLD", "BUCKET_NUMEL", "trainable_params"]
