"""A rank that dies or stops inside one pipeline stage (issue 15): every stage's ranks end within
the timeout + 15 s of the fault, and the dead / stopped rank is named with its mesh coordinates,
through the real launcher (`shardwise run` -> torchrun, gloo). The fault hits inside
train_batch's schedule, while the other stages wait in their sends / receives.

The pipeline's groups are made with the job's timeout: torch gives a sub-group its default of
30 minutes whatever the world group's, and a stopped peer would keep the other stage's
receive waiting that long ([Note: pipeline groups and timeouts] in shardwise/pipe/__init__.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from test_fault_launch import leftovers as launch_leftovers

SCRIPT = Path(__file__).parent / "fault_scripts" / "pipeline_fault.py"
TIMEOUT_S = 5
BOUND_S = TIMEOUT_S + 15
CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
          "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_optimization": {"stage": 1},
          "comms_timeout": TIMEOUT_S, "steps_per_print": 1000}


def launch(out: Path, fault: str, rank: int, nproc: int, pp: int = 2, step: int = 2) -> tuple[int, str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SHARDWISE_TIMEOUT")}
    cmd = [sys.executable, "-c", "from shardwise.cli import main; raise SystemExit(main())", "run",
           "--nproc-per-node", str(nproc), str(SCRIPT), str(out), json.dumps(CONFIG), fault, str(rank), str(step),
           str(pp)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=150)
    return proc.returncode, proc.stderr, time.time()


def leftovers(out: Path) -> list[int]:
    return launch_leftovers(out, SCRIPT)


def check_bound(out: Path, ended: float) -> None:
    fault = float((out / "fault_time").read_text())
    assert ended - fault <= BOUND_S, f"took {ended - fault:.1f} s after the fault (bound {BOUND_S} s)"
    assert not leftovers(out), "worker processes survived the launcher"
    assert not list(out.glob("done*")), "a rank finished training although a stage was gone"


def summary(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("shardwise run: ")]
    assert lines, f"no launcher summary in:\n{err[-3000:]}"
    return lines[-1]


def test_sigkill_in_the_last_stage_ends_every_stage(tmp_path):
    """(pp 2, dp 2): rank 3 (stage 1 of data-parallel replica 1) is SIGKILLed in its forward."""
    code, err, ended = launch(tmp_path, "kill", rank=3, nproc=4)
    assert code != 0
    line = summary(err)
    assert "rank 3 failed first" in line and "SIGKILL" in line, line
    # a survivor that saw it before the launcher stopped it names rank 3 with its coordinates
    named = [l for l in err.splitlines() if "CollectiveError: rank" in l]
    for l in named:
        assert "rank 3 (dp=1 pp=1) exited" in l, l
    check_bound(tmp_path, ended)


def test_sigstop_in_one_stage_is_a_timeout_naming_it(tmp_path):
    """(pp 2): rank 1 (the last stage) is SIGSTOPped: rank 0's receive times out after the
    comms_timeout and names it; the launcher then ends both."""
    code, err, ended = launch(tmp_path, "stop", rank=1, nproc=2)
    assert code != 0
    assert "CollectiveTimeoutError: rank 0 (dp=0 pp=0): train_batch: the pipeline schedule's sends/receives" in err, \
        err[-3000:]
    assert f"timed out after {TIMEOUT_S} s: rank 1 (dp=0 pp=1) is stopped" in err, err[-3000:]
    line = summary(err)
    assert "rank 0 failed first" in line and "rank 1 (dp=0 pp=1) is stopped" in line, line
    check_bound(tmp_path, ended)
