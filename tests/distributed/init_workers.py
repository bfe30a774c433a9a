"""Rank functions for tests/distributed/test_zero_init_hf.py: models built under
``shardwise.zero.Init`` (Hugging Face ``resize_token_embeddings``, ``from_pretrained``, ranks
seeded differently) against single-process plain PyTorch / transformers.

Every function runs either in a ``run_distributed`` rank (``use_init=True``: build under
``zero.Init``, train with ZeRO stage 3) or in the test process (``use_init=False``: the plain
reference, plain AdamW on the whole batch)."""
from __future__ import annotations

import torch
import torch.distributed as dist

import shardwise
import shardwise.zero

VOCAB, SEQ, BATCH, LR = 96, 12, 6, 1e-3


def hf_model(kind: str, vocab: int = VOCAB):
    import transformers as T

    if kind == "gpt2":  # tied embeddings
        cfg = T.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cls = T.GPT2LMHeadModel
    else:  # untied head, rotary buffers
        cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                            tie_word_embeddings=False)
        cls = T.LlamaForCausalLM
    cfg._attn_implementation = "eager"
    return cls(cfg)


def config() -> dict:
    return {"train_batch_size": BATCH, "steps_per_print": 1000, "gradient_clipping": 0.0,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
            "zero_optimization": {"stage": 3}}


def batches(steps: int, vocab: int, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (BATCH, SEQ), generator=g) for _ in range(steps)]


def whole(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, whole (collective for a sharded model)."""
    with shardwise.zero.GatheredParameters(list(model.parameters())):
        return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def _hf_loss(model, x):
    return model(input_ids=x, labels=x).loss


def _gpt_loss(model, x):
    return model(x[:, :-1], x[:, 1:])


def train(model, use_init: bool, steps: int, vocab: int, loss_fn=_hf_loss, probe=None) -> dict:
    """Train ``steps`` steps: plain AdamW on the whole batch, or stage 3 on this rank's slice.
    Returns the (rank-averaged) losses, kinds of parameter after construction, whole params,
    and ``probe(model)`` run before the first step (after ``shardwise.initialize``)."""
    kinds = sorted({type(p).__name__ for p in model.parameters()})
    losses = []
    if not use_init:
        probed = probe(model) if probe else None
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        for x in batches(steps, vocab):
            loss = loss_fn(model, x)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return {"losses": losses, "kinds": kinds, "params": whole(model), "probe": probed}
    world, rank = dist.get_world_size(), dist.get_rank()
    engine, *_ = shardwise.initialize(model=model, config=config())
    probed = probe(model) if probe else None
    per = BATCH // world
    for x in batches(steps, vocab):
        xb = x[rank * per:(rank + 1) * per]
        loss = loss_fn(engine, xb)
        engine.backward(loss)
        engine.step()
        t = torch.tensor([loss.item()], dtype=torch.float64)
        dist.all_reduce(t)
        losses.append(t.item() / world)
    return {"losses": losses, "kinds": kinds, "params": whole(model), "probe": probed}


# -- 1. resize_token_embeddings ------------------------------------------------------------------


def resize_run(kind: str, use_init: bool, inside: bool, new_vocab: int, steps: int) -> dict:
    """Build (under Init or not), ``resize_token_embeddings(new_vocab)`` (inside the Init
    context or after it), then train on tokens that use the new rows."""
    torch.manual_seed(0)
    with shardwise.zero.Init(enabled=use_init):
        model = hf_model(kind)
        if inside:
            model.resize_token_embeddings(new_vocab)
    if not inside:
        model.resize_token_embeddings(new_vocab)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    after = whole(model)
    out = train(model, use_init, steps, new_vocab)
    return {**out, "after_resize": after, "shapes": shapes, "vocab": model.config.vocab_size}


# -- 2. from_pretrained ----------------------------------------------------------------------------


def save_random(kind: str, path: str) -> None:
    torch.manual_seed(11)
    hf_model(kind).save_pretrained(path)


def _logits(model):
    x = batches(1, VOCAB, seed=9)[0]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=x).logits
    model.train()
    return logits


def pretrained_run(path: str, use_init: bool, steps: int) -> dict:
    """``AutoModelForCausalLM.from_pretrained(path)`` (under Init or not): logits of one batch
    before training, then ``steps`` training steps."""
    import transformers as T

    torch.manual_seed(1 + (dist.get_rank() if use_init else 0))  # nothing random may matter
    with shardwise.zero.Init(enabled=use_init):
        model = T.AutoModelForCausalLM.from_pretrained(path)
    loaded = whole(model)
    return {**train(model, use_init, steps, VOCAB, probe=_logits), "loaded": loaded}


# -- 3. ranks seeded differently -------------------------------------------------------------------


def seeded_run(kind: str, use_init: bool, steps: int) -> dict:
    """``torch.manual_seed(rank)`` before building under Init: the result must be rank 0's
    model (a plain build with seed 0), trained like it."""
    from model import GPT, GPTConfig

    torch.manual_seed(dist.get_rank() if use_init else 0)
    with shardwise.zero.Init(enabled=use_init):
        if kind == "gpt":
            model = GPT(GPTConfig.preset("tiny"))
        else:
            model = hf_model(kind)
            model.resize_token_embeddings(VOCAB + 5)  # random new rows, drawn after the build
    built = whole(model)
    vocab = 64 if kind == "gpt" else VOCAB + 5
    return {**train(model, use_init, steps, vocab, _gpt_loss if kind == "gpt" else _hf_loss), "built": built}


# -- GatheredParameters before initialize ------------------------------------------------------


def gathered_under_init() -> dict:
    """DeepSpeed's idiom on a model still under construction: only the modifier rank writes
    (no collective may depend on the others writing too); without modifier_rank, changes go."""
    from model import GPT, GPTConfig

    rank = dist.get_rank()
    torch.manual_seed(0)
    with shardwise.zero.Init():
        model = GPT(GPTConfig.preset("tiny"))
    w = model.blocks[0].mlp.fc.weight
    with shardwise.zero.GatheredParameters(w, modifier_rank=1):
        if rank == 1:
            w.data.fill_(2.0)
            w.data[0].zero_()  # a write through a view of the whole tensor
    with shardwise.zero.GatheredParameters(w):
        w.data.mul_(3.0)  # discarded
    with shardwise.zero.GatheredParameters(model.ln_f.weight, modifier_rank=0):
        model.ln_f.weight.data = torch.full((8,), float(rank))  # re-bound to a new shape
    return {"fc": whole(model)["blocks.0.mlp.fc.weight"], "ln_f": whole(model)["ln_f.weight"]}
