"""Freezing after ``shardwise.initialize`` (``requires_grad_(False)``), for test_freeze.py.

A GAN-like model (a generator and a discriminator, two ``nn.Sequential``s) trained by one
optimizer over both, with alternating freezes, against single-process plain PyTorch doing
the same: a frozen parameter gets no gradient, ``zero_grad`` leaves its ``.grad`` None and
AdamW (weight decay on) skips it entirely.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import shardwise
import shardwise.zero

BATCH, Z, X = 6, 4, 8
LR, WD = 1e-2, 0.1

# per step: (frozen while forward/backward run, frozen when the step runs)
# "D" trains the discriminator (generator frozen), "G" the generator (discriminator frozen)
SCHEDULE = [
    ("D", "gen", "gen"),
    ("G", "disc", "disc"),
    ("D", "gen", "gen"),
    ("G", "disc", ""),  # discriminator unfrozen between backward and step: still skipped
    ("B", "", ""),  # both train
    ("G", "disc", "disc"),
    ("G", "disc", "disc"),
    ("D", "gen", "gen"),
    ("B", "", ""),
    ("D", "gen", ""),
]


class GAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.gen = nn.Sequential(nn.Linear(Z, 16), nn.Tanh(), nn.Linear(16, X))
        self.disc = nn.Sequential(nn.Linear(X, 12), nn.Tanh(), nn.Linear(12, 1))

    def forward(self, z: torch.Tensor, real: torch.Tensor, phase: str) -> torch.Tensor:
        fake = self.gen(z)
        if phase == "G":
            return F.softplus(-self.disc(fake)).mean()
        d = F.softplus(-self.disc(real)).mean() + F.softplus(self.disc(fake)).mean()
        if phase == "B":
            d = d + (fake ** 2).mean()
        return d


def build() -> GAN:
    torch.manual_seed(0)
    return GAN()


def data(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(BATCH, Z, generator=g), torch.randn(BATCH, X, generator=g) + 1.0) for _ in range(steps)]


def _freeze(model: GAN, which: str) -> None:
    model.gen.requires_grad_(which != "gen")
    model.disc.requires_grad_(which != "disc")


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    with shardwise.zero.GatheredParameters(list(model.parameters())):
        return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def reference(steps: int = len(SCHEDULE)) -> dict:
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, fused=True)
    losses, params = [], []
    for (phase, during, at_step), (z, real) in zip(SCHEDULE[:steps], data(steps)):
        _freeze(model, during)
        loss = model(z, real, phase)
        loss.backward()
        _freeze(model, at_step)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        params.append(_snapshot(model))
    return {"losses": losses, "params": params}


def config(stage: int, **zero) -> dict:
    return {"train_batch_size": BATCH, "steps_per_print": 1000, "gradient_clipping": 0.0,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0, **zero}}


def sharded(stage: int, groups: bool, steps: int = len(SCHEDULE), zero: dict | None = None,
            gas: int = 1) -> dict:
    """``groups``: the generator's and the discriminator's parameters as two param groups;
    ``gas`` micro-steps per step (the freeze set again before each)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    model = build()
    params = [{"params": model.gen.parameters()}, {"params": model.disc.parameters()}] if groups else None
    cfg = {**config(stage, **(zero or {})), "gradient_accumulation_steps": gas}
    engine, *_ = shardwise.initialize(model=model, model_parameters=params, config=cfg)
    per, micro = BATCH // world, BATCH // world // gas
    losses, snaps = [], []
    for (phase, during, at_step), (z, real) in zip(SCHEDULE[:steps], data(steps)):
        z, real = z[rank * per:(rank + 1) * per], real[rank * per:(rank + 1) * per]
        loss = 0.0
        for m in range(gas):
            _freeze(model, during)
            part = engine(z[m * micro:(m + 1) * micro], real[m * micro:(m + 1) * micro], phase)
            engine.backward(part)
            loss += part.item() / gas
            if m == gas - 1:
                _freeze(model, at_step)
            engine.step()
        t = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(t)
        losses.append(t.item() / world)
        snaps.append(_snapshot(model))
    return {"losses": losses, "params": snaps,
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()}}


def resume_mid_schedule(stage: int, groups: bool, save_dir: str, split: int) -> dict:
    """Train ``split`` steps (the generator frozen from the first, so it has no optimizer state
    yet), save, load into a fresh engine, train the rest: as if uninterrupted."""
    world, rank = dist.get_world_size(), dist.get_rank()
    per = BATCH // world
    snaps: list = []
    for part in (SCHEDULE[:split], SCHEDULE[split:]):
        model = build()
        params = [{"params": model.gen.parameters()}, {"params": model.disc.parameters()}] if groups else None
        engine, *_ = shardwise.initialize(model=model, model_parameters=params, config=config(stage))
        if snaps:
            engine.load_checkpoint(save_dir)
        offset = 0 if not snaps else split
        for (phase, during, at_step), (z, real) in zip(part, data(len(SCHEDULE))[offset:]):
            _freeze(model, during)
            engine.backward(engine(z[rank * per:(rank + 1) * per], real[rank * per:(rank + 1) * per], phase))
            _freeze(model, at_step)
            engine.step()
            snaps.append(_snapshot(model))
        if not offset:
            engine.save_checkpoint(save_dir)
    return {"params": snaps}


def partial_freeze(stage: int) -> str:
    """Freeze half of one optimizer bucket after initialize: a named error at the step."""
    model = build()
    engine, *_ = shardwise.initialize(model=model, config=config(stage))
    z, real = data(1)[0]
    rank, per = dist.get_rank(), BATCH // dist.get_world_size()
    model.disc[2].requires_grad_(False)  # at stage 3 a fetch unit of its own: honoured
    model.gen[0].weight.requires_grad_(False)  # shares a bucket / unit with gen[0].bias
    engine.backward(engine(z[rank * per:(rank + 1) * per], real[rank * per:(rank + 1) * per], "D"))
    try:
        engine.step()
    except Exception as exc:  # noqa: BLE001 - the test checks the type by name
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def stage3_frozen_units() -> dict:
    """A G step at stage 3: the frozen discriminator's full parameters do not require grad
    while it runs, nothing is reduced for its units, and its weights are unchanged."""
    model = build()
    engine, *_ = shardwise.initialize(model=model, config=config(3))
    rt = engine.strategy.runtime
    launched: list[str] = []
    orig = rt.reduction._launch

    def spy(shard):
        launched.append(next(u.name for u in rt.all_units() if shard in u.shards))
        orig(shard)

    rt.reduction._launch = spy
    seen: dict[str, list[bool]] = {}

    def record(name, module, args) -> None:  # after shardwise's pre-hook: the gathered parameters
        seen.setdefault(name, [(type(p).__name__, p.requires_grad) for p in module.parameters()])

    for name in ("disc.0", "gen.0"):
        model.get_submodule(name).register_forward_pre_hook(partial(record, name))
    z, real = data(1)[0]
    rank, per = dist.get_rank(), BATCH // dist.get_world_size()
    before = _snapshot(model)
    _freeze(model, "disc")
    engine.backward(engine(z[rank * per:(rank + 1) * per], real[rank * per:(rank + 1) * per], "G"))
    engine.step()
    after = _snapshot(model)
    return {"launched": launched, "seen": seen, "states": {u.name: u.state.value for u in rt.units},
            "changed": sorted(k for k in before if not torch.equal(before[k], after[k]))}


def requires_grad_round_trip() -> dict:
    """At stage 3 a freeze set on whichever object the module shows (placeholder while
    sharded, full parameter while gathered) or on one held from earlier reaches the other."""
    model = build()
    engine, *_ = shardwise.initialize(model=model, config=config(3))
    held = list(model.disc.parameters())  # placeholders now
    with shardwise.zero.GatheredParameters(list(model.disc.parameters())):
        shown = list(model.disc.parameters())  # the full parameters
        for p in shown:
            p.requires_grad_(False)
    out = {"kinds": [type(p).__name__ for p in held + shown],
           "after_gathered_freeze": [p.requires_grad for p in model.disc.parameters()]}
    with shardwise.zero.GatheredParameters(held):
        held[0].requires_grad_(True)  # a stale placeholder while its unit is gathered
    out["after_stale_unfreeze"] = [p.requires_grad for p in model.disc.parameters()]
    return out
