"""Rank functions shared by the distributed parity tests (importable in spawned ranks).

Every run trains the tiny GPT of examples/gpt/model.py on a fixed sequence of random global
batches. A shardwise rank takes its contiguous slice of each global batch (and splits that
into micro-batches); the reference is plain single-process PyTorch on the whole global batch.
Both run with one intra-op thread (run_distributed sets it), so at world size 1 they match
bitwise.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import shardwise
import shardwise.zero
from model import GPT, GPTConfig

PRESET = "tiny"


def batches(global_batch: int, steps: int, seed: int = 1234) -> list[torch.Tensor]:
    cfg = GPTConfig.preset(PRESET)
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (global_batch, cfg.seq_len + 1), generator=g) for _ in range(steps)]


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset(PRESET)).to(dtype)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    with shardwise.zero.GatheredParameters(list(model.parameters())):  # whole at every stage
        return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def reference_run(global_batch: int, steps: int, lr: float = 1e-3, weight_decay: float = 0.01,
                  clip: float = 0.0, compute: str = "fp32", seed: int = 1234) -> dict:
    """Plain PyTorch, one process. For bf16/fp16: low-precision model, fp32 master copy."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[compute]
    model = make_model(dtype=dtype)
    params = list(model.parameters())
    master = [p.detach().float().clone().requires_grad_(True) for p in params] if dtype != torch.float32 else params
    opt = torch.optim.AdamW(master, lr=lr, weight_decay=weight_decay, fused=True)
    losses, norms = [], []
    for x in batches(global_batch, steps, seed=seed):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        if dtype != torch.float32:
            for m, p in zip(master, params):
                m.grad = p.grad.float()
                p.grad = None
        norm = torch.nn.utils.clip_grad_norm_(master, clip if clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad()
        if dtype != torch.float32:
            with torch.no_grad():
                for m, p in zip(master, params):
                    p.copy_(m)
        losses.append(loss.item())
        norms.append(norm.item())
    return {"losses": losses, "norms": norms, "params": _snapshot(model)}


def shardwise_run(config: dict, steps: int, unit_classes: list | None = None, seed_per_rank: bool = False) -> dict:
    """Train with shardwise on this rank; losses are averaged over ranks for comparison.
    ``unit_classes``: stage-3 fetch units by module class name (``set_fetch_units``).
    ``seed_per_rank``: each rank builds its model from its own seed (rank 0's is the reference's)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    compute = "bf16" if config.get("bf16", {}).get("enabled") else "fp16" if config.get("fp16", {}).get("enabled") else "fp32"
    model = make_model(seed=1000 * rank if seed_per_rank else 0)
    if unit_classes is not None:
        shardwise.zero.set_fetch_units(model, unit_classes)
    engine, optimizer, _, _ = shardwise.initialize(model=model, model_parameters=model.parameters(), config=config)
    gas = engine.gradient_accumulation_steps()
    micro = engine.train_micro_batch_size_per_gpu()
    per_rank = micro * gas
    losses, norms, applied = [], [], []
    for x in batches(engine.train_batch_size(), steps):
        mine = x[rank * per_rank:(rank + 1) * per_rank]
        total = 0.0
        for k in range(gas):
            xb = mine[k * micro:(k + 1) * micro]
            loss = engine(xb[:, :-1], xb[:, 1:])
            engine.backward(loss)
            engine.step()
            total += loss.item() / gas
        t = torch.tensor([total], dtype=torch.float64)
        dist.all_reduce(t)
        losses.append(t.item() / world)
        norms.append(engine.get_global_grad_norm())
        applied.append(engine.was_step_applied())
    return {
        "losses": losses,
        "norms": norms,
        "applied": applied,
        "params": _snapshot(model),
        "memory": engine.memory_report(),
        "compute": compute,
        "skipped": engine.skipped_steps,
        "loss_scale": engine.loss_scale(),
        "global_steps": engine.global_steps,
        "units": [u.name for u in engine.strategy.runtime.units] if engine.zero_optimization_stage() == 3 else [],
    }


def fp16_overflow_run(config: dict, steps: int, bad_step: int, bad_rank: int) -> dict:
    """fp16 training where one rank's gradients overflow at one step (injected inf)."""
    rank = dist.get_rank()
    model = make_model()
    engine, *_ = shardwise.initialize(model=model, config=config)
    micro = engine.train_micro_batch_size_per_gpu()
    scales, applied, snapshots = [], [], []
    for i, x in enumerate(batches(engine.train_batch_size(), steps)):
        xb = x[rank * micro:(rank + 1) * micro]
        loss = engine(xb[:, :-1], xb[:, 1:])
        if i == bad_step and rank == bad_rank:
            loss = loss * float("inf")
        before = _snapshot(model)
        engine.backward(loss)
        engine.step()
        scales.append(engine.loss_scale())
        applied.append(engine.was_step_applied())
        snapshots.append(all(torch.equal(before[k], v) for k, v in _snapshot(model).items()))
    return {"scales": scales, "applied": applied, "unchanged": snapshots, "skipped": engine.skipped_steps}


def overlap_probe(config: dict) -> dict:
    """How many bucket reductions had been launched when backward reached the embedding."""
    rank = dist.get_rank()
    model = make_model()
    engine, *_ = shardwise.initialize(model=model, config=config)
    seen = {}

    def probe(grad):
        seen["launched"] = engine.strategy.grad_sync._launched
        return grad

    x = batches(engine.train_batch_size(), 1)[0]
    micro = engine.train_micro_batch_size_per_gpu()
    xb = x[rank * micro:(rank + 1) * micro]
    handle = model.blocks[0].register_full_backward_pre_hook(lambda m, g: probe(g))
    loss = engine(xb[:, :-1], xb[:, 1:])
    engine.backward(loss)
    engine.step()
    handle.remove()
    return {"launched_before_end": seen["launched"], "buckets": len(engine.strategy.buckets)}


class PartlyUsed(torch.nn.Module):
    """A GPT plus a head that only some steps use, and one parameter no step uses."""

    def __init__(self):
        super().__init__()
        self.gpt = make_model()
        cfg = GPTConfig.preset(PRESET)
        self.aux = torch.nn.Linear(cfg.vocab_size, 1)
        self.never = torch.nn.Linear(3, 3)

    def forward(self, x, y, use_aux: bool):
        loss = self.gpt(x, y)
        if use_aux:
            loss = loss + self.aux(self.gpt(x)).pow(2).mean()
        return loss


def partly_used_run(config: dict | None, steps: int) -> dict:
    """Reference when config is None (plain PyTorch, one process); else shardwise on this rank."""
    torch.manual_seed(0)
    model = PartlyUsed()
    data = batches(6, steps)
    if config is None:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
        losses = []
        for i, x in enumerate(data):
            loss = model(x[:, :-1], x[:, 1:], i % 2 == 0)
            loss.backward()
            for p in model.parameters():  # shardwise (like DeepSpeed) steps them with zeros
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return {"losses": losses, "params": _snapshot(model)}
    world, rank = dist.get_world_size(), dist.get_rank()
    engine, *_ = shardwise.initialize(model=model, config=config)
    per = 6 // world
    losses = []
    for i, x in enumerate(data):
        xb = x[rank * per:(rank + 1) * per]
        loss = engine(xb[:, :-1], xb[:, 1:], i % 2 == 0)
        engine.backward(loss)
        engine.step()
        t = torch.tensor([loss.item()], dtype=torch.float64)
        dist.all_reduce(t)
        losses.append(t.item() / world)
    return {"losses": losses, "params": _snapshot(model)}


def misuse_run(stages: list[int]) -> dict:
    """Per stage: a backward that bypasses the engine's forward (``engine.module(x).backward()``)
    then ``engine.step()`` must raise UsageError on every rank
    and discard what that backward started; a proper step afterwards must give exactly what a
    fresh engine's first proper step gives."""
    from shardwise.errors import UsageError

    rank, world = dist.get_rank(), dist.get_world_size()
    x = batches(2 * world, 1)[0][2 * rank:2 * rank + 2]
    out = {}
    for stage in stages:
        config = {"train_batch_size": 2 * world, "gradient_clipping": 0.0, "steps_per_print": 1000,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                  "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000}}
        params = []
        for misuse in (True, False):
            model = make_model()
            engine, *_ = shardwise.initialize(model=model, config=config)
            raised = None
            if misuse:
                engine.module(x[:, :-1], x[:, 1:]).backward()
                try:
                    engine.step()
                except UsageError as exc:
                    raised = str(exc)
            engine.backward(engine(x[:, :-1], x[:, 1:]))
            engine.step()
            params.append(_snapshot(model))
            if misuse:
                out[stage] = {"raised": raised, "steps": engine.global_steps}
        out[stage]["same"] = all(torch.equal(params[0][k], params[1][k]) for k in params[0])
    return out
