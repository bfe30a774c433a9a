"""Rank functions for test_tensor_parallel.py: tensor parallelism (DTensor) under ZeRO 0-2.

Each case trains one model under ``shardwise.initialize`` with ``tensor_parallel`` for a few
steps (gradient accumulation, clipping active so the tp-spanning norm decides the step) and
returns what the test compares with one plain process on the same global batch: losses,
gradient norms, every parameter whole (``full_tensor()`` over tp), and evidence that the
feature really ran (local shard shapes, DTensor types, the tied head, parameters changed).
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn

import shardwise

GLOBAL_BATCH, SEQ, VOCAB = 8, 16, 64


def make_gpt() -> nn.Module:
    from model import GPT, GPTConfig  # examples/gpt

    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", n_head=4))  # V=64, T=16, L=2, d=32, 4 heads (2 per tp rank)


def make_llama() -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return T.LlamaForCausalLM(cfg)


def make_gpt2() -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    return T.GPT2LMHeadModel(cfg)


MODELS = {"gpt": make_gpt, "llama": make_llama, "gpt2": make_gpt2}


def batches(steps: int, seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(steps)]


def _loss(model, xb: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "gpt":
        return model(xb[:, :-1], xb[:, 1:])
    return model(input_ids=xb, labels=xb).loss  # Hugging Face shifts the labels itself


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().float().clone()
            for k, v in model.state_dict().items()}


def reference(kind: str, steps: int, *, gas: int, clip: float, lr: float, opt: str = "SGD",
              dtype: torch.dtype = torch.float32) -> dict:
    """One plain process on the whole global batch."""
    model = MODELS[kind]().to(dtype)
    params = list(model.parameters())
    optim = torch.optim.SGD(params, lr=lr) if opt == "SGD" else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses, norms = [], []
    t0 = time.perf_counter()
    for x in batches(steps):
        micro = GLOBAL_BATCH // gas
        total = 0.0
        for k in range(gas):
            loss = _loss(model, x[k * micro:(k + 1) * micro], kind)
            (loss / gas).backward()
            total += loss.item() / gas
        norms.append(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")).item())
        optim.step()
        optim.zero_grad()
        losses.append(total)
    return {"losses": losses, "norms": norms, "params": _full(model), "step_s": (time.perf_counter() - t0) / steps,
            "param_bytes": sum(p.numel() * p.element_size() for p in {id(p): p for p in params}.values())}


def _config(*, stage: int, gas: int, clip: float, lr: float, dp: int, tp: int, opt: str = "SGD",
            preset: str | None = None, bf16: bool = False, grad_fp32: bool = False) -> dict:
    cfg = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // (dp * gas),
           "gradient_accumulation_steps": gas, "gradient_clipping": clip, "steps_per_print": 1000,
           "optimizer": {"type": opt, "params": {"lr": lr, **({"weight_decay": 0.0} if opt == "AdamW" else {})}},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 2000},
           "tensor_parallel": {"autotp_size": tp}}
    if preset:
        cfg["tensor_parallel"]["preset_model"] = preset
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if grad_fp32:  # fp32 gradient buffers under bf16 compute: the hook adds each DTensor's local gradient
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def _evidence(model: nn.Module, kind: str) -> dict:
    from torch.distributed.tensor import DTensor

    named = dict(model.named_parameters(remove_duplicate=False))
    probe = {"gpt": "blocks.0.attn.q.weight", "llama": "model.layers.0.self_attn.k_proj.weight",
             "gpt2": "transformer.h.0.mlp.c_fc.weight"}[kind]
    p = named[probe]
    with torch.no_grad():
        local = p.to_local() if isinstance(p, DTensor) else p
    out = {"probe": probe, "is_dtensor": isinstance(p, DTensor), "global_shape": tuple(p.shape),
           "local_shape": tuple(local.shape), "placements": str(getattr(p, "placements", None)),
           "n_dtensor": sum(isinstance(q, DTensor) for q in named.values()),
           "local_param_bytes": sum((q.to_local() if isinstance(q, DTensor) else q).numel() * q.element_size()
                                    for q in {id(q): q for q in named.values()}.values())}
    if kind == "gpt":
        out["tied"] = model.head.weight is model.tok_emb.weight and isinstance(model.head.weight, DTensor)
        ln = model.blocks[0].ln1.weight
        out["ln_placements"] = str(ln.placements) if isinstance(ln, DTensor) else "plain"
    if kind == "gpt2":
        out["tied"] = model.lm_head.weight is model.transformer.wte.weight
    return out


def _prebuilt(model: nn.Module, plan_name: str, dp: int, tp: int):
    """The script parallelizes the model itself (here with a built-in plan the config schema
    does not offer by name) on its own (dp, tp) mesh, and hands initialize that mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    from shardwise.tensor_parallel import PRESETS, parallelize

    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    parallelize(model, PRESETS[plan_name], tp, mesh["tp"])
    return mesh


def tp_case(kind: str, steps: int, *, stage: int, gas: int, clip: float, lr: float, tp: int = 2,
            opt: str = "SGD", bf16: bool = False, preset: str | None = None, prebuilt: str | None = None,
            grad_fp32: bool = False) -> dict:
    world = dist.get_world_size()
    dp = world // tp
    model = MODELS[kind]()
    init = _full_plain(model)
    mesh = _prebuilt(model, prebuilt, dp, tp) if prebuilt else None
    engine, *_ = shardwise.initialize(model=model, mesh=mesh,
                                      config=_config(stage=stage, gas=gas, clip=clip, lr=lr, dp=dp, tp=tp, opt=opt,
                                                     preset=preset, bf16=bf16, grad_fp32=grad_fp32))
    ctx = engine.ctx
    evidence = _evidence(model, kind)
    losses, norms, times = [], [], []
    micro = GLOBAL_BATCH // (dp * gas)
    for x in batches(steps):
        t0 = time.perf_counter()
        total = 0.0
        for k in range(gas):
            # micro-step k of dp rank r: rows of the plain run's micro-batch k, split over dp
            lo = k * (GLOBAL_BATCH // gas) + ctx.dp.rank * micro
            loss = _loss(engine, x[lo:lo + micro], kind)
            engine.backward(loss)
            engine.step()
            total += float(loss.detach()) / gas
        times.append(time.perf_counter() - t0)
        # the engine's loss is this dp rank's; the global mean is over dp
        t = torch.tensor([total / dp], dtype=torch.float64)
        if ctx.dp.size > 1:
            dist.all_reduce(t, group=ctx.dp.group)
        losses.append(float(t))
        norms.append(float(engine.get_global_grad_norm()))
    params = _full(model)
    changed = max(float((params[k] - init[k].float()).abs().max()) for k in init)
    try:  # needs FlatBucketStrategy.memory_report to count DTensors' local tensors (lead's change)
        memory = engine.memory_report()
    except RuntimeError as exc:
        memory = {"error": str(exc)}
    engine.destroy()
    return {"losses": losses, "norms": norms, "params": params if ctx.rank == 0 else None, "changed": changed,
            "evidence": evidence, "coords": ctx.coords(), "step_s": sum(times[1:]) / max(len(times) - 1, 1),
            "first_step_s": times[0], "memory": memory}


def start_state(tp: int = 2) -> dict:
    """Every rank perturbs its model differently before initialize (a per-rank seed): after it,
    a replicated (plain) parameter equals tp rank 0 / dp rank 0's on every rank, and a sharded
    one is the shard of global rank 0's tensor."""
    model = make_gpt()
    rank = dist.get_rank()
    with torch.no_grad():
        model.blocks[0].ln1.weight.add_(rank)
        model.blocks[0].attn.q.weight.add_(rank)
    engine, *_ = shardwise.initialize(model=model, config=_config(stage=1, gas=1, clip=0.0, lr=0.1,
                                                                   dp=dist.get_world_size() // tp, tp=tp))
    out = {"ln1": model.blocks[0].ln1.weight.detach().clone(), "q": model.blocks[0].attn.q.weight.full_tensor()}
    engine.destroy()
    return out


def _full_plain(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unplanned_error() -> str:
    """A model shardwise has no plan for, under autotp_size 2: the ConfigError's text."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    cfg = _config(stage=1, gas=1, clip=0.0, lr=0.1, dp=dist.get_world_size() // 2, tp=2)
    try:
        shardwise.initialize(model=model, config=cfg)
    except Exception as exc:  # noqa: BLE001 - the test checks the type and text
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def run_cases(cases: list[tuple[str, dict]]) -> dict:
    """Several cases in one job (one run_distributed call: DTensor's caches warm once)."""
    out = {}
    for name, kw in cases:
        if name == "unplanned":
            out[name] = unplanned_error()
        elif name == "start_state":
            out[name] = start_state()
        else:
            out[name] = tp_case(**kw)
    return out
