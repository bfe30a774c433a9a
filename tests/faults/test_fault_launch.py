"""faults.md rows 1-3, 13, 14, 18 through the real launcher (`shardwise run` -> torchrun, gloo,
2 ranks): exit codes, the named messages, and the wall-clock bound (every process gone within
the timeout + 15 s of the fault)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "fault_scripts" / "fault_train.py"
TIMEOUT_S = 5
BOUND_S = TIMEOUT_S + 15


def config(**extra) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 2,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "zero_optimization": {"stage": 2, "reduce_bucket_size": 6000},
           "comms_timeout": TIMEOUT_S, "steps_per_print": 1000}
    cfg.update(extra)
    return cfg


def launch(out: Path, cfg: dict, fault: str, rank: int = 1, step: int = 2, steps: int = 4,
           launcher_args: tuple = ()) -> tuple[int, str, float]:
    """Run the fault script on 2 ranks; returns (exit code, stderr, time the launcher returned)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                         "SHARDWISE_TIMEOUT")}
    cmd = [sys.executable, "-c", "from shardwise.cli import main; raise SystemExit(main())", "run",
           "--nproc-per-node", "2", *launcher_args, str(SCRIPT), str(out), json.dumps(cfg), fault,
           str(rank), str(step), str(steps)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=150)
    return proc.returncode, proc.stderr, time.time()


def leftovers(out: Path, script: Path = SCRIPT) -> list[int]:
    """Processes still running ``script`` for this test's output directory."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(out).encode() in cmdline and str(script.name).encode() in cmdline:
                found.append(int(pid))
    return found


def check_bound(out: Path, ended: float) -> None:
    fault = float((out / "fault_time").read_text())
    assert ended - fault <= BOUND_S, f"took {ended - fault:.1f} s after the fault (bound {BOUND_S} s)"
    assert not leftovers(out), "worker processes survived the launcher"


def summary(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("shardwise run: ")]
    assert lines, f"no launcher summary in:\n{err[-3000:]}"
    return lines[-1]


def test_sigkill_one_rank_mid_step(tmp_path):
    code, err, ended = launch(tmp_path, config(), "kill")
    assert code != 0
    # the survivor names the dead rank; the launcher names the first failure and its signal.
    # torchrun SIGTERMs the survivor as soon as it sees rank 1 gone, which can be before gloo
    # fails the survivor's all_reduce (seen in 3 of ~15 runs on a loaded machine): then it is the
    # launcher's stop that ends rank 0, and the summary line below is the whole report
    if "CollectiveError: rank 0: all_reduce" in err:
        assert "rank 1 exited" in err, err[-3000:]
    else:
        assert "closing signal SIGTERM" in err, err[-3000:]
    assert "rank 1 failed first" in summary(err) and "SIGKILL" in summary(err)
    check_bound(tmp_path, ended)


def test_sigstop_one_rank_inside_a_collective(tmp_path):
    code, err, ended = launch(tmp_path, config(), "stop")
    assert code != 0
    assert "CollectiveTimeoutError: rank 0: all_reduce" in err, err[-3000:]
    assert f"timed out after {TIMEOUT_S} s: rank 1 is stopped" in err
    line = summary(err)
    assert "rank 0 failed first" in line and "rank 1 is stopped" in line
    check_bound(tmp_path, ended)


def test_exception_on_one_rank(tmp_path):
    code, err, ended = launch(tmp_path, config(), "raise")
    assert code != 0
    assert "[rank1]: Traceback" in err and "ValueError: injected failure on rank 1 at step 2" in err
    line = summary(err)
    assert "rank 1 failed first" in line and "ValueError: injected failure" in line
    check_bound(tmp_path, ended)


def test_rank_that_never_joins(tmp_path):
    code, err, ended = launch(tmp_path, config(), "nojoin")
    assert code != 0
    assert "1 of 2 ranks joined within 5 s; missing ranks [1]" in err, err[-3000:]
    assert "JoinError" in summary(err)
    check_bound(tmp_path, ended)


def test_config_differs_across_ranks(tmp_path):
    code, err, _ = launch(tmp_path, config(), "mismatch")
    assert code != 0
    for r in (0, 1):
        assert f"[rank{r}]: shardwise.errors.MismatchError: the ranks started with different configs" in err
    assert "zero.stage: rank 0: 2; rank 1: 1" in err, err[-3000:]


def test_nan_loss_on_one_rank_is_an_error_on_every_rank(tmp_path):
    code, err, _ = launch(tmp_path, config(zero_optimization={"stage": 1}), "nan")
    assert code != 0
    for r in (0, 1):
        assert f"[rank{r}]: shardwise.errors.NonFiniteError: the loss or gradient norm is NaN or inf " \
               "at optimizer step 2" in err, err[-3000:]
    assert "The loss was NaN/inf on rank(s) [1]" in err
    assert not (tmp_path / "final.pt").exists()


@pytest.mark.parametrize("offload", [None, "nvme"])
def test_restart_resumes_bitwise(tmp_path, offload):
    """--max-restarts 1 + checkpoint.auto_resume: rank 1 is SIGKILLed at step 3 on the first
    attempt; the group restarts from the step-2 commit and ends equal to an uninterrupted run.
    With the optimizer state on disk the kill comes with the step's first swap write in flight;
    the restarted ranks clear the killed run's swap files and resume from the checkpoint."""
    runs = {}
    kill = "kill_in_write_once" if offload else "kill_once"
    for name, fault, extra in (("restarted", kill, ("--max-restarts", "1")), ("plain", "none", ())):
        out = tmp_path / name
        out.mkdir()
        cfg = config(checkpoint={"dir": str(out / "ckpt"), "auto_resume": True, "save_interval": 2})
        if offload:
            (out / "nvme").mkdir()
            cfg["zero_optimization"] = {**cfg["zero_optimization"], "sub_group_size": 3000,
                                        "offload_optimizer": {"device": "nvme", "nvme_path": str(out / "nvme")}}
        code, err, _ = launch(out, cfg, fault, step=3, steps=6, launcher_args=extra)
        assert code == 0, err[-3000:]
        runs[name] = torch.load(out / "final.pt", weights_only=False)
    a, b = runs["restarted"], runs["plain"]
    assert a["attempt"] == 1 and b["attempt"] == 0
    assert a["global_steps"] == b["global_steps"] == 6
    for k in b["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    for sa, sb in zip(a["opt"], b["opt"]):
        for k in sb:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k
