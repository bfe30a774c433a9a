"""The heartbeat across hosts (comm/health.py): finished ranks exit cleanly with it running,
and a rank on another host that stops inside a collective is named through it.

"Other hosts" are UTS namespaces: every rank gets its own host name (heartbeat_scripts/hb_jobs.py
unshares CLONE_NEWUTS in each rank), so shardwise takes the multi-host path: /proc is not asked
about peers, the heartbeat is. SHARDWISE_HB_JOBS sets the number of exit jobs (default 50;
heartbeat_scripts/hb_stress.sh runs 200 and the fresh-interpreter form)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from shardwise.comm.health import RankHealth

SCRIPT = Path(__file__).parent / "heartbeat_scripts" / "hb_jobs.py"
JOBS = int(os.environ.get("SHARDWISE_HB_JOBS", "50"))
STOP_TIMEOUT_S = 5
BOUND_S = STOP_TIMEOUT_S + 15


def _uts_refused() -> str | None:
    """Why this machine cannot give a process its own host name, or None if it can."""
    try:
        proc = subprocess.run(["unshare", "--uts", "hostname", "hb-probe"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`unshare --uts` could not run ({exc})"
    if proc.returncode != 0:
        return ("a UTS namespace per rank needs unshare(CLONE_NEWUTS) (root or CAP_SYS_ADMIN); "
                f"this machine refused it: {proc.stderr.strip() or proc.returncode}")
    return None


needs_uts = pytest.mark.skipif(_uts_refused() is not None, reason=str(_uts_refused()))


def _env() -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SHARDWISE_TIMEOUT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("PET_", "TORCHELASTIC_"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(args: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], env=env or _env(), capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert lines, f"no summary from {SCRIPT.name}:\n{out[-4000:]}"
    return proc.returncode, out, json.loads(lines[-1])


@needs_uts
def test_heartbeat_jobs_exit_cleanly(tmp_path):
    """JOBS back-to-back 2-rank gloo jobs, each rank on its own "host" with the heartbeat beating
    every 10 ms: every rank exits 0 and none prints "terminate called" (the abort at exit)."""
    code, out, summary = _run([str(JOBS), str(tmp_path), "--mode", "min"], timeout=60 + 8 * JOBS)
    assert summary["ranks"] == 2 * JOBS
    assert code == 0 and summary["bad"] == 0, f"{summary['bad']} bad ranks ({summary['aborts']} aborts):\n{out[-4000:]}"


@needs_uts
def test_stopped_rank_on_another_host_is_named(tmp_path):
    """Rank 1 stops itself (SIGSTOP) inside a collective; rank 0, on another host name, cannot
    ask /proc and names it from its quiet heartbeat, within timeout + 15 s."""
    env = dict(_env(), HB_TIMEOUT=str(STOP_TIMEOUT_S))
    code, out, summary = _run(["1", str(tmp_path), "--mode", "stop"], timeout=120, env=env)
    assert "job 0 rank 0 exit 3" in out, out[-4000:]
    m = re.search(r"RESULT after ([0-9.]+)s: CollectiveTimeoutError: rank 0: all_reduce\(4 elements\) "
                  r"timed out after 5 s: rank 1 is not responding \(no heartbeat", out)
    assert m, out[-4000:]
    assert float(m.group(1)) <= BOUND_S, f"named after {m.group(1)} s (bound {BOUND_S} s)"
    assert "exited (" not in out and "is stopped (" not in out, "the /proc path was used: " + out[-2000:]


def test_no_heartbeat_accuses_nobody():
    """Without a heartbeat (a store without clone()), a quiet counter is not evidence: a peer on
    another host is not called "not responding"."""
    health = RankHealth(dist.HashStore(), rank=0, world_size=2, timeout_s=1.0)
    health.peers = {0: {"host": health.host, "pid": os.getpid(), "start": ""},
                    1: {"host": health.host + "-elsewhere", "pid": 1, "start": ""}}
    assert not health.beating
    assert health.suspects(wait_s=0.2) == {}
