"""Rank functions for test_ckpt_mesh.py: checkpoints that follow the mesh ([Note: pieces on a
mesh], [Note: n-d pieces]).

One 4-rank job runs a whole cycle, each phase a fresh engine on its own mesh: at mesh M (dp 2,
tp 2 or pp 2, dp 2) train two steps with AdamW and save A; at dp 4 (a plain, non-pipelined
model; other weights) load A and save B; at M again (other weights) load B and save C. Every
phase returns what each rank's model holds after its load (whole tensors: ``full_tensor()``
over tp); the test compares those with A's consolidated tensors, and A, B and C with each other
tensor by tensor and kind by kind, bitwise.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

import shardwise
import shardwise.zero

VOCAB, SEQ, BATCH = 64, 16, 8


def _whole(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    with shardwise.zero.GatheredParameters(list(model.parameters())):  # whole at stage 3 too
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                for k, v in model.state_dict().items()}


def _config(stage: int, dp: int, *, tp: int = 1, pipeline: bool = False) -> dict:
    gas = 2 if pipeline else 1  # 1F1B needs as many micro-batches as stages
    cfg = {"train_batch_size": BATCH, "train_micro_batch_size_per_gpu": BATCH // (dp * gas),
           "gradient_accumulation_steps": gas,
           "steps_per_print": 1000, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000}}
    if tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": tp}
    if pipeline:
        cfg["pipeline"] = {"schedule": "1F1B"}
    return cfg


def _batches(steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(17)
    return [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g) for _ in range(steps)]


# -- tensor parallel: the example GPT (tied head) --------------------------------------------------


def _gpt(seed: int):
    from model import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny", n_head=4))


def _train_gpt(engine, steps: int) -> None:
    dp = engine.ctx.dp
    per = BATCH // dp.size
    for x in _batches(steps):
        xb = x[dp.rank * per:(dp.rank + 1) * per]
        engine.backward(engine(xb[:, :-1], xb[:, 1:]))
        engine.step()


def tp_cycle(root: str, stages: tuple[int, int, int] = (3, 1, 2)) -> list[dict]:
    out = []
    model = _gpt(0)
    engine, *_ = shardwise.initialize(model=model, config=_config(stages[0], 2, tp=2))
    _train_gpt(engine, 2)
    engine.save_checkpoint(os.path.join(root, "A"), tag="t")
    out.append({"coords": engine.ctx.coords(), "values": _whole(model), "dtensors": _dtensors(model)})
    engine.destroy()

    model = _gpt(1)
    engine, *_ = shardwise.initialize(model=model, config=_config(stages[1], 4))
    engine.load_checkpoint(os.path.join(root, "A"), tag="t")
    out.append({"coords": engine.ctx.coords(), "values": _whole(model), "steps": engine.global_steps})
    engine.save_checkpoint(os.path.join(root, "B"), tag="t")
    engine.destroy()

    model = _gpt(2)
    engine, *_ = shardwise.initialize(model=model, config=_config(stages[2], 2, tp=2))
    engine.load_checkpoint(os.path.join(root, "B"), tag="t")
    out.append({"coords": engine.ctx.coords(), "values": _whole(model), "steps": engine.global_steps})
    engine.save_checkpoint(os.path.join(root, "C"), tag="t")
    _train_gpt(engine, 1)  # the loaded engine trains on
    engine.destroy()
    return out


def _dtensors(model) -> dict[str, str]:
    return {n: str(p.placements) for n, p in model.named_parameters() if hasattr(p, "placements")}


# -- pipeline: the example GPT as a PipelineModule (tied embedding / head) -------------------------


def _pipe(num_stages: int, seed: int):
    from model import GPTConfig
    from pipeline import gpt_pipeline

    torch.manual_seed(seed + 100 * dist.get_rank())  # stages build alone; values differ per rank
    return gpt_pipeline(GPTConfig.preset("tiny", n_layer=2), num_stages=num_stages)


class _Plain(torch.nn.Module):
    """The whole pipeline's layers in a plain module (no PipelineModule, no pipeline engine):
    the same state-dict names as every stage's, all of them."""

    def __init__(self, pipe):
        super().__init__()
        for name, child in pipe.named_children():
            self.add_module(name, child)


def _train_pipe(engine, steps: int) -> None:
    dp = engine.ctx.dp
    per = BATCH // dp.size
    for x in _batches(steps):
        xb = x[dp.rank * per:(dp.rank + 1) * per]
        half = per // 2
        engine.train_batch(iter([(xb[:half, :-1], xb[:half, 1:]), (xb[half:, :-1], xb[half:, 1:])]))


PIPE_TP_PLAN = {"*.attn.q": "colwise", "*.attn.k": "colwise", "*.attn.v": "colwise", "*.attn.proj": "rowwise",
                "*.mlp.fc": "colwise", "*.mlp.proj": "rowwise"}  # the pipeline's blocks are layers "2", "3"


def pp_cycle(root: str, stages: tuple[int, int, int] = (1, 2, 0), tp: int = 1) -> list[dict]:
    """(pp 2, dp 2) -> plain dp 4 -> (pp 2, dp 2); with ``tp=2``: (pp 2, tp 2) -> dp 4 -> (pp 2, tp 2)."""
    out = []
    dp = 4 // (2 * tp)

    def mesh_config(stage: int) -> dict:
        cfg = _config(stage, dp, pipeline=True)
        if tp > 1:
            cfg["tensor_parallel"] = {"autotp_size": tp, "tp_plan": PIPE_TP_PLAN}
        return cfg

    model = _pipe(2, 0)
    engine, *_ = shardwise.initialize(model=model, config=mesh_config(stages[0]))
    _train_pipe(engine, 2)
    engine.save_checkpoint(os.path.join(root, "A"), tag="t")
    out.append({"coords": engine.ctx.coords(), "values": _whole(model), "duplicates": len(model.tied_duplicates()),
                "dtensors": _dtensors(model)})
    engine.destroy()

    model = _Plain(_pipe(1, 1))
    engine, *_ = shardwise.initialize(model=model, config=_config(stages[1], 4))
    engine.load_checkpoint(os.path.join(root, "A"), tag="t")
    out.append({"coords": engine.ctx.coords(), "values": _whole(model), "steps": engine.global_steps})
    engine.save_checkpoint(os.path.join(root, "B"), tag="t")
    engine.destroy()

    model = _pipe(2, 2)
    engine, *_ = shardwise.initialize(model=model, config=mesh_config(stages[2]))
    engine.load_checkpoint(os.path.join(root, "B"), tag="t")
    out.append({"coords": engine.ctx.coords(), "values": _whole(model), "steps": engine.global_steps})
    engine.save_checkpoint(os.path.join(root, "C"), tag="t")
    _train_pipe(engine, 1)
    engine.destroy()
    return out


# -- the piece generation itself: DTensor blocks and who writes them --------------------------------


def dtensor_blocks() -> list[dict]:
    """On a (dp 2, tp 2) mesh: ``tensor_block`` of DTensors with Shard(0) / Shard(1) (uneven
    splits included) and Replicate placements on the tp sub-mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from shardwise.zero.pieces import tensor_block

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    out = []
    for shape, placement in [((5, 3), Shard(0)), ((4, 7), Shard(1)), ((3,), Shard(0)), ((1, 4), Shard(0)),
                             ((2, 3), Replicate())]:
        full = torch.arange(float(torch.Size(shape).numel())).reshape(shape)
        d = distribute_tensor(full, mesh["tp"], [placement])
        gshape, offsets, local, unique = tensor_block(d)
        value = d.to_local().clone()
        out.append({"shape": gshape, "offsets": offsets, "local": local, "unique": unique, "value": value})
    return out
