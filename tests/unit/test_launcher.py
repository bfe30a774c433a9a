"""`shardwise run`: the torchrun command it builds, and the console entry (real launches:
tests/launch/)."""
from __future__ import annotations

import re
import sys

import pytest
import torch

from shardwise.cli import main
from shardwise.launcher.run import LaunchError, build_torchrun_command, split_run_args

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
    lines = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.splitlines() if "  " in line)
    assert lines["torch"] == torch.__version__
    assert lines["backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
