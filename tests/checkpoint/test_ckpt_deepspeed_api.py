"""DeepSpeed's checkpoint API, unchanged scripts: ``(None, None)`` for an empty directory, integer
tags, a non-JSON ``client_state`` (RNG states, tensors, tuples) stored without pickle,
``load_module_strict``, ``exclude_frozen_parameters``, ``custom_load_fn``, DeepSpeed's
signatures and ``shardwise.utils.zero_to_fp32`` (functions and CLI)."""
from __future__ import annotations

import collections
import inspect
import json
import logging
import math
import os
import pathlib
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ckpt_corrupt as C
import ckpt_workers as W
import shardwise
from shardwise.checkpoint import client_state as CS
from shardwise.checkpoint import consolidate, info, read_client_state
from shardwise.cli import main as cli
from shardwise.engine import Engine
from shardwise.errors import CheckpointError, UsageError
from shardwise.testing import run_distributed
from shardwise.utils.zero_to_fp32 import (convert_zero_checkpoint_to_fp32_state_dict,
                                          get_fp32_state_dict_from_zero_checkpoint,
                                          load_state_dict_from_zero_checkpoint)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _small(seed: int = 0, steps: int = 2, extra: bool = False):
    return W.small_engine(seed=seed, steps=steps, extra=extra)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    """Equal values of exactly the same types (tuples stay tuples, dtypes kept), NaN == NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and a.requires_grad == b.requires_grad and \
            torch.equal(a.detach().view(torch.uint8) if a.dtype.is_complex else a.detach(),
                        b.detach().view(torch.uint8) if b.dtype.is_complex else b.detach())
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_no_checkpoint_is_none_none_broken_one_is_an_error(tmp_path, caplog):
    from shardwise.api import _auto_resume

    engine, model = _small()
    before = _state(model)
    os.makedirs(tmp_path / "empty" / ".tmp-global_step1")  # an interrupted first save: still nothing
    with caplog.at_level(logging.WARNING, logger="shardwise"):
        assert engine.load_checkpoint(tmp_path / "missing") == (None, None)
        assert engine.load_checkpoint(tmp_path / "empty") == (None, None)
    assert sum("holds no checkpoint" in r.getMessage() for r in caplog.records) == 2
    _auto_resume(engine, str(tmp_path / "empty"))  # starts fresh
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and engine.global_steps == 2
    with pytest.raises(CheckpointError, match="does not exist"):  # an explicit tag must be there
        engine.load_checkpoint(tmp_path / "empty", tag="global_step1")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="is not a directory"):
        engine.load_checkpoint(tmp_path / "afile")
    engine.save_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "latest").write_text("global_step9")  # has checkpoints, latest is stale
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        engine.load_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):  # auto_resume stays strict
        _auto_resume(engine, str(tmp_path / "ck"))
    os.unlink(tmp_path / "ck" / "latest")  # committed tags but no latest: still an error
    with pytest.raises(CheckpointError, match=r"committed tags in .*\['global_step2'\]"):
        engine.load_checkpoint(tmp_path / "ck")


def test_integer_tags(tmp_path):
    engine, model = _small()
    path = engine.save_checkpoint(tmp_path, tag=100)
    assert path == str(tmp_path / "100") and (tmp_path / "latest").read_text() == "100"
    assert C.read_doc(path)["tag"] == "100"
    saved = _state(model)
    W.small_steps(engine, 1)
    assert engine.load_checkpoint(tmp_path, tag=100)[0] == path
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert engine.load_checkpoint(tmp_path, tag="100")[0] == path and engine.load_checkpoint(tmp_path)[0] == path
    assert torch.equal(consolidate(tmp_path, tag=100)["lin.weight"], saved["lin.weight"])
    for bad in (-1, True, 1.5):
        with pytest.raises(CheckpointError, match="not usable as a directory name"):
            engine.save_checkpoint(tmp_path, tag=bad)
    assert sorted(os.listdir(tmp_path)) == ["100", "latest"]


def _client():
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    draws = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])  # what follows the states
    shared = torch.randn(2, 3)
    return draws, {
        "torch_rng": states[0], "np_rng": states[1], "py_rng": states[2],
        "epoch": 3, "lr": 0.1, "name": "run", "none": None, "flag": True, "big": 10 ** 40, "nan": float("nan"),
        "tuple": (1, (2.5, "x"), [None, ()]), "nested": {"a": [1, {"b": (3,)}], 4: "int key", (1, 2): "tuple key"},
        "tensors": [torch.arange(5), torch.randn(3, dtype=torch.bfloat16), torch.tensor(2.0), torch.zeros(0, 4),
                    torch.tensor([1 + 2j], dtype=torch.complex64), torch.randn(4, 2).t(),
                    torch.ones(2, requires_grad=True), torch.nn.Parameter(torch.ones(3))],
        "shared": [shared, shared],
        "arrays": [np.arange(6, dtype=">i2").reshape(2, 3), np.array(1.5), np.array([True, False]),
                   np.array(["ab", "c"]), np.zeros((2, 0), dtype=np.float32)],
        "np_scalars": [np.float32(1.25), np.int64(-3), np.bool_(True)],
        "misc": [b"\x00\x01", bytearray(b"z"), {1, 2}, frozenset({"q"}), 1 - 2j, torch.Size([2, 3]), torch.float16,
                 torch.device("cpu"), collections.OrderedDict(b=1, a=2), float("-inf")],
        "__shardwise__": "a user key that looks like the marker",
    }


def test_client_state_round_trip_and_rng_draws(tmp_path):
    engine, _ = _small()
    draws, client = _client()
    path = engine.save_checkpoint(tmp_path, tag="c", client_state=client)
    loaded_path, back = engine.load_checkpoint(tmp_path, tag="c")
    assert loaded_path == path and _same(client, back)
    assert back["shared"][0] is back["shared"][1]  # one tensor reached twice: one object again
    assert type(back["tensors"][7]) is torch.nn.Parameter and back["tensors"][6].requires_grad
    assert _same(read_client_state(tmp_path, "c"), client)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    torch.set_rng_state(back["torch_rng"])
    np.random.set_state(back["np_rng"])
    random.setstate(back["py_rng"])
    assert torch.equal(torch.rand(3), draws[0]) and np.array_equal(np.random.rand(3), draws[1])
    assert [random.random() for _ in range(3)] == draws[2]
    # never a pickle: only the manifest (JSON) and safetensors files, every one parsed as such
    for root, _, files in os.walk(tmp_path):
        for name in files:
            full = os.path.join(root, name)
            data = open(full, "rb").read()
            assert name in ("latest", "manifest.json") or name.endswith(".safetensors"), name
            assert not data.startswith((b"\x80", b"PK")) and b"torch._utils" not in data, name
            if name.endswith(".safetensors"):
                with safe_open(full, "pt") as f:
                    list(f.keys())
            elif name == "manifest.json":
                json.loads(data, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    doc = C.read_doc(path)
    assert doc["format_version"] == 5 and len(doc["client_tensors"]["tensors"]) == 16  # format 5: client state as format 4
    # the new file is verified like the shards: a flipped bit fails the load, nothing changes
    client_file = os.path.join(path, "client_state.safetensors")
    data = bytearray(open(client_file, "rb").read())
    data[-1] ^= 1
    open(client_file, "wb").write(bytes(data))
    W.small_steps(engine, 1)
    before = _state(engine.module)
    with pytest.raises(CheckpointError, match="checksum mismatch for tensor .* in client-state file"):
        engine.load_checkpoint(tmp_path, tag="c")
    assert all(torch.equal(v, before[k]) for k, v in engine.module.state_dict().items()) and engine.global_steps == 3
    assert not info(tmp_path)["tags"][0]["ok"]


def test_client_state_decode_refuses_edited_markers():
    doc, tensors, _ = CS.encode({"t": torch.ones(2), "x": (1,)})
    assert _same(CS.decode(doc, tensors, "m"), {"t": torch.ones(2), "x": (1,)})
    for edit, match in ((lambda d: d["t"].__setitem__("key", "t9"), "does not hold"),
                        (lambda d: d["t"].__setitem__("shape", [3]), "says shape"),
                        (lambda d: d["x"].__setitem__("__shardwise__", "pickle"), "does not know"),
                        (lambda d: d["x"].__setitem__("items", 5), "not a list")):
        bad = json.loads(json.dumps(doc))
        edit(bad)
        with pytest.raises(CheckpointError, match=match):
            CS.decode(bad, tensors, "m")


class _Opaque:
    pass


def test_unrepresentable_client_state_is_refused_at_save(tmp_path):
    engine, _ = _small()
    engine.save_checkpoint(tmp_path, tag="first")
    listing = sorted(os.listdir(tmp_path))
    cycle: list = []
    cycle.append(cycle)
    cases = [({"opt": [1, 2, _Opaque()]}, r"client_state\['opt'\]\[2\] is a .*_Opaque"),
             ({"f": lambda: 1}, r"client_state\['f'\] is a function"),
             ({"p": pathlib.Path("x")}, r"client_state\['p'\] is a pathlib.*str\(path\)"),
             ({"d": collections.defaultdict(int)}, r"client_state\['d'\] is a collections.defaultdict .*store dict"),
             ({"c": cycle}, r"client_state\['c'\]\[0\] contains itself"),
             ({"a": np.array([object()])}, r"client_state\['a'\] is a numpy array of dtype object")]
    for value, match in cases:
        with pytest.raises(CheckpointError, match=match) as err:
            engine.save_checkpoint(tmp_path, tag="second", client_state=value)
        assert "nothing was committed" in str(err.value) and "without pickle" in str(err.value)
        assert sorted(os.listdir(tmp_path)) == listing  # no tag, no .tmp- directory, latest unchanged
    assert (tmp_path / "latest").read_text() == "first"


def test_load_module_strict(tmp_path, caplog):
    small, small_model = _small(seed=0, extra=False)
    small.save_checkpoint(tmp_path / "small")
    big, big_model = _small(seed=5, extra=True)
    before = _state(big_model)
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: \['gate'\].*load_module_strict=False"):
        big.load_checkpoint(tmp_path / "small")
    assert all(torch.equal(v, before[k]) for k, v in big_model.state_dict().items()) and big.global_steps == 2
    with caplog.at_level(logging.WARNING, logger="shardwise"):
        assert big.load_checkpoint(tmp_path / "small", load_module_strict=False)[0].endswith("global_step2")
    assert "kept at the model's current values: ['gate']" in caplog.text
    saved = _state(small_model)
    after = _state(big_model)
    assert torch.equal(after["gate"], before["gate"])
    assert all(torch.equal(after[k], saved[k]) for k in saved)
    W.small_steps(big, 1)  # trains on: the missing parameter got a fresh optimizer state
    assert big.global_steps == 3 and torch.isfinite(big_model.gate).all()
    big.save_checkpoint(tmp_path / "big")
    fresh, fresh_model = _small(seed=9, extra=False)
    with pytest.raises(CheckpointError, match=r"not in the model: \['gate'\]"):
        fresh.load_checkpoint(tmp_path / "big")
    fresh.load_checkpoint(tmp_path / "big", load_module_strict=False)
    ref = _state(big_model)
    assert all(torch.equal(v, ref[k]) for k, v in fresh_model.state_dict().items())
    torch.manual_seed(1)
    odd = W.Small(extra=True)
    odd.gate = torch.nn.Parameter(torch.randn(32))  # same name, another shape
    odd_engine, *_ = shardwise.initialize(model=odd, config=W.small_config())
    with pytest.raises(CheckpointError, match="shape differs: gate: saved \\[64\\], model \\[32\\]"):
        odd_engine.load_checkpoint(tmp_path / "big", load_module_strict=False)  # shapes must agree even so


def test_exclude_frozen_parameters(tmp_path):
    engine, model = _small(seed=0)
    path = engine.save_checkpoint(tmp_path, exclude_frozen_parameters=True)
    doc = C.read_doc(path)
    assert "frozen" not in doc["tensors"] and doc["excluded"] == ["frozen"] and doc["buffers"] == ["scale"]
    assert "frozen" not in doc["state_dict_keys"] and "param:frozen" not in load_file(f"{path}/rank00000.safetensors")
    other, other_model = _small(seed=7)
    frozen = other_model.frozen.detach().clone()
    assert not torch.equal(frozen, model.frozen)
    with pytest.raises(CheckpointError, match=r"exclude_frozen_parameters=True .*\['frozen'\].*load_module_strict=False"):
        other.load_checkpoint(tmp_path)
    other.load_checkpoint(tmp_path, load_module_strict=False)
    ref = _state(model)
    got = _state(other_model)
    assert torch.equal(got["frozen"], frozen) and all(torch.equal(got[k], ref[k]) for k in ref if k != "frozen")
    sd = get_fp32_state_dict_from_zero_checkpoint(tmp_path, exclude_frozen_parameters=True)
    assert "frozen" not in sd and "scale" in sd and torch.equal(sd["lin.weight"], ref["lin.weight"])
    with pytest.raises(CheckpointError, match="format 2 checkpoint.*exclude_frozen_parameters needs format 4"):
        get_fp32_state_dict_from_zero_checkpoint(FIXTURES / "format2", exclude_frozen_parameters=True)


def test_signatures_positional_order_and_custom_load_fn(tmp_path):
    load = list(inspect.signature(Engine.load_checkpoint).parameters)
    assert load == ["self", "load_dir", "tag", "load_module_strict", "load_optimizer_states",
                    "load_lr_scheduler_states", "load_module_only", "custom_load_fn"]
    save = list(inspect.signature(Engine.save_checkpoint).parameters)
    assert save == ["self", "save_dir", "tag", "client_state", "save_latest", "exclude_frozen_parameters"]
    engine, model = _small()
    engine.save_checkpoint(tmp_path, "t", {"k": (1,)}, True, False)
    opt_before = {k: v.clone() for k, v in engine.optimizer.state[engine.strategy.buckets[0].opt_param].items()
                  if isinstance(v, torch.Tensor)}
    W.small_steps(engine, 1)
    # DeepSpeed's positional order: (dir, tag, load_module_strict, load_optimizer_states, ...)
    _, client = engine.load_checkpoint(tmp_path, "t", True, False)
    assert client == {"k": (1,)}
    opt_after = engine.optimizer.state[engine.strategy.buckets[0].opt_param]
    assert not torch.equal(opt_after["exp_avg"], opt_before["exp_avg"])  # optimizer state not loaded
    with pytest.raises(UsageError, match="custom_load_fn.*not supported.*get_fp32_state_dict_from_zero_checkpoint"):
        engine.load_checkpoint(tmp_path, custom_load_fn=lambda src, dst: None)


def test_zero_to_fp32_on_older_formats_and_bad_arguments(tmp_path):
    for fixture in ("format1", "format2"):
        expected = consolidate(FIXTURES / fixture, dtype=None)
        got = get_fp32_state_dict_from_zero_checkpoint(FIXTURES / fixture)
        assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    lazy = get_fp32_state_dict_from_zero_checkpoint(FIXTURES / "format2", lazy_mode=True)
    assert all(torch.equal(lazy[k].contiguous(), expected[k]) for k in expected)
    with pytest.raises(UsageError, match="pickle file"):
        convert_zero_checkpoint_to_fp32_state_dict(FIXTURES / "format2", tmp_path / "pytorch_model.bin")
    with pytest.raises(UsageError, match="pass tag=... by keyword"):
        convert_zero_checkpoint_to_fp32_state_dict(FIXTURES / "format2", tmp_path, "global_step2")
    files = convert_zero_checkpoint_to_fp32_state_dict(FIXTURES / "format2", tmp_path / "one.safetensors")
    assert files == [str(tmp_path / "one.safetensors")]
    assert cli(["zero_to_fp32", str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 2


@pytest.fixture(scope="module")
def stage3(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_api")
    return root, run_distributed(W.deepspeed_api_case, 2, str(root))


def test_two_ranks_none_broken_client_state(stage3):
    root, results = stage3
    for r in results:
        assert r["empty"] == (None, None) and r["empty2"] == (None, None)
        assert r["broken"].startswith("CheckpointError") and "global_step9" in r["broken"]
        assert r["path_a"] == str(root / "ckpt" / "7") and r["client_ok"]
    assert read_client_state(root / "ckpt", 7)["rank"] == 0  # rank 0's client state, as DeepSpeed keeps


def test_two_ranks_lenient_loads_at_stage3(stage3):
    _, results = stage3
    for r in results:
        assert "missing from the checkpoint" not in r["strict"] and "not in the model: ['gate']" in r["strict"]
        saved, b = r["saved_a"], r["state_b"]
        assert set(b) == set(saved) - {"gate"} and all(torch.equal(b[k], saved[k]) for k in b)
        assert "exclude_frozen_parameters=True" in r["strict_excluded"] and r["unchanged_after_refusal"]
        before, after, b_saved = r["before_a"], r["after_a"], r["state_b_saved"]
        assert torch.equal(after["gate"], before["gate"]) and torch.equal(after["frozen"], before["frozen"])
        assert not torch.equal(b_saved["frozen"], before["frozen"])  # (B's value was not taken)
        assert all(torch.equal(after[k], b_saved[k]) for k in b_saved if k != "frozen")
        assert r["steps_a"] == 4
    assert all(torch.equal(results[0]["after_a"][k], results[1]["after_a"][k]) for k in results[0]["after_a"])


def test_zero_to_fp32_equals_the_gathered_model_bitwise(stage3, tmp_path):
    """ZeRO-3 on 2 ranks: the functions and the CLI give the gathered state dict, bit for bit."""
    root, results = stage3
    whole = results[0]["saved_a"]
    sd = get_fp32_state_dict_from_zero_checkpoint(root / "ckpt", tag=7)
    assert list(sd) == list(whole) and all(sd[k].dtype == torch.float32 and torch.equal(sd[k], whole[k]) for k in sd)
    assert sd["head.weight"] is sd["emb.weight"]  # tied, as in model.state_dict()
    files = convert_zero_checkpoint_to_fp32_state_dict(root / "ckpt", tmp_path / "fn", tag=7)
    assert files == [str(tmp_path / "fn" / "model.safetensors")]
    written = load_file(files[0])
    assert set(written) == set(whole) - {"head.weight"}  # safetensors holds no shared tensors: once
    assert all(torch.equal(written[k], whole[k]) for k in written)
    assert cli(["zero_to_fp32", str(root / "ckpt"), str(tmp_path / "cli"), "--tag", "7",
                "--max_shard_size", "300B"]) == 0
    index = json.load(open(tmp_path / "cli" / "model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    cli_sd = {}
    for f in shards:
        cli_sd |= load_file(tmp_path / "cli" / f)
    assert cli_sd.keys() == written.keys() and all(torch.equal(cli_sd[k], whole[k]) for k in cli_sd)
    torch.manual_seed(3)
    plain = load_state_dict_from_zero_checkpoint(W.Small(extra=True), root / "ckpt", tag=7)
    assert all(torch.equal(v, whole[k]) for k, v in plain.state_dict().items())
    assert not os.path.exists(root / "ckpt" / "7" / "zero_to_fp32.py")  # nothing extra in the checkpoint
