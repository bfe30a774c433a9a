"""Rank functions for the Lightning tests (importable in the ranks ``run_distributed`` starts).

Each rank builds its own ``Trainer(devices=2, num_nodes=1, accelerator="cpu",
plugins=[LightningEnvironment()])``: the process group already exists (``run_distributed``'s
file store) and ``LOCAL_RANK`` is set, so Lightning's launcher starts nothing and its
``_init_dist_connection`` keeps the group; ``shardwise.initialize`` joins the same group.
"""
from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.fabric.plugins.environments import LightningEnvironment
from torch.utils.data import DataLoader, TensorDataset

import shardwise.zero
from shardwise.integrations.lightning import ShardwiseStrategy

SAMPLES = 56  # 2 ranks x batch 4 -> 7 batches per rank and epoch (an odd window with accumulation 2)
BATCH = 4


def dataset(n: int = SAMPLES, seed: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, :4] * 0.5).sin() + 0.1 * torch.randn(n, 4, generator=g))


class MLP(pl.LightningModule):
    def __init__(self, hidden: int = 16, lr: float = 1e-2, opt: str = "adamw"):
        super().__init__()
        self.save_hyperparameters()  # plain values: they go into the checkpoint's client_state
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 4))
        self.losses: list[float] = []
        self.val_losses: list[float] = []
        self.lrs: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_losses.append(F.mse_loss(self.net(x), y).item())

    def configure_optimizers(self):
        if self.hparams.opt == "sgd":  # clipping matters to SGD (Adam is nearly blind to a gradient's scale)
            opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)  # Lightning steps it per step
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(dataset(), batch_size=BATCH, shuffle=True)

    def val_dataloader(self):
        return DataLoader(dataset(16, seed=9), batch_size=BATCH)


class Record(pl.Callback):
    """Per optimizer step: the learning rate and (under shardwise) the engine's grad norm before clipping."""

    def __init__(self):
        self.grad_norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        engine = getattr(trainer.strategy, "engine", None)
        if engine is not None and engine.get_global_grad_norm() is not None:
            self.grad_norms.append(float(engine.get_global_grad_norm()))


def whole_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (gathered at stage 3; a no-op otherwise), in fp32 on the CPU."""
    with shardwise.zero.GatheredParameters(list(model.parameters())):
        return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def fit(strategy: Any, max_epochs: int, ckpt_path: str | None = None, save_to: str | None = None,
        hparams: dict | None = None, **trainer_kwargs: Any) -> dict:
    pl.seed_everything(0, verbose=False)
    model = MLP(**(hparams or {}))
    record = Record()
    trainer = pl.Trainer(strategy=strategy, devices=2, num_nodes=1, accelerator="cpu",
                         plugins=[LightningEnvironment()], max_epochs=max_epochs, callbacks=[record],
                         enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, num_sanity_val_steps=0, **trainer_kwargs)
    trainer.fit(model, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)  # after fit: the engine outlives Lightning's teardown
    engine = getattr(trainer.strategy, "engine", None)
    return {
        "strategy": type(trainer.strategy).__name__, "stage": engine.zero_optimization_stage() if engine else None,
        "losses": model.losses, "val_losses": model.val_losses, "lrs": model.lrs, "grad_norms": record.grad_norms,
        "global_step": trainer.global_step, "epoch": trainer.current_epoch, "params": whole_params(model),
        "sharded": engine is not None and any(p.numel() == 0 or type(p).__name__ != "Parameter"
                                              for p in model.parameters()),
    }


STAGE3 = {"steps_per_print": 1000}
CLIP = 0.3  # between the smallest and the largest gradient norm of the run: some steps clip, some do not


def suite(tmp: str) -> dict:
    """Every 2-rank case in one launch (Lightning's import costs seconds per process)."""
    out: dict[str, Any] = {}
    out["ddp"] = fit("ddp", 2)
    out["sw3"] = fit(ShardwiseStrategy(stage=3, config=STAGE3), 2)
    out["sw2"] = fit("shardwise_stage_2", 2)  # the registered name
    clip = dict(accumulate_grad_batches=2, gradient_clip_val=CLIP, limit_val_batches=0,
                hparams={"opt": "sgd", "lr": 0.1})
    out["ddp_acc"] = fit("ddp", 1, **clip)
    out["sw3_acc"] = fit("shardwise_stage_3", 1, **clip)
    path = os.path.join(tmp, "epoch1.ckpt")
    out["first"] = fit(ShardwiseStrategy(stage=3, config=STAGE3), 1, save_to=path)
    out["ckpt_entries"] = sorted(os.listdir(path))
    out["resumed"] = fit(ShardwiseStrategy(stage=3, config=STAGE3), 2, ckpt_path=path)
    out["refusals"] = refusals(tmp)
    return out


class Manual(MLP):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


def _error(call) -> tuple[str, str] | None:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test checks the type and the message
        return type(exc).__name__, str(exc)
    return None


def _trainer(strategy: Any, **kw: Any) -> pl.Trainer:
    return pl.Trainer(strategy=strategy, devices=2, num_nodes=1, accelerator="cpu", plugins=[LightningEnvironment()],
                      max_epochs=1, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kw)


def refusals(tmp: str) -> dict:
    """What ShardwiseStrategy refuses once the ranks run (each raises in setup, on every rank alike)."""
    import torch.distributed as dist

    plain = os.path.join(tmp, "plain.ckpt")
    if dist.get_rank() == 0:
        torch.save({"state_dict": {}}, plain)
    dist.barrier()
    return {
        "validate": _error(lambda: _trainer("shardwise_stage_2").validate(MLP())),
        "manual": _error(lambda: _trainer("shardwise_stage_2").fit(Manual())),
        "accumulation_conflict": _error(lambda: _trainer(
            ShardwiseStrategy(stage=2, config={"gradient_accumulation_steps": 3}), accumulate_grad_batches=2).fit(MLP())),
        "plain_ckpt": _error(lambda: _trainer("shardwise_stage_2").fit(MLP(), ckpt_path=plain)),
    }


def script_main(out_dir: str) -> None:
    """The README's example as a script: Lightning's own launcher starts the second process
    (it re-runs this file with LOCAL_RANK set) and builds the process group; the default
    ModelCheckpoint saves through the strategy at the end of the epoch."""
    import json

    import shardwise.integrations.lightning  # noqa: F401  registers "shardwise_stage_3"

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = MLP()
    trainer = pl.Trainer(strategy="shardwise_stage_3", devices=2, accelerator="cpu", max_epochs=1,
                         default_root_dir=out_dir, enable_progress_bar=False, logger=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model)
    result = {"losses": model.losses, "stage": trainer.strategy.engine.zero_optimization_stage(),
              "world": trainer.world_size, "step": trainer.global_step,
              "best": trainer.checkpoint_callback.best_model_path}
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    import sys

    script_main(sys.argv[1])
