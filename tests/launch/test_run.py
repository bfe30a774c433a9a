"""``shardwise run`` for real: torchrun launches 2 gloo ranks of small scripts (about 10 s)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shardwise.cli import main

SCRIPTS = Path(__file__).parent / "scripts"


# --- real launches (gloo, 2 ranks) --------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                 "MASTER_PORT"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name in [k for k in os.environ if k.startswith("PET_")]:
        monkeypatch.delenv(name)


def test_run_two_ranks_end_to_end(tmp_path, capfd, clean_env):
    script = str(SCRIPTS / "allreduce_script.py")
    code = main(["run", "--nproc-per-node", "2", script, str(tmp_path), "--nproc-per-node", "5"])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in reports] == [0, 1]
    for r in reports:
        assert r["world_size"] == 2
        assert r["all_reduce_sum"] == 3.0  # 1 + 2
        assert r["script_args"] == ["--nproc-per-node", "5"]
        assert r["local_rank_arg"] == r["local_rank"] == r["rank"]  # as DeepSpeed's launcher passes it
        if not torch.cuda.is_available():
            assert r["omp_num_threads"] == "1"
            assert r["torch_threads"] == 1
    # the launcher set OMP_NUM_THREADS itself, so torchrun had no reason to warn
    assert "Setting OMP_NUM_THREADS environment variable" not in captured.err


def test_run_failing_rank_gives_nonzero_exit(capfd, clean_env):
    code = main(["run", "--nproc-per-node", "2", str(SCRIPTS / "failing_script.py")])
    err = capfd.readouterr().err
    assert code != 0
    # the last line names the rank that failed and how (rank 1 exits with 3; rank 0 succeeds)
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"shardwise run: rank 1 failed first, pid \d+: exit code 3", last), last


def test_deepspeed_style_command_line(tmp_path, capfd, clean_env):
    """`deepspeed --num_gpus 2 --master_port P script.py`, spelled for shardwise run."""
    script = str(SCRIPTS / "allreduce_script.py")
    code = main(["run", "--num_gpus", "2", "--num_nodes", "1", "--no_local_rank", script, str(tmp_path)])
    assert code == 0, capfd.readouterr().err
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["world_size"], r["local_rank_arg"]) for r in reports] == [(2, None), (2, None)]


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "mode, exception",
    [
        ("before", "ValueError: rank 1 failed before init_process_group"),
        ("after", "KeyError: 'missing after init'"),
        ("custom", "Boom: multi-line ..."),
    ],
)
def test_failure_summary_names_the_exception(mode, exception, capfd, clean_env):
    code = main(["run", "--nproc-per-node", "2", str(SCRIPTS / "raising_script.py"), mode])
    err = capfd.readouterr().err
    assert code != 0
    assert re.fullmatch(rf"shardwise run: rank 1 failed first, pid \d+: exit code 1: {re.escape(exception)}",
                        _last_line(err)), err[-3000:]
    # the traceback reads as if the script ran directly: no launcher or runpy frames
    assert "runpy.py" not in err and "worker.py\", line" not in err


def test_script_that_rejects_local_rank_gets_a_hint(tmp_path, capfd, clean_env):
    code = main(["run", "--nproc-per-node", "2", str(SCRIPTS / "strict_script.py"), str(tmp_path)])
    err = capfd.readouterr().err
    assert code != 0
    assert "unrecognized arguments: --local_rank=" in err
    assert "shardwise run --no-local-rank" in _last_line(err), _last_line(err)
    assert main(["run", "--nproc-per-node", "2", "--no-local-rank", str(SCRIPTS / "strict_script.py"),
                 str(tmp_path)]) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_to_launcher_stops_torchrun_and_workers(tmp_path, clean_env):
    """SIGTERM (what schedulers send) is forwarded: torchrun stops its workers, nothing leaks."""
    err_path = tmp_path / "launcher.err"
    with err_path.open("wb") as err:
        launcher = subprocess.Popen(
            [sys.executable, "-c", "from shardwise.cli import main; raise SystemExit(main())",
             "run", "--nproc-per-node", "2", str(SCRIPTS / "sleep_script.py"), str(tmp_path)],
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    pids: list[int] = []  # workers and their parent (torchrun)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"pid{r}").exists() for r in range(2)):
            assert launcher.poll() is None, err_path.read_text()
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.1)
        pids = sorted({int(p) for r in range(2) for p in (tmp_path / f"pid{r}").read_text().split()})
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) != 0
        deadline = time.monotonic() + 10
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, pids)), f"torchrun or workers survived\n{err_path.read_text()}"
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait()
