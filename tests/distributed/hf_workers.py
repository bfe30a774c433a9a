"""Hugging Face ``transformers`` models built from small configs with random init (no
downloads), for the stage-3 parity tests."""
from __future__ import annotations

import torch
import torch.distributed as dist

import shardwise
import shardwise.zero

VOCAB, SEQ, BATCH = 96, 12, 6


def build(kind: str, use_init: bool = False, config: dict | None = None):
    import transformers as T

    if kind == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=3, n_head=4,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cls = T.GPT2LMHeadModel
    else:
        cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                            tie_word_embeddings=False)
        cls = T.LlamaForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    with shardwise.zero.Init(config=config, enabled=use_init):
        return cls(cfg)


def data(steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(steps)]


def snapshot(model) -> dict[str, torch.Tensor]:
    with shardwise.zero.GatheredParameters(list(model.parameters())):
        return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def checkpointing(model, gc: str | None) -> None:
    """``gc``: None (off), "default" (transformers' own default), "reentrant", "non_reentrant";
    "config": shardwise's ``activation_checkpointing.modules`` instead (nothing to do here)."""
    if gc is None or gc == "config":
        return
    kwargs = {"default": None, "reentrant": {"use_reentrant": True},
              "non_reentrant": {"use_reentrant": False}}[gc]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()


def reference(kind: str, steps: int, gc: str | None = None) -> dict:
    model = build(kind)
    checkpointing(model, gc)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    losses = []
    for x in data(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "params": snapshot(model)}


def config() -> dict:
    return {"train_batch_size": BATCH, "steps_per_print": 1000, "gradient_clipping": 0.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}},
            "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 2000}}


def sharded(kind: str, steps: int, use_init: bool = False, gc: str | None = None,
            gc_before_initialize: bool = False, stage: int = 3) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = config()
    cfg["zero_optimization"] = {**cfg["zero_optimization"], "stage": stage} if stage == 3 else {"stage": stage}
    if gc == "config":  # every decoder layer, without touching the model
        cfg["activation_checkpointing"] = {"modules": "blocks"}
    model = build(kind, use_init, cfg)
    if gc_before_initialize:
        checkpointing(model, gc)
    engine, *_ = shardwise.initialize(model=model, config=cfg)
    if not gc_before_initialize:
        checkpointing(model, gc)
    per = BATCH // world
    losses = []
    for x in data(steps):
        xb = x[rank * per:(rank + 1) * per]
        loss = engine(input_ids=xb, labels=xb).loss
        engine.backward(loss)
        engine.step()
        t = torch.tensor([loss.item()], dtype=torch.float64)
        dist.all_reduce(t)
        losses.append(t.item() / world)
    units = [u.name for u in engine.strategy.runtime.units] if stage == 3 else []
    wrapped = sorted(n for n, m in model.named_modules() if "forward" in m.__dict__)
    return {"losses": losses, "params": snapshot(model), "units": units, "wrapped": wrapped}


def memory_reports(kind: str, stages: list[int]) -> list[dict]:
    """memory_report() after one step, per stage (estimate-vs-measured for a transformers model)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for stage in stages:
        model = build(kind)
        cfg = {**config(), "train_batch_size": world, "zero_optimization": {"stage": stage}}
        engine, *_ = shardwise.initialize(model=model, config=cfg)
        xb = data(1)[0][rank:rank + 1]
        engine.backward(engine(input_ids=xb, labels=xb).loss)
        engine.step()
        out.append(engine.memory_report())
    return out
