"""`shardwise run --hostfile`, --include/--exclude, SLURM steps and MPI rank discovery, without
starting any host (the real multi-host runs: tests/multinode/)."""
from __future__ import annotations

import os
import shlex
import sys

import pytest

from shardwise.cli import main
from shardwise.comm import env_discovery as ed
from shardwise.errors import DistributedSetupError
from shardwise.launcher import hostfile as hf
from shardwise.launcher import multinode as mn
from shardwise.launcher.run import WORKER, LaunchError, build_torchrun_command, split_run_args, torchrun_command

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
LR = "--local_rank=${local_rank}"


def resolve(argv, env=None):
    return mn.resolve(split_run_args(argv), {} if env is None else env)


@pytest.fixture
def hosts(tmp_path):
    p = tmp_path / "hostfile"
    p.write_text("# the cluster\nworker-1 slots=4\n\n  worker-2   slots = 4   # comment\nworker-3 slots=2\n")
    return str(p)


# --- the hostfile and the filters ([Note: hostfile and filters]) ----------------------------

def test_hostfile_lines_comments_and_blanks(hosts):
    assert hf.read_hostfile(hosts) == {"worker-1": 4, "worker-2": 4, "worker-3": 2}


@pytest.mark.parametrize("text, line", [("a slots=2\nb slots\n", 2), ("a slots=2\nb 4\n", 2), ("a slots=0\n", 1),
                                        ("# c\n\na slot=2\n", 3), ("a slots=2 gpus=1\n", 1)])
def test_malformed_hostfile_line_names_file_line_and_form(tmp_path, text, line):
    p = tmp_path / "hf"
    p.write_text(text)
    with pytest.raises(LaunchError, match=rf"{p}:{line}: malformed hostfile line .*expected `HOSTNAME slots=N`"):
        hf.read_hostfile(str(p))


def test_hostfile_duplicate_empty_missing(tmp_path):
    with pytest.raises(LaunchError, match=r"hf:2: host 'a' is listed twice"):
        hf.parse_hostfile_text("a slots=1\na slots=2\n", "hf")
    with pytest.raises(LaunchError, match="no hosts in the hostfile"):
        hf.parse_hostfile_text("# nothing\n\n", "hf")
    with pytest.raises(LaunchError, match="cannot read hostfile"):
        hf.read_hostfile(str(tmp_path / "absent"))


POOL = {"w1": 4, "w2": 4, "w3": 2}


@pytest.mark.parametrize("kw, want", [
    ({}, {"w1": [0, 1, 2, 3], "w2": [0, 1, 2, 3], "w3": [0, 1]}),
    ({"include": "w1:0,2@w3"}, {"w1": [0, 2], "w3": [0, 1]}),
    ({"include": "w2:3@w1:1"}, {"w1": [1], "w2": [3]}),  # hostfile order
    ({"exclude": "w1:0,1@w3"}, {"w1": [2, 3], "w2": [0, 1, 2, 3]}),
    ({"exclude": "w2"}, {"w1": [0, 1, 2, 3], "w3": [0, 1]}),
    ({"num_nodes": 2}, {"w1": [0, 1, 2, 3], "w2": [0, 1, 2, 3]}),
    ({"num_nodes": 2, "num_gpus": 2}, {"w1": [0, 1], "w2": [0, 1]}),
    ({"num_nodes": -1}, {"w1": [0, 1, 2, 3], "w2": [0, 1, 2, 3], "w3": [0, 1]}),
])
def test_select(kw, want):
    assert hf.select(POOL, **kw) == want


@pytest.mark.parametrize("kw, words", [
    ({"include": "w1", "exclude": "w2"}, "exclusive"),
    ({"include": "w1", "num_gpus": 1}, "cannot be combined with --num_nodes/--num_gpus"),
    ({"include": "w9:0"}, "host 'w9' is not in the hostfile"),
    ({"include": "w3:5"}, "w3 has slots 0-1; no slot \\[5\\]"),
    ({"include": "w1:a"}, "must be integers"),
    ({"include": "w1@@w2"}, "empty host entry"),
    ({"num_nodes": 4}, "the hostfile has 3 host"),
    ({"num_gpus": 3}, "w3 have fewer slots"),
    ({"exclude": "w1@w2@w3"}, "no hosts left"),
])
def test_select_errors(kw, words):
    with pytest.raises(LaunchError, match=words):
        hf.select(POOL, **kw)


# --- SLURM host lists and steps ----------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("node[01-03,7],login-1", ["node01", "node02", "node03", "node7", "login-1"]),
    ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
    ("a,b", ["a", "b"]),
    ("gpu[9-11]", ["gpu9", "gpu10", "gpu11"]),
    ("x[007]", ["x007"]),
])
def test_expand_hostlist(text, want):
    assert hf.expand_hostlist(text) == want


@pytest.mark.parametrize("text", ["n[1-", "n[a-b]", "n[3-1]"])
def test_expand_hostlist_errors(text):
    with pytest.raises(LaunchError, match="SLURM host list"):
        hf.expand_hostlist(text)


SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[03-04]", "SLURM_NNODES": "2",
         "SLURM_STEP_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2",
         "SLURM_GPUS_ON_NODE": "4"}


def test_shardwise_run_inside_an_srun_step_takes_nodes_from_slurm():
    run = mn.from_slurm(split_run_args(["train.py"]), SLURM)
    cmd, _ = torchrun_command(run, SLURM, cuda_available=True)
    assert cmd == [*TORCHRUN, "--nnodes", "2", "--node-rank", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                   "gpu03:29500", "--rdzv-id", "77.0", "--nproc-per-node", "4", WORKER, "train.py", LR]
    run = mn.from_slurm(split_run_args(["--nproc-per-node", "2", "--master_port", "1234", "t.py"]), SLURM)
    assert run.option("nproc_per_node") == "2" and run.option("rdzv_endpoint") == "gpu03:1234"
    assert "--master_port" not in run.torchrun_args


def test_srun_step_edge_cases(capsys):
    batch = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_ID"}  # the batch script: left alone
    assert mn.from_slurm(split_run_args(["t.py"]), batch).torchrun_args == ()
    assert "not an srun step: starting the ranks of this node only" in capsys.readouterr().err
    given = split_run_args(["--nnodes", "2", "--rdzv-endpoint", "x:1", "t.py"])  # the user decides
    assert mn.from_slurm(given, SLURM) == given
    with pytest.raises(LaunchError, match="srun --ntasks-per-node 1 shardwise run"):
        mn.from_slurm(split_run_args(["t.py"]), {**SLURM, "SLURM_STEP_NUM_TASKS": "8"})


# --- multi-host commands ([Note: multi-host launch]) ---------------------------------------

def test_ssh_commands_one_per_host(hosts, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    env = {"PATH": "/p", "NCCL_DEBUG": "INFO", "SECRET": "x", "PYTHONPATH": "/pp", "OMP_NUM_THREADS": "2"}
    _, _, plan = resolve(["--hostfile", hosts, "--num_nodes", "2", "--num_gpus", "2", "--master_port", "29600",
                          "--ssh_port", "2222", "--max-restarts", "1", "train.py", "--lr", "1"], env)
    assert [h.name for h in plan.hosts] == ["worker-1", "worker-2"] and plan.master == "worker-1"
    for h in plan.hosts:
        assert h.command[:6] == ["ssh", "-o", "BatchMode=yes", "-p", "2222", h.name]
        words = shlex.split(h.command[6])
        assert words[:4] == ["cd", str(tmp_path), "&&", "exec"]
        assert {"NCCL_DEBUG=INFO", "PATH=/p", "PYTHONPATH=/pp", "OMP_NUM_THREADS=2",
                f"SHARDWISE_LAUNCH_HOST={h.name}", f"TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE=[{h.name} rank ${{rank}}]: "
                } <= set(words)
        assert not any(w.startswith(("SECRET=", "CUDA_VISIBLE_DEVICES=")) for w in words)
        tr = words[words.index("--") + 1:]
        assert tr == [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                      "--rdzv-endpoint", "worker-1:29600", "--rdzv-id", plan.job_id, "--rdzv-conf",
                      "join_timeout=600", "--tee", "3", "--max-restarts", "1", WORKER, "train.py", LR, "--lr", "1"]
        assert words[words.index("--") - 2:words.index("--")] == [mn.AGENT, h.name]


def test_launcher_cmd_host_placeholder_include_and_exports(hosts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".deepspeed_env").write_text("# ds\nDS_VAR=1 2\n")
    env = {"MINE": "m", "SHARDWISE_TIMEOUT": "9"}
    _, _, plan = resolve(["--hostfile", hosts, "--include", "worker-1:1,3@worker-3", "--launcher-cmd",
                          "srun -N1 -w {host}", "--export", "MINE", "--export", "SET=v v", "--master_addr", "10.0.0.1",
                          "--join-timeout", "30", "t.py"], env)
    w1, w3 = plan.hosts
    assert w1.command[:6] == ["srun", "-N1", "-w", "worker-1", "sh", "-c"] and w1.slots == [1, 3]
    words = shlex.split(w1.command[6])
    assert {"MINE=m", "SET=v v", "DS_VAR=1 2", "SHARDWISE_TIMEOUT=9", "CUDA_VISIBLE_DEVICES=1,3",
            "join_timeout=30", "10.0.0.1:29500"} <= set(words)
    assert not any(w.startswith("CUDA_VISIBLE_DEVICES=") for w in shlex.split(w3.command[6]))  # all its slots
    _, _, plan = resolve(["--hostfile", hosts, "--launcher-cmd", "my-exec", "t.py"], {})
    assert plan.hosts[0].command[:4] == ["my-exec", "worker-1", "sh", "-c"]  # the host appended


def test_export_errors(hosts):
    with pytest.raises(LaunchError, match="--export NOPE: NOPE is not set here"):
        resolve(["--hostfile", hosts, "--export", "NOPE", "t.py"])
    with pytest.raises(LaunchError, match="expected NAME or NAME=VALUE"):
        resolve(["--hostfile", hosts, "--export", "1X=2", "t.py"])


def test_no_ssh_check_is_accepted(hosts):
    assert resolve(["--hostfile", hosts, "--no_ssh_check", "t.py"])[2] is not None


def test_hostfile_conflicts_with_torchrun_node_options(hosts):
    with pytest.raises(LaunchError, match="the hostfile decides.*--nnodes"):
        resolve(["--hostfile", hosts, "--nnodes", "3", "t.py"])


def test_one_local_host_runs_as_before(tmp_path):
    p = tmp_path / "hf"
    p.write_text("localhost slots=4\n")
    run, env, plan = resolve(["--hostfile", str(p), "--include", "localhost:1,2", "t.py"], {"A": "1"})
    assert plan is None and env == {"A": "1", "CUDA_VISIBLE_DEVICES": "1,2"}
    cmd, _ = torchrun_command(run, env, cuda_available=True)
    assert cmd == [*TORCHRUN, "--nproc-per-node", "2", "--standalone", WORKER, "t.py", LR]
    run, env, _ = resolve(["--hostfile", str(p), "t.py"])
    assert run.option("nproc_per_node") == "4" and "CUDA_VISIBLE_DEVICES" not in env


def test_include_localhost_without_hostfile():
    run, env, plan = resolve(["--include", "localhost:1,3", "t.py"])
    assert plan is None and env["CUDA_VISIBLE_DEVICES"] == "1,3" and run.option("nproc_per_node") == "2"
    with pytest.raises(LaunchError, match="without a hostfile only this node"):
        resolve(["--include", "w1:0@w2", "t.py"])
    with pytest.raises(LaunchError, match="--exclude localhost:0: needs a hostfile"):
        resolve(["--exclude", "localhost:0", "t.py"])


def test_num_nodes_above_one_needs_a_hostfile():
    with pytest.raises(LaunchError, match="--num_nodes 2 needs a hostfile"):
        resolve(["--num_nodes", "2", "t.py"])
    cmd, _ = build_torchrun_command(["--num_nodes", "1", "t.py"], {}, cuda_available=True)
    assert "--standalone" in cmd


def test_default_hostfile_is_used_when_it_exists(tmp_path, monkeypatch, capsys):
    p = tmp_path / "job_hostfile"
    p.write_text("a slots=1\nb slots=1\n")
    monkeypatch.setattr(hf, "DEFAULT_HOSTFILE", str(p))
    _, _, plan = resolve(["t.py"])
    assert [h.name for h in plan.hosts] == ["a", "b"]
    assert f"using DeepSpeed's default hostfile {p}" in capsys.readouterr().err
    run, _, plan = resolve(["--nproc-per-node", "2", "--standalone", "t.py"])  # torchrun's options win
    assert plan is None
    monkeypatch.setattr(hf, "DEFAULT_HOSTFILE", str(tmp_path / "absent"))
    assert resolve(["t.py"])[2] is None


def test_dry_run_prints_every_host(hosts, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["run", "--dry-run", "--hostfile", hosts, "--exclude", "worker-2", "t.py"]) == 0
    out = capsys.readouterr().out
    assert "# 2 hosts from" in out and "# worker-1: 4 rank(s), slots 0,1,2,3" in out and "# worker-3: 2 rank(s)" in out
    assert out.count("ssh -o BatchMode=yes worker-") == 2 and "worker-2 " not in out


def test_malformed_hostfile_through_the_cli(tmp_path, capsys):
    p = tmp_path / "hf"
    p.write_text("ok slots=1\nbroken line\n")
    assert main(["run", "--hostfile", str(p), "t.py"]) == 2
    assert f"{p}:2: malformed hostfile line 'broken line'" in capsys.readouterr().err


def test_hosts_whose_launch_command_fails_are_named(hosts, capfd):
    """The launch command itself fails on every host (as ssh does when it cannot connect)."""
    code = main(["run", "--hostfile", hosts, "--num_nodes", "2", "--launcher-cmd", "sh -c 'echo no route to $0 >&2; "
                 "exit 255'", "t.py"])
    err = capfd.readouterr().err
    assert code == 255
    assert "[worker-1] no route to worker-1" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("shardwise run: hosts worker-1, worker-2 never joined the rendezvous at worker-1:29500"), last
    assert "worker-1: its launch command exited with code 255 (no route to worker-1)" in last
    assert "worker-2: its launch command exited with code 255 (no route to worker-2)" in last


# --- rank discovery for scripts started by srun / mpirun ([Note: rank discovery]) -----------

@pytest.mark.parametrize("env, want", [
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "n1"},
     {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "n1",
      "MASTER_PORT": "29500", "SHARDWISE_RANKS_FROM": "openmpi"}),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "MASTER_PORT": "7"},
     {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
      "MASTER_PORT": "7", "SHARDWISE_RANKS_FROM": "pmi"}),
    ({"MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_SIZE": "2", "MV2_COMM_WORLD_LOCAL_RANK": "0",
      "MV2_COMM_WORLD_LOCAL_SIZE": "2"},
     {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
      "MASTER_PORT": "29500", "SHARDWISE_RANKS_FROM": "mvapich2"}),
    ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
      "SLURM_STEP_TASKS_PER_NODE": "2(x4)", "SLURM_STEP_NODELIST": "cn[7-10]"},
     {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "cn7",
      "MASTER_PORT": "29500", "SHARDWISE_RANKS_FROM": "slurm"}),
])
def test_rank_discovery(env, want):
    env = dict(env)
    assert ed.apply_launcher_env(env) == want["SHARDWISE_RANKS_FROM"]
    assert {k: env[k] for k in want} == want


def test_rank_discovery_leaves_alone():
    for env in ({"RANK": "0", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"},  # torchrun's wins
                {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"},  # one process
                {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "n[1-2]"},  # the batch script
                {}):
        before = dict(env)
        assert ed.apply_launcher_env(env) is None and env == before


def test_rank_discovery_errors():
    with pytest.raises(DistributedSetupError, match="MASTER_ADDR is not set.*mpirun -x MASTER_ADDR"):
        ed.apply_launcher_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4",
                               "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    with pytest.raises(DistributedSetupError, match="is not a number"):
        ed.apply_launcher_env({"PMI_RANK": "x", "PMI_SIZE": "2"})
    assert os.environ.get("SHARDWISE_RANKS_FROM") is None


# --- the last line of a multi-host run --------------------------------------------------------

def test_host_failure_line_reuses_the_one_node_summary():
    report = ("Root Cause (first observed failure):\n[0]:\n  time      : 2026-01-01_00:00:00\n  host      : h2\n"
              "  rank      : 3 (local_rank: 1)\n  exitcode  : 1 (pid: 4242)\n  error_file: <N/A>\n"
              "  traceback : To enable traceback see: https://pytorch.org/docs/x.html\n" + "=" * 60)
    h = mn.Host("h2", [0, 1], [], ranks={2, 3}, code=1)
    h.tail = ["[shardwise rank 3] failed: ValueError: boom", *report.splitlines()]
    assert mn._why(h) == "rank 3 failed first, pid 4242: exit code 1: ValueError: boom"
    assert mn._ranks(h) == "ranks 2, 3"
    h = mn.Host("h2", [0], [], code=137, signal=None)
    h.tail = ["[shardwise agent] h2: torchrun (pid 9) was killed by SIGKILL"]
    assert mn._why(h) == "torchrun (pid 9) was killed by SIGKILL" and mn._ranks(h) == "no rank had started"
    h = mn.Host("h3", [0], [], code=143, signal=15)
    assert mn._why(h) == "its launch command died of SIGTERM"


def test_agent_exit_codes(tmp_path):
    """agent.py: torchrun's exit code; 128 + N when it dies of signal N, with the named line."""
    import subprocess

    ok = subprocess.run([sys.executable, mn.AGENT, "--no-stdin-watch", "hx", "--", sys.executable, "-c",
                         "raise SystemExit(3)"], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 3 and "[shardwise agent] hx: started torchrun, pid" in ok.stderr
    killed = subprocess.run([sys.executable, mn.AGENT, "--no-stdin-watch", "hx", "--", sys.executable, "-c",
                             "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                            capture_output=True, text=True, timeout=30)
    assert killed.returncode == 137 and "was killed by SIGKILL" in killed.stderr
    # an orphan left by the dead "torchrun" is ended by the agent (it is the subreaper)
    marker = tmp_path / "orphan"
    code = ("import os, signal, subprocess, sys; "
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', {str(marker)!r}], "
            "start_new_session=True); os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, mn.AGENT, "--no-stdin-watch", "hx", "--", sys.executable, "-c", code],
                   capture_output=True, timeout=30)
    def cmdline(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read()
        except OSError:
            return b""

    assert not [p for p in os.listdir("/proc") if p.isdigit() and str(marker).encode() in cmdline(p)]
