"""ZeRO-Offload / ZeRO-Infinity parity (issue 13): the same training with the optimizer's
masters and state resident, in host memory (``cpu``) or on disk (``nvme``) gives bitwise the
same parameters and optimizer state after every step, at stages 1-3 on 1-3 ranks, for
AdamW, Adam, SGD with momentum, Adagrad and a client optimizer; with accumulation, clipping,
bf16 and ``ratio`` 0.5. Resident training is itself tested against plain PyTorch
(test_parity.py, test_stage3.py); here each run also shows that the state really lived in
its tier (memory_report, the swap files), so that offload silently doing nothing fails.
See [Note: offload tiers] and [Note: the tile walk] in shardwise/offload/."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offload_workers import train
from shardwise.testing import run_distributed

CPU = {"device": "cpu"}
NVME = {"device": "nvme", "pipeline_read": True, "pipeline_write": True, "buffer_count": 6}
NVME_SYNC = {"device": "nvme"}


def _equal(got: dict, want: dict) -> None:
    assert got["losses"] == want["losses"]
    for step, (g, w) in enumerate(zip(got["params"], want["params"])):
        assert g.keys() == w.keys()
        for k in w:
            assert torch.equal(g[k], w[k]), f"step {step}: {k} differs"
    assert got["state"].keys() == want["state"].keys()
    for k in want["state"]:
        assert torch.equal(got["state"][k], want["state"][k]), f"optimizer state {k} differs"


def _resident_state(r: dict) -> int:
    return r["reports"][-1]["optimizer_state"]


def _check_nvme(r: dict, *, ratio: float = 1.0) -> None:
    rep = r["reports"][-1]
    assert rep["disk_offload"] > 0 and rep["swap_buffers"] > 0, rep
    files = r["files"][-1]
    assert files and all(f.split("/")[-2].startswith("rank") for f in files), files
    if ratio == 1.0:  # only the 4-byte step counts stay resident
        assert rep["optimizer_state"] < 0.05 * rep["disk_offload"], rep
    assert r["state_after"].keys() == r["state"].keys()
    for k in r["state"]:  # reading the state for the checkpoint changed nothing
        assert torch.equal(r["state_after"][k], r["state"][k])


@pytest.mark.parametrize("stage,world", [(1, 2), (2, 3), (3, 1), (3, 2)])
def test_adamw_state_offloaded_to_cpu_and_nvme_is_bitwise_resident(stage, world, tmp_path):
    base = run_distributed(train, world, stage, None)
    host = run_distributed(train, world, stage, CPU)
    disk = run_distributed(train, world, stage, NVME, nvme_path=str(tmp_path))
    for b, h, d in zip(base, host, disk):
        _equal(h, b)
        _equal(d, b)
        assert h["reports"][-1]["host_offload"] > 0 and h["reports"][-1]["optimizer_state"] < \
            b["reports"][-1]["optimizer_state"] * 0.05
        _check_nvme(d)
    assert base[0]["losses"][-1] < base[0]["losses"][0]


@pytest.mark.parametrize("optimizer,stage", [("adam", 2), ("sgd", 3), ("adagrad", 1), ("client", 3)])
def test_other_optimizers_on_nvme_are_bitwise_resident(optimizer, stage, tmp_path):
    base = run_distributed(train, 2, stage, None, optimizer)
    disk = run_distributed(train, 2, stage, NVME_SYNC, optimizer, nvme_path=str(tmp_path))
    for b, d in zip(base, disk):
        _equal(d, b)
        _check_nvme(d)


@pytest.mark.parametrize("stage", [1, 3])
def test_accumulation_and_clipping_with_offload(stage, tmp_path):
    kw = dict(gas=2, clip=0.05)
    base = run_distributed(train, 2, stage, None, **kw)
    disk = run_distributed(train, 2, stage, NVME, nvme_path=str(tmp_path), **kw)
    host = run_distributed(train, 2, stage, CPU, **kw)
    for b, d, h in zip(base, disk, host):
        _equal(d, b)
        _equal(h, b)


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_ratio_half_offloads_part_of_the_state(device, tmp_path):
    base = run_distributed(train, 2, 2, None)
    part = run_distributed(train, 2, 2, {"device": device, "ratio": 0.5}, nvme_path=str(tmp_path))
    for b, p in zip(base, part):
        _equal(p, b)
        rep, full = p["reports"][-1], b["reports"][-1]["optimizer_state"]
        off = rep["disk_offload"] if device == "nvme" else rep["host_offload"]
        assert 0.2 * full < rep["optimizer_state"] < 0.8 * full, (rep, full)
        assert off > 0


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_with_the_master_on_disk(stage, tmp_path):
    """bf16: the fp32 master goes to disk too (3 kinds per tile); still bitwise the resident run."""
    base = run_distributed(train, 2, stage, None, precision="bf16")
    disk = run_distributed(train, 2, stage, NVME, precision="bf16", nvme_path=str(tmp_path))
    for b, d in zip(base, disk):
        _equal(d, b)
        _check_nvme(d)
        assert d["reports"][-1]["master_params"] == 0


def _script(tmp_path, mode: str) -> subprocess.Popen:
    store = tmp_path / f"store-{mode}"
    return subprocess.Popen([sys.executable, str(Path(__file__).with_name("offload_script.py")), str(tmp_path / "nvme"),
                             str(store), mode], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_swap_files_are_scratch_removed_at_exit_by_destroy_and_after_a_kill(tmp_path):
    """A clean exit and ``engine.destroy()`` remove the rank's swap files; a SIGKILLed run
    leaves them, and the next run of the job clears that stale set with a warning."""
    (tmp_path / "nvme").mkdir()
    out = _script(tmp_path, "exit").communicate(timeout=120)[0]
    assert "swap files: 3" in out, out  # exp_avg, exp_avg_sq and the owner file
    assert not _files(tmp_path / "nvme"), _files(tmp_path / "nvme")
    out = _script(tmp_path, "destroy").communicate(timeout=120)[0]
    assert "after destroy: 0" in out, out
    p = _script(tmp_path, "hang")
    for line in p.stdout:
        if line.startswith("ready"):
            break
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert len(_files(tmp_path / "nvme")) == 3
    out = _script(tmp_path, "exit").communicate(timeout=120)[0]
    assert "stale swap directory" in out and "did not exit cleanly" in out, out
    assert not _files(tmp_path / "nvme")


@pytest.mark.parametrize("save,load", [
    ((2, 2, NVME), (3, 1, None)),  # nvme at stage 2 on 2 ranks -> no offload, stage 3, 1 rank
    ((1, 1, None), (3, 2, NVME)),  # the reverse
    ((3, 2, CPU), (2, 3, NVME)),
])
def test_checkpoints_move_between_offload_modes_world_sizes_and_stages(save, load, tmp_path):
    """Save with one tier, load with another at another world size and stage: the loaded
    weights are bitwise the saved ones, and training goes on exactly as it did after the save."""
    from offload_workers import load_then_train, save_then_train

    (s_stage, s_world, s_off), (l_stage, l_world, l_off) = save, load
    ck = str(tmp_path / "ck")
    (tmp_path / "swap_a").mkdir()
    (tmp_path / "swap_b").mkdir()
    a = run_distributed(save_then_train, s_world, s_stage, s_off, ck, str(tmp_path / "swap_a"))[0]
    b = run_distributed(load_then_train, l_world, l_stage, l_off, ck, str(tmp_path / "swap_b"))[0]
    for k in a["saved"]:
        assert torch.equal(b["loaded"][k], a["saved"][k]), k
    # after the load: the same batches give the same losses (fp32 parity across world sizes)
    torch.testing.assert_close(b["after"], a["after"], rtol=1e-6, atol=0)
    for k in a["params"]:
        torch.testing.assert_close(b["params"][k], a["params"][k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("damage,expect", [("truncate", "SwapFileCorruptError"),
                                            ("delete", "SwapFileCorruptError")])
def test_a_damaged_swap_file_is_a_named_error_never_zeros(damage, expect, tmp_path):
    from offload_workers import damaged_swap

    for msg in run_distributed(damaged_swap, 2, 2, damage, str(tmp_path)):
        assert msg.startswith(expect), msg
        assert "exp_avg.swp" in msg and "rank" in msg, msg


@pytest.mark.parametrize("remote", ["nvme", "cpu"])
def test_zero_init_remote_device_builds_into_the_tier(remote, tmp_path):
    """``zero.Init(remote_device=...)`` keeps each split chunk in its tier while the model is
    built (nvme: one file per parameter, nothing in memory), and training is bitwise the same
    as a model built under ``zero.Init`` without it; the spill files are gone afterwards."""
    from offload_workers import built_under_init

    plain = run_distributed(built_under_init, 2, None, str(tmp_path))
    got = run_distributed(built_under_init, 2, remote, str(tmp_path))
    for p, g in zip(plain, got):
        assert g["losses"] == p["losses"]
        for k in p["params"]:
            assert torch.equal(g["params"][k], p["params"][k]), k
        assert all(p["kept_in_memory"])
        if remote == "nvme":
            assert g["spilled"] == 10 and not any(g["kept_in_memory"]), g  # 5 weights + 5 biases
        assert g["init_files_after"] == 0


def test_host_memory_budget_is_checked_and_says_what_fits(tmp_path):
    from offload_workers import budget_error

    msg = run_distributed(budget_error, 1, "4KB", str(tmp_path))[0]
    assert msg.startswith("ConfigError") and "offload.host_memory_budget" in msg, msg
    assert "buffer_count" in msg and "sub_group_size" in msg, msg
    assert run_distributed(budget_error, 1, "1GB", str(tmp_path))[0] == "no error"


REPORT_CASES = [(2, "fp32", NVME_SYNC, None), (1, "bf16", {"device": "nvme", "ratio": 0.5}, None),
                (3, "fp32", CPU, None), (3, "fp32", NVME_SYNC, {"device": "nvme"}),
                (3, "bf16", NVME_SYNC, {"device": "cpu"})]


@pytest.mark.parametrize("world", [1, 2])
def test_estimate_equals_memory_report_with_offload(world, tmp_path):
    """The memory model's device / host / disk / swap-buffer bytes equal what the engine
    reports after a step, on every rank ([Note: offload in the memory model])."""
    from offload_workers import MLP, measured_reports
    from shardwise.estimate import model_states
    from shardwise.memory_model import Offload

    measured = run_distributed(measured_reports, world, REPORT_CASES, str(tmp_path))
    keys = ("params", "grads", "master_params", "optimizer_state", "host_offload", "disk_offload", "swap_buffers")
    for i, (stage, precision, opt, param) in enumerate(REPORT_CASES):
        off = Offload(optimizer=opt["device"], param=(param or {}).get("device", "none"), ratio=opt.get("ratio", 1.0),
                      sub_group_size=150, max_in_cpu=1_000_000_000)
        for rank, per_rank in enumerate(measured):
            got = per_rank[i]
            want = model_states(MLP(), world, stage, precision, bucket_numel=96, rank=rank, offload=off)
            assert {k: want[k] for k in keys} == {k: got[k] for k in keys}, (stage, precision, opt, param, rank)


def test_a_second_engine_in_one_process(tmp_path):
    from offload_workers import two_engines

    r = run_distributed(two_engines, 1, str(tmp_path))[0]
    assert r["alive"].startswith("OffloadIOError") and "engine.destroy()" in r["alive"], r
