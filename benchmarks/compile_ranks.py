"""The compile rows of ``compare.py --compile``: shardwise eager vs torch.compile'd, side by side.

In one process group, per ZeRO stage, two engines of the same GPT from the same seed (one
eager, one with ``"compile": {"enabled": true, "backend": ...}``) take their steps in turn on
the same batches (rotating who goes first, a barrier before each step, each step's time the max
over ranks): the paired measurement of [Note: interleaved measurement] in ``compare.py``. The
first ``warmup`` steps are not timed; the compile time is reported on its own: the compiled
engine's first step (dynamo tracing + the backend's forward compile; the backward compile
happens in its first backward) minus its median timed step. Inductor's cache directory is a
fresh temporary one unless ``TORCHINDUCTOR_CACHE_DIR`` is set, so the compile time is a cold
compile.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

import peers
import ranks


def _engine(model_name: str, stage: int, compile_backend: str | None):
    import shardwise
    from model import GPT, GPTConfig

    world = dist.get_world_size()
    torch.manual_seed(ranks.SEED)
    model = GPT(GPTConfig.preset(model_name))
    config = {
        "train_batch_size": ranks.GLOBAL_BATCH, "train_micro_batch_size_per_gpu": ranks.GLOBAL_BATCH // world,
        "optimizer": {"type": "AdamW", "params": {"lr": ranks.LR, "weight_decay": ranks.WEIGHT_DECAY}},
        "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0, "steps_per_print": 1_000_000}
    if compile_backend is not None:
        config["compile"] = {"enabled": True, "backend": compile_backend}
    engine, *_ = shardwise.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def rank_compile(model_name: str, stages: list[int], warmup: int, steps: int, backend: str = "inductor") -> dict:
    from model import GPTConfig

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    data = ranks._batches(GPTConfig.preset(model_name), warmup + steps, rank, world)
    out = {}
    for stage in stages:
        engines = {"eager": _engine(model_name, stage, None), "compiled": _engine(model_name, stage, backend)}
        step = {k: peers.engine_step(e) for k, e in engines.items()}
        times = {k: [] for k in engines}
        losses = {k: [] for k in engines}
        order = list(engines)
        for i in range(warmup + steps):
            for k in order[i % 2:] + order[:i % 2]:
                x, y = data[i]
                dist.barrier()
                t0 = time.perf_counter()
                loss = step[k](x, y, [])
                times[k].append(time.perf_counter() - t0)
                losses[k].append(float(loss.detach()))
            if rank == 0 and i == 0:
                print(f"[compile {model_name} zero{stage}] first steps: eager {times['eager'][0]:.2f} s, "
                      f"compiled {times['compiled'][0]:.2f} s", flush=True)
        res = {}
        for k in engines:
            all_t = ranks._max_over_ranks(times[k])
            res[k] = {"times": all_t[warmup:], "first_step_s": all_t[0], "median_step_s": statistics.median(all_t[warmup:]),
                      "losses": ranks._mean_over_ranks(losses[k])}
        rep = engines["compiled"].compile_report()
        res["compile_s"] = res["compiled"]["first_step_s"] - res["compiled"]["median_step_s"]
        res["graphs"], res["graph_breaks"] = rep["graphs"], rep["graph_breaks"]
        res["regions"] = len(rep["regions"])
        res["compiled_runs"] = sum(r["compiled_runs"] for r in rep["regions"])
        out[stage] = res
        for e in engines.values():
            e.destroy()
    return {"stages": out, "cpu_s": ranks._cpu_s()}
