"""Offload tiers in the memory model, `shardwise estimate` and `shardwise plan --fit`
([Note: offload in the memory model] in ``shardwise/memory_model.py``).

Every figure is computed by hand for ``toy``: four bias-free Linear layers of 64, 32, 64 and 64
(frozen) elements at 2 ranks, buckets of 64 elements. Stages 1-2: the trainable parameters make
three buckets, last parameter first, of 64, 32 and 64 elements (padded to 160 in all; each a
multiple of 2 x 16), so rank 0's optimizer chunks are 32, 16 and 32 (Ψ_s = 80) in step order
and the frozen 64 stay whole. Stage 3: one unit per Linear; trainable chunks 32, 16, 32, the
frozen shard 32, so this rank's parameter shards are P = 112 elements (80 trainable).
``offload_optimizer.ratio`` 0.5 offloads whole chunks from the end until they hold >= 40
elements: 32 + 16 = 48 (two chunks, two ``step`` scalars). Swap buffers are page-aligned
(4096 B per chunk in a tile), which dominates at this size. ``wide`` (eight 64 x 64 layers,
buckets of 4096) is large enough for disk offload to need less host memory than cpu offload.
"""
from __future__ import annotations

import json
import sys
import types

from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from shardwise.cli import main as cli_main
from shardwise.errors import UsageError
from shardwise.estimate import (_offload_from_doc, _offload_from_plan, estimate_all, io_seconds, model_states,
                                offload_table, parse_bandwidth)
from shardwise.memory_model import OFFLOAD_KEYS, TRAFFIC_KEYS, Offload, offload_choices
from shardwise.planner import fit_analytic, fit_model, plan_model

W, BUCKET = 2, 64
DEVICE_KEYS = ("params", "grads", "master_params", "optimizer_state", "total")


def toy() -> nn.Module:
    m = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 4, bias=False), nn.Linear(4, 16, bias=False),
                      nn.Linear(16, 4, bias=False))
    m[3].weight.requires_grad_(False)
    return m


def wide() -> nn.Module:
    return nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(8)])


def states(stage, precision="bf16", offload=None, **kw):
    kw.setdefault("bucket_numel", BUCKET)
    return model_states(toy, W, stage, precision, offload=offload, **kw)


def tiers(s):
    return {k: s[k] for k in DEVICE_KEYS + OFFLOAD_KEYS + TRAFFIC_KEYS}


def expect(params, grads, master, state, host=0, disk=0, swap=0, read=0, write=0, h2d=0):
    return dict(params=params, grads=grads, master_params=master, optimizer_state=state,
                total=params + grads + master + state, host_offload=host, disk_offload=disk, swap_buffers=swap,
                io_read_bytes=read, io_write_bytes=write, host_device_bytes=h2d)


# -- the layout ----------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [1, 2])
def test_no_offload_is_the_resident_model(stage):
    for precision in ("fp32", "bf16"):
        plain = states(stage, precision)
        off = states(stage, precision, Offload())
        assert {k: off[k] for k in plain} == plain
        assert all(off[k] == 0 for k in OFFLOAD_KEYS + TRAFFIC_KEYS)
    # bf16 stage 1 by hand: params 2 x (160 + 64 frozen), grads 2 x 160, master 4 x 80, Adam 8 x 80 + 3 steps
    assert tiers(states(1, "bf16", Offload())) == expect(448, 320, 320, 652)
    assert tiers(states(2, "bf16", Offload())) == expect(448, 160, 320, 652)


@pytest.mark.parametrize("stage,grads", [(1, 320), (2, 160)])
def test_cpu_offload_stages_1_2(stage, grads):
    # ratio 1: all 80 elements; host: fp32 master 320 + Adam 640 + the 3 steps; D2H grads 2 x 80, H2D params 2 x 80
    assert tiers(states(stage, "bf16", Offload("cpu"))) == expect(448, grads, 0, 0, host=972, h2d=320)
    # ratio 0.5: chunks 32 + 16 offloaded (2 steps), 32 stay: master 4 x 32, state 8 x 32 + 1 step
    half = Offload("cpu", ratio=0.5)
    assert tiers(states(stage, "bf16", half)) == expect(448, grads, 128, 260, host=4 * 48 + 8 * 48 + 8, h2d=192)
    # fp32: no device master, the host still keeps its own fp32 master; 4-byte grads and params move
    g32 = 2 * grads
    assert tiers(states(stage, "fp32", half)) == expect(896, g32, 0, 260, host=584, h2d=4 * 48 + 4 * 48)


@pytest.mark.parametrize("stage,grads", [(1, 320), (2, 160)])
def test_nvme_offload_stages_1_2(stage, grads):
    half = Offload("nvme", ratio=0.5)
    # bf16: state 8 x 48 and master 4 x 48 on disk (3 kinds), read and written per step; steps stay.
    # Swap buffers: one tile of both chunks (16 + 32 <= min(sub_group_size, 48)), a page per chunk, one
    # buffer per kind; buffer_count 4 // 3 kinds = 1 slot
    assert tiers(states(stage, "bf16", half)) == expect(448, grads, 128, 652 - 384, disk=576, swap=3 * 2 * 4096,
                                                        read=576, write=576)
    # fp32: the master is the parameters (stay on the device): only Adam's 2 kinds go to disk; 2 slots,
    # one in use without pipelining
    assert tiers(states(stage, "fp32", half)) == expect(896, 2 * grads, 0, 268, disk=384, swap=2 * 2 * 4096,
                                                        read=384, write=384)
    # tiles of at least the largest offloaded chunk (32) when sub_group_size is smaller: 2 tiles of 1 page
    small = Offload("nvme", ratio=0.5, sub_group_size=20)
    assert states(stage, "bf16", small)["swap_buffers"] == 3 * 4096
    assert states(stage, "fp32", small)["swap_buffers"] == 2 * 4096
    assert states(stage, "fp32", replace(small, pipeline_read=True))["swap_buffers"] == 2 * 2 * 4096  # 2 slots
    # SGD without momentum at fp32 has nothing to swap
    none = states(stage, "fp32", Offload("nvme"), optimizer="sgd-nomomentum")
    assert none["disk_offload"] == none["swap_buffers"] == none["io_read_bytes"] == 0


def test_stage3_optimizer_offload():
    # bf16: params 2 x 112 (shards incl. the frozen one), grads 2 x 80, master 4 x 80, Adam 8 x 80 + 3 steps
    assert tiers(states(3, "bf16", Offload())) == expect(224, 160, 320, 652)
    assert tiers(states(3, "bf16", Offload("cpu", ratio=0.5))) == expect(224, 160, 128, 260, host=584, h2d=192)
    assert tiers(states(3, "fp32", Offload("nvme", ratio=0.5))) == expect(448, 320, 0, 268, disk=384,
                                                                         swap=2 * 2 * 4096, read=384, write=384)


def test_stage3_param_offload():
    # cpu: all 112 shard elements (2 B) to host; H2D 2 gathers x 224 B, D2H the 80 updated trainable elements
    assert tiers(states(3, "bf16", Offload(param="cpu"))) == expect(0, 160, 320, 652, host=224, h2d=448 + 160)
    # fp32: each offloaded trainable shard gets its own fp32 master, on the device here (4 x 80)
    assert tiers(states(3, "fp32", Offload(param="cpu"))) == expect(0, 320, 320, 652, host=448,
                                                                    h2d=2 * 4 * 112 + 4 * 80)
    # nvme, max_in_cpu 40: every shard on disk (2 x 112); whole shards in build order while they fit in
    # 40 elements are kept in host memory too: the first (32); reads 2 gathers x 80 x 2 B; writes the 80
    # updated trainable elements; write-behind buffers of the last 2 shards stored (16 and 32: a page each);
    # H2D 2 gathers x 32 x 2 B + D2H of the 80 updated elements
    nv = Offload(param="nvme", max_in_cpu=40, param_buffer_count=2, param_buffer_size=100)
    assert tiers(states(3, "bf16", nv)) == expect(0, 160, 320, 652, host=64, disk=224, swap=2 * 4096, read=320,
                                                  write=160, h2d=128 + 160)
    # gradient accumulation: every micro-step gathers twice
    assert states(3, "bf16", nv, gradient_accumulation_steps=4)["io_read_bytes"] == 4 * 320
    # both offloaded, bf16: the host steps its own shards, nothing goes back
    both = tiers(states(3, "bf16", Offload("cpu", "cpu")))
    assert both == expect(0, 160, 0, 0, host=224 + 320 + 640 + 12, h2d=160 + 448)
    # fp32, both on disk, nothing in host memory: the parameter files are the masters (4 x 112 on disk, the
    # optimizer's files only Adam's 8 x 80); the tile walk reads and writes master + state (12 x 80), the
    # gathers read 2 x 4 x 112; one tile of the three chunks (3 pages) x 3 kinds; no parameter write-behind
    disk = Offload("nvme", "nvme", max_in_cpu=0, param_buffer_count=2, param_buffer_size=100)
    assert tiers(states(3, "fp32", disk)) == expect(0, 320, 0, 12, disk=8 * 80 + 4 * 112, swap=3 * 3 * 4096,
                                                    read=12 * 80 + 2 * 4 * 112, write=12 * 80)


def test_stage3_resident_params_stay_on_device():
    # persistence threshold 40: the 32-element parameter is kept whole (32 elements on every rank); its
    # chunk (16) is still an optimizer chunk, so the optimizer offloads it, offload_param does not
    s = tiers(states(3, "bf16", Offload(param="cpu"), persistence_threshold=40))
    assert s["params"] == 2 * 32 and s["host_offload"] == 2 * 96
    assert states(3, "bf16", Offload("cpu"), persistence_threshold=40)["host_offload"] == 12 * 80 + 12


def test_invalid_choices_and_rows():
    with pytest.raises(UsageError, match="stage >= 1"):
        states(0, "bf16", Offload("cpu"))
    with pytest.raises(UsageError, match="stage 3"):
        states(2, "bf16", Offload(param="nvme"))
    with pytest.raises(UsageError, match="ratio"):
        Offload("cpu", ratio=1.5)
    with pytest.raises(UsageError, match="device"):
        Offload("disk")
    assert [len(offload_choices(s)) for s in range(4)] == [1, 3, 3, 9]
    rows = offload_table(toy, W, bucket_numel=BUCKET)
    assert len(rows) == 16 and rows[0]["stage"] == 0 and {r["offload_param"] for r in rows[:7]} == {"none"}
    assert estimate_all(toy, W, precision="bf16", bucket_numel=BUCKET)["stages"]["1"] == states(1)  # no new keys


# -- analytic, bytes moved, predicted time --------------------------------------------------------
def test_analytic_offload_and_io_time():
    n = 1000  # shard 500 at 2 ranks; ratio 0.5 -> 250 elements, no chunks, no step scalars
    s = model_states(n, 2, 1, "bf16", offload=Offload("cpu", ratio=0.5))
    assert tiers(s) == expect(2000, 2000, 1000, 2000, host=3000, h2d=1000)
    s = model_states(n, 2, 1, "bf16", offload=Offload("nvme", ratio=0.5))  # 1 slot x 3 kinds x 250 x 4 B
    assert tiers(s) == expect(2000, 2000, 1000, 2000, disk=3000, swap=3000, read=3000, write=3000)
    assert io_seconds(s, (0.5, 0.25)) == pytest.approx(3000 / 0.5e9 + 3000 / 0.25e9)
    assert io_seconds(s, None) is None
    s3 = model_states(n, 2, 3, "bf16", offload=Offload(param="nvme", max_in_cpu=100, param_buffer_count=1,
                                                       param_buffer_size=10))
    assert (s3["params"], s3["host_offload"], s3["disk_offload"], s3["swap_buffers"]) == (0, 200, 1000, 20)
    assert (s3["io_read_bytes"], s3["io_write_bytes"], s3["host_device_bytes"]) == (2 * 800, 1000, 400 + 1000)
    assert parse_bandwidth("0.5") == (0.5, 0.5) and parse_bandwidth("0.8,0.4") == (0.8, 0.4)
    with pytest.raises(UsageError, match="bandwidth"):
        parse_bandwidth("fast")


def test_offload_read_from_the_raw_config():
    doc = {"zero_optimization": {"stage": 3, "sub_group_size": 1e6,
                                 "offload_optimizer": {"device": "nvme", "nvme_path": "/x", "ratio": 0.25,
                                                       "buffer_count": 6},
                                 "offload_param": {"device": "cpu", "max_in_cpu": "auto"}}}
    got = _offload_from_doc(doc)
    assert (got.optimizer, got.param, got.ratio, got.sub_group_size, got.buffer_count) == ("nvme", "cpu", 0.25,
                                                                                           10**6, 6)
    assert got.max_in_cpu == Offload().max_in_cpu  # unreadable: the default
    assert _offload_from_doc({"zero_optimization": {"cpu_offload": True}}).optimizer == "cpu"
    assert not _offload_from_doc({}).enabled
    # the validated plan's offload (shardwise.config.plan.OffloadPlan's fields) wins when present
    ns = types.SimpleNamespace
    plan = ns(offload=ns(optimizer=ns(device="cpu", ratio=0.5, buffer_count=3), sub_group_size=1000,
                         param=ns(device="nvme", buffer_count=2, buffer_size=100, max_in_cpu=7)))
    assert _offload_from_plan(plan) == Offload("cpu", "nvme", 0.5, 1000, 3, 2, 100, 7)
    assert _offload_from_plan(ns()) is None and _offload_from_plan(ns(offload=ns(optimizer=None))) is None


# -- plan and --fit ----------------------------------------------------------------------------------
def model():
    with torch.device("meta"):
        return toy()


def test_plan_model_with_offload_matches_the_estimate():
    m = model()
    for stage, choice in ((1, Offload("cpu", ratio=0.5)), (3, Offload("nvme", "cpu"))):
        r = plan_model(m, W, stage, precision="bf16", bucket_numel=BUCKET, offload=choice)
        want = states(stage, "bf16", choice)
        assert r.max_bytes == want["total"] and r.tiers == {k: want[k] for k in OFFLOAD_KEYS + TRAFFIC_KEYS}
        assert r.to_json()["offload"]["offload_optimizer"] == choice.optimizer
        plain = plan_model(m, W, stage, precision="bf16", bucket_numel=BUCKET)
        assert "offload" not in plain.to_json() and plain.with_offload(choice).max_bytes == want["total"]


def fit(device, host=None, disk=None, **kw):
    return fit_model(model(), W, device, host, disk, precision="bf16", bucket_numel=BUCKET, **kw)


def test_fit_everything_fits_on_the_device():
    f = fit(10_000)  # host memory and disk not checked
    assert f.best is not None and (f.best.stage, f.best.offload.optimizer, f.best.offload.param) == (0, "none", "none")
    assert len(f.candidates) == 16 and all(c.fits for c in f.candidates)
    assert f.best.config() == {"zero_optimization": {"stage": 0}}
    by = {(c.stage, c.offload.optimizer, c.offload.param): c for c in f.candidates}
    assert "more disk traffic" in by[(1, "nvme", "none")].reason
    assert "more host<->device traffic" in by[(1, "cpu", "none")].reason
    assert "more communication" in by[(3, "none", "none")].reason


def test_fit_device_too_small_host_big_picks_cpu():
    # device needs without offload: stage 0 2700 B, 1 1740 B, 2 1580 + 512 staging, 3 1356 + 384 gathered
    f = fit(1000, 1_000_000)
    best = f.best
    assert (best.stage, best.offload.optimizer, best.offload.param) == (1, "cpu", "none")
    assert best.device_bytes == 448 + 320 and best.host_bytes == 972
    by = {(c.stage, c.offload.optimizer, c.offload.param): c for c in f.candidates}
    assert by[(0, "none", "none")].reason == "does not fit: device needs 2.70 kB > 1.00 kB (over by 1.70 kB)"
    assert "more communication" in by[(3, "cpu", "none")].reason  # same copies, 960 vs 640 B of collectives
    assert "more disk traffic" in by[(3, "cpu", "nvme")].reason  # the updated shards are written


def test_fit_host_too_small_picks_nvme_with_reasons(capsys):
    # wide at 2 ranks, buckets of 4096: eight chunks of 2048 (Ψ_s 16384). bf16 stage 1: params and grads
    # 2 x 32768 each, master 4 x 16384, Adam 8 x 16384 + 8 steps. cpu offload needs 12 x 16384 + 32 B of
    # host memory; nvme with tiles of one chunk (sub_group_size 2048) one slot of 3 kinds x 8 kB
    with torch.device("meta"):
        m = wide()
    base = Offload(sub_group_size=2048)
    f = fit_model(m, W, 200_000, 100_000, 10**7, base=base, bandwidth=(0.5, 0.5), precision="bf16",
                  bucket_numel=4096)
    best = f.best
    assert (best.stage, best.offload.optimizer, best.offload.param) == (1, "nvme", "none")
    assert (best.device_bytes, best.host_bytes, best.disk_bytes) == (2 * 65536 + 32, 3 * 8192, 12 * 16384)
    by = {(c.stage, c.offload.optimizer, c.offload.param): c for c in f.candidates}
    assert by[(1, "cpu", "none")].reason == ("does not fit: host memory needs 196.64 kB > 100.00 kB "
                                             "(over by 96.64 kB)")
    assert by[(1, "none", "none")].overflow == {"device": (327712, 200_000)}
    assert by[(2, "nvme", "none")].reason == "fits at the same traffic, but a higher stage (2 vs 1)"
    assert "more communication" in by[(3, "nvme", "none")].reason
    assert f.to_json()["recommended"]["config"] == {"zero_optimization": {"stage": 1,
                                                                          "offload_optimizer": {"device": "nvme"}}}
    # per node: the ranks of a node share its host memory (24.6 kB of swap buffers each)
    def per_node(rpn):
        return fit_model(m, W, 200_000, 40_000, 10**7, base=base, ranks_per_node=rpn, precision="bf16",
                         bucket_numel=4096).best
    assert per_node(1).offload.optimizer == "nvme" and per_node(2) is None
    from shardwise.planner import _print_fit
    _print_fit(f)
    text = capsys.readouterr().out
    assert "recommended: stage 1, offload_optimizer nvme" in text and "over by 96.64 kB" in text
    assert "s of disk I/O per step" in text


def test_fit_analytic():
    n, G = 3_000_000_000, 10**9  # bf16 Adam at 8 ranks: 48 GB at stage 0, 6 GB at stage 3

    def best(*budgets, **kw):
        b = fit_analytic(n, 8, *budgets, precision="bf16", **kw).best
        return (b.stage, b.offload.optimizer, b.offload.param)

    assert best(60 * G) == (0, "none", "none")
    assert best(10 * G) == (3, "none", "none")  # stage 1 with cpu offload fits too (12 GB), but copies
    assert best(2 * G, 2000 * G) == (3, "cpu", "none")  # 0.75 GB params + 0.75 GB grads on the device
    # the host holds 4.5 GB of master + Adam: too much; on disk with 160 MB of swap buffers
    assert best(2 * G, G, 1000 * G, base=Offload(sub_group_size=10**7)) == (3, "nvme", "none")


# -- CLI --------------------------------------------------------------------------------------------
def test_cli_estimate_offload_table(capsys):
    assert cli_main(["estimate", "--model", "test_offload_estimate:toy", "--world-size", "2",
                     "--offload-ratio", "0.5", "--disk-bandwidth", "0.5,0.25"]) == 0
    text = capsys.readouterr().out
    assert "offload (offload_optimizer.ratio 0.5" in text and "io time" in text and "nvme" in text
    assert cli_main(["estimate", "--model", "test_offload_estimate:toy", "--world-size", "2", "--json",
                     "--disk-bandwidth", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["stages"]) == ["0", "1", "2", "3"] and len(out["offload"]["rows"]) == 16
    row = next(r for r in out["offload"]["rows"] if (r["stage"], r["offload_optimizer"]) == (1, "nvme"))
    assert row["io_seconds"] == pytest.approx((row["io_read_bytes"] + row["io_write_bytes"]) / 0.5e9)
    assert out["offload"]["disk_bandwidth_gbps"] == {"read": 0.5, "write": 0.5}


def test_cli_estimate_measure_disk(capsys, monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("shardwise.offload.aio")
    fake.measure_bandwidth = lambda directory, nbytes=256 << 20, **kw: calls.append(directory) or (2.0, 1.0)
    monkeypatch.setitem(sys.modules, "shardwise.offload.aio", fake)
    assert cli_main(["estimate", "--params", "1e6", "--world-size", "2", "--measure-disk", str(tmp_path),
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert calls == [str(tmp_path)] and out["offload"]["disk_bandwidth_gbps"] == {"read": 2.0, "write": 1.0}
    assert cli_main(["estimate", "--params", "1e6", "--world-size", "2", "--measure-disk",
                     str(tmp_path / "missing")]) == 2


def write_config(tmp_path, bucket=BUCKET, name="ds.json", **zero) -> str:
    doc = {"train_batch_size": 8, "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
           "zero_optimization": {"reduce_bucket_size": bucket, **zero}}
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def test_cli_plan_fit(capsys, tmp_path):
    wide_cfg = write_config(tmp_path, bucket=4096, name="wide.json", sub_group_size=10**9)
    assert cli_main(["plan", wide_cfg, "--model", "test_offload_estimate:wide", "--world-size", "2", "--fit",
                     "200KB", "--host-memory", "100KB", "--disk", "10MB", "--sub-group-size", "2048",
                     "--disk-bandwidth", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "recommended: stage 1, offload_optimizer nvme, offload_param none" in text
    assert "over by 96.64 kB" in text and "every other combination" in text
    path = write_config(tmp_path)
    args = ["plan", path, "--model", "test_offload_estimate:toy", "--world-size", "2"]
    assert cli_main(args + ["--fit", "1000B", "--host-memory", "1MB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recommended"]["offload_optimizer"] == "cpu" and len(out["candidates"]) == 16
    assert cli_main(args + ["--fit", "100B"]) == 1  # nothing fits
    assert "nothing fits" in capsys.readouterr().out
    assert cli_main(["plan", path, "--params", "3e9", "--world-size", "8", "--fit", "2GB", "--host-memory",
                     "2TB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recommended"]["offload_optimizer"] == "cpu"
    assert cli_main(["plan", path, "--params", "3e9", "--world-size", "8"]) == 2  # analytic needs --fit


def test_cli_plan_reads_the_config_offload(capsys, tmp_path):
    path = write_config(tmp_path, stage=2, offload_optimizer={"device": "cpu", "ratio": 0.5})
    assert cli_main(["plan", path, "--model", "test_offload_estimate:toy", "--world-size", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = states(2, "bf16", Offload("cpu", ratio=0.5))
    assert out["offload"]["host_offload"] == want["host_offload"]
    assert out["model_state_bytes_per_rank"]["max"] == want["total"]
    assert cli_main(["plan", path, "--model", "test_offload_estimate:toy", "--world-size", "2"]) == 0
    assert "offload (optimizer cpu, param none, ratio 0.5" in capsys.readouterr().out
