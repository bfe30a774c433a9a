"""Rank functions for the ZeRO stage-3 tests (importable in spawned ranks).

``Zoo`` exercises every case stage 3 must get right: tied weights, a module called twice, a
parameter used by a module that does not own it (inside one unit, and across units with
``register_external_parameter``), a parameter without gradient on some steps, frozen
parameters with a trainable LoRA pair, activation checkpointing (re-entrant and not), and a
greedy-generation loop under ``eval()`` + ``no_grad()`` between training steps.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import shardwise
import shardwise.zero

VOCAB, D, SEQ, BATCH = 32, 16, 8, 6


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)
        self.mix = nn.Linear(d, d, bias=False)
        self.peer: list[nn.Module] = []  # a module of another unit whose weight this one borrows

    def forward(self, x):
        h = x + self.proj(F.gelu(self.fc(self.ln(x))))
        h = h + 0.5 * self.mix(h)
        if self.peer:
            h = h + 0.25 * F.linear(h, self.peer[0].mix.weight)  # owned by another fetch unit
        return h


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Block(D) for _ in range(4)])
        self.frozen = nn.Linear(D, D)
        self.frozen.requires_grad_(False)
        self.lora_a = nn.Linear(D, 4, bias=False)
        self.lora_b = nn.Linear(4, D, bias=False)
        self.sometimes = nn.Linear(D, D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.blocks[3].peer.append(self.blocks[0])
        shardwise.zero.register_external_parameter(self.blocks[3], self.blocks[0].mix.weight)

    def forward(self, x, y=None, use_sometimes: bool = False):
        h = self.emb(x)
        h = self.blocks[0](h)
        h = checkpoint(self.blocks[1], h, use_reentrant=True)
        h = checkpoint(self.blocks[2], h, use_reentrant=False)
        h = self.blocks[1](h)  # the same module a second time
        h = self.blocks[3](h)
        h = self.frozen(h) + self.lora_b(self.lora_a(h))
        if use_sometimes:
            h = h + self.sometimes(h)
        logits = self.head(h) + 0.1 * F.linear(h, self.emb.weight)  # tied + borrowed inside the root unit
        if y is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


def zoo_batches(steps: int, seed: int = 7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g) for _ in range(steps)]


@torch.no_grad()
def greedy(model: nn.Module, prompt: torch.Tensor, n: int = 4) -> list[int]:
    was = model.training
    model.eval()
    x = prompt
    for _ in range(n):
        nxt = model(x)[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], dim=1)
    model.train(was)
    return x[0, prompt.shape[1]:].tolist()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    with shardwise.zero.GatheredParameters(list(model.parameters())):
        return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def zoo_reference(steps: int, lr: float = 1e-2) -> dict:
    torch.manual_seed(0)
    model = Zoo()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0, fused=True)
    losses, gens = [], []
    for i, x in enumerate(zoo_batches(steps)):
        loss = model(x[:, :-1], x[:, 1:], use_sometimes=i % 2 == 1)
        loss.backward()
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)  # shardwise (like DeepSpeed) steps unused ones with zeros
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        gens.append(greedy(model, x[:1, :3]))
    return {"losses": losses, "gens": gens, "params": snapshot(model)}


def zoo_shardwise(config: dict, steps: int) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = Zoo()
    engine, *_ = shardwise.initialize(model=model, config=config)
    per = engine.train_micro_batch_size_per_gpu()
    losses, gens = [], []
    for i, x in enumerate(zoo_batches(steps)):
        xb = x[rank * per:(rank + 1) * per]
        loss = engine(xb[:, :-1], xb[:, 1:], use_sometimes=i % 2 == 1)
        engine.backward(loss)
        engine.step()
        t = torch.tensor([loss.item()], dtype=torch.float64)
        dist.all_reduce(t)
        losses.append(t.item() / world)
        gens.append(greedy(model, x[:1, :3]))
    return {"losses": losses, "gens": gens, "params": snapshot(model), "memory": engine.memory_report()}


def zoo_config(**zero) -> dict:
    return {
        "train_batch_size": BATCH, "gradient_clipping": 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, **zero},
        "steps_per_print": 1000,
    }


# -- placeholders and GatheredParameters ------------------------------------------------------


def placeholder_errors() -> dict:
    """What user code sees outside forward, and inside forward without the external declaration."""
    torch.manual_seed(0)
    model = Zoo()
    engine, *_ = shardwise.initialize(model=model, config=zoo_config())
    w = model.blocks[0].fc.weight
    out = {"shape": tuple(w.shape), "numel": w.numel(), "requires_grad": w.requires_grad,
           "is_param": isinstance(w, nn.Parameter), "repr": repr(w)}
    for what, fn in {"add": lambda: w + 1, "sum": lambda: w.sum(), "data": lambda: w.data.clone(),
                     "copy": lambda: w.data.copy_(torch.zeros(w.shape)), "item": lambda: w[0, 0].item()}.items():
        try:
            fn()
            out[what] = "no error"
        except shardwise.zero.sharded_params.ShardedParameterError as exc:
            out[what] = str(exc)
    # a cross-unit borrow that was not declared is a named error, not garbage
    model.blocks[0].peer.append(model.blocks[3])
    x = zoo_batches(1)[0][:2]
    try:
        engine(x[:, :-1], x[:, 1:])
        out["undeclared"] = "no error"
    except shardwise.zero.sharded_params.ShardedParameterError as exc:
        out["undeclared"] = str(exc)
    return out


def gathered_round_trip(world_modifier: int) -> dict:
    """Read whole parameters, modify them on one rank, and train on from the modification."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Zoo()
    engine, *_ = shardwise.initialize(model=model, config=zoo_config())
    with shardwise.zero.GatheredParameters(model.blocks[2].fc.weight):
        read = model.blocks[2].fc.weight.detach().clone()
    with shardwise.zero.GatheredParameters([model.blocks[2].fc.weight, model.emb.weight],
                                           modifier_rank=world_modifier):
        if rank == world_modifier:
            model.blocks[2].fc.weight.data.mul_(2.0)
            model.emb.weight.data[0].fill_(0.5)
    with shardwise.zero.GatheredParameters([model.blocks[2].fc.weight, model.emb.weight]):
        after = model.blocks[2].fc.weight.detach().clone()
        emb0 = model.emb.weight[0].detach().clone()
    # a change without modifier_rank is discarded
    with shardwise.zero.GatheredParameters(model.blocks[2].fc.weight):
        model.blocks[2].fc.weight.data.zero_()
    with shardwise.zero.GatheredParameters(model.blocks[2].fc.weight):
        kept = model.blocks[2].fc.weight.detach().clone()
    sharded_after = isinstance(model.blocks[2].fc.weight, shardwise.zero.sharded_params.ShardedParameter)
    return {"read": read, "after": after, "emb0": emb0, "kept": kept, "sharded_after": sharded_after}


# -- prefetch and memory -----------------------------------------------------------------------


def prefetch_probe(config: dict) -> dict:
    """States of the next block's unit when each block starts, on the second step; and after a
    forward that takes another path."""
    rank, world = dist.get_rank(), dist.get_world_size()
    from parity_workers import batches, make_model

    model = make_model()
    engine, *_ = shardwise.initialize(model=model, config=config)
    rt = engine.strategy.runtime
    unit_of = {u.name: u for u in rt.units}
    seen: list[tuple[str, str]] = []
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: seen.append(
        (f"blocks.{i}", unit_of[f"blocks.{i + 1}"].state.value if f"blocks.{i + 1}" in unit_of else "-")))
        for i, b in enumerate(model.blocks)]
    data = batches(engine.train_batch_size(), 3)
    per = engine.train_micro_batch_size_per_gpu()
    for x in data[:2]:
        seen.clear()
        xb = x[rank * per:(rank + 1) * per]
        engine.backward(engine(xb[:, :-1], xb[:, 1:]))
        engine.step()
    second = list(seen)
    with torch.no_grad():  # another path: logits only, no loss
        model(data[2][:1, :-1])
    for h in hooks:
        h.remove()
    live_after = [u.name for u in rt.units if u.state.value != "sharded"]
    return {"second": second, "live_after": live_after, "peak": rt.gathered_peak, "world": world,
            "memory": engine.memory_report()}


# -- zero.Init ---------------------------------------------------------------------------------


def _rss_peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def init_build(use_init: bool, preset: str, overrides: dict, steps: int = 0) -> dict:
    """Build the GPT (with or without zero.Init), measure what construction allocated (peak RSS
    growth), hand it to stage 3, train ``steps`` steps, return the whole parameters."""
    import gc

    from model import GPT, GPTConfig

    # RSS tracks live memory only if freed blocks go back to the OS: fix glibc's mmap threshold
    # (by default it grows after the first large free, and freed transients then stay resident)
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    cfg = GPTConfig.preset(preset, **overrides)
    config = {"train_batch_size": 2 * dist.get_world_size(), "steps_per_print": 1000,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "zero_optimization": {"stage": 3}}
    with shardwise.zero.Init(config=config, enabled=use_init):  # warm up: kernels, gloo buffers
        GPT(GPTConfig.preset("tiny"))
    gc.collect()
    before = _rss_now_mib()
    torch.manual_seed(0)
    with shardwise.zero.Init(config=config, enabled=use_init):
        model = GPT(cfg)
    built_peak = _rss_peak_mib() - before
    full_mib = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()) / 2**20
    kinds = sorted({type(p).__name__ for p in model.parameters()})
    engine, *_ = shardwise.initialize(model=model, config=config)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randint(0, cfg.vocab_size, (config["train_batch_size"], 17), generator=g)[2 * rank:2 * rank + 2]
        engine.backward(engine(x[:, :-1], x[:, 1:]))
        engine.step()
    return {"built_peak_mib": built_peak, "full_mib": full_mib, "kinds": kinds, "params": snapshot(model)}


def plain_gpt(preset: str, overrides: dict) -> dict:
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    m = GPT(GPTConfig.preset(preset, **overrides))
    return {k: v.detach().float().clone() for k, v in m.state_dict().items()}


def gathered_on_one_rank_only() -> str:
    """Rank 0 gathers, rank 1 does not: rank 0 gets a named error within the timeout."""
    torch.manual_seed(0)
    model = Zoo()
    shardwise.initialize(model=model, config={**zoo_config(), "comms_timeout": 4})
    if dist.get_rank() == 1:
        import time

        time.sleep(8)
        return "rank 1 did not call it"
    try:
        with shardwise.zero.GatheredParameters(model.blocks[0].fc.weight):
            return "no error"
    except shardwise.errors.UsageError as exc:
        return str(exc)
