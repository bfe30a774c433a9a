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


def _reachable_tensors(root, max_depth: int = 12) -> list[torch.Tensor]:
    """Every tensor reachable from ``root`` through DeepSpeed's and torch's own objects
    (attributes, containers, ``.grad``, a parameter's ``__dict__`` such as ZeRO-3's ``ds_tensor``), for
    counting what an engine holds without relying on its private attribute names."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [(root, 0)]
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen or depth > max_depth:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            out.append(obj)
            if obj.is_leaf and obj.grad is not None:
                stack.append((obj.grad, depth + 1))
            if isinstance(obj, torch.nn.Parameter) or obj.__dict__:
                stack.extend((v, depth + 1) for v in vars(obj).values())
            continue
        if isinstance(obj, dict):
            stack.extend((v, depth + 1) for v in obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in obj)
        elif type(obj).__module__.split(".")[0] in ("deepspeed", "torch") and hasattr(obj, "__dict__"):
            if isinstance(obj, torch.nn.Module):
                stack.extend((t, depth + 1) for t in obj.parameters())
                stack.extend((t, depth + 1) for t in obj.buffers())
            else:
                stack.extend((v, depth + 1) for v in vars(obj).values())
    return out


def build_deepspeed(model, stage: int, bucket: int, lr: float, wd: float, precision: str,
                    global_batch: int):
    """DeepSpeed ZeRO-``stage`` with the same optimizer, batch and bucket sizes as shardwise's
    rows. Needs ``DS_ACCELERATOR=cpu`` on a machine without a GPU (compare.py sets it); see
    shared/design/peers.md. ``gradient_clipping`` is set to 0 explicitly: DeepSpeed >= 0.19
    clips at 1.0 when the key is absent, and the torch peers do not clip."""
    if not HAVE_DEEPSPEED:
        raise RuntimeError("deepspeed is not installed")
    import deepspeed  # noqa: F401  (guarded by HAVE_DEEPSPEED)

    world = dist.get_world_size()
    cfg = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": global_batch // world,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": wd}},
        "gradient_clipping": 0.0,
        # stage 3: reduce_bucket_size sizes DeepSpeed's gradient bucket (its 5e8-element default
        # allocates 2 GiB per rank); allgather_bucket_size applies to stages 1-2 only
        "zero_optimization": {"stage": stage, "overlap_comm": True, "reduce_bucket_size": int(bucket),
                              **({"allgather_bucket_size": int(bucket)} if stage < 3 else {})},
        "steps_per_print": 1_000_000,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)

    def breakdown() -> dict:
        """Bytes of every tensor the engine can reach, by role: optimizer state (the inner
        optimizer's ``state``), parameters (module parameters and ZeRO-3's per-parameter
        partitions), master weights (the optimizer's own fp32 partitions where they are separate
        tensors) and the rest (gradients, gradient partitions, reduce buffers), each storage once."""
        opt = engine.optimizer
        inner = getattr(opt, "optimizer", opt)
        counted: set[int] = set()

        def take(tensors) -> int:
            total = 0
            for t in tensors:
                st = _local(t).untyped_storage()
                if st.nbytes() > 0 and st.data_ptr() not in counted:
                    counted.add(st.data_ptr())
                    total += st.nbytes()
            return total

        state = take(v for st in inner.state.values() for v in st.values() if isinstance(v, torch.Tensor))
        params = take(list(engine.module.parameters())
                      + [p.ds_tensor for p in engine.module.parameters() if hasattr(p, "ds_tensor")])
        master = take(t for g in inner.param_groups for t in g["params"])
        rest = take(_reachable_tensors(engine))
        return {"params": params, "grads": rest, "master_params": master, "optimizer_state": state,
                "total": params + rest + master + state}

    # measured once, between backward and the optimizer step of the second step: gradients are
    # live then (DeepSpeed frees them after the step) and the optimizer state exists (made lazily
    # by the first step), as for the DDP row
    calls = [0]
    snapshot: dict = {}

    def step(x, y, marks):
        loss = engine(x, y)
        marks.append(time.perf_counter())
        engine.backward(loss)
        marks.append(time.perf_counter())
        calls[0] += 1
        if calls[0] == 2:
            snapshot.update(breakdown())
        engine.step()
        return loss

    def state_bytes() -> dict:
        return dict(snapshot) if snapshot else breakdown()
    return step, state_bytes


def ideal_bytes(system: str, n_params: int, world: int, precision: str = "fp32") -> float:
    """Ideal model-state bytes per rank. fp32: 4 params + 4 grads + 8 AdamW per element (16Ψ),
    sharded per stage. bf16 applies to shardwise/DeepSpeed only (the torch peers autocast and
    keep fp32 state): 2 bf16 params + 2 bf16 gradients + 4 fp32 master + 8 AdamW (16Ψ), the
    ZeRO paper's mixed-precision figures; both keep 16-bit gradients by default."""
    psi = n_params
    if system in ("ddp", "plain"):
        return 16 * psi
    if system == "fsdp2" or system in ("ds3", "zero3"):
        return 16 * psi / world
    stage = int(system[-1])
    if precision == "bf16":
        return {0: 16 * psi, 1: 4 * psi + 12 * psi / world, 2: 2 * psi + 14 * psi / world}[stage]
    return {0: 16 * psi, 1: 8 * psi + 8 * psi / world, 2: 4 * psi + 12 * psi / world}[stage]
