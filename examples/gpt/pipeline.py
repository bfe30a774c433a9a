"""The example GPT (model.py) as a pipeline: DeepSpeed's ``PipelineModule`` layer list.

    layers = [TiedLayerSpec("embed", TokenEmbedding, cfg),           # 0: token embedding
              LayerSpec(PositionEmbedding, cfg),                     # 1: + position embedding
              LayerSpec(PipeBlock, cfg), ... (n_layer of them),      # 2 .. n_layer+1
              LayerSpec(FinalNorm, cfg),                             # n_layer+2: ln_f
              TiedLayerSpec("embed", TokenEmbedding, cfg,            # n_layer+3: the LM head, the
                            forward_fn=lm_head)]                     #   embedding's weight (tied)

Each ``LayerSpec`` is built only on the stage that owns it. The math is GPT(cfg)'s exactly
(same blocks, pre-norm, tied head, cross-entropy in fp32); the initialisation follows the same
distributions (normal(0, 0.02), zero biases, ``proj.weight`` with std 0.02/sqrt(2 n_layer)) but
draws its own values (each stage builds alone). To start from a given ``GPT(cfg)``'s values
(the parity tests do), :func:`load_gpt_state` copies them by the name map
:func:`gpt_to_pipe_names`:

    GPT name                  pipeline name
    tok_emb.weight (=head)    tied_modules.embed.weight
    pos_emb.weight            1.weight
    blocks.{i}.<rest>         {2+i}.<rest>
    ln_f.<rest>               {n_layer+2}.<rest>
"""
from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import Block, GPTConfig  # noqa: E402

from torch.distributed.tensor import DTensor, Replicate  # noqa: E402

from shardwise.pipe import LayerSpec, PipelineModule, TiedLayerSpec  # noqa: E402


class TokenEmbedding(nn.Embedding):
    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.weight, mean=0.0, std=0.02)


class PositionEmbedding(nn.Embedding):
    """``x + pos_emb(0..t-1)``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg.seq_len, cfg.d_model)
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device)
        return x + super().forward(pos)


class PipeBlock(Block):
    """model.Block with GPT's initialisation."""

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("proj") else 0.02
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


class FinalNorm(nn.LayerNorm):
    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg.d_model)


def lm_head(embedding: nn.Embedding, x: torch.Tensor) -> torch.Tensor:
    """The LM head: logits with the (tied) token-embedding matrix. Under tensor parallelism with
    a vocabulary-parallel embedding (``"tied_modules.embed": "rowwise"`` in the tp_plan) the
    weight is a DTensor sharded along the vocabulary: each tp rank computes its slice of the
    logits from the replicated hidden state and the slices are gathered (the input's gradient,
    partial per rank, is summed over tp by DTensor)."""
    w = embedding.weight
    if isinstance(w, DTensor):
        hidden = DTensor.from_local(x, w.device_mesh, [Replicate()] * w.device_mesh.ndim, run_check=False)
        return F.linear(hidden, w).redistribute(placements=[Replicate()] * w.device_mesh.ndim).to_local()
    return F.linear(x, w)


def gpt_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def gpt_layers(cfg: GPTConfig) -> list:
    return [TiedLayerSpec("embed", TokenEmbedding, cfg),
            LayerSpec(PositionEmbedding, cfg),
            *[LayerSpec(PipeBlock, cfg) for _ in range(cfg.n_layer)],
            LayerSpec(FinalNorm, cfg),
            TiedLayerSpec("embed", TokenEmbedding, cfg, forward_fn=lm_head)]


def gpt_pipeline(cfg: GPTConfig, num_stages: int | None = None, **kwargs) -> PipelineModule:
    """The GPT as a ``PipelineModule`` (``kwargs``: PipelineModule's, e.g. partition_method)."""
    kwargs.setdefault("loss_fn", gpt_loss)
    kwargs.setdefault("partition_method", "type:PipeBlock")  # blocks balanced; the rest joins them
    return PipelineModule(gpt_layers(cfg), num_stages=num_stages, **kwargs)


def gpt_to_pipe_names(cfg: GPTConfig) -> dict[str, str]:
    """GPT(cfg)'s state-dict names -> the pipeline's (see the module docstring)."""
    from model import GPT

    with torch.device("meta"):
        names = list(GPT(cfg).state_dict())
    out = {}
    for name in names:
        if name in ("tok_emb.weight", "head.weight"):
            out[name] = "tied_modules.embed.weight"
        elif name.startswith("pos_emb."):
            out[name] = "1." + name[len("pos_emb."):]
        elif name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            out[name] = f"{2 + int(i)}.{rest}"
        elif name.startswith("ln_f."):
            out[name] = f"{cfg.n_layer + 2}.{name[len('ln_f.'):]}"
        else:
            raise KeyError(name)
    return out


@torch.no_grad()
def load_gpt_state(pipe: PipelineModule, gpt_state: dict, cfg: GPTConfig) -> int:
    """Copy a GPT(cfg) state dict into the entries this rank's stage holds; returns how many."""
    mine = dict(pipe.state_dict(keep_vars=True))
    done = 0
    for gname, pname in gpt_to_pipe_names(cfg).items():
        if pname in mine:
            mine[pname].copy_(gpt_state[gname])
            done += 1
    return done
