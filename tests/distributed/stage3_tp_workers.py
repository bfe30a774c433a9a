"""Rank functions for ZeRO stage 3 over tensor-parallel (DTensor) modules and for
``activation_checkpointing.partition_activations`` (importable in spawned ranks).

``TPNet`` is a tiny pre-norm decoder whose every block has attention with separate q, k, v
Linears (``view(b, t, -1, hd)``: the local head count) and an MLP; the TP plan shards q/k/v/fc
colwise, o/proj rowwise, the embedding rowwise and the head colwise with replicated output, so
almost every element is tp-sharded (LayerNorms and rowwise biases stay replicated). A
shardwise run uses a ``(dp, tp)`` mesh; the reference is the same model in one plain process
on the whole global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import shardwise
import shardwise.zero

VOCAB, D, HEADS, SEQ, LAYERS = 64, 32, 4, 8, 2
GLOBAL_BATCH = 8

TP_PLAN = {
    "emb": "rowwise",  # vocabulary rows sharded; token ids replicated
    "blocks.*.attn.q": "colwise", "blocks.*.attn.k": "colwise", "blocks.*.attn.v": "colwise",
    "blocks.*.attn.o": "rowwise",
    "blocks.*.mlp.fc": "colwise", "blocks.*.mlp.proj": "rowwise",
    "head": "colwise_rep",
}


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        hd = D // HEADS
        q, k, v = (f(x).view(b, t, -1, hd).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 4 * D)
        self.proj = nn.Linear(4 * D, D)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = nn.LayerNorm(D), Attention(), nn.LayerNorm(D), MLP()

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TPNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Block() for _ in range(LAYERS)])
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, x, y):
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        logits = self.head(self.ln_f(h))
        return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


def make_model() -> TPNet:
    torch.manual_seed(0)
    return TPNet()


def batches(steps: int, seed: int = 11) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(steps)]


def config(*, stage: int = 3, gas: int = 1, clip: float = 0.0, lr: float = 0.1, opt: str = "SGD",
           checkpoint: bool = False, partition: bool = False, dp: int = 2) -> dict:
    cfg = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // (dp * gas),
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": opt, "params": {"lr": lr}},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "gradient_clipping": clip,
        "steps_per_print": 1000,
    }
    if checkpoint:
        cfg["activation_checkpointing"] = {"modules": "blocks", "partition_activations": partition}
    return cfg


# -- the plain reference ------------------------------------------------------------------------


def reference(steps: int, *, gas: int = 1, clip: float = 0.0, lr: float = 0.1, opt: str = "SGD") -> dict:
    model = make_model()
    optim = (torch.optim.SGD(model.parameters(), lr=lr) if opt == "SGD"
             else torch.optim.AdamW(model.parameters(), lr=lr, fused=True))
    losses, norms = [], []
    for x in batches(steps):
        micro = GLOBAL_BATCH // gas
        total = 0.0
        for k in range(gas):
            xb = x[k * micro:(k + 1) * micro]
            loss = model(xb[:, :-1], xb[:, 1:])
            (loss / gas).backward()
            total += loss.item() / gas
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf")).item())
        optim.step()
        optim.zero_grad()
        losses.append(total)
    return {"losses": losses, "norms": norms,
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "numel": sum(p.numel() for p in model.parameters())}


# -- shardwise at (dp, tp) ----------------------------------------------------------------------


def _mesh(tp: int):
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    return init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))


def parallelize(model: nn.Module, tp_mesh, sequence_parallel: bool = False) -> None:
    """torch's ``parallelize_module`` with TP_PLAN, as a script may do itself before
    ``initialize`` (shardwise then leaves the model's DTensors as they are).
    ``sequence_parallel``: Megatron-style, the residual stream sharded along the sequence
    between blocks (``Shard(1)``), the LayerNorms ``SequenceParallel`` (Replicate DTensor weights
    whose gradients autograd produces as ``Partial``)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    sp = sequence_parallel
    out = dict(output_layouts=Shard(1), use_local_output=False) if sp else {}
    styles = {"colwise": ColwiseParallel, "rowwise": lambda: RowwiseParallel(**out),
              "colwise_rep": lambda: ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(),
                                                     output_layouts=Replicate())}
    plan = {}
    for pattern, style in TP_PLAN.items():
        parts = pattern.split(".")
        for n, m in model.named_modules():
            q = n.split(".")
            if len(q) == len(parts) and all(p in ("*", x) for p, x in zip(parts, q)):
                # an embedding's input (token ids) is replicated, not sharded like a Linear's
                plan[n] = (RowwiseParallel(input_layouts=Replicate(), **out) if isinstance(m, nn.Embedding)
                           else styles[style]())
    if sp:
        for n, m in model.named_modules():
            if isinstance(m, nn.LayerNorm):
                plan[n] = SequenceParallel()
            elif isinstance(m, (Attention, MLP)):
                plan[n] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    parallelize_module(model, tp_mesh, plan)


def _initialize(model: nn.Module, cfg: dict, tp: int, *, by_config: bool = False, sequence_parallel: bool = False):
    """``shardwise.initialize`` over a (dp, tp) mesh of our own, the model parallelized by
    ``parallelize`` here, or (``by_config``) by the config's ``tensor_parallel.tp_plan`` (the
    head then stays replicated: the config's vocabulary has no gathered-output colwise)."""
    mesh = _mesh(tp)
    tp_cfg: dict = {"autotp_size": tp}
    if by_config:
        tp_cfg["tp_plan"] = {k: v for k, v in TP_PLAN.items() if v != "colwise_rep"}
    else:
        parallelize(model, mesh["tp"], sequence_parallel)
    engine, *_ = shardwise.initialize(model=model, config={**cfg, "tensor_parallel": tp_cfg}, mesh=mesh)
    return engine, mesh


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (gathered over dp by stage 3, over tp by DTensor)."""
    from torch.distributed.tensor import DTensor

    with shardwise.zero.GatheredParameters(list(model.parameters())):
        out = {}
        for k, v in model.state_dict().items():
            out[k] = (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        return out


def placements(model: nn.Module) -> dict[str, str]:
    """What each parameter is while gathered (a DTensor's placements), and while sharded."""
    from torch.distributed.tensor import DTensor

    sharded = {n: type(p).__name__ for n, p in model.named_parameters()}
    with shardwise.zero.GatheredParameters(list(model.parameters())):
        gathered = {n: (str(tuple(p.placements)) if isinstance(p, DTensor) else "plain")
                    for n, p in model.named_parameters()}
        local_is_view = {}
        rt = model_runtime(model)
        for n, p in model.named_parameters():
            if isinstance(p, DTensor):
                with torch.no_grad():
                    local = p.to_local()
                local_is_view[n] = rt.gathered_at(local) is not None
    return {"sharded": sharded, "gathered": gathered, "local_is_view": local_is_view}


def model_runtime(model):
    from shardwise.zero.stage3 import runtime_of

    return runtime_of(next(model.parameters()))[0]


def tp_run(cfg: dict, steps: int, tp: int = 2, sequence_parallel: bool = False) -> dict:
    rank = dist.get_rank()
    model = make_model()
    engine, mesh = _initialize(model, cfg, tp, sequence_parallel=sequence_parallel)
    ctx = engine.ctx if hasattr(engine, "ctx") else None
    dp_rank, dp = mesh["dp"].get_local_rank(), mesh["dp"].size()
    gas = engine.gradient_accumulation_steps()
    micro = engine.train_micro_batch_size_per_gpu()
    per = micro * gas
    info = placements(model) if cfg["zero_optimization"]["stage"] == 3 else {}
    losses, norms = [], []
    for x in batches(steps):
        mine = x[dp_rank * per:(dp_rank + 1) * per]
        total = 0.0
        for k in range(gas):
            xb = mine[k * micro:(k + 1) * micro]
            loss = engine(xb[:, :-1], xb[:, 1:])
            engine.backward(loss)
            engine.step()
            total += loss.item() / gas
        t = torch.tensor([total], dtype=torch.float64)
        dist.all_reduce(t, group=mesh["dp"].get_group())
        losses.append(t.item() / dp)
        norms.append(engine.get_global_grad_norm())
    mem = engine.memory_report()
    return {"rank": rank, "coords": ctx.coords() if ctx is not None else "", "losses": losses, "norms": norms,
            "params": full_params(model), "memory": mem, "info": info}


# -- partition_activations: kept-activation bytes ------------------------------------------------
#
# What a forward leaves alive for backward is measured, not computed: every plain tensor an op
# creates during the forward is tracked weakly (a TorchDispatchMode), and after the forward the
# storages still alive are summed (parameters' shards, gathered stage-3 buffers and the small
# tensors the gloo layer keeps for its in-flight collectives excluded: equal in both runs).
# torch.autograd.graph.saved_tensors_hooks cannot count this here: stage 3's own saved-tensor
# hooks are the innermost ones during the forward (an outer pair sees nothing), and what a
# non-re-entrant checkpoint keeps (its region's inputs) is held by the region, not saved by
# autograd.


class _Retained:
    def __init__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode

        refs = self.refs = []

        class Track(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in (out if isinstance(out, (tuple, list)) else (out,)):
                    if type(t) is torch.Tensor:
                        refs.append(weakref.ref(t))
                return out

        self.mode = Track()

    def alive_bytes(self, exclude: set[int]) -> tuple[int, list]:
        seen, total, alive = set(exclude), 0, []
        for r in self.refs:
            t = r()
            if t is None:
                continue
            s = t.untyped_storage()
            if s.nbytes() and s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
                alive.append((tuple(t.shape), s.nbytes()))
        return total, alive


def kept_bytes_run(cfg: dict, tp: int = 2, steps: int = 3) -> dict:
    """Train ``steps`` steps (the model parallelized by the config's tp_plan); the first
    forward's kept bytes are measured (see above)."""
    from shardwise.comm import collectives

    model = make_model()
    engine, mesh = _initialize(model, cfg, tp, by_config=True)
    dp_rank = mesh["dp"].get_local_rank()
    micro = engine.train_micro_batch_size_per_gpu()
    rt = model_runtime(model)
    losses, alive, listing = [], 0, []
    for i, x in enumerate(batches(steps, seed=5)):
        xb = x[dp_rank * micro:(dp_rank + 1) * micro]
        track = _Retained()
        with track.mode:
            loss = engine(xb[:, :-1], xb[:, 1:])
        if i == 0:
            import gc

            gc.collect()  # what is only waiting for the cycle collector is not kept for backward
            exclude = {s.shard.untyped_storage().data_ptr() for s in rt.shards()}
            exclude |= {f.untyped_storage().data_ptr() for u in rt.units if u._flats for f in u._flats}
            exclude |= {t.untyped_storage().data_ptr() for ts in collectives._RECENT for t in ts}
            alive, listing = track.alive_bytes(exclude)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return {"alive": alive, "alive_list": listing, "losses": losses, "params": full_params(model),
            "input_bytes": micro * SEQ * D * 4}


def partition_pair(tp: int = 2) -> dict:
    """``kept_bytes_run`` with every block checkpointed, without and with partition_activations."""
    base = config()
    off = kept_bytes_run({**base, "activation_checkpointing": {"modules": "blocks"}}, tp)
    on = kept_bytes_run({**base, "activation_checkpointing": {"modules": "blocks", "partition_activations": True}},
                        tp)
    return {"off": off, "on": on}


def variants_run(steps: int) -> dict:
    """``tp_run`` under bf16, offload_param and a persistence threshold (norms and biases stay
    whole on every dp rank), one engine after another in the same ranks."""
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    cfgs = {"bf16": {**config(), "bf16": {"enabled": True}},
            "offload_param": {**config(), "zero_optimization": {**zero, "offload_param": {"device": "cpu"}}},
            "persistent": {**config(), "zero_optimization": {**zero, "stage3_param_persistence_threshold": 100}}}
    out = {}
    for name, cfg in cfgs.items():
        r = tp_run(cfg, steps)
        out[name] = {"losses": r["losses"], "params": {k: v.float() for k, v in r["params"].items()}}
    return out
