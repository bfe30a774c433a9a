"""`shardwise plan --tp T --pp P` / `shardwise estimate --tp T --pp P`: the 3-D memory model
([Note: parallel memory model] in shardwise/planner_parallel.py) at tiny sizes against
hand-computed figures, the 175B GPT at 1024 ranks under a minute, and the CLI flags.

The tiny GPT (examples/gpt/model.py preset "tiny": vocab 64, seq 16, 2 blocks, 2 heads,
d_model 32; q, k, v separate Linears; head tied to tok_emb) has, whole:
tok_emb 2048, pos_emb 512, per block 64 + 3 * 1056 + 1056 + 64 + 4224 + 4128 = 12704, ln_f 64:
28032 elements. benchmarks/parallel_memory.py measures the same figures on 2 gloo ranks
(memory_report() and saved tensors equal to the byte).
"""
from __future__ import annotations

import json
import time

import pytest
import torch

from model import GPT, GPTConfig
from shardwise.cli import main as cli_main
from shardwise.errors import ConfigError, UsageError
from shardwise.memory_model_parallel import (block_activation_bytes, in_flight, tp_chunk, tp_shard_dim,
                                             transformer_activation_bytes)
from shardwise.planner_parallel import Mesh, mesh_for, plan_job_parallel, plan_parallel, tp_local_model

WHOLE, BLOCK = 28032, 12704
# tp 2, rank 0: tok_emb rows 1024 (tied head: the same tensor), pos_emb 512 whole; per block
# ln1 64, q/k/v (16x32 + 16) x 3 = 1584, proj 32x16 + bias 32 whole = 544, ln2 64,
# fc 64x32 + 64 = 2112, mlp.proj 32x64 + 32 = 2080 -> 6448; ln_f 64
TP2_LOCAL = 1024 + 512 + 2 * 6448 + 64
TP2_REPLICATED = 512 + 2 * (64 + 32 + 64 + 32) + 64  # pos_emb, norms, rowwise biases


def tiny() -> GPT:
    return GPT(GPTConfig.preset("tiny"))


def gpt_175b() -> GPT:
    return GPT(GPTConfig(vocab_size=50257, seq_len=2048, n_layer=96, n_head=96, d_model=12288))


@pytest.fixture(scope="module")
def meta_tiny() -> GPT:
    with torch.device("meta"):
        return tiny()


def write_config(tmp_path, name: str = "ds.json", **extra) -> str:
    doc = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 1}, **extra}
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


# -- the formulas (memory_model.py) --------------------------------------------------------------------
def test_tp_shard_rules_and_chunks():
    assert tp_shard_dim("Linear", "weight", "colwise") == 0 and tp_shard_dim("Linear", "bias", "colwise") == 0
    assert tp_shard_dim("Linear", "weight", "rowwise") == 1 and tp_shard_dim("Linear", "bias", "rowwise") is None
    assert tp_shard_dim("Embedding", "weight", "rowwise") == 0 and tp_shard_dim("Embedding", "weight", "colwise") == 1
    assert tp_shard_dim("Linear", "weight", "colwise_gather_output") == 0
    assert tp_shard_dim("LayerNorm", "weight", "sequence_parallel") is None
    assert tp_shard_dim("Linear", "weight", "replicate") is None
    assert [tp_chunk(10, 4, r) for r in range(4)] == [3, 3, 3, 1]  # torch.chunk sizes (DTensor Shard)
    assert [tp_chunk(2, 4, r) for r in range(4)] == [1, 1, 0, 0]


def test_activation_split_by_hand():
    s, b, h, a = 16, 2, 32, 2
    sbh, sb = s * b * h, s * b
    # tp 1: 16 s*b*h tensors (fp32), 4 s*b fp32 norm statistics, the log-sum-exp of a heads
    assert block_activation_bytes(s, b, h, a, 4) == 16 * sbh * 4 + 4 * sb * 4 + a * sb * 4
    # tp 2: 4 replicated (block input, two norm outputs, residual) + 12 at h/2; lse of a/2 heads
    assert block_activation_bytes(s, b, h, a, 4, tp=2) == (4 * sbh + 12 * sbh // 2) * 4 + 4 * sb * 4 + sb * 4
    # sequence parallel: the norm inputs and statistics over s/2 too
    assert block_activation_bytes(s, b, h, a, 4, tp=2, sequence_parallel=True) == \
        (2 * sbh // 2 + 2 * sbh + 12 * sbh // 2) * 4 + 4 * sb // 2 * 4 + sb * 4
    first = (sb + s) * 8  # token ids + position ids
    last = 2 * sbh * 4 + 2 * sb * 4 + sb * 64 * 4 + sb * 8 + 4  # ln_f in/out, stats, log-softmax, targets, weight
    one = block_activation_bytes(s, b, h, a, 4, tp=2)
    assert transformer_activation_bytes(2, s, b, h, a, 64, 4, tp=2) == 2 * one + first + last
    assert transformer_activation_bytes(2, s, b, h, a, 64, 4, tp=2, first=False) == 2 * one + last
    # both blocks checkpointed: their inputs only; partition_activations: 1/tp of them
    assert transformer_activation_bytes(2, s, b, h, a, 64, 4, checkpointed=2, tp=2, last=False) == 2 * sbh * 4 + first
    assert transformer_activation_bytes(2, s, b, h, a, 64, 4, checkpointed=2, tp=2, partition_activations=True,
                                        last=False) == 2 * sbh // 2 * 4 + first
    # 1F1B: the first stage holds pp micro-batches, the last one; GPipe all of them
    assert [in_flight("1F1B", 4, i, 8) for i in range(4)] == [4, 3, 2, 1]
    assert in_flight("1F1B", 4, 0, 2) == 2 and in_flight("GPipe", 4, 3, 8) == 8


# -- the plan at tiny sizes ----------------------------------------------------------------------------
def test_tp_local_shapes(meta_tiny):
    local0, rep0 = tp_local_model(meta_tiny, 2, 0, __import__("shardwise.tensor_parallel.plans",
                                                              fromlist=["GPT_PLAN"]).GPT_PLAN)
    assert sum(p.numel() for p in meta_tiny.parameters()) == WHOLE
    assert sum(p.numel() for p in local0.parameters()) == TP2_LOCAL
    assert local0.head.weight is local0.tok_emb.weight and tuple(local0.head.weight.shape) == (32, 32)
    assert tuple(local0.blocks[0].attn.q.weight.shape) == (16, 32)
    assert tuple(local0.blocks[0].mlp.proj.weight.shape) == (32, 64)
    assert sum(p.numel() for p in local0.parameters() if id(p) in rep0) == TP2_REPLICATED
    assert all(p.is_meta for p in meta_tiny.parameters()) and tuple(meta_tiny.tok_emb.weight.shape) == (64, 32)


def test_tp2_model_states_and_collectives(meta_tiny):
    # fp32 AdamW, ZeRO 0 over dp 1: every element 4 + 4 + 8 bytes; all sizes are multiples of 16
    # (no padding); one 4-byte `step` per bucket: tp rank 0 one bucket, tp rank 1 two (its
    # replicated parameters count in the norm on tp rank 0 only: a bucket of their own)
    r = plan_parallel(meta_tiny, mesh_for(2, tp=2), 0, micro_batch=2, seq_len=16, gradient_accumulation_steps=3)
    s0, s1 = r.rank_states(0, 0), r.rank_states(0, 1)
    assert s0["params"] == s0["grads"] == 4 * TP2_LOCAL and s0["optimizer_state"] == 8 * TP2_LOCAL + 4
    assert s1["optimizer_state"] == s0["optimizer_state"] + 4 and r.max_bytes == s1["total"] == 16 * TP2_LOCAL + 8
    by = dict(r.by_dimension)
    assert by["model"]["params"] == 4 * WHOLE and by["tp 2"]["params"] == 4 * TP2_LOCAL
    sbh = 2 * 16 * 32
    coll = {(d, c.op): (c.calls, c.bytes) for d, c in r.collectives}
    assert coll[("tp", "all_reduce block outputs (forward)")] == (2 * 2 * 3, 2 * 2 * 3 * sbh * 4)
    assert coll[("tp", "all_reduce input grads (backward)")] == (2 * 2 * 3, 2 * 2 * 3 * sbh * 4)
    assert coll[("tp", "all_gather head logits (forward)")] == (3, 3 * 2 * 16 * 64 * 4)
    assert r.comm_by_dimension()["pp"] == 0
    assert r.activations == transformer_activation_bytes(2, 16, 2, 32, 2, 64, 4, tp=2)


def test_pp2_partition_ties_and_in_flight(meta_tiny):
    # layers [tok_emb 2048, pos_emb 512, block 12704, block 12704, ln_f 64, head 2048 (tied)]:
    # balanced in two, [0:3] 15264 | [3:6] 14816; the tied weight on both stages
    r = plan_parallel(meta_tiny, Mesh(tp=1, pp=2, dp=2), 1, micro_batch=2, seq_len=16, gradient_accumulation_steps=4)
    first, last = r.stages
    assert first.layers == ["tok_emb", "pos_emb", "blocks.0"] and last.layers == ["blocks.1", "ln_f", "head"]
    assert (first.n_params, last.n_params) == (2048 + 512 + BLOCK, BLOCK + 64 + 2048)
    # ZeRO-1 over dp 2: params and grads whole, AdamW state of the own half (+ a `step` per bucket;
    # the last stage's tied copy is a norm duplicate: a bucket of its own)
    a, b = r.rank_states(0), r.rank_states(1)
    assert a["params"] == 4 * first.n_params and a["optimizer_state"] == 8 * first.n_params // 2 + 4
    assert b["params"] == 4 * last.n_params and b["optimizer_state"] == 8 * last.n_params // 2 + 8
    assert (first.in_flight, last.in_flight) == (2, 1)
    assert first.activations == 2 * transformer_activation_bytes(1, 16, 2, 32, 2, 64, 4, last=False)
    assert last.activations == transformer_activation_bytes(1, 16, 2, 32, 2, 64, 4, first=False)
    coll = {(d, c.op): (c.calls, c.bytes) for d, c in first.collectives}
    assert coll[("pp", "p2p activations (forward: sent / received)")] == (4, 4 * 2 * 16 * 32 * 4)
    assert coll[("pp", "all_reduce tied-weight grads (end stages)")] == (1, 2048 * 4)
    assert coll[("dp", "reduce_to_shard grads (fp32)")][1] == 4 * first.n_params
    uniform = plan_parallel(meta_tiny, Mesh(pp=2, partition="uniform"), 0)
    assert [len(s.layers) for s in uniform.stages] == [3, 3]


def test_175b_at_1024_ranks_under_a_minute():
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = gpt_175b()
    r = plan_parallel(model, mesh_for(1024, tp=8, pp=16), 1, precision="bf16", micro_batch=1, seq_len=2048,
                      gradient_accumulation_steps=16, device_memory=80 * 10**9)
    assert time.perf_counter() - t0 < 60
    assert 174e9 < r.n_params < 176e9 and (r.mesh.dp, len(r.stages)) == (8, 16)
    assert [s.blocks for s in r.stages] == [6] * 16
    first = r.stages[0]
    n = first.n_params  # ~1.46e9 local: 6 blocks / 8 + the vocab-sharded embedding + whole pos_emb
    assert 1.4e9 < n < 1.5e9
    # bf16 ZeRO-1 over dp 8: 2 + 2 bytes whole, (4 + 8) / 8 bytes of masters and Adam state
    assert first.max_bytes == pytest.approx(4 * n + 12 * n / 8, rel=1e-3)
    assert r.worst.index == 0 and first.in_flight == 16 and r.fits is True
    comm = r.comm_by_dimension()
    assert comm["tp"] > comm["dp"] > comm["pp"] > 0


# -- the CLI ---------------------------------------------------------------------------------------------
def test_cli_plan_tp_pp_json_and_table(capsys, tmp_path):
    path = write_config(tmp_path)
    assert cli_main(["plan", path, "--model", "test_plan_parallel:tiny", "--world-size", "4", "--tp", "2", "--pp", "2",
                     "--seq", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mesh"] == {"pp": 2, "dp": 1, "tp": 2} and out["world_size"] == 4 and out["stage"] == 1
    assert [d["after"] for d in out["by_dimension"]][:2] == ["model", "tp 2"]
    assert {c["dim"] for c in out["collectives"]} == {"tp", "pp", "dp"}
    assert len(out["pipeline_ranks"]) == 2 and out["pipeline_ranks"][0]["in_flight"] == 2
    assert cli_main(["plan", path, "--model", "test_plan_parallel:tiny", "--world-size", "4", "--tp", "2"]) == 0
    text = capsys.readouterr().out
    assert "pp 1 x dp 2 x tp 2" in text and "by dimension" in text and "collectives" in text
    # the data-parallel plan is unchanged without the flags
    assert cli_main(["plan", path, "--model", "test_plan_parallel:tiny", "--world-size", "4", "--json"]) == 0
    assert "mesh" not in json.loads(capsys.readouterr().out)


def test_cli_plan_errors(capsys, tmp_path):
    path = write_config(tmp_path)
    assert cli_main(["plan", path, "--model", "test_plan_parallel:tiny", "--world-size", "4", "--tp", "3"]) == 2
    assert "divide" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="ZeRO stage 2"):
        plan_job_parallel(write_config(tmp_path, "z2.json", zero_optimization={"stage": 2}), "test_plan_parallel:tiny", 4, pp=2)
    with pytest.raises(UsageError, match="stage 3"):
        plan_job_parallel(path, "test_plan_parallel:tiny", 4, pp=2, stage=3)
    assert cli_main(["plan", path, "--model", "test_plan_parallel:tiny", "--world-size", "4", "--pp", "2",
                     "--fit", "1GB"]) == 2


def test_cli_estimate_tp_pp(capsys):
    assert cli_main(["estimate", "--model", "test_plan_parallel:tiny", "--world-size", "4", "--tp", "2", "--pp", "2",
                     "--micro-batch", "2", "--seq", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mesh"] == {"pp": 2, "dp": 1, "tp": 2} and list(out["stages"]) == ["0", "1", "2", "3"]
    assert out["refused_with_pp"] == [2, 3] and out["stages"]["1"]["activations"] > 0
    with torch.device("meta"):
        r = plan_parallel(tiny(), mesh_for(4, tp=2, pp=2), 1, micro_batch=2, seq_len=16)
    assert out["stages"]["1"]["total"] == r.worst.max_bytes + r.worst.activations
    assert cli_main(["estimate", "--params", "175e9", "--world-size", "1024", "--tp", "8", "--pp", "16", "--json"]) == 0
    analytic = json.loads(capsys.readouterr().out)["stages"]["0"]
    assert analytic["params"] == 4 * -(-175_000_000_000 // 128)
    assert cli_main(["estimate", "--model", "test_plan_parallel:tiny", "--world-size", "4", "--tp", "2"]) == 0
    assert "by dimension" in capsys.readouterr().out
