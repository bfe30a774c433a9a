"""Rank functions for test_mesh.py: independent data-parallel groups on a (replica, dp) mesh."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import shardwise
from parity_workers import _snapshot, batches, make_model
from shardwise.errors import UsageError

MESH = (2, 2)  # (replica, dp): ranks {0, 1} and {2, 3} are the two data-parallel groups


def data_seed(replica: int) -> int:
    return 1234 + 1000 * replica  # every group trains on its own batches


def grouped_run(config: dict, steps: int) -> dict:
    """Train on this rank's slice of its group's batches; losses averaged over the group."""
    mesh = init_device_mesh("cpu", MESH, mesh_dim_names=("replica", "dp"))
    replica = mesh.get_local_rank("replica")
    dp_rank, dp_size = mesh.get_local_rank("dp"), mesh.size(1)
    dp_group = mesh.get_group("dp")
    model = make_model()
    data = torch.utils.data.TensorDataset(torch.arange(16))
    engine, _, loader, _ = shardwise.initialize(model=model, config=config, mesh=mesh, training_data=data)
    ctx = engine.ctx
    micro = engine.train_micro_batch_size_per_gpu()
    losses = []
    for x in batches(engine.train_batch_size(), steps, seed=data_seed(replica)):
        mine = x[dp_rank * micro:(dp_rank + 1) * micro]
        loss = engine(mine[:, :-1], mine[:, 1:])
        engine.backward(loss)
        engine.step()
        t = torch.tensor([loss.item()], dtype=torch.float64)
        dist.all_reduce(t, group=dp_group)
        losses.append(t.item() / dp_size)
    try:
        engine.save_checkpoint("/nonexistent/never-written")
        refused = ""
    except UsageError as exc:
        refused = str(exc)
    return {
        "replica": replica,
        "losses": losses,
        "params": _snapshot(model),
        "same_ctx": engine.ctx is engine.strategy.ctx,
        "dp": (ctx.dp.rank, ctx.dp.size, ctx.dp.global_ranks),
        "replicas": ctx.dp_replicas,
        "sampler": (loader.sampler.num_replicas, loader.sampler.rank),
        "batch": (engine.train_batch_size(), micro),
        "refused": refused,
    }


def mesh_without_dp() -> str:
    mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("replica",))
    try:
        shardwise.initialize(model=make_model(), config={"train_batch_size": 4, "optimizer": {
            "type": "AdamW", "params": {"lr": 1e-3}}}, mesh=mesh)
    except UsageError as exc:
        return str(exc)
    return ""
