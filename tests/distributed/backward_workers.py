"""Workers for test_backward_forms.py: the ways DeepSpeed scripts run backward (issue 14,
items 4-5): ``engine.backward(loss)``, ``loss.backward()`` on the engine's output, several
backward passes per step, and two engines whose graphs cross (a GAN)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

import shardwise
import shardwise.zero
from parity_workers import _snapshot, batches, make_model

FORMS = ("engine", "direct", "twice", "twice_direct")


def _config(stage: int, world: int, gas: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": gas,
            "train_batch_size": 2 * gas * world, "gradient_clipping": 0.0, "steps_per_print": 1000,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000}}


def _micro(engine, xb, form: str) -> None:
    """One micro-batch of 2 sequences, its gradient taken the way ``form`` says. Every form
    yields the gradient of the mean loss over the 2 sequences."""
    if form in ("engine", "direct"):
        loss = engine(xb[:, :-1], xb[:, 1:])
        engine.backward(loss) if form == "engine" else loss.backward()
        return
    for i in range(2):  # one sequence at a time: half the micro-batch's mean each
        loss = engine(xb[i:i + 1, :-1], xb[i:i + 1, 1:]) * 0.5
        engine.backward(loss) if form == "twice" else loss.backward()


def forms_run(stages: list[int], gas: int, steps: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches(2 * gas * world, steps)
    out: dict = {}
    for stage in stages:
        for form in FORMS:
            model = make_model()
            engine, *_ = shardwise.initialize(model=model, config=_config(stage, world, gas))
            for x in data:
                for m in range(gas):
                    lo = (m * world + rank) * 2
                    _micro(engine, x[lo:lo + 2], form)
                    engine.step()
            out[(stage, form)] = {"params": _snapshot(model), "steps": engine.global_steps}
            engine.destroy()
    return out


class Gen(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 6))

    def forward(self, z):
        return self.net(z)


class Disc(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


def _gan_data(steps: int, batch: int):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(batch, 6, generator=g), torch.randn(batch, 4, generator=g)) for _ in range(steps)]


def gan_run(stage: int | None, steps: int, batch: int) -> dict:
    """The DCGAN tutorial's loop: D steps on real + fake (two backward calls), then G steps on
    D(G(z)), whose backward also reaches D's parameters (outside D's own backward); D's
    zero_grad() drops those. ``stage`` None: plain PyTorch, one process, whole batch."""
    torch.manual_seed(3)
    netG, netD = Gen(), Disc()
    bce = nn.BCEWithLogitsLoss()
    data = _gan_data(steps, batch)
    losses = []
    if stage is None:
        optD = torch.optim.Adam(netD.parameters(), lr=1e-2)
        optG = torch.optim.Adam(netG.parameters(), lr=1e-2)
        eD, eG, lo, hi = netD, netG, 0, batch
    else:
        rank, world = dist.get_rank(), dist.get_world_size()
        per = batch // world
        lo, hi = rank * per, (rank + 1) * per
        cfg = {"train_batch_size": batch, "gradient_clipping": 0.0, "steps_per_print": 1000,
               "zero_optimization": {"stage": stage}}
        eD, optD, _, _ = shardwise.initialize(model=netD, optimizer=torch.optim.Adam(netD.parameters(), lr=1e-2),
                                              config=cfg)
        eG, optG, _, _ = shardwise.initialize(model=netG, optimizer=torch.optim.Adam(netG.parameters(), lr=1e-2),
                                              config=cfg)
    for real, z in data:
        real, z = real[lo:hi], z[lo:hi]
        ones, zeros = torch.ones(len(real)), torch.zeros(len(real))
        eD.zero_grad()
        err_real = bce(eD(real), ones)
        fake = eG(z)
        err_fake = bce(eD(fake.detach()), zeros)
        if stage is None:
            err_real.backward()
            err_fake.backward()
            optD.step()
        else:
            eD.backward(err_real)
            eD.backward(err_fake)
            eD.step()
        eG.zero_grad()
        err_g = bce(eD(fake), ones)
        if stage is None:
            err_g.backward()
            optG.step()
        else:
            eG.backward(err_g)
            eG.step()
        losses.append([err_real.item(), err_fake.item(), err_g.item()])
    if stage is not None:
        t = torch.tensor(losses, dtype=torch.float64)
        dist.all_reduce(t)
        losses = (t / dist.get_world_size()).tolist()
    return {"losses": losses, "D": _snapshot(netD), "G": _snapshot(netG)}


def predivide_run(stages: list[int], steps: int) -> dict:
    """``prescale_gradients`` / ``gradient_predivide_factor`` per stage, with SGD (scale-sensitive,
    unlike Adam) and no clipping: losses, gradient norms and parameters per setting."""
    from parity_workers import shardwise_run

    settings = {"default": {}, "prescale": {"prescale_gradients": True},
                "predivide4": {"gradient_predivide_factor": 4.0}, "predivide1.5": {"gradient_predivide_factor": 1.5}}
    out = {}
    for stage in stages:
        for name, keys in settings.items():
            cfg = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0,
                   "steps_per_print": 1000, "optimizer": {"type": "SGD", "params": {"lr": 0.5}},
                   "zero_optimization": {"stage": stage}, **keys}
            r = shardwise_run(cfg, steps)
            out[(stage, name)] = {k: r[k] for k in ("losses", "norms", "params")}
    return out


def comm_surface_run() -> dict:
    """DeepSpeed's ``deepspeed.comm`` calls on shardwise.comm, torch.distributed's arguments."""
    import shardwise.comm as comm

    shardwise.init_distributed()  # already joined: a no-op
    rank, world = comm.get_rank(), comm.get_world_size()
    t = torch.tensor([float(rank + 1)])
    comm.all_reduce(t)
    b = torch.tensor([float(rank * 10)])
    comm.broadcast(b, 1)
    parts = [torch.zeros(1) for _ in range(world)]
    comm.all_gather(parts, torch.tensor([float(rank)]))
    flat = torch.zeros(world)
    comm.all_gather_into_tensor(flat, torch.tensor([float(rank)]))
    mine = torch.zeros(1)
    comm.reduce_scatter_tensor(mine, torch.arange(world, dtype=torch.float32) + rank)
    work = comm.all_reduce(torch.ones(1), async_op=True)
    work.wait()
    comm.barrier()
    # a script's own collectives show in the comms logger's summary
    from shardwise.comm.context import init_context
    from shardwise.config.plan import CommsLoggerPolicy
    from shardwise.profiling.comms import CommsLogger

    logger = CommsLogger(CommsLoggerPolicy(verbose=False, prof_all=True, prof_ops=()), init_context())
    comm.all_reduce(torch.ones(4))
    comm.all_reduce(torch.ones(4))
    logged = logger.summary().get("all_reduce", {})
    logger.close()
    return {"logged": (logged.get("count"), logged.get("bytes")),"sum": t.item(), "bcast": b.item(), "gather": [p.item() for p in parts], "flat": flat.tolist(),
            "rs": mine.item(), "world": world, "local_rank": comm.get_local_rank(), "backend": comm.get_backend()}


LAMB = {"lr": 2e-2, "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-6}


def lamb_reference(steps: int, global_batch: int) -> dict:
    """Per-parameter LAMB on the plain model, one process (shardwise.optim.Lamb on model tensors)."""
    from shardwise.optim.lamb import Lamb

    model = make_model()
    opt = Lamb(model.parameters(), lr=LAMB["lr"], weight_decay=LAMB["weight_decay"], betas=tuple(LAMB["betas"]),
               eps=LAMB["eps"])
    losses = []
    for x in batches(global_batch, steps):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "params": _snapshot(model)}


def lamb_run(stages: list[int], steps: int, global_batch: int) -> dict:
    from parity_workers import shardwise_run

    out = {}
    for stage in stages:
        cfg = {"train_batch_size": global_batch, "gradient_clipping": 0.0, "steps_per_print": 1000,
               "optimizer": {"type": "Lamb", "params": LAMB},
               "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000}}
        r = shardwise_run(cfg, steps)
        out[stage] = {"losses": r["losses"], "params": r["params"]}
    return out
