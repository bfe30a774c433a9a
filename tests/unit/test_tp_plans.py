"""Tensor-parallel plans (shardwise/tensor_parallel/plans.py): pattern matching, the built-in
plans against the models they are for, and the errors (no process group needed: every check
runs before parallelize_module touches a mesh)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from model import GPT, GPTConfig
from shardwise.config.plan import TensorParallelPlan
from shardwise.errors import ConfigError, UsageError
from shardwise.tensor_parallel import apply_tensor_parallel, parallelize
from shardwise.tensor_parallel.plans import (GPT2_PLAN, GPT_PLAN, GPT_SP_PLAN, LLAMA_PLAN, first_unplanned,
                                              match_plan, pattern_regex, recognise)

transformers = pytest.importorskip("transformers")


class _Mesh:
    """Stands in for a DeviceMesh: every check under test runs before the mesh is used."""

    mesh_dim_names = ("dp", "tp")

    def __getitem__(self, name):
        return None


def _ctx(tp: int = 2):
    return SimpleNamespace(tp=SimpleNamespace(size=tp, rank=0), mesh=_Mesh())


def _gpt(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", n_head=4, **kw))


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32,
                                                                n_layer=2, n_head=4))


def test_star_is_one_name_component():
    rx = pattern_regex("blocks.*.attn.q")
    assert rx.match("blocks.0.attn.q") and rx.match("blocks.11.attn.q")
    assert not rx.match("blocks.0.x.attn.q")  # not two components
    assert not rx.match("blocks.0.attn.qq") and not rx.match("blocks.0.attn.q.weight")
    assert not rx.match("xblocks.0.attn.q")  # the whole name
    assert pattern_regex("a.b").match("a.b") and not pattern_regex("a.b").match("aXb")  # '.' is literal


def test_first_matching_pattern_wins_in_module_order():
    got = match_plan(_gpt(), (("blocks.0.attn.q", "rowwise"), ("blocks.*.attn.q", "colwise")))
    assert [(a.name, a.style, a.pattern) for a in got] == [
        ("blocks.0.attn.q", "rowwise", "blocks.0.attn.q"), ("blocks.1.attn.q", "colwise", "blocks.*.attn.q")]


def test_hf_patterns_below_the_base_model_prefix():
    """Hugging Face writes base-model patterns (``layers.*.self_attn.q_proj``) for
    LlamaForCausalLM's ``model.layers.0.self_attn.q_proj``; full names match too."""
    m = _llama()
    a = match_plan(m, (("layers.*.self_attn.q_proj", "colwise"), ("model.layers.*.mlp.down_proj", "rowwise")))
    assert [x.name for x in a] == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                                   "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


def test_hf_alias_colwise_rep():
    a = match_plan(_gpt(), (("head", "colwise_rep"),))
    assert a[0].style == "colwise_gather_output"


@pytest.mark.parametrize("make,plan,n", [(_gpt, GPT_PLAN, 2 + 6 * 2 + 1), (_gpt, GPT_SP_PLAN, 2 + 8 * 2 + 2),
                                         (_llama, LLAMA_PLAN, 1 + 7 * 2 + 1), (_gpt2, GPT2_PLAN, 2 + 4 * 2 + 1)])
def test_builtin_plans_cover_every_linear_and_embedding(make, plan, n):
    model = make()
    got = match_plan(model, plan)  # every pattern matches (no ConfigError)
    assert len(got) == n
    assert first_unplanned(model, [a.name for a in got]) is None


def test_models_are_recognised_by_class():
    assert recognise(_gpt()) == "gpt"
    assert recognise(_llama()) == "llama" and recognise(_llama().model) == "llama"
    assert recognise(_gpt2()) == "gpt2"
    assert recognise(nn.Linear(2, 2)) is None


def test_unplanned_model_names_its_first_linear():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    with pytest.raises(ConfigError) as e:
        apply_tensor_parallel(model, TensorParallelPlan(2, None, None), _ctx())
    text = str(e.value)
    assert "tensor_parallel.tp_plan" in text and "Sequential" in text
    assert "'0' (Embedding) is covered by no plan" in text and "preset_model" in text


def test_pattern_matching_nothing_is_named():
    plan = TensorParallelPlan(2, (("blocks.*.attn.q", "colwise"), ("blocks.*.attn.qkv", "colwise")), None)
    with pytest.raises(ConfigError) as e:
        apply_tensor_parallel(_gpt(), plan, _ctx())
    text = str(e.value)
    assert "tensor_parallel.tp_plan['blocks.*.attn.qkv']" in text and "matches no module" in text
    assert "blocks.0.attn" in text  # what the names look like


def test_unknown_preset_and_style():
    with pytest.raises(ConfigError, match="unknown preset 'bert'"):
        apply_tensor_parallel(_gpt(), TensorParallelPlan(2, None, "bert"), _ctx())
    with pytest.raises(ConfigError, match="unknown tensor-parallel style 'diagonal'"):
        match_plan(_gpt(), (("head", "diagonal"),))


def test_style_on_a_norm_is_refused():
    with pytest.raises(ConfigError, match="'blocks.0.ln1' is a LayerNorm"):
        parallelize(_gpt(), (("blocks.*.ln1", "colwise"),), 2, None)


def test_head_count_must_divide():
    """Attention runs with the local head count: 2 heads over tp 4 cannot be split."""
    with pytest.raises(ConfigError, match="n_head=2 is not divisible by the tensor-parallel size 4"):
        parallelize(GPT(GPTConfig.preset("tiny", n_head=2)), GPT_PLAN, 4, None)
    with pytest.raises(ConfigError, match="num_key_value_heads=2 is not divisible"):
        parallelize(_llama(), LLAMA_PLAN, 4, None)


def test_sizes_must_divide():
    with pytest.raises(ConfigError, match=r"'blocks.0.mlp.fc' \(Linear\) has out_features=128, not divisible by "
                                          r"the tensor-parallel size 3"):
        parallelize(_gpt(), (("blocks.*.mlp.fc", "colwise"),), 3, None)


def test_size_mismatch_and_missing_mesh():
    with pytest.raises(UsageError, match="autotp_size=4 but the context's tp dimension has 2"):
        apply_tensor_parallel(_gpt(), TensorParallelPlan(4, None, None), _ctx(2))
    ctx = SimpleNamespace(tp=SimpleNamespace(size=2), mesh=None)
    with pytest.raises(UsageError, match="'tp' dimension"):
        apply_tensor_parallel(_gpt(), TensorParallelPlan(2, None, None), ctx)


def test_size_one_is_a_no_op():
    m = _gpt()
    before = {n: p for n, p in m.named_parameters()}
    apply_tensor_parallel(m, TensorParallelPlan(1, None, None), None)
    assert all(p is before[n] for n, p in m.named_parameters())


def test_a_class_name_alone_does_not_pick_a_preset():
    """A model class called GPT whose layout is not the example's (nanoGPT) is unplanned."""
    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(8, 4)
            self.lm = nn.Linear(4, 8)

    with pytest.raises(ConfigError, match="no built-in tensor-parallel plan for GPT: its module 'wte'"):
        apply_tensor_parallel(GPT(), TensorParallelPlan(2, None, None), _ctx())
