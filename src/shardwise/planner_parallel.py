"""3-D plans: ``shardwise plan --tp T --pp P --world-size N`` and ``shardwise estimate --tp T --pp P``.

[Note: parallel memory model]
A rank at mesh coordinates (pp stage i, dp rank d, tp rank t) of N = pp * dp * tp ranks holds:

- model states: the parameters of its pipeline stage(s), each at its *local* tensor-parallel
  shape, laid out by ZeRO over dp exactly as at pp = tp = 1 ([Note: memory model] in
  ``memory_model.py``, the same functions on a meta-device copy of the stage):
  * tp: every module the tp plan (``tensor_parallel.tp_plan``, else the built-in plan of the
    model) marks ``colwise`` / ``rowwise`` holds the ``t``-th ``torch.chunk`` piece of the
    dimension ``memory_model_parallel.tp_shard_dim`` names (Linear colwise: rows of weight and bias;
    rowwise: columns of the weight, the bias whole; Embedding colwise: columns, rowwise: rows);
    everything else (norms, a rowwise bias, the position embedding, ``sequence_parallel``
    modules) is replicated: held whole on every tp rank;
  * pp: the model's layers (a ``PipelineModule``'s, or the plain model's top-level children with
    its block list expanded, in order) are split over ``pp * stages_per_rank`` stages with
    ``pipeline.partition`` ("parameters": balanced parameter counts, the smallest largest stage;
    "uniform": layer counts; "type:<regex>": balanced counts of the matching layer classes);
    a weight tied across stages (the embedding / LM head) is counted on every stage holding it;
    rank i holds stage i (and i + pp, ... with ``stages_per_rank`` > 1; the V schedule's i and
    2 pp - 1 - i);
  * ZeRO stage s over dp (stages 0-1 only with pp > 1: ``config/resolve_parallel.py``).
- activations of one micro-batch (``memory_model_parallel.transformer_activation_bytes``): the stage's
  blocks, each with the replicated tensors whole and the head-/column-sharded ones at 1/tp
  (``memory_model_parallel.block_activation_bytes``), a checkpointed block's input (1/tp with
  ``partition_activations``), the ids on the first stage and the final norm + logits +
  targets on the last; times the micro-batches in flight (``memory_model_parallel.in_flight``: GPipe all
  m, the 1F1B family min(pp - i, m): up to pp on the first stage).
- collectives per optimizer step (buffer bytes per rank, m = gradient_accumulation_steps micro-
  batches of b x s tokens, h = hidden, p = compute-dtype bytes):
  * tp: per block 2 all-reduces of b*s*h in forward (attention and MLP outputs) and 2 in
    backward (the gradients of their inputs), again 2 in each checkpointed block's recompute;
    a vocab-sharded embedding all-reduces its output (b*s*h), a column-sharded head all-gathers
    the logits (b*s*vocab) and all-reduces its input gradient (b*s*h);
  * pp: per micro-batch and stage boundary one b*s*h activation forward and one gradient back
    (send and receive on each side); the tied weight's gradient all-reduce once per step on
    the stages that hold it;
  * dp: ZeRO's collectives on the rank's own parameter share ([Note: plan figures] in
    ``planner.py``).
The rank reported is the worst one (largest model states + working memory + activations);
the per-dimension rows show the bytes of the whole model, after tp, after pp, after ZeRO.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from shardwise.config.schema_parallel import SCHEDULES as PIPE_SCHEDULES
from shardwise.errors import UsageError
from shardwise.memory_model import DTYPE_BYTES, model_state_bytes, trainable_params
from shardwise.memory_model_parallel import in_flight, tp_chunk, tp_shard_dim, transformer_activation_bytes
from shardwise.pipe.module import partition_layers
from shardwise.planner import Collective, PlanReport, plan_model

STATE_KEYS = ("params", "grads", "master_params", "optimizer_state")


@dataclass(frozen=True)
class Mesh:
    """The sizes of one plan's mesh (``pp`` outermost, ``tp`` innermost) and its policies."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_plan: tuple[tuple[str, str], ...] | None = None  # None: the model's built-in plan
    partition: str = "parameters"
    schedule: str = "1F1B"
    stages_per_rank: int = 1
    sequence_parallel: bool = False
    partition_activations: bool = False
    checkpoint_interval: int = 0  # pipeline.activation_checkpoint_interval: layers per checkpointed chunk

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def __post_init__(self) -> None:
        if min(self.tp, self.pp, self.dp, self.stages_per_rank) < 1:
            raise UsageError(f"mesh sizes must be positive, got tp={self.tp} pp={self.pp} dp={self.dp}")
        if self.schedule not in PIPE_SCHEDULES:
            raise UsageError(f"pipeline schedule {self.schedule!r}: choose one of {list(PIPE_SCHEDULES)}")


def mesh_for(world_size: int, tp: int = 1, pp: int = 1, **policies: Any) -> Mesh:
    """The mesh of ``world_size`` ranks with tp x pp model parallelism (dp the rest)."""
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        raise UsageError(f"--tp {tp} x --pp {pp} = {tp * pp} does not divide the {world_size} ranks")
    return Mesh(tp, pp, world_size // (tp * pp), **policies)


# -- tensor parallelism: the local shapes -----------------------------------------------------------
def resolve_tp_plan(model: nn.Module, tp_plan: Sequence[tuple[str, str]] | None = None,
                    preset: str | None = None) -> tuple[tuple[str, str], ...]:
    """The plan ``apply_tensor_parallel`` would use ([Note: tp plans] in tensor_parallel/plans.py):
    the config's ``tp_plan``, else the ``preset_model``'s, else the one recognised from the
    model's class (its ConfigError naming the model when there is none)."""
    from shardwise.config.plan import TensorParallelPlan
    from shardwise.tensor_parallel import _plan_for

    return _plan_for(model, TensorParallelPlan(2, tuple(tp_plan) if tp_plan else None, preset))[0]


def module_styles(model: nn.Module, tp_plan: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Module name -> style, matched as ``apply_tensor_parallel`` matches (first pattern wins)."""
    from shardwise.tensor_parallel.plans import match_plan

    return {a.name: a.style for a in match_plan(model, tp_plan)} if tp_plan else {}


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "Embedding"
    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":  # HF GPT-2's Conv1D is a Linear^T
        return "Linear"
    return type(module).__name__


def tp_local_model(model: nn.Module, tp: int, tp_rank: int, tp_plan: Sequence[tuple[str, str]]
                   ) -> tuple[nn.Module, set[int]]:
    """A meta-device copy of ``model`` whose parameters have ``tp_rank``'s local shapes under
    ``tp_plan`` (see [Note: parallel memory model]; tied parameters stay tied), and the ids of
    its replicated parameters (whole on every tp rank)."""
    if tp == 1:
        return model, set()
    styles = module_styles(model, tp_plan)
    local = copy.deepcopy(model) if all(p.is_meta for p in model.parameters()) else _meta_copy(model)
    replaced: dict[int, nn.Parameter] = {}
    replicated: set[int] = set()
    for name, module in local.named_modules():
        style = styles.get(name)
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            dim = tp_shard_dim(_kind(module), pname, style) if style else None
            if type(module).__name__ == "Conv1D" and dim is not None:  # weight stored (in, out)
                dim = 1 - dim if p.dim() == 2 else dim
            shape = list(p.shape)
            if dim is not None and dim < len(shape):
                shape[dim] = tp_chunk(shape[dim], tp, tp_rank)
            new = replaced.get(id(p))
            if new is None:
                new = replaced[id(p)] = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=p.requires_grad)
            elif list(new.shape) != shape:
                raise UsageError(f"tied parameter {name}.{pname}: the tp plan shards its copies differently "
                                 f"({list(new.shape)} vs {shape})")
            module._parameters[pname] = new
            if dim is None:
                replicated.add(id(new))
    return local, replicated


def _meta_copy(model: nn.Module) -> nn.Module:
    memo = {id(p): nn.Parameter(torch.empty(p.shape, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    memo.update({id(b): torch.empty(b.shape, device="meta", dtype=b.dtype) for b in model.buffers()})
    return copy.deepcopy(model, memo)


# -- pipeline parallelism: layers and their partition --------------------------------------------------
def pipeline_layers(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """``(name, module, is_block)`` in forward order: the model's top-level children with every
    ``ModuleList`` / ``Sequential`` expanded (its members are the blocks), as the example GPT's
    ``PipelineModule`` lists them (examples/gpt/pipeline.py); parameterless ones are kept."""
    out: list[tuple[str, nn.Module, bool]] = []
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            out += [(f"{name}.{n}", c, True) for n, c in child.named_children()]
        else:
            out.append((name, child, False))
    return out


def tied_layers(model: nn.Module) -> set[str]:
    """Names of the layers that share a parameter with another layer (the tied embedding / head)."""
    owners: dict[int, set[str]] = {}
    for name, mod, _ in pipeline_layers(model):
        for p in mod.parameters():
            owners.setdefault(id(p), set()).add(name)
    return {n for o in owners.values() if len(o) > 1 for n in o}


def _tied_copies(layers: list[tuple[str, nn.Module, bool]], bounds: list[int], held: list[int], tied: set[str],
                 mesh: Mesh) -> set[int]:
    """Ids of the tied parameters on this pipeline rank when an earlier pipeline rank owns them
    too (``PipelineModule.tied_duplicates``)."""
    if mesh.pp == 1 or not tied:
        return set()
    rank_of = {}
    for v in range(len(bounds) - 1):
        r = next(i for i in range(mesh.pp) if v in rank_stages(mesh.pp, i, mesh.stages_per_rank, mesh.schedule))
        for name, mod, _ in layers[bounds[v]:bounds[v + 1]]:
            if name in tied:
                for p in mod.parameters():
                    rank_of.setdefault(id(p), set()).add(r)
    me = next(i for i in range(mesh.pp) if rank_stages(mesh.pp, i, mesh.stages_per_rank, mesh.schedule) == held)
    return {pid for pid, owners in rank_of.items() if me in owners and min(owners) < me}


def rank_stages(pp: int, stage_index: int, stages_per_rank: int, schedule: str) -> list[int]:
    """The pipeline stages rank ``stage_index`` of the pp dimension holds."""
    if stages_per_rank == 1:
        return [stage_index]
    if schedule == "ZBVZeroBubble":
        return [stage_index, 2 * pp - 1 - stage_index]
    return [stage_index + k * pp for k in range(stages_per_rank)]


class _Stage(nn.Module):
    """The layers of one rank's pipeline stage(s) in the order a ``PipelineModule`` registers
    them: the tied layers (``tied_modules``, first) and then the others by index."""

    def __init__(self, layers: list[tuple[str, nn.Module, bool]], tied: set[str] = frozenset()):
        super().__init__()
        order = [x for x in layers if x[0] in tied] + [x for x in layers if x[0] not in tied]
        for i, (_, m, _) in enumerate(order):
            self.add_module(str(i), m)


# -- the plan ----------------------------------------------------------------------------------------
@dataclass
class StageRow:
    """The worst tp rank of one pipeline rank (pp coordinate ``index``)."""

    index: int
    layers: list[str]
    blocks: int
    n_params: int  # local elements (tp rank 0)
    report: PlanReport  # ZeRO over dp of this stage's local model (max/min over dp ranks)
    max_bytes: int  # model states, worst tp and dp rank
    activations: int | None  # all micro-batches in flight
    activations_per_micro_batch: int | None
    in_flight: int
    collectives: list[tuple[str, Collective]] = field(default_factory=list)
    modules: dict[int, nn.Module] = field(default_factory=dict, repr=False)  # tp rank -> local stage module
    duplicates: dict[int, set[int]] = field(default_factory=dict, repr=False)  # tp rank -> norm duplicates

    @property
    def need(self) -> int:
        return self.max_bytes + self.report.working_bytes + (self.activations or 0)


@dataclass
class ParallelPlanReport:
    mesh: Mesh
    stage: int
    precision: str
    n_params: int
    by_dimension: list[tuple[str, dict[str, int]]]
    stages: list[StageRow]
    micro_batch: int | None
    seq_len: int | None
    gradient_accumulation_steps: int
    device_memory: int | None
    seconds: float = 0.0
    layout_kw: dict[str, Any] = field(default_factory=dict, repr=False)

    def rank_states(self, pp_rank: int, tp_rank: int = 0, dp_rank: int = 0) -> dict[str, int | None]:
        """The model-state bytes (``memory_report()``'s keys) of the rank at these coordinates
        (tp ranks 0 and tp - 1 are laid out); activations are the stage row's."""
        row = self.stages[pp_rank]
        if tp_rank not in row.modules:
            raise UsageError(f"tp rank {tp_rank} was not laid out (0 and {self.mesh.tp - 1} are)")
        return model_state_bytes(row.modules[tp_rank], self.mesh.dp, self.stage, rank=dp_rank,
                                 duplicates=row.duplicates[tp_rank], **self.layout_kw)

    @property
    def worst(self) -> StageRow:
        return max(self.stages, key=lambda r: (r.need, -r.index))

    @property
    def max_bytes(self) -> int:
        return max(r.max_bytes for r in self.stages)

    @property
    def min_bytes(self) -> int:
        return min(r.report.min_bytes for r in self.stages)

    @property
    def activations(self) -> int | None:
        return self.worst.activations

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.worst.need <= self.device_memory

    @property
    def collectives(self) -> list[tuple[str, Collective]]:
        """The worst rank's collectives per step, by dimension."""
        return self.worst.collectives

    def comm_by_dimension(self) -> dict[str, int]:
        out = {"tp": 0, "pp": 0, "dp": 0}
        for dim, c in self.collectives:
            out[dim] += c.bytes
        return out

    def to_json(self) -> dict[str, Any]:
        w = self.worst
        return {"world_size": self.mesh.world_size, "mesh": {"pp": self.mesh.pp, "dp": self.mesh.dp, "tp": self.mesh.tp},
                "stage": self.stage, "precision": self.precision, "n_params": self.n_params,
                "model_state_bytes_per_rank": {"max": self.max_bytes, "min": self.min_bytes},
                "by_dimension": [{"after": k, **v} for k, v in self.by_dimension],
                "activations": w.activations, "worst_pipeline_rank": w.index,
                "pipeline_ranks": [{"pp_rank": r.index, "layers": r.layers, "blocks": r.blocks, "params": r.n_params,
                                    "model_state_bytes": r.max_bytes, "working_bytes": r.report.working_bytes,
                                    "activations": r.activations, "in_flight": r.in_flight,
                                    "activations_per_micro_batch": r.activations_per_micro_batch}
                                   for r in self.stages],
                "collectives": [{"dim": d, "op": c.op, "calls": c.calls, "bytes": c.bytes} for d, c in w.collectives],
                "comm_bytes_per_step": self.comm_by_dimension(), "fits": self.fits, "seconds": round(self.seconds, 3)}


def _states(model: nn.Module, world: int, stage: int, precision: str, optimizer: str, **kw: Any) -> dict[str, int]:
    s = model_state_bytes(model, world, stage, precision, optimizer, **kw)
    return {k: int(s[k] or 0) for k in STATE_KEYS + ("total",)}


def plan_parallel(model: nn.Module, mesh: Mesh, stage: int, *, precision: str = "fp32", optimizer: str = "adamw",
                  grad_precision: str | None = None, gradient_accumulation_steps: int = 1,
                  micro_batch: int | None = None, seq_len: int | None = None, checkpoint_every: int = 0,
                  tp_preset: str | None = None, device_memory: int | None = None, **zero_kw: Any) -> ParallelPlanReport:
    """Plan ``model`` (on the meta device) on ``mesh`` at ZeRO ``stage`` over dp; see [Note:
    parallel memory model]. ``zero_kw``: :func:`shardwise.planner.plan_model`'s layout options
    (``bucket_numel``, ``persistence_threshold``, ``unit_classes``)."""
    from shardwise.estimate import transformer_shape

    t0 = time.perf_counter()
    pb, gb, m = DTYPE_BYTES[precision], DTYPE_BYTES[grad_precision or precision], gradient_accumulation_steps
    shape = transformer_shape(model)
    tp_plan = (mesh.tp_plan or resolve_tp_plan(model, None, tp_preset)) if mesh.tp > 1 else ()
    styles = module_styles(model, tp_plan)
    ranks = sorted({0, mesh.tp - 1})
    built = {t: tp_local_model(model, mesh.tp, t, tp_plan) for t in ranks}
    locals_ = {t: m for t, (m, _) in built.items()}
    trainable, frozen = trainable_params(model)
    n_params = sum(p.numel() for p in trainable) + frozen
    n_stages = mesh.pp * mesh.stages_per_rank
    layers = {t: pipeline_layers(loc) for t, loc in locals_.items()}
    bounds = partition_layers([mm for _, mm, _ in pipeline_layers(model)], n_stages, mesh.partition)
    kw = dict(precision=precision, optimizer=optimizer, grad_precision=grad_precision, **zero_kw)
    by_dim = [("model", _states(model, 1, 0, precision, optimizer, grad_precision=grad_precision)),
              (f"tp {mesh.tp}", _states(locals_[0], 1, 0, precision, optimizer, grad_precision=grad_precision))]
    tied = tied_layers(model)
    rows = []
    sb_h = (micro_batch or 0) * (seq_len or 0) * (shape.hidden if shape else 0)
    for i in range(mesh.pp):
        held = rank_stages(mesh.pp, i, mesh.stages_per_rank, mesh.schedule)
        reports, mods, dups = {}, {}, {}
        for t in ranks:
            mine = [lay for s in held for lay in layers[t][bounds[s]:bounds[s + 1]]]
            mods[t] = locals_[t] if mesh.pp == 1 else _Stage(mine, tied)
            # [Note: norm over the mesh]: replicated parameters on tp ranks > 0 and tied copies
            # on a stage after the first owner's count elsewhere (buckets are keyed by that)
            dups[t] = (built[t][1] if t else set()) | _tied_copies(layers[t], bounds, held, tied, mesh)
            reports[t] = plan_model(mods[t], mesh.dp, stage, gradient_accumulation_steps=m,
                                    checkpoint_every=checkpoint_every, duplicates=dups[t], **kw)
        names = [n for s in held for n, _, _ in layers[0][bounds[s]:bounds[s + 1]]]
        blocks = sum(b for s in held for _, _, b in layers[0][bounds[s]:bounds[s + 1]])
        first, last = 0 in held, n_stages - 1 in held
        act = inflight = None
        if shape is not None and micro_batch and seq_len:
            ckpt = blocks // checkpoint_every if checkpoint_every > 0 else 0
            kept = -(-blocks // mesh.checkpoint_interval) if mesh.checkpoint_interval else None
            act = transformer_activation_bytes(blocks, seq_len, micro_batch, shape.hidden, shape.heads, shape.vocab,
                                               pb, blocks if kept else ckpt, mesh.tp, mesh.sequence_parallel,
                                               mesh.partition_activations, first, last, kept)
            inflight = in_flight(mesh.schedule, mesh.pp, i, m)
        row = StageRow(i, names, blocks, sum(p.numel() for p in mods[0].parameters()), reports[0],
                       max(r.max_bytes for r in reports.values()), None if act is None else act * inflight, act,
                       inflight or 0)
        row.modules = mods
        row.duplicates = dups
        row.collectives = _collectives(row, mesh, styles, names, mods[0], model, held, n_stages, m, sb_h, pb, gb,
                                       micro_batch, seq_len, shape, checkpoint_every)
        rows.append(row)
    big = max(rows, key=lambda r: r.max_bytes)
    by_dim.append((f"pp {mesh.pp} (largest: pp rank {big.index})",
                   _states(_Stage([x for x in layers[0] if x[0] in big.layers], tied) if mesh.pp > 1
                           else locals_[0], 1, 0, precision, optimizer, grad_precision=grad_precision)))
    st = big.report.states
    by_dim.append((f"ZeRO-{stage} over dp {mesh.dp}", {k: int(st[k] or 0) for k in STATE_KEYS} | {"total": big.max_bytes}))
    return ParallelPlanReport(mesh, stage, precision, n_params, by_dim, rows, micro_batch, seq_len, m, device_memory,
                              time.perf_counter() - t0, kw)


def _collectives(row: StageRow, mesh: Mesh, styles: dict[str, str], names: list[str], stage_model: nn.Module,
                 model: nn.Module, held: list[int], n_stages: int, m: int, sb_h: int, pb: int, gb: int,
                 micro_batch: int | None, seq_len: int | None, shape: Any, checkpoint_every: int
                 ) -> list[tuple[str, Collective]]:
    out: list[tuple[str, Collective]] = []
    if mesh.tp > 1 and sb_h:
        L = row.blocks
        out += [("tp", Collective("all_reduce block outputs (forward)", 2 * L * m, 2 * L * m * sb_h * pb)),
                ("tp", Collective("all_reduce input grads (backward)", 2 * L * m, 2 * L * m * sb_h * pb))]
        ck = L if mesh.checkpoint_interval else (L // checkpoint_every if checkpoint_every > 0 else 0)
        if ck:
            out.append(("tp", Collective("all_reduce (recompute of checkpointed blocks)", 2 * ck * m,
                                         2 * ck * m * sb_h * pb)))
        for name in names:
            style, kind = styles.get(name), _kind(model.get_submodule(name)) if name in styles else ""
            if kind == "Embedding" and style == "rowwise":
                out.append(("tp", Collective(f"all_reduce {name} output (forward)", m, m * sb_h * pb)))
            elif kind == "Linear" and style in ("colwise", "colwise_gather_output") and shape is not None and shape.vocab and \
                    model.get_submodule(name).out_features == shape.vocab:
                logits = (micro_batch or 0) * (seq_len or 0) * shape.vocab
                out += [("tp", Collective(f"all_gather {name} logits (forward)", m, m * logits * pb)),
                        ("tp", Collective(f"all_reduce {name} input grad (backward)", m, m * sb_h * pb))]
    if mesh.pp > 1:
        boundaries = sum((s > 0) + (s < n_stages - 1) for s in held)
        if sb_h:
            out += [("pp", Collective("p2p activations (forward: sent / received)", boundaries * m, boundaries * m * sb_h * pb)),
                    ("pp", Collective("p2p gradients (backward: sent / received)", boundaries * m, boundaries * m * sb_h * gb))]
        tied = _tied_numel(model, stage_model, names)
        if tied:
            out.append(("pp", Collective("all_reduce tied-weight grads (end stages)", 1, tied * gb)))
    out += [("dp", c) for c in row.report.collectives]
    return out


def _tied_numel(model: nn.Module, stage_model: nn.Module, names: list[str]) -> int:
    """Local elements of this stage's parameters that other stages hold too (tied weights)."""
    owners: dict[int, set[str]] = {}
    for lname, mod, _ in pipeline_layers(model):
        for p in mod.parameters():
            owners.setdefault(id(p), set()).add(lname)
    mine = set(names)
    shared = {pid for pid, o in owners.items() if o & mine and o - mine}
    by_name = {lname: mod for lname, mod, _ in pipeline_layers(model)}
    local = dict(zip(names, stage_model.children()))
    total = 0
    for lname in names:
        for (_, p), (_, q) in zip(by_name[lname].named_parameters(), local[lname].named_parameters()):
            if id(p) in shared:
                total += q.numel()
                shared.discard(id(p))
    return total


# -- output -----------------------------------------------------------------------------------------
def print_parallel(r: ParallelPlanReport, title: str = "plan") -> None:
    from shardwise.estimate import fmt_bytes

    mesh, w = r.mesh, r.worst
    size = f"{r.n_params / 1e9:.3f} B" if r.n_params >= 1e8 else f"{r.n_params:,}"
    print(f"{title}: {size} parameters, {mesh.world_size} ranks = pp {mesh.pp} x dp {mesh.dp} x tp "
          f"{mesh.tp}, ZeRO stage {r.stage} over dp, {r.precision} ({r.seconds:.1f} s)")
    print("model states per rank, by dimension:")
    cols = ("after",) + STATE_KEYS + ("total",)
    lines = [[k] + [fmt_bytes(v[c]) for c in cols[1:]] for k, v in r.by_dimension]
    widths = [max(len(c), *(len(x[i]) for x in lines)) for i, c in enumerate(cols)]
    for line in [list(cols)] + lines:
        print("  " + "  ".join(x.ljust(widths[0]) if i == 0 else x.rjust(widths[i]) for i, x in enumerate(line)))
    print(f"pipeline ranks (partition {mesh.partition}, schedule {mesh.schedule}, "
          f"{r.gradient_accumulation_steps} micro-batches):")
    for s in r.stages:
        span = f"{s.layers[0]} .. {s.layers[-1]}" if s.layers else "-"
        act = "" if s.activations is None else (f"; activations {fmt_bytes(s.activations)} ({s.in_flight} in flight x "
                                                 f"{fmt_bytes(s.activations_per_micro_batch)})")
        print(f"  pp {s.index:>3}: {len(s.layers):>3} layers ({s.blocks} blocks; {span}), {s.n_params / 1e9:.3f} B local "
              f"params, model states {fmt_bytes(s.max_bytes)}{act}")
    print(f"worst rank: pp {w.index}; collectives per optimizer step (buffer bytes per rank):")
    for dim, c in w.collectives:
        print(f"  {dim:<3} {c.op:<44} {c.calls:>8} calls  {fmt_bytes(c.bytes)}")
    comm = r.comm_by_dimension()
    print("  total: " + ", ".join(f"{d} {fmt_bytes(v)}" for d, v in comm.items()))
    print(f"working memory (transient): {fmt_bytes(w.report.working_bytes)}; activations: {fmt_bytes(w.activations)}")
    if r.device_memory is not None:
        print(f"fits {fmt_bytes(r.device_memory)}: {'yes' if r.fits else 'NO'} (needs {fmt_bytes(w.need)})")


def plan_job_parallel(config_path: str, model_spec: str | nn.Module, world_size: int, *, tp: int | None = None,
                      pp: int | None = None, stage: int | None = None, schedule: str | None = None,
                      partition: str | None = None, seq_len: int | None = None, device_memory: int | None = None,
                      micro_batch: int | None = None) -> ParallelPlanReport:
    """``shardwise plan --tp T --pp P`` as a function: the config resolved at N ranks with
    ``tensor_parallel.autotp_size`` = T and ``pipeline.stages`` = P (its ConfigErrors: sizes
    that do not divide N, ZeRO 2/3 with pp > 1), the model built on the meta device, planned."""
    from shardwise.estimate import build_on_meta, load_factory, planning_config

    t0 = time.perf_counter()
    cfg = planning_config(config_path, world_size, tp=tp, pp=pp)
    par = cfg.parallel
    stage = cfg.stage if stage is None else stage
    if par.pp > 1 and stage >= 2:
        raise UsageError(f"ZeRO stage {stage} with pipeline parallelism ({par.pp} stages) is refused (use stage 0 "
                         "or 1; see config/resolve_parallel.py [Note: ZeRO with pipelining])")
    tp_plan = par.tensor.tp_plan
    mesh = Mesh(par.tp, par.pp, par.dp, tp_plan, partition or par.pipeline.partition,
                schedule or par.pipeline.schedule, par.pipeline.stages_per_rank,
                any(st == "sequence_parallel" for _, st in tp_plan or ()), cfg.partition_activations,
                par.pipeline.activation_checkpoint_interval)
    model = model_spec if isinstance(model_spec, nn.Module) else build_on_meta(load_factory(model_spec))
    report = plan_parallel(model, mesh, stage, precision=cfg.precision, optimizer=cfg.optimizer,
                           grad_precision=cfg.grad_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                           micro_batch=micro_batch or cfg.micro_batch, seq_len=seq_len,
                           checkpoint_every=cfg.checkpoint_every, tp_preset=par.tensor.preset,
                           device_memory=device_memory, bucket_numel=cfg.bucket_numel,
                           persistence_threshold=cfg.persistence_threshold)
    report.seconds = time.perf_counter() - t0
    return report


def estimate_parallel(model: Any, world_size: int, tp: int, pp: int, *, precision: str = "fp32",
                      optimizer: str = "adamw", micro_batch: int | None = None, seq_len: int | None = None,
                      grad_precision: str | None = None, gradient_accumulation_steps: int = 1,
                      **kw: Any) -> dict[str, Any]:
    """``shardwise estimate --tp T --pp P --json``: per ZeRO stage over dp, the worst rank's bytes
    ({"stages": {"0": {...}, ...}}, as without --tp/--pp) and the per-dimension split of stage
    1 (activations: ``gradient_accumulation_steps`` micro-batches, those in flight); a parameter
    count is split analytically (Ψ / (T P) per rank, no replicated parts, no activations)."""
    from shardwise.estimate import FIELDS, model_states

    mesh = mesh_for(world_size, tp, pp)
    out: dict[str, Any] = {"world_size": world_size, "mesh": {"pp": mesh.pp, "dp": mesh.dp, "tp": mesh.tp},
                           "stages": {}, "refused_with_pp": [2, 3] if pp > 1 else []}
    if isinstance(model, (int, float)):
        local = -(-int(model) // (tp * pp))
        for s in range(4):
            out["stages"][str(s)] = model_states(local, mesh.dp, s, precision, optimizer, grad_precision=grad_precision)
        return out
    zero_kw = {k: kw[k] for k in ("bucket_numel", "persistence_threshold") if k in kw}
    for s in range(4):
        r = plan_parallel(model, mesh, s, precision=precision, optimizer=optimizer, grad_precision=grad_precision,
                          micro_batch=micro_batch, seq_len=seq_len, checkpoint_every=kw.get("checkpoint_every", 0),
                          gradient_accumulation_steps=gradient_accumulation_steps, **zero_kw)
        w = r.worst
        row = {k: int(w.report.states[k] or 0) for k in STATE_KEYS}
        row["activations"] = w.activations
        row["total"] = w.max_bytes + (w.activations or 0)
        out["stages"][str(s)] = {k: row[k] for k in FIELDS}
        if s == 1:
            out["by_dimension"] = [{"after": k, **v} for k, v in r.by_dimension]
    return out


def print_estimate_parallel(out: dict[str, Any], device_memory: int | None = None) -> None:
    from shardwise.estimate import FIELDS, _table, fmt_bytes

    m = out["mesh"]
    print(f"{out['world_size']} ranks = pp {m['pp']} x dp {m['dp']} x tp {m['tp']}; bytes per rank (worst rank), "
          "ZeRO over dp")
    cols = ["stage"] + list(FIELDS) + (["fits"] if device_memory else [])
    rows = [[s + (" (refused: pp)" if int(s) in out["refused_with_pp"] else "")] + [fmt_bytes(v[f]) for f in FIELDS]
            + ([str(v["total"] <= device_memory).lower()] if device_memory else []) for s, v in out["stages"].items()]
    _table(cols, rows)
    if out.get("by_dimension"):
        print("model states per rank by dimension (ZeRO-1):")
        cols = ["after"] + list(STATE_KEYS) + ["total"]
        _table(cols, [[d["after"]] + [fmt_bytes(d[c]) for c in cols[1:]] for d in out["by_dimension"]])


__all__ = ["Mesh", "mesh_for", "resolve_tp_plan", "module_styles", "tp_local_model", "pipeline_layers",
           "tied_layers", "rank_stages", "StageRow", "ParallelPlanReport",
           "plan_parallel", "print_parallel", "plan_job_parallel", "estimate_parallel", "print_estimate_parallel"]
