"""Workers for test_pipeline.py: the example GPT (examples/gpt/pipeline.py) trained as a pipeline
through ``shardwise.initialize`` + ``engine.train_batch``, and the one-process reference.

Every case starts from the values of ``GPT(cfg)`` built with seed 0 (``load_gpt_state`` maps
them into the stage's layers), so the reference is the plain GPT in one process on the same
global batch. A data-parallel rank r takes rows ``[r*gas*micro, (r+1)*gas*micro)`` of each
global batch, split into ``gas`` micro-batches of ``micro`` rows: the mean of their losses over
dp is the mean loss of the global batch.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

import shardwise
from model import GPT, GPTConfig
from pipeline import gpt_pipeline, gpt_to_pipe_names, load_gpt_state

CFG = GPTConfig.preset("tiny", n_layer=4)  # 8 pipeline layers: 4 blocks, so 4 virtual stages get one each
TIED = "tied_modules.embed.weight"
MICRO = 2


def data(global_batch: int, steps: int, seed: int = 1234) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (global_batch, CFG.seq_len + 1), generator=g) for _ in range(steps)]


def case_defaults(case: dict) -> dict:
    return {"schedule": "1F1B", "gas": 2, "steps": 3, "zero": 0, "clip": 0.0, "opt": "SGD", "lr": 0.5,
            "dtype": "fp32", "ckpt": 0, "tp": 1, **case}


# tensor parallelism inside each stage: the blocks' projections sharded (the pattern's "*" is the
# layer index, the PipelineModule's name for a block); the tied embedding / head stay whole
TP_PLAN = {"*.attn.q": "colwise", "*.attn.k": "colwise", "*.attn.v": "colwise", "*.attn.proj": "rowwise",
           "*.mlp.fc": "colwise", "*.mlp.proj": "rowwise",
           # the tied embedding / LM head, vocabulary-parallel on both end stages (lm_head in
           # examples/gpt/pipeline.py gathers the logits)
           "tied_modules.embed": "rowwise"}


def _placement(schedule: str) -> tuple[int, str]:
    if schedule in ("1F1B", "GPipe"):
        return 1, "loop"
    return 2, "v" if schedule == "ZBVZeroBubble" else "loop"


def _config(c: dict, dp: int) -> dict:
    spr, _ = _placement(c["schedule"])
    opt = {"type": c["opt"], "params": {"lr": c["lr"]}}
    if c["opt"] == "AdamW":
        opt["params"]["weight_decay"] = 0.0
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": c["gas"],
           "train_batch_size": MICRO * c["gas"] * dp, "steps_per_print": 1000, "gradient_clipping": c["clip"],
           "optimizer": opt, "zero_optimization": {"stage": c["zero"]},
           "pipeline": {"schedule": c["schedule"], "stages_per_rank": spr}}
    if c["dtype"] in ("bf16", "fp16"):
        cfg[c["dtype"]] = {"enabled": True}
    if c["tp"] > 1:
        cfg["tensor_parallel"] = {"autotp_size": c["tp"], "tp_plan": TP_PLAN}
    return cfg


def _gpt_view(pipe) -> dict[str, torch.Tensor]:
    """This rank's parameters under GPT's names (the tied weight under tok_emb.weight)."""
    mine = dict(pipe.state_dict())
    out = {}
    for gname, pname in gpt_to_pipe_names(CFG).items():
        if pname in mine and gname != "head.weight":
            t = mine[pname].detach()
            if hasattr(t, "full_tensor"):  # a tensor-parallel shard (DTensor): the whole tensor
                t = t.full_tensor()
            out[gname] = t.float().clone()
    return out


def run_cases(cases: list[dict], pp: int) -> list[dict]:
    """Each case on every rank: a fresh pipeline engine, ``steps`` train_batch calls."""
    return [_run_case(case_defaults(c), pp) for c in cases]


def _run_case(c: dict, pp: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    dp = world // (pp * c["tp"])
    spr, placement = _placement(c["schedule"])
    torch.manual_seed(0)
    ref = GPT(CFG)  # the starting values (a test builds the whole model; the library never does)
    pipe = gpt_pipeline(CFG, num_stages=pp, stages_per_rank=spr, placement=placement,
                        activation_checkpoint_interval=c["ckpt"])
    load_gpt_state(pipe, ref.state_dict(), CFG)
    del ref
    start = _gpt_view(pipe)
    import torch.utils.checkpoint as cp

    checkpoint, calls = cp.checkpoint, [0]

    def counted(*args, **kwargs):  # activation checkpointing really runs (and non-reentrant)
        calls[0] += 1
        assert kwargs.get("use_reentrant") is False
        return checkpoint(*args, **kwargs)

    cp.checkpoint = counted
    engine, *_ = shardwise.initialize(model=pipe, config=_config(c, dp))
    dp_rank, dp = engine.ctx.dp.rank, engine.ctx.dp.size  # (a tp dimension is not data parallel)
    rows = MICRO * c["gas"]
    out = {"rank": rank, "stage": engine.stage_id, "first": engine.is_first_stage(), "last": engine.is_last_stage(),
           "local_stages": list(pipe.local_stages), "names": sorted(n for n, _ in pipe.named_parameters()),
           "duplicates": len(pipe.tied_duplicates()), "start": start, "losses": [], "params": [], "norms": [],
           "tied": [], "times": []}
    for x in data(rows * dp, c["steps"]):
        mine = x[dp_rank * rows:(dp_rank + 1) * rows]
        micro = [(mine[m * MICRO:(m + 1) * MICRO, :-1], mine[m * MICRO:(m + 1) * MICRO, 1:]) for m in range(c["gas"])]
        t0 = time.perf_counter()
        loss = engine.train_batch(iter(micro))
        out["times"].append(time.perf_counter() - t0)
        out["losses"].append(float(loss))
        out["norms"].append(engine.get_global_grad_norm())
        out["params"].append(_gpt_view(pipe))
        tied = dict(pipe.state_dict()).get(TIED)
        out["tied"].append(None if tied is None else tied.detach().float().clone())
    out["global_steps"], out["micro_steps"] = engine.global_steps, engine.micro_steps
    cp.checkpoint = checkpoint
    out["checkpoint_calls"] = calls[0]
    if c.get("eval"):
        x = data(MICRO * c["gas"] * dp, 1, seed=99)[0][dp_rank * rows:(dp_rank + 1) * rows]
        micro = [(x[m * MICRO:(m + 1) * MICRO, :-1], x[m * MICRO:(m + 1) * MICRO, 1:]) for m in range(c["gas"])]
        loss, logits = engine.eval_batch(iter(micro), return_logits=True)
        out["eval_loss"] = float(loss)
        out["eval_logits"] = None if logits is None else logits.float().clone()
        out["eval_loss_last_only"] = engine.eval_batch(iter(micro), bcast_loss=False)
        out["eval_losses_list"] = engine.eval_batch(iter(micro), reduce_output=None)
        one = engine.eval_batch(iter(micro[:1]), num_micro_batches=1)
        out["eval_one"] = float(one)
        # training continues after eval (the stages were re-initialised for eval and back)
        x = data(rows * dp, 1, seed=7)[0][dp_rank * rows:(dp_rank + 1) * rows]
        micro = [(x[m * MICRO:(m + 1) * MICRO, :-1], x[m * MICRO:(m + 1) * MICRO, 1:]) for m in range(c["gas"])]
        out["after_eval_loss"] = float(engine.train_batch(iter(micro)))
    if c.get("misuse"):
        errors = {}
        for name, call in (("forward", lambda: engine(torch.zeros(1, 16, dtype=torch.long))),
                           ("backward", lambda: engine.backward(torch.zeros(()))),
                           ("step", lambda: engine.step())):
            try:
                call()
                errors[name] = None
            except shardwise.errors.UsageError as exc:
                errors[name] = str(exc)
        out["misuse"] = errors
    engine.destroy()
    return out


def reference(c: dict, dp: int, eval_too: bool = False) -> dict:
    """Plain GPT(cfg), one process, the whole global batch per step (bf16: bf16 model with fp32
    master weights, as shardwise's mixed precision; fp16: the fp32 reference)."""
    c = case_defaults(c)
    torch.manual_seed(0)
    model = GPT(CFG)
    bf16 = c["dtype"] == "bf16"
    if bf16:
        model = model.to(torch.bfloat16)
    params = list(model.parameters())
    master = [p.detach().float().clone().requires_grad_(True) for p in params] if bf16 else params
    opt = (torch.optim.SGD(master, lr=c["lr"]) if c["opt"] == "SGD"
           else torch.optim.AdamW(master, lr=c["lr"], weight_decay=0.0))
    rows = MICRO * c["gas"]
    out = {"losses": [], "params": [], "norms": []}
    for x in data(rows * dp, c["steps"]):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        if bf16:
            for m, p in zip(master, params):
                m.grad = p.grad.float()
                p.grad = None
        norm = torch.nn.utils.clip_grad_norm_(master, c["clip"] if c["clip"] > 0 else float("inf"))
        opt.step()
        opt.zero_grad()
        if bf16:
            with torch.no_grad():
                for m, p in zip(master, params):
                    p.copy_(m)
        out["losses"].append(loss.item())
        out["norms"].append(float(norm))
        out["params"].append({k: v.detach().float().clone() for k, v in model.state_dict().items()
                              if k != "head.weight"})
    if eval_too:
        with torch.no_grad():
            x = data(rows * dp, 1, seed=99)[0]
            out["eval_loss"] = model(x[:, :-1], x[:, 1:]).item()
            out["eval_logits"] = model(x[:rows, :-1]).float()  # dp rank 0's rows
            out["eval_one"] = model(x[:MICRO, :-1], x[:MICRO, 1:]).item() if dp == 1 else None
    return out


def bubble_probe(schedule: str, pp: int, gas: int, steps: int, work: int) -> dict:
    """For benchmarks/pipeline_bubble.py: per step, the schedule's wall time and the time this
    rank spent blocked in the schedule's point-to-point waits (torch's ``_wait_batch_p2p``)."""
    import torch.distributed.pipelining.schedules as S

    from shardwise.pipe import LayerSpec, PipelineModule

    rank = dist.get_rank()
    spr, placement = _placement(schedule)
    layers = [LayerSpec(torch.nn.Linear, work, work) for _ in range(pp * spr * 2)]
    blocked = [0.0]
    wait = S._wait_batch_p2p

    def timed_wait(works):
        t0 = time.perf_counter()
        try:
            return wait(works)
        finally:
            blocked[0] += time.perf_counter() - t0

    S._wait_batch_p2p = timed_wait
    pipe = PipelineModule(layers, num_stages=pp, loss_fn=lambda o, y: ((o - y) ** 2).mean(), stages_per_rank=spr,
                          placement=placement, partition_method="uniform", seed_layers=True)
    cfg = {"train_micro_batch_size_per_gpu": 64, "gradient_accumulation_steps": gas, "steps_per_print": 1000,
           "optimizer": {"type": "SGD", "params": {"lr": 1e-4}}, "zero_optimization": {"stage": 0},
           "pipeline": {"schedule": schedule, "stages_per_rank": spr}}
    engine, *_ = shardwise.initialize(model=pipe, config=cfg)
    run = engine.pipe.run
    sched_wall = [0.0]

    def timed_run(*a, **k):  # the schedule alone (not the optimizer step)
        t0 = time.perf_counter()
        try:
            return run(*a, **k)
        finally:
            sched_wall[0] = time.perf_counter() - t0

    engine.pipe.run = timed_run
    g = torch.Generator().manual_seed(0)
    batch = [(torch.randn(64, work, generator=g), torch.randn(64, work, generator=g)) for _ in range(gas)]
    walls, waits = [], []
    for s in range(steps + 1):
        blocked[0] = 0.0
        dist.barrier()
        engine.train_batch(iter(batch))
        if s:  # the first step infers shapes
            walls.append(sched_wall[0])
            waits.append(blocked[0])
    S._wait_batch_p2p = wait
    engine.destroy()
    return {"rank": rank, "wall": walls, "blocked": waits}

class Counted(torch.nn.Linear):
    """A layer that records where it was really built (not the meta-device parameter count)."""

    built: list[int] = []

    def __init__(self, index: int, width: int = 4):
        super().__init__(width, width)
        if not self.weight.is_meta:
            Counted.built.append(index)


class CountedTied(torch.nn.Linear):
    built = 0

    def __init__(self, width: int = 4):
        super().__init__(width, width)
        if not self.weight.is_meta:
            CountedTied.built += 1


def build_counts() -> dict:
    """Which LayerSpecs each rank built, and whether the tied weight starts equal on both stages
    (each rank draws different initial values: the broadcast from the first owner must fix it)."""
    from shardwise.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    Counted.built, CountedTied.built = [], 0
    torch.manual_seed(dist.get_rank())  # different values on every rank
    layers = [TiedLayerSpec("t", CountedTied), *[LayerSpec(Counted, i) for i in range(4)],
              TiedLayerSpec("t", CountedTied, forward_fn=lambda m, x: x @ m.weight)]
    pipe = PipelineModule(layers, num_stages=2, partition_method="type:Counted")
    w = pipe.tied_modules["t"].weight.detach().clone()
    ws = [torch.zeros_like(w) for _ in range(2)]
    dist.all_gather(ws, w)
    return {"built": sorted(Counted.built), "tied_built": CountedTied.built, "tied_equal": torch.equal(ws[0], ws[1])}


def one_stage_run(stages: list[int], steps: int = 2) -> dict:
    """A PipelineModule with num_stages=1 under data parallelism (every rank one whole model):
    train_batch runs the micro-batches like the plain engine, at every ZeRO stage."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for stage in stages:
        c = case_defaults({"zero": stage, "steps": steps})
        torch.manual_seed(0)
        ref = GPT(CFG)
        pipe = gpt_pipeline(CFG, num_stages=1)
        load_gpt_state(pipe, ref.state_dict(), CFG)
        cfg = _config(c, world)
        engine, *_ = shardwise.initialize(model=pipe, config=cfg)
        rows = MICRO * c["gas"]
        losses, params = [], []
        for x in data(rows * world, steps):
            mine = x[rank * rows:(rank + 1) * rows]
            micro = [(mine[m * MICRO:(m + 1) * MICRO, :-1], mine[m * MICRO:(m + 1) * MICRO, 1:]) for m in range(c["gas"])]
            losses.append(float(engine.train_batch(iter(micro))))
            with shardwise.zero.GatheredParameters(list(pipe.parameters())):
                params.append(_gpt_view(pipe))
        out[stage] = {"losses": losses, "params": params, "first": engine.is_first_stage(), "last": engine.is_last_stage()}
        engine.destroy()
    return out


def checkpoint_run(tmp: str, pp: int) -> dict:
    """save_checkpoint / load_checkpoint on a pipeline engine (the lead's checkpoint code)."""
    c = case_defaults({"steps": 2})
    world = dist.get_world_size()
    torch.manual_seed(0)
    ref = GPT(CFG)
    pipe = gpt_pipeline(CFG, num_stages=pp)
    load_gpt_state(pipe, ref.state_dict(), CFG)
    engine, *_ = shardwise.initialize(model=pipe, config=_config(c, world // pp))
    rows = MICRO * c["gas"]
    for x in data(rows * (world // pp), 2):
        mine = x[engine.ctx.dp.rank * rows:(engine.ctx.dp.rank + 1) * rows]
        engine.train_batch(iter([(mine[m * MICRO:(m + 1) * MICRO, :-1], mine[m * MICRO:(m + 1) * MICRO, 1:])
                                 for m in range(c["gas"])]))
    engine.save_checkpoint(tmp, tag="t")
    before = _gpt_view(pipe)
    with torch.no_grad():
        for p in pipe.parameters():
            p.add_(1.0)
    engine.load_checkpoint(tmp, tag="t")
    after = _gpt_view(pipe)
    return {"equal": all(torch.equal(before[k], after[k]) for k in before), "steps": engine.global_steps,
            "params": before}


def load_at_run(tmp: str, pp: int) -> dict:
    """Load checkpoint_run's checkpoint into a pipeline of ``pp`` stages: this rank's parameters
    under GPT's names (the names are the global layer indices, so any split finds its own)."""
    c = case_defaults({"steps": 2})
    world = dist.get_world_size()
    pipe = gpt_pipeline(CFG, num_stages=pp)
    engine, *_ = shardwise.initialize(model=pipe, config=_config(c, world // pp))
    engine.load_checkpoint(tmp, tag="t")
    return {"params": _gpt_view(pipe), "steps": engine.global_steps}


def two_rank_misc(tmp: str) -> dict:
    """One process group for test_pipeline.py's smaller 2-rank checks (each start costs seconds):
    the one-stage module at every ZeRO stage, then a checkpoint saved at pp 2 and loaded at pp 1
    (dp 2) and at pp 2."""
    out = {"one_stage": one_stage_run([0, 1, 2, 3]), "saved": checkpoint_run(tmp, 2)}
    dist.barrier()
    out["loaded"] = {pp: load_at_run(tmp, pp) for pp in (1, 2)}
    return out
