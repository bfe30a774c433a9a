"""Tensor-parallel plans: which module gets which DTensor parallel style.

[Note: tp plans]
A plan is an ordered list of ``(pattern, style)`` pairs in Hugging Face's ``tp_plan`` syntax:
a pattern is a dotted module name in which ``*`` stands for exactly one name component
(``"blocks.*.attn.q"`` matches ``blocks.0.attn.q``, not ``blocks.0.x.attn.q``). A pattern
matches a module's full name, or its name below the model's ``base_model_prefix`` (Hugging
Face writes ``layers.*.self_attn.q_proj`` for ``LlamaForCausalLM``'s
``model.layers.0.self_attn.q_proj``). The first matching pattern wins; a pattern that matches
no module is an error (a typo would otherwise leave the model silently replicated).

Styles (``torch.distributed.tensor.parallel``):

- ``colwise``: ``ColwiseParallel``, the output features sharded; replicated input, output the
  local shard of the last dimension (q, k, v, MLP up-projections: attention then runs with the
  local head count, which the module must compute as ``view(b, t, -1, head_dim)``).
- ``rowwise``: ``RowwiseParallel``, the input features sharded; input the local shard of the
  last dimension, output replicated (all-reduce). On an ``nn.Embedding``: vocabulary-parallel
  (rows sharded, the output summed over tp).
- ``sequence_parallel``: ``SequenceParallel`` on a norm: the residual stream is then sharded
  along the sequence between blocks; when a plan has such an entry, ``colwise`` modules take a
  sequence-sharded input (all-gathered) and ``rowwise`` ones give a sequence-sharded output
  (reduce-scatter), as in Megatron-LM. Every module on the residual stream must then be planned.
- ``colwise_gather_output`` (Hugging Face: ``colwise_rep``): ``colwise`` with the output
  all-gathered (the LM head: whole logits for the loss).
- ``replicate``: nothing (the module keeps whole, plain parameters); useful to make a pattern
  explicit.

Hugging Face's ``Conv1D`` (GPT-2: a Linear with its weight stored transposed, ``[in, out]``)
is handled by the same styles with the shard dimension flipped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch.nn as nn

from shardwise.errors import ConfigError, ConfigProblem

STYLES = ("colwise", "rowwise", "sequence_parallel", "colwise_gather_output", "replicate")
ALIASES = {"colwise_rep": "colwise_gather_output", "gather_output": "colwise_gather_output",
           "sequence-parallel": "sequence_parallel", "sp": "sequence_parallel"}

Plan = tuple[tuple[str, str], ...]

# -- built-in plans ---------------------------------------------------------------------------
# The example GPT (examples/gpt/model.py): q, k, v separate Linears (attention uses the local
# head count), tied embedding / head both sharded along the vocabulary (one DTensor, Shard(0)).
GPT_PLAN: Plan = (
    ("tok_emb", "rowwise"),
    ("pos_emb", "replicate"),
    ("blocks.*.attn.q", "colwise"),
    ("blocks.*.attn.k", "colwise"),
    ("blocks.*.attn.v", "colwise"),
    ("blocks.*.attn.proj", "rowwise"),
    ("blocks.*.mlp.fc", "colwise"),
    ("blocks.*.mlp.proj", "rowwise"),
    ("head", "colwise_gather_output"),
)

# The same with Megatron-style sequence parallelism (norms, residual stream and position
# embedding sharded along the sequence between blocks).
GPT_SP_PLAN: Plan = (
    ("tok_emb", "rowwise"),
    ("pos_emb", "rowwise"),
    ("blocks.*.ln1", "sequence_parallel"),
    ("blocks.*.ln2", "sequence_parallel"),
    *GPT_PLAN[2:-1],
    ("ln_f", "sequence_parallel"),
    ("head", "colwise_gather_output"),
)

# Hugging Face GPT-2 (GPT2LMHeadModel / GPT2Model; names below ``transformer``). Its attention
# projects q, k and v with ONE fused Conv1D (``c_attn``) and splits the output with the global
# ``split_size``, so a column shard of c_attn would hand each rank a mix of q and k columns and
# break the split: c_attn stays replicated (attention computed whole on every rank) and
# ``c_proj`` takes that replicated output and keeps its local input slice (rowwise, no
# communication before it). The MLP, the embedding and the tied head are sharded.
GPT2_PLAN: Plan = (
    ("wte", "rowwise"),
    ("wpe", "replicate"),
    ("h.*.attn.c_attn", "replicate"),
    ("h.*.attn.c_proj", "rowwise_from_replicated"),
    ("h.*.mlp.c_fc", "colwise"),
    ("h.*.mlp.c_proj", "rowwise"),
    ("lm_head", "colwise_gather_output"),
)

# Hugging Face Llama (LlamaForCausalLM / LlamaModel): its config's base_model_tp_plan, plus the
# vocabulary-parallel embedding and the gathered head. Needs num_attention_heads and
# num_key_value_heads divisible by the tp size.
LLAMA_PLAN: Plan = (
    ("embed_tokens", "rowwise"),
    ("layers.*.self_attn.q_proj", "colwise"),
    ("layers.*.self_attn.k_proj", "colwise"),
    ("layers.*.self_attn.v_proj", "colwise"),
    ("layers.*.self_attn.o_proj", "rowwise"),
    ("layers.*.mlp.gate_proj", "colwise"),
    ("layers.*.mlp.up_proj", "colwise"),
    ("layers.*.mlp.down_proj", "rowwise"),
    ("lm_head", "colwise_gather_output"),
)

PRESETS: dict[str, Plan] = {"gpt": GPT_PLAN, "gpt_sp": GPT_SP_PLAN, "gpt2": GPT2_PLAN, "llama": LLAMA_PLAN}

# model class name -> preset (recognised without importing transformers)
_CLASS_PRESETS = {"GPT": "gpt", "GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2",
                  "LlamaForCausalLM": "llama", "LlamaModel": "llama"}

INTERNAL_STYLES = STYLES + ("rowwise_from_replicated",)


def recognise(model: nn.Module) -> str | None:
    """The built-in preset for ``model``'s class, or None."""
    for cls in type(model).__mro__:
        if cls.__name__ in _CLASS_PRESETS:
            return _CLASS_PRESETS[cls.__name__]
    return None


def normalise_style(style: str, where: str) -> str:
    s = ALIASES.get(style, style)
    if s not in INTERNAL_STYLES:
        raise ConfigError([ConfigProblem(where, f"unknown tensor-parallel style {style!r}",
                                         f"use one of {', '.join(STYLES)}")])
    return s


# -- matching ---------------------------------------------------------------------------------
def pattern_regex(pattern: str) -> re.Pattern:
    """``*`` = exactly one name component; everything else literal; the whole name must match."""
    parts = pattern.split(".")
    return re.compile(r"\.".join("[^.]+" if p == "*" else re.escape(p) for p in parts) + r"\Z")


def _candidates(name: str, prefix: str) -> list[str]:
    out = [name]
    if prefix and name.startswith(prefix + "."):
        out.append(name[len(prefix) + 1:])
    return out


@dataclass(frozen=True)
class Assignment:
    name: str  # the module's full name
    module: nn.Module
    style: str
    pattern: str


def match_plan(model: nn.Module, plan: Sequence[tuple[str, str]], *, where: str = "tensor_parallel.tp_plan",
               allow_unused: bool = False) -> list[Assignment]:
    """Each module the plan names, with its style (first matching pattern wins), in module
    order. A pattern that matches no module is a ``ConfigError`` naming it, unless
    ``allow_unused`` (one pipeline stage: the pattern may match on another stage)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and not isinstance(getattr(model, prefix, None), nn.Module):
        prefix = ""  # the base model itself (LlamaModel): names have no prefix
    compiled = [(pat, normalise_style(style, f"{where}[{pat!r}]"), pattern_regex(pat)) for pat, style in plan]
    used = [False] * len(compiled)
    out: list[Assignment] = []
    for name, mod in model.named_modules():
        if not name:
            continue
        for i, (pat, style, rx) in enumerate(compiled):
            if any(rx.match(c) for c in _candidates(name, prefix)):
                used[i] = True
                out.append(Assignment(name, mod, style, pat))
                break
    unused = [pat for (pat, _, _), u in zip(compiled, used) if not u]
    if unused and not allow_unused:
        names = [n for n, _ in model.named_modules() if n][:8]
        raise ConfigError([ConfigProblem(
            f"{where}[{unused[0]!r}]",
            f"the pattern matches no module of {type(model).__name__} (module names look like "
            f"{names}{' ...' if len(names) == 8 else ''})",
            "patterns are dotted module names with '*' for one name component, e.g. "
            "'blocks.*.attn.q'; fix or remove the pattern")])
    return out


def shardable(mod: nn.Module) -> bool:
    """Modules a tensor-parallel plan is expected to cover (what an unplanned model is named by)."""
    return isinstance(mod, (nn.Linear, nn.Embedding)) or is_conv1d(mod)


def is_conv1d(mod: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (weight ``[in, out]``), by duck type."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and getattr(mod, "weight", None) is not None


def first_unplanned(model: nn.Module, covered: Iterable[str] = ()) -> tuple[str, nn.Module] | None:
    done = set(covered)
    for name, mod in model.named_modules():
        if name and shardable(mod) and name not in done:
            return name, mod
    return None
