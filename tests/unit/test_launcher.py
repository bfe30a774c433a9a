"""`shardwise run`: the torchrun command it builds, and two real launches on gloo."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shardwise.cli import main
from shardwise.launcher.run import LaunchError, build_torchrun_command, split_run_args

SCRIPTS = Path(__file__).parent / "scripts"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def build(argv, env=None, cuda=False):
    return build_torchrun_command(argv, {} if env is None else env, cuda_available=cuda)


# --- command building -------------------------------------------------------------------


def test_nproc_per_node_single_node_adds_standalone():
    cmd, _ = build(["--nproc-per-node", "2", "train.py"])
    assert cmd == [*TORCHRUN, "--nproc-per-node", "2", "--standalone", "train.py"]


def test_no_options_is_still_standalone():
    cmd, _ = build(["train.py", "--lr", "3"])
    assert cmd == [*TORCHRUN, "--standalone", "train.py", "--lr", "3"]


def test_torchrun_options_pass_through_verbatim():
    opts = [
        "--nnodes", "2", "--node_rank=1", "--master-addr", "10.1.2.3", "--master_port", "29501",
        "--nproc_per_node=4", "--max-restarts", "3", "--monitor-interval", "0.5",
        "--redirects", "3", "-t", "3", "--log-dir", "/tmp/logs", "--start-method=fork",
    ]  # fmt: skip
    cmd, _ = build([*opts, "train.py", "a"])
    assert cmd == [*TORCHRUN, *opts, "train.py", "a"]


@pytest.mark.parametrize(
    "opts, env",
    [
        (["--nnodes", "2"], {}),
        (["--nnodes=1:4"], {}),
        (["--rdzv-backend", "c10d", "--rdzv-endpoint", "host:29400", "--rdzv-id", "7"], {}),
        (["--rdzv_endpoint=host:29400"], {}),
        (["--master-addr", "127.0.0.1", "--master-port", "29555"], {}),
        (["--master_port", "29555"], {}),
        ([], {"PET_NNODES": "2"}),
        ([], {"PET_RDZV_ENDPOINT": "host:29400"}),
        ([], {"PET_MASTER_PORT": "29555"}),
    ],
)
def test_standalone_not_added_when_rendezvous_or_nodes_given(opts, env):
    cmd, _ = build([*opts, "train.py"], env)
    assert "--standalone" not in cmd
    assert cmd == [*TORCHRUN, *opts, "train.py"]


@pytest.mark.parametrize("opts", [["--nnodes", "1"], ["--nnodes=1:1"], ["--node-rank", "0"]])
def test_standalone_added_for_one_node(opts):
    cmd, _ = build([*opts, "train.py"])
    assert cmd == [*TORCHRUN, *opts, "--standalone", "train.py"]


def test_standalone_not_duplicated():
    cmd, _ = build(["--standalone", "--nproc-per-node", "2", "train.py"])
    assert cmd.count("--standalone") == 1
    cmd, _ = build(["train.py"], {"PET_STANDALONE": "1"})
    assert "--standalone" not in cmd


def test_script_args_that_look_like_options_belong_to_the_script():
    script_args = ["--nproc-per-node", "5", "--standalone", "--dry-run", "--nnodes", "3"]
    run = split_run_args(["--nproc-per-node", "2", "train.py", *script_args])
    assert run.script == "train.py"
    assert run.script_args == tuple(script_args)
    assert not run.dry_run
    assert run.option("nproc_per_node") == "2"
    cmd, _ = build(["--nproc-per-node", "2", "train.py", *script_args])
    assert cmd == [*TORCHRUN, "--nproc-per-node", "2", "--standalone", "train.py", *script_args]


def test_double_dash_ends_the_options():
    cmd, _ = build(["--nproc-per-node", "2", "--", "train.py", "--x"])
    assert cmd == [*TORCHRUN, "--nproc-per-node", "2", "--standalone", "train.py", "--x"]


def test_module_flag_takes_no_value():
    cmd, _ = build(["-m", "--nproc-per-node", "2", "pkg.train", "--lr", "1"])
    opts = ["-m", "--nproc-per-node", "2", "--standalone"]
    assert cmd == [*TORCHRUN, *opts, "pkg.train", "--lr", "1"]


def test_dry_run_is_not_passed_to_torchrun():
    run = split_run_args(["--dry-run", "--nproc-per-node", "2", "train.py"])
    assert run.dry_run
    cmd, _ = build(["--dry-run", "--nproc-per-node", "2", "train.py"])
    assert "--dry-run" not in cmd


def test_abbreviated_option_resolved_like_torchrun():
    run = split_run_args(["--nproc", "2", "--nnodes", "2", "train.py"])
    assert run.option("nproc_per_node") == "2" and run.script == "train.py"


def test_omp_threads_set_on_cpu_without_mutating_env():
    env = {"PATH": "/bin"}
    _, child = build(["train.py"], env, cuda=False)
    assert child == {"PATH": "/bin", "OMP_NUM_THREADS": "1"}
    assert env == {"PATH": "/bin"}


def test_omp_threads_not_overridden():
    _, child = build(["train.py"], {"OMP_NUM_THREADS": "4"}, cuda=False)
    assert child["OMP_NUM_THREADS"] == "4"


def test_omp_threads_left_alone_with_cuda():
    _, child = build(["train.py"], {}, cuda=True)
    assert "OMP_NUM_THREADS" not in child


@pytest.mark.parametrize(
    "argv, words",
    [
        ([], "no training script"),
        (["--nproc-per-node", "2"], "no training script"),
        (["--nproc-per-node"], "needs a value"),
        (["--bogus", "1", "train.py"], "unknown torchrun option '--bogus'"),
        (["--standalone=1", "train.py"], "takes no value"),
    ],
)
def test_bad_command_lines_are_named_errors(argv, words):
    with pytest.raises(LaunchError, match=words):
        build(argv)


# --- the console entry ------------------------------------------------------------------


def test_cli_dry_run_prints_the_command(capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["run", "--dry-run", "--nproc-per-node", "2", "train.py", "--x", "1"]) == 0
    out = capsys.readouterr().out
    assert "torch.distributed.run --nproc-per-node 2 --standalone train.py --x 1" in out
    if not torch.cuda.is_available():
        assert out.startswith("OMP_NUM_THREADS=1 ")


def test_cli_errors_return_2(capsys):
    assert main(["run"]) == 2
    assert "no training script" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2
    assert main([]) == 2


def test_cli_help_returns_0(capsys):
    assert main(["run", "--help"]) == 0
    assert "usage: shardwise run" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "run" in capsys.readouterr().out


def test_cli_env(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    assert ("nccl" if torch.cuda.is_available() else "gloo") in out


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
        if not torch.cuda.is_available():
            assert r["omp_num_threads"] == "1"
            assert r["torch_threads"] == 1
    # the launcher set OMP_NUM_THREADS itself, so torchrun had no reason to warn
    assert "Setting OMP_NUM_THREADS environment variable" not in captured.err


def test_run_failing_rank_gives_nonzero_exit(capfd, clean_env):
    code = main(["run", "--nproc-per-node", "2", str(SCRIPTS / "failing_script.py")])
    capfd.readouterr()
    assert code != 0


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
