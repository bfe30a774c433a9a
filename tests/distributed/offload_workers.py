"""Workers for test_offload.py: the same training with offload none / cpu / nvme.

A small MLP whose buckets (``reduce_bucket_size`` 96 elements) or stage-3 units (one per
layer) give several chunks per rank, and ``sub_group_size`` 150 several tiles, trained 5
steps; each rank returns the losses, the whole parameters after every step, its optimizer
state (the pieces the checkpoint would write) and what ``memory_report`` and the swap
directory showed, so the test can check that the state really lived where the config said.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

import shardwise
import shardwise.zero

BATCH, D = 12, 12


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(D, D) for _ in range(4))
        self.head = nn.Linear(D, 1)

    def forward(self, x, y):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return nn.functional.mse_loss(self.head(x), y)


def data(steps: int, gas: int):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(BATCH, D, generator=g), torch.randn(BATCH, 1, generator=g)) for _ in range(steps)]


OPTIMIZERS = {
    "adamw": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
    "adam": {"type": "Adam", "params": {"lr": 1e-2}},
    "sgd": {"type": "SGD", "params": {"lr": 5e-2, "momentum": 0.9}},
    "adagrad": {"type": "Adagrad", "params": {"lr": 5e-2}},
}


def config(stage: int, offload: dict | None, optimizer: str, *, precision: str = "fp32", gas: int = 1,
           clip: float = 0.0, nvme_path: str | None = None, **zero) -> dict:
    cfg = {"train_batch_size": BATCH, "gradient_accumulation_steps": gas, "steps_per_print": 1000,
           "gradient_clipping": clip,
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 96, "sub_group_size": 150,
                                 "stage3_param_persistence_threshold": 0, **zero}}
    if optimizer != "client":
        cfg["optimizer"] = OPTIMIZERS[optimizer]
    if precision != "fp32":
        cfg[precision] = {"enabled": True}
    if offload:
        off = dict(offload)
        if off.get("device") == "nvme":
            off.setdefault("nvme_path", nvme_path)
        cfg["zero_optimization"]["offload_optimizer"] = off
    return cfg


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    with shardwise.zero.GatheredParameters(list(model.parameters())):
        return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def optimizer_state(engine) -> dict[str, torch.Tensor]:
    """This rank's chunk of every parameter (fp32 master) and optimizer state, by piece key."""
    return {p.key: p.tensor.detach().clone() for p in engine.strategy.state_pieces(engine.module)}


def swap_files(root: str | None) -> dict[str, int]:
    out = {}
    if root and os.path.isdir(root):
        for dirpath, _, files in os.walk(root):
            for f in files:
                path = os.path.join(dirpath, f)
                out[os.path.relpath(path, root)] = os.path.getsize(path)
    return out


def train(stage: int, offload: dict | None, optimizer: str = "adamw", steps: int = 5, *, precision: str = "fp32",
          gas: int = 1, clip: float = 0.0, nvme_path: str | None = None, zero: dict | None = None) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = MLP()
    cfg = config(stage, offload, optimizer, precision=precision, gas=gas, clip=clip, nvme_path=nvme_path,
                 **(zero or {}))
    client = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True) if optimizer == "client" else None
    engine, *_ = shardwise.initialize(model=model, config=cfg, optimizer=client)
    per, micro = BATCH // world, BATCH // world // gas
    losses, params, reports, files = [], [], [], []
    for x, y in data(steps, gas):
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        loss = 0.0
        for m in range(gas):
            part = engine(x[m * micro:(m + 1) * micro], y[m * micro:(m + 1) * micro])
            engine.backward(part)
            loss += part.float().item() / gas
            engine.step()
        t = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(t)
        losses.append(t.item() / world)
        params.append(snapshot(model))
        reports.append(engine.memory_report())
        files.append(swap_files(nvme_path))
    state = optimizer_state(engine)
    return {"losses": losses, "params": params, "state": state, "reports": reports, "files": files,
            "state_after": optimizer_state(engine), "files_after": swap_files(nvme_path)}


def _train_steps(engine, model, batches, rank: int, world: int) -> list[float]:
    per = BATCH // world
    out = []
    for x, y in batches:
        loss = engine(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
        engine.backward(loss)
        engine.step()
        t = torch.tensor([loss.item()], dtype=torch.float64)
        dist.all_reduce(t)
        out.append(t.item() / world)
    return out


def save_then_train(stage: int, offload: dict | None, save_dir: str, nvme_path: str | None, steps: int = 3,
                    more: int = 2) -> dict:
    """Train ``steps``, save, train ``more``: the state at the save and the losses after it."""
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = MLP()
    engine, *_ = shardwise.initialize(model=model, config=config(stage, offload, "adamw", nvme_path=nvme_path))
    batches = data(steps + more, 1)
    _train_steps(engine, model, batches[:steps], rank, world)
    engine.save_checkpoint(save_dir, tag="t")
    saved = snapshot(model)
    after = _train_steps(engine, model, batches[steps:], rank, world)
    return {"saved": saved, "after": after, "params": snapshot(model)}


def load_then_train(stage: int, offload: dict | None, save_dir: str, nvme_path: str | None, steps: int = 3,
                    more: int = 2) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(1)  # other initial weights: the load must replace them all
    model = MLP()
    engine, *_ = shardwise.initialize(model=model, config=config(stage, offload, "adamw", nvme_path=nvme_path))
    engine.load_checkpoint(save_dir, tag="t")
    loaded = snapshot(model)
    after = _train_steps(engine, model, data(steps + more, 1)[steps:], rank, world)
    return {"loaded": loaded, "after": after, "params": snapshot(model)}


def damaged_swap(stage: int, damage: str, nvme_path: str) -> str:
    """Train one step with the state on disk, damage this rank's swap files, step again: the
    named error (every rank sees it in its own files)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = MLP()
    engine, *_ = shardwise.initialize(model=model, config=config(stage, {"device": "nvme"}, "adamw",
                                                                 nvme_path=nvme_path))
    batches = data(2, 1)
    _train_steps(engine, model, batches[:1], rank, world)
    swp = sorted(p for p in swap_files(nvme_path) if p.endswith("exp_avg.swp") and f"rank{rank}" in p)
    path = os.path.join(nvme_path, swp[0])
    if damage == "truncate":
        os.truncate(path, 4096)
    elif damage == "delete":
        os.unlink(path)
    try:
        _train_steps(engine, model, batches[1:], rank, world)
    except Exception as exc:  # noqa: BLE001 - the test checks the type and message
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def built_under_init(remote_device: str | None, nvme_path: str, steps: int = 3) -> dict:
    """The MLP built under ``zero.Init(remote_device=...)``, stage 3 with parameters and
    optimizer state on disk: what construction left in memory and on disk, then training."""
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = config(3, {"device": "nvme"}, "adamw", nvme_path=nvme_path)
    cfg["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": nvme_path}
    torch.manual_seed(0)
    with shardwise.zero.Init(config=cfg, remote_device=remote_device):
        model = MLP()
        spilled = sum(1 for f in swap_files(nvme_path) if "-init" in f and f"rank{rank}/" in f and f.endswith(".swp"))
        kept = [p.store._chunk is not None for p in model.parameters()]
    engine, *_ = shardwise.initialize(model=model, config=cfg)
    losses = _train_steps(engine, model, data(steps, 1), rank, world)
    import gc

    gc.collect()
    left = sum(1 for f in swap_files(nvme_path) if "-init" in f)
    return {"spilled": spilled, "kept_in_memory": kept, "losses": losses, "params": snapshot(model),
            "init_files_after": left}


def budget_error(budget: str, nvme_path: str) -> str:
    cfg = config(2, {"device": "nvme", "buffer_count": 6, "pipeline_read": True}, "adamw", nvme_path=nvme_path)
    cfg["offload"] = {"host_memory_budget": budget}
    torch.manual_seed(0)
    try:
        shardwise.initialize(model=MLP(), config=cfg)
    except Exception as exc:  # noqa: BLE001 - the test checks type and message
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def measured_reports(cases: list, nvme_path: str) -> list[dict]:
    """``memory_report()`` after one step for each (stage, precision, optimizer offload, param offload)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    out = []
    for stage, precision, opt, param in cases:
        torch.manual_seed(0)
        model = MLP()
        cfg = config(stage, opt, "adamw", precision=precision, nvme_path=nvme_path)
        if param:
            cfg["zero_optimization"]["offload_param"] = {**param, "nvme_path": nvme_path} \
                if param.get("device") == "nvme" else param
        engine, *_ = shardwise.initialize(model=model, config=cfg)
        _train_steps(engine, model, data(1, 1), rank, world)
        out.append(engine.memory_report())
        engine.destroy()
    return out


def two_engines(nvme_path: str) -> dict:
    """A second engine in one process: fine once the first is dropped; a named error while it lives."""
    cfg = config(2, {"device": "nvme"}, "adamw", nvme_path=nvme_path)
    first, *_ = shardwise.initialize(model=MLP(), config=cfg)
    try:
        shardwise.initialize(model=MLP(), config=cfg)
        alive = "no error"
    except Exception as exc:  # noqa: BLE001 - the test checks the message
        alive = f"{type(exc).__name__}: {exc}"
    del first
    second, *_ = shardwise.initialize(model=MLP(), config=cfg)
    second.destroy()
    return {"alive": alive}
