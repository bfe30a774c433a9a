"""`shardwise run`: the torchrun command it builds, and the console entry (real launches:
tests/launch/)."""
from __future__ import annotations

import re
import sys

import pytest
import torch

from shardwise.cli import main
from shardwise.launcher.run import WORKER, LaunchError, build_torchrun_command, failure_summary, split_run_args

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
LR = "--local_rank=${local_rank}"  # torchrun substitutes each worker's local rank


def build(argv, env=None, cuda=False):
    return build_torchrun_command(argv, {} if env is None else env, cuda_available=cuda)


# --- command building -------------------------------------------------------------------


def test_nproc_per_node_single_node_adds_standalone():
    cmd, _ = build(["--nproc-per-node", "2", "train.py"])
    assert cmd == [*TORCHRUN, "--nproc-per-node", "2", "--standalone", WORKER, "train.py", LR]


def test_no_options_is_still_standalone():
    cmd, _ = build(["train.py", "--lr", "3"])
    assert cmd == [*TORCHRUN, "--standalone", WORKER, "train.py", LR, "--lr", "3"]


def test_torchrun_options_pass_through_verbatim():
    opts = [
        "--nnodes", "2", "--node_rank=1", "--master-addr", "10.1.2.3", "--master_port", "29501",
        "--nproc_per_node=4", "--max-restarts", "3", "--monitor-interval", "0.5",
        "--redirects", "3", "-t", "3", "--log-dir", "/tmp/logs", "--start-method=fork",
    ]  # fmt: skip
    cmd, _ = build([*opts, "train.py", "a"])
    assert cmd == [*TORCHRUN, *opts, WORKER, "train.py", LR, "a"]


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
    assert cmd == [*TORCHRUN, *opts, WORKER, "train.py", LR]


@pytest.mark.parametrize("opts", [["--nnodes", "1"], ["--nnodes=1:1"], ["--node-rank", "0"]])
def test_standalone_added_for_one_node(opts):
    cmd, _ = build([*opts, "train.py"])
    assert cmd == [*TORCHRUN, *opts, "--standalone", WORKER, "train.py", LR]


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
    assert cmd == [*TORCHRUN, "--nproc-per-node", "2", "--standalone", WORKER, "train.py", LR, *script_args]


def test_double_dash_ends_the_options():
    cmd, _ = build(["--nproc-per-node", "2", "--", "train.py", "--x"])
    assert cmd == [*TORCHRUN, "--nproc-per-node", "2", "--standalone", WORKER, "train.py", LR, "--x"]


def test_module_flag_takes_no_value():
    """torchrun's -m: worker.py is the program and runs the module (torchrun's -m is dropped)."""
    cmd, _ = build(["-m", "--nproc-per-node", "2", "pkg.train", "--lr", "1"])
    opts = ["--nproc-per-node", "2", "--standalone"]
    assert cmd == [*TORCHRUN, *opts, WORKER, "--module", "pkg.train", LR, "--lr", "1"]
    cmd, _ = build(["--module", "--no-local-rank", "pkg.train"])
    assert cmd == [*TORCHRUN, "--standalone", WORKER, "--module", "pkg.train"]


@pytest.mark.parametrize("flag", ["--no-python", "--run-path"])
def test_no_python_and_run_path_are_not_wrapped(flag):
    cmd, _ = build([flag, "--nproc-per-node", "2", "prog", "x"])
    assert cmd == [*TORCHRUN, flag, "--nproc-per-node", "2", "--standalone", "prog", LR, "x"]


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


# --- DeepSpeed launcher options and --local_rank ([Note: DeepSpeed launcher options]) -------


@pytest.mark.parametrize("opts", [["--num_gpus", "2"], ["--num_gpus=2"], ["--num-gpus", "2"],
                                  ["--num_accelerators", "2"]])
def test_num_gpus_is_nproc_per_node(opts):
    run = split_run_args([*opts, "train.py", "--deepspeed"])
    assert run.option("nproc_per_node") == "2" and run.script_args == ("--deepspeed",)
    cmd, _ = build([*opts, "train.py"])
    assert cmd == [*TORCHRUN, "--nproc-per-node", "2", "--standalone", WORKER, "train.py", LR]


def test_num_gpus_all_and_conflicts():
    assert split_run_args(["--num_gpus", "-1", "t.py"]).option("nproc_per_node") == "gpu"
    assert split_run_args(["--num_gpus", "2", "--nproc-per-node", "2", "t.py"]).option("nproc_per_node") == "2"
    with pytest.raises(LaunchError, match=r"--num_gpus 2 conflicts with torchrun's --nproc-per-node"):
        split_run_args(["--num_gpus", "2", "--nproc-per-node", "4", "t.py"])
    with pytest.raises(LaunchError, match="expected a number of processes"):
        split_run_args(["--num_gpus", "two", "t.py"])
    with pytest.raises(LaunchError, match="needs a value"):
        split_run_args(["--num_gpus"])


def test_deepspeed_master_options_are_torchruns():
    opts = ["--master_port", "29555", "--master_addr", "127.0.0.1", "--node_rank", "0"]
    cmd, _ = build([*opts, "--num_gpus", "2", "train.py"])
    assert cmd == [*TORCHRUN, *opts, "--nproc-per-node", "2", WORKER, "train.py", LR]


@pytest.mark.parametrize("opts", [["--num_nodes", "1"], ["--num_nodes=-1"], ["--num-nodes", "1"]])
def test_one_node_is_accepted(opts):
    cmd, _ = build([*opts, "--num_gpus", "2", "train.py"])
    assert cmd == [*TORCHRUN, "--nproc-per-node", "2", "--standalone", WORKER, "train.py", LR]


@pytest.mark.parametrize(
    "opts, words",
    [
        (["--launcher", "slurm"], r"--launcher slurm: DeepSpeed's --launcher.*--launcher-cmd 'srun"),
        (["--no_ssh"], r"--no_ssh: shardwise run starts one torchrun agent per host.*--rdzv-endpoint"),
        (["--force_multi"], r"--force_multi: shardwise run starts one torchrun agent per host"),
        (["--elastic_training"], r"--nnodes MIN:MAX.*--max-restarts"),
        (["--autotuning", "run"], r"`shardwise plan`"),
        (["--enable_each_rank_log", "logs"], r"--log-dir DIR --redirects 3"),
        (["--bind_cores_to_rank"], r"numactl"),
    ],
)
def test_unsupported_deepspeed_options_name_what_to_use(opts, words):
    with pytest.raises(LaunchError, match=words):
        split_run_args([*opts, "train.py"])


def test_local_rank_passed_like_deepspeed_unless_turned_off():
    run = split_run_args(["--nproc-per-node", "2", "train.py", "--x"])
    assert run.local_rank
    for flag in ("--no_local_rank", "--no-local-rank"):
        run = split_run_args([flag, "--nproc-per-node", "2", "train.py", "--x"])
        assert not run.local_rank and run.script_args == ("--x",)
        cmd, _ = build([flag, "--nproc-per-node", "2", "train.py", "--x"])
        assert cmd == [*TORCHRUN, "--nproc-per-node", "2", "--standalone", WORKER, "train.py", "--x"]
    # after the script it belongs to the script
    assert split_run_args(["train.py", "--no-local-rank"]).local_rank


# --- the failure summary ([Note: launcher failure report]) --------------------------------

REPORT = """Root Cause (first observed failure):
[0]:
  time      : 2026-01-01_00:00:00
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 4242)
  error_file: {error_file}
  traceback : {traceback}
============================================================
"""
NO_TB = REPORT.format(error_file="<N/A>", traceback="To enable traceback see: https://pytorch.org/docs/x.html")


def test_summary_prefers_the_worker_line():
    tail = ("[rank0]: KeyError: 'a consequence'\n[shardwise rank 1] failed: ValueError: bad input ...\n"
            "[shardwise rank 0] failed: KeyError: 'a consequence'\n" + NO_TB)
    assert failure_summary(tail) == "shardwise run: rank 1 failed first, pid 4242: exit code 1: ValueError: bad input ..."


def test_summary_reads_the_root_cause_traceback():
    tb = "Traceback (most recent call last):\n    raise Boom('x')\n  mymod.Boom: x happened\n  "
    tail = REPORT.format(error_file="/tmp/e/error.json", traceback=tb)
    assert failure_summary(tail).endswith("exit code 1: mymod.Boom: x happened")


def test_summary_reads_rank_lines_for_any_exception_type():
    tail = ("[rank1]: Traceback (most recent call last):\n[rank1]:   File \"t.py\", line 3, in <module>\n"
            "[rank1]:     raise StopIteration\n[rank1]: StopIteration\n" + NO_TB)
    assert failure_summary(tail).endswith("exit code 1: StopIteration")
    teed = "[default1]:[shardwise rank 1] failed: OSError: disk full\n" + NO_TB
    assert failure_summary(teed).endswith("exit code 1: OSError: disk full")


def test_summary_hints_at_no_local_rank():
    tail = ("usage: t.py [-h] out\nt.py: error: unrecognized arguments: --local_rank=1\n"
            + NO_TB.replace("exitcode  : 1", "exitcode  : 2"))
    line = failure_summary(tail)
    assert "exit code 2" in line and "shardwise run --no-local-rank" in line and "add_argument('--local_rank'" in line


def test_worker_one_line():
    from shardwise.launcher.worker import one_line

    assert one_line(ValueError("a\nb")) == "ValueError: a ..."
    assert one_line(KeyError("k")) == "KeyError: 'k'"
    assert one_line(StopIteration()) == "StopIteration"
    assert one_line(LaunchError("x")) == "shardwise.launcher.run.LaunchError: x"
    assert len(one_line(RuntimeError("x" * 1000))) == 300


# --- the console entry ------------------------------------------------------------------


def test_cli_dry_run_prints_the_command(capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["run", "--dry-run", "--nproc-per-node", "2", "train.py", "--x", "1"]) == 0
    out = capsys.readouterr().out
    assert ("torch.distributed.run --nproc-per-node 2 --standalone "
            f"{WORKER} train.py '--local_rank=${{local_rank}}' --x 1") in out
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
