"""Peer systems for ``compare.py``: torch FSDP2, plain single-process PyTorch, DeepSpeed (optional).

Each builder takes the freshly seeded model and returns ``(step(x, y, marks) -> loss,
state_bytes() -> dict)`` like ``compare._build``. ``precision`` is ``"fp32"`` or ``"bf16"``;
for the torch peers bf16 means ``torch.autocast("cpu", dtype=torch.bfloat16)`` around the
forward with fp32 parameters, gradients and optimizer state (shardwise's bf16 instead keeps
bf16 parameters/gradients and fp32 master weights; see README.md).
"""
from __future__ import annotations

import contextlib
import importlib.util
import time

import torch
import torch.distributed as dist

HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
DS_SYSTEMS = ("ds0", "ds1", "ds2", "ds3")
# systems whose whole step runs on rank 0 alone (the other ranks wait at the next barrier)
RANK0_ONLY = ("plain",)



def engine_step(engine):
    """A timed step for any engine with DeepSpeed's API (shardwise or DeepSpeed): marks after
    forward and after backward."""

    def step(x, y, marks):
        loss = engine(x, y)
        marks.append(time.perf_counter())
        engine.backward(loss)
        marks.append(time.perf_counter())
        engine.step()
        return loss

    return step

def _autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(tensors) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        t = _local(t)
        s = t.untyped_storage()
        if s.nbytes() > 0 and s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def _torch_step(fwd, params, opt, precision: str, keep_grads: dict):
    def step(x, y, marks):
        with _autocast(precision):
            loss = fwd(x, y)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        # remember gradient bytes while they are live (freed by zero_grad(set_to_none=True))
        if "grads" not in keep_grads:
            keep_grads["grads"] = _nbytes(p.grad for p in params if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def _state(params, opt, keep_grads: dict):
    def state_bytes() -> dict:
        p = _nbytes(params)
        g = keep_grads.get("grads", 0)
        s = _nbytes(v for st in opt.state.values() for v in st.values())
        return {"params": p, "grads": g, "master_params": 0, "optimizer_state": s, "total": p + g + s}
    return state_bytes


def build_fsdp2(model, lr: float, wd: float, precision: str):
    """``fully_shard`` on each block, then on the root (embedding, tied head, final norm)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = list({id(p): p for p in model.parameters()}.values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=True)
    keep: dict = {}
    return _torch_step(model, params, opt, precision, keep), _state(params, opt, keep)


def build_plain(model, lr: float, wd: float, precision: str):
    """Single-process PyTorch on the whole global batch, on rank 0 only; other ranks return a
    NaN loss at once (compare.py takes plain's losses from rank 0)."""
    params = list({id(p): p for p in model.parameters()}.values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=True)
    keep: dict = {}
    inner = _torch_step(model, params, opt, precision, keep)
    rank = dist.get_rank()

    def step(x, y, marks):
        if rank != 0:
            marks += [time.perf_counter()] * 2
            return torch.tensor(float("nan"))
        return inner(x, y, marks)
    return step, _state(params, opt, keep)


def build_deepspeed(model, stage: int, bucket: int, lr: float, wd: float, precision: str,
                    global_batch: int):
    """DeepSpeed ZeRO-``stage`` (UNTESTED here: deepspeed is not installed on the machine this
    was written on). Needs ``DS_ACCELERATOR=cpu``; see shared/design/peers.md."""
    if not HAVE_DEEPSPEED:
        raise RuntimeError("deepspeed is not installed")
    import deepspeed  # noqa: F401  (guarded by HAVE_DEEPSPEED)

    world = dist.get_world_size()
    cfg = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": global_batch // world,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": wd}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": int(bucket),
                              "allgather_bucket_size": int(bucket), "overlap_comm": True},
        "steps_per_print": 1_000_000,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)

    step = engine_step(engine)

    def state_bytes() -> dict:
        opt = engine.optimizer
        p = _nbytes(engine.module.parameters())
        s = _nbytes(v for st in getattr(opt, "state", {}).values() for v in st.values())
        master = _nbytes(t for g in getattr(opt, "single_partition_of_fp32_groups", []) for t in [g])
        return {"params": p, "grads": 0, "master_params": master, "optimizer_state": s,
                "total": p + master + s}
    return step, state_bytes


def ideal_bytes(system: str, n_params: int, world: int, precision: str = "fp32") -> float:
    """Ideal model-state bytes per rank. fp32: 4 params + 4 grads + 8 AdamW per element (16Ψ),
    sharded per stage. bf16 applies to shardwise/DeepSpeed only (the torch peers autocast and
    keep fp32 state): 2 bf16 params + 4 fp32 gradients + 4 fp32 master + 8 AdamW (18Ψ), the
    gradients kept in fp32 as DeepSpeed's bf16 optimizer does (grad_accum_dtype fp32)."""
    psi = n_params
    if system in ("ddp", "plain"):
        return 16 * psi
    if system == "fsdp2" or (system in ("ds3", "zero3") and precision == "fp32"):
        return 16 * psi / world
    stage = int(system[-1])
    if precision == "bf16":
        return {0: 18 * psi, 1: 6 * psi + 12 * psi / world, 2: 2 * psi + 16 * psi / world,
                3: 18 * psi / world}[stage]
    return {0: 16 * psi, 1: 8 * psi + 8 * psi / world, 2: 4 * psi + 12 * psi / world, 3: 16 * psi / world}[stage]
