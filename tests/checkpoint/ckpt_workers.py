"""Rank functions for the checkpoint tests (importable in spawned ranks)."""
from __future__ import annotations

import errno
import os
import time

import torch
import torch.distributed as dist

import shardwise
import shardwise.zero
from model import GPT, GPTConfig
from shardwise.checkpoint import files as ckfiles
from shardwise.zero.pieces import regions, split_state
from shardwise.errors import CheckpointError

SEQ = 16


def config(stage: int, world: int, *, micro: int = 2, gas: int = 1, scheduler: bool = False,
           keep_last: int | None = None, bf16: bool = False, optimizer: str = "AdamW") -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas, "gradient_clipping": 0.0,
        "optimizer": {"type": optimizer, "params": {"lr": 1e-3, "weight_decay": 0.01}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 6000},
        "steps_per_print": 1000,
    }
    if optimizer == "SGD":
        cfg["optimizer"]["params"] = {"lr": 1e-2, "momentum": 0.9}
    if scheduler:
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3,
                                                           "warmup_num_steps": 15}}
    if keep_last:
        cfg["checkpoint"] = {"keep_last": keep_last}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def make_model(seed: int = 0, dropout: float = 0.0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny", dropout=dropout))


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 48, seed: int = 7):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, 64, (n, SEQ + 1), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def global_batches(n: int, size: int, seed: int = 99) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (size, SEQ + 1), generator=g) for _ in range(n)]


def whole_state(model) -> dict[str, torch.Tensor]:
    with shardwise.zero.GatheredParameters(list(model.parameters())):
        return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def optimizer_state(engine) -> list[dict]:
    return [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in engine.optimizer.state[b.opt_param].items()}
            for b in engine.strategy.buckets]


def per_param_state(engine) -> dict:
    """{name: {"param": full tensor, state key: [(start, tensor piece)]}} for this rank."""
    out = {}
    regs = regions(engine.module, engine.strategy.buckets)
    with shardwise.zero.GatheredParameters(list(engine.module.parameters())):  # whole at stage 3 too
        whole = dict(engine.module.named_parameters())
        values = {reg.name: whole[reg.name].detach().float().reshape(-1).clone() for reg in regs}
    for reg in regs:
        elementwise, _ = split_state(engine.optimizer, reg.bucket)
        a, b = reg.clip(reg.bucket.lo, reg.bucket.hi)
        entry = {"param": values[reg.name]}
        for k, t in {"master": reg.bucket.opt_param.detach(), **elementwise}.items():
            entry[k] = [(a, reg.opt_slice(t, a, b).clone())] if a < b else []
        out[reg.name] = entry
    return out


# -- (1) bit-for-bit resume through the engine's own data loader ----------------------------


def _train(engine, loader, until: int, save_at: int | None = None, ckpt: str | None = None) -> list[float]:
    losses = []
    epoch = loader.sampler.epoch
    while engine.global_steps < until:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            loss = engine(batch[:, :-1], batch[:, 1:])
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            if engine.micro_steps % engine.gradient_accumulation_steps() == 0:
                if engine.global_steps == save_at:
                    engine.save_checkpoint(ckpt, client_state={"epoch": epoch, "note": "mid-epoch"})
                if engine.global_steps >= until:
                    break
        else:
            epoch += 1
    return losses


def resume_run(ckpt: str, phase: str, stage: int = 2) -> dict:
    world = dist.get_world_size()
    model = make_model(dropout=0.1)
    engine, _, loader, _ = shardwise.initialize(
        model=model, config=config(stage, world, gas=2, scheduler=True), training_data=Tokens())
    client = None
    if phase == "straight":
        torch.manual_seed(1000 + dist.get_rank())  # dropout masks differ per rank
        losses = _train(engine, loader, 20, save_at=10, ckpt=ckpt)
        losses = losses[len(losses) // 2:]
    else:
        torch.manual_seed(5)  # overwritten by the checkpoint's RNG state
        _, client = engine.load_checkpoint(ckpt)
        losses = _train(engine, loader, 20)
    return {"losses": losses, "params": whole_state(model),
            "optim": optimizer_state(engine), "lr": engine.get_lr(), "client": client,
            "counters": (engine.global_steps, engine.global_samples, engine.micro_steps, engine.skipped_steps)}


# -- (2) reshard ------------------------------------------------------------------------------


def _step(engine, x: torch.Tensor) -> None:
    rank, world = engine.ctx.rank, engine.ctx.world_size
    per = x.shape[0] // world
    xb = x[rank * per:(rank + 1) * per]
    engine.backward(engine(xb[:, :-1], xb[:, 1:]))
    engine.step()


def reshard_save(ckpt: str, stage: int, steps: int, bf16: bool = False, optimizer: str = "AdamW") -> dict:
    world = dist.get_world_size()
    model = make_model()
    engine, *_ = shardwise.initialize(model=model, config=config(stage, world, micro=12 // world, bf16=bf16,
                                                                 optimizer=optimizer))
    data = global_batches(steps + 1, 12)
    for x in data[:steps]:
        _step(engine, x)
    engine.save_checkpoint(ckpt)
    saved = per_param_state(engine)
    _step(engine, data[steps])
    return {"saved": saved, "next": whole_state(model)}


def reshard_load(ckpt: str, stage: int, steps: int, bf16: bool = False, optimizer: str = "AdamW") -> dict:
    world = dist.get_world_size()
    model = make_model(seed=123)  # different weights: the load must overwrite them all
    engine, *_ = shardwise.initialize(model=model, config=config(stage, world, micro=12 // world, bf16=bf16,
                                                                 optimizer=optimizer))
    engine.load_checkpoint(ckpt)
    loaded = per_param_state(engine)
    _step(engine, global_batches(steps + 1, 12)[steps])
    return {"saved": loaded, "next": whole_state(model),
            "global_steps": engine.global_steps}


# -- (3) faults ---------------------------------------------------------------------------------


def disk_full(ckpt: str) -> dict:
    """A stale .tmp dir from an earlier crash, then a good save, then ENOSPC on rank 1."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    engine, *_ = shardwise.initialize(model=model, config=config(1, world, keep_last=1))
    data = global_batches(2, 2 * world)
    _step(engine, data[0])
    if rank == 0:
        stale = os.path.join(ckpt, ".tmp-global_step1")
        os.makedirs(stale)
        with open(os.path.join(stale, "rank00000.safetensors"), "wb") as f:
            f.write(b"partial")
    dist.barrier()
    first = engine.save_checkpoint(ckpt)
    _step(engine, data[1])
    if rank == 1:
        def full_disk(f, data, path, written, total, r):
            raise ckfiles._write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path, written, total, r)

        ckfiles.write_bytes = full_disk
    try:
        engine.save_checkpoint(ckpt)
        second = "no error"
    except CheckpointError as exc:
        second = str(exc)
    return {"first": first, "error": second, "listing": sorted(os.listdir(ckpt))}


def save_on_rank0_only(ckpt: str) -> str:
    from shardwise.checkpoint import save_checkpoint

    model = make_model()
    engine, *_ = shardwise.initialize(model=model, config=config(0, dist.get_world_size()))
    if dist.get_rank() == 0:
        try:
            save_checkpoint(engine, ckpt, timeout_s=2.0)
        except CheckpointError as exc:
            return str(exc)
        return "no error"
    time.sleep(4.0)
    return "skipped"


def killed_during_write(ckpt: str) -> None:
    """Rank 1 is SIGKILLed half-way through writing its second checkpoint."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    engine, *_ = shardwise.initialize(model=model, config=config(2, world))
    _step(engine, global_batches(1, 2 * world)[0])
    engine.save_checkpoint(ckpt)
    if rank == 1:
        real = ckfiles.write_bytes

        def die(f, data, path, written, total, r):
            if written > 0:
                f.flush()
                os.kill(os.getpid(), 9)
            real(f, data, path, written, total, r)

        ckfiles.write_bytes = die
    engine.save_checkpoint(ckpt, tag="second")


def save_16bit_run(out_dir: str, stage: int, bf16: bool, filename: str) -> dict:
    """Two steps at ``stage``, then ``engine.save_16bit_model``; returns the whole parameters
    as the engine sees them (compute dtype) for comparison with the file."""
    world, rank = dist.get_world_size(), dist.get_rank()
    model = make_model()
    engine, *_ = shardwise.initialize(model=model, config=config(stage, world, bf16=bf16))
    for x in global_batches(2, 2 * world):
        mine = x[2 * rank:2 * rank + 2]
        engine.backward(engine(mine[:, :-1], mine[:, 1:]))
        engine.step()
    assert engine.save_16bit_model(out_dir, filename) is True
    assert os.path.exists(os.path.join(out_dir, filename))  # on every rank once the call returns
    with shardwise.zero.GatheredParameters(list(model.parameters())):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- (4) a very small model for the fuzz test and the format-1 fixture -------------------------


class Small(torch.nn.Module):
    """Every kind of entry a checkpoint holds, in ~150 numbers: a tied weight (emb = head), a
    frozen parameter, a persistent buffer. ``extra`` adds a 64-element parameter alone in its
    bucket, so that at world 2 it has two pieces of equal length (the format-1 fixture has none)."""

    def __init__(self, extra: bool = False):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.lin = torch.nn.Linear(6, 5)
        self.out = torch.nn.Linear(5, 6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight
        self.frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 5))
        self.gate = torch.nn.Parameter(torch.randn(64)) if extra else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x[:, :-1])
        h = self.out(torch.tanh(self.lin(h)) * self.scale) + self.frozen.sum()
        logits = self.head(h)
        if self.gate is not None:
            logits = logits + (self.gate * self.gate).mean()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 11), x[:, 1:].reshape(-1))


def small_config(stage: int = 0, world: int = 1) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0, "steps_per_print": 1000,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                         "warmup_num_steps": 5}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 40}}


def small_engine(seed: int = 0, steps: int = 2, stage: int = 0, extra: bool = False):
    torch.manual_seed(seed)
    model = Small(extra)
    world = dist.get_world_size() if dist.is_initialized() else 1
    engine, *_ = shardwise.initialize(model=model, config=small_config(stage, world))
    small_steps(engine, steps, seed)
    return engine, model


def small_steps(engine, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(1000 + seed + engine.global_steps)
    rank, world = engine.ctx.rank, engine.ctx.world_size
    for _ in range(steps):
        x = torch.randint(0, 11, (2 * world, 5), generator=g)
        engine.backward(engine(x[2 * rank:2 * rank + 2]))
        engine.step()


# -- (5) failed loads at 2 ranks: every rank raises the same error, no rank changed anything ----


def two_rank_cases(root: str) -> dict:
    """Save the small model at world 2 / ZeRO-1 (kept as ``root/pristine`` for the fuzz test),
    then load damaged copies of it on both ranks."""
    import shutil

    import ckpt_corrupt as C

    rank = dist.get_rank()
    engine, _ = small_engine(stage=1, extra=True)
    ckpt = engine.save_checkpoint(os.path.join(root, "save"), tag="global_step2")
    small_steps(engine, 1)  # the live state now differs from the checkpoint
    if rank == 0:
        shutil.copytree(os.path.dirname(ckpt), os.path.join(root, "pristine"), symlinks=True)

    def drop_global_steps(doc):
        del doc["counters"]["global_steps"]

    def empty_rank1(doc):
        doc["ranks"][1] = {}

    def bad_rng_rank1(doc):
        doc["ranks"][1]["rng"]["torch"] = "AAAA"

    def lr_string(doc):
        doc["param_groups"][0]["lr"] = "0.1"

    cases = {"missing global_steps": drop_global_steps, "empty ranks[1]": empty_rank1,
             "rank 1's torch RNG state garbage": bad_rng_rank1, "lr a string": lr_string}
    out = {}
    for name, edit in cases.items():
        d = os.path.join(root, name.replace(" ", "_").replace("'", ""))
        if rank == 0:
            shutil.copytree(os.path.dirname(ckpt), d, symlinks=True)
            C.edit_doc(os.path.join(d, "global_step2"), edit)
        dist.barrier()
        before = C.snapshot(engine)
        try:
            engine.load_checkpoint(d)
            result = "loaded"
        except Exception as exc:  # noqa: BLE001 - the test checks the type
            result = f"{type(exc).__name__}: {exc}"
        out[name] = {"result": result, "unchanged": C.same(before, C.snapshot(engine))}
    return out


# -- (6) the committed fixtures of older formats --------------------------------------------------


def fixture_save(out_dir: str, stage: int = 1) -> dict:
    """``small_engine(seed=0, steps=2, extra=True)`` at this world size and ``stage``, saved
    under ``out_dir`` as ``global_step2``; returns this rank's view of what was saved (for
    ``fixtures/make_fixture.py``, which merges the ranks' views into the expected values)."""
    engine, model = small_engine(seed=0, steps=2, stage=stage, extra=True)
    engine.save_checkpoint(out_dir, tag="global_step2")
    return {"model": whole_state(model), "state": per_param_state(engine), "global_steps": engine.global_steps,
            "lr": engine.get_lr()}


# -- (7) DeepSpeed's checkpoint API at 2 ranks, ZeRO-3 (test_ckpt_deepspeed_api.py) ------------------


def deepspeed_api_case(root: str) -> dict:
    """Empty / missing directory and a broken ``latest`` on both ranks; an integer tag with a
    non-JSON client_state; ``load_module_strict=False`` both ways (a parameter only the
    checkpoint has, one only the model has: gathered at stage 3) and a checkpoint saved with
    ``exclude_frozen_parameters=True``. Returns what the test compares."""
    import random

    import numpy as np

    rank = dist.get_rank()
    out: dict = {}
    a, model_a = small_engine(seed=0, steps=2, stage=3, extra=True)
    out["empty"] = a.load_checkpoint(os.path.join(root, "empty"))  # does not exist
    os.makedirs(os.path.join(root, "empty"), exist_ok=True)
    out["empty2"] = a.load_checkpoint(os.path.join(root, "empty"))  # exists, empty
    if rank == 0:
        os.makedirs(os.path.join(root, "broken"))
        with open(os.path.join(root, "broken", "latest"), "w") as f:
            f.write("global_step9")
    dist.barrier()
    try:
        a.load_checkpoint(os.path.join(root, "broken"))
        out["broken"] = "loaded"
    except CheckpointError as exc:
        out["broken"] = f"CheckpointError: {exc}"
    client = {"torch_rng": torch.get_rng_state(), "np_rng": np.random.get_state(), "py_rng": random.getstate(),
              "rank": rank, "t": torch.arange(4.0)}
    ckpt = os.path.join(root, "ckpt")
    out["path_a"] = a.save_checkpoint(ckpt, tag=7, client_state=client)
    out["saved_a"] = whole_state(model_a)
    _, back = a.load_checkpoint(ckpt, tag=7)
    out["client_ok"] = (back["rank"] == 0 and type(back["np_rng"]) is tuple and torch.equal(back["t"], client["t"])
                        and (rank != 0 or torch.equal(back["torch_rng"], client["torch_rng"])))

    # B has no `gate`: a checkpoint tensor the model lacks is ignored with load_module_strict=False
    b, model_b = small_engine(seed=5, steps=0, stage=3, extra=False)
    try:
        b.load_checkpoint(ckpt, tag=7)
        out["strict"] = "loaded"
    except CheckpointError as exc:
        out["strict"] = str(exc)
    out["loaded_b"] = b.load_checkpoint(ckpt, tag=7, load_module_strict=False)[0]
    out["state_b"] = whole_state(model_b)
    small_steps(b, 1, seed=3)  # trains on after the lenient load
    with shardwise.zero.GatheredParameters([model_b.frozen], modifier_rank=0):
        if rank == 0:
            model_b.frozen.data.fill_(7.0)  # a frozen value that only B has: excluded from its save
    b.save_checkpoint(os.path.join(root, "b"), tag="b", exclude_frozen_parameters=True)
    out["state_b_saved"] = whole_state(model_b)

    # A loads B's checkpoint: `gate` (only in A) and `frozen` (excluded) keep A's current values
    before = whole_state(model_a)
    try:
        a.load_checkpoint(os.path.join(root, "b"))
        out["strict_excluded"] = "loaded"
    except CheckpointError as exc:
        out["strict_excluded"] = str(exc)
    out["unchanged_after_refusal"] = all(torch.equal(v, before[k]) for k, v in whole_state(model_a).items())
    a.load_checkpoint(os.path.join(root, "b"), load_module_strict=False)
    out["before_a"], out["after_a"] = before, whole_state(model_a)
    small_steps(a, 1, seed=4)
    out["steps_a"] = a.global_steps
    return out
