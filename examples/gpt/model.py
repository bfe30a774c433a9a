"""A small GPT-style decoder (pre-norm, tied LM head), built from a config with random init."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256  # byte-level tokens
    seq_len: int = 256
    n_layer: int = 6
    n_head: int = 8
    d_model: int = 512
    dropout: float = 0.0

    @staticmethod
    def preset(name: str, **overrides) -> "GPTConfig":
        presets = {
            # ~25.3M parameters: the benchmark model of ../shared/design/peers.md
            "25m": dict(vocab_size=12288, seq_len=256, n_layer=6, n_head=8, d_model=512),
            # ~1.07M parameters: per-step overhead dominates
            "1m": dict(vocab_size=256, seq_len=128, n_layer=4, n_head=4, d_model=144),
            # the bundled example: byte-level text
            "demo": dict(vocab_size=256, seq_len=128, n_layer=4, n_head=4, d_model=256),
            # tests
            "tiny": dict(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32),
        }
        if name not in presets:
            raise KeyError(f"unknown GPT preset {name!r}; choose one of {sorted(presets)}")
        return GPTConfig(**{**presets[name], **overrides})


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        # q, k and v are separate projections so that tensor parallelism can shard each by
        # heads (a fused qkv's column shard would mix q and k columns on a rank)
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.k = nn.Linear(cfg.d_model, cfg.d_model)
        self.v = nn.Linear(cfg.d_model, cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # -1: the heads this rank holds (all of them without tensor parallelism)
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in (self.q(x), self.k(x), self.v(x)))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """``forward(idx, targets=None)``: logits, or the mean cross-entropy loss when targets are given.

    ``forward`` also accepts one ``(idx, targets)`` tuple/list, the shape a DataLoader yields.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(idx, (tuple, list)):
            idx, targets = idx
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device).unsqueeze(0)  # [1, t]: sequence is dim 1, as for idx
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
