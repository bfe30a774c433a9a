"""`shardwise run --hostfile` across two namespace hosts (h1, h2: tests/multinode/netns.sh),
each agent started by a stand-in for ssh (netns_exec.sh: the host's network and UTS namespace,
a clean environment). About 90 s on 2 loaded cores."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SCRIPT = HERE / "scripts" / "mn_train.py"
EXEC = HERE / "netns_exec.sh"
TIMEOUT_S = 10
RUN = [sys.executable, "-c", "from shardwise.cli import main; raise SystemExit(main())", "run"]

pytestmark = pytest.mark.usefixtures("netns_hosts")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return 20000 + s.getsockname()[1] % 20000


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_", "SHARDWISE_", "MN_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")}
    env.update(extra)
    return env


def hostfile(tmp: Path) -> Path:
    path = tmp / "hostfile"
    path.write_text("# two namespace hosts\nh1 slots=2\n\nh2 slots=2  # second\n")
    return path


def multi_host(tmp: Path, steps: int, pause: float = 0.0, env=None, extra=(), timeout=120, wait=True):
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    cmd = [*RUN, "--hostfile", str(hostfile(tmp)), "--launcher-cmd", str(EXEC), "--master_port", str(free_port()),
           *extra, str(SCRIPT), str(out), str(steps), str(pause)]
    popen = subprocess.Popen(cmd, cwd=tmp, env=env or base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    if not wait:
        return popen
    stdout, stderr = popen.communicate(timeout=timeout)
    return popen.returncode, stdout, stderr


def reports(out: Path, n: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def leftovers(tmp: Path) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(tmp).encode() in cmdline and int(pid) != os.getpid():
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace")[:200])
    return found


def test_two_hosts_match_one_host(tmp_path):
    """2 hosts x 2 ranks == 1 host x 4 ranks, bitwise (same world size, same data order, same
    reduction order: gloo's all-reduce sums in the same ring order over 4 ranks either way)."""
    multi, single = tmp_path / "multi", tmp_path / "single"
    multi.mkdir()
    single.mkdir()
    (multi / ".deepspeed_env").write_text("# DeepSpeed users have one\nMN_FROM_DS_ENV=ds ok\n")
    env = base_env(PYTHONPATH="/nonexistent/mn-marker", MN_EXPORTED="exp", MN_NOT_EXPORTED="leak")
    out = single / "out"
    out.mkdir()
    # the 1-host reference runs at the same time (independent jobs; it halves the wall time here)
    one = subprocess.Popen([*RUN, "--nproc-per-node", "4", str(SCRIPT), str(out), "4", "0"], cwd=single,
                           env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        code, stdout, stderr = multi_host(multi, 4, env=env,
                                          extra=("--export", "MN_EXPORTED", "--export", "MN_SET=v"))
        one_err = one.communicate(timeout=120)[1]
    finally:
        if one.poll() is None:
            one.kill()
            one.wait()
    assert code == 0, stderr[-4000:]
    assert one.returncode == 0, one_err[-4000:]
    got = reports(multi / "out", 4)
    lines = re.findall(r"^\[(h\d) rank (\d)\]: mn_train rank (\d) on (\S+)$", stdout, re.M)
    assert sorted(int(r) for _, r, _, _ in lines) == [0, 1, 2, 3], stdout[-3000:]
    for host, rank, rank2, seen in lines:  # each rank's lines carry its host, the name it saw
        assert rank == rank2 and host == seen == got[int(rank)]["host"]
    assert sorted(r["host"] for r in got) == ["h1", "h1", "h2", "h2"]
    for r in got:  # the allow-list, --export, .deepspeed_env; nothing else of this environment
        assert r["env"] == {"PYTHONPATH": "/nonexistent/mn-marker", "MN_EXPORTED": "exp", "MN_SET": "v",
                            "MN_FROM_DS_ENV": "ds ok"}, r["env"]
        assert r["omp"] == "1"
    ref = reports(out, 4)
    assert [r["host"] for r in ref] == [socket.gethostname()] * 4
    for a, b in zip(got, ref):
        assert a["losses"] == b["losses"], (a["rank"], a["losses"], b["losses"])
        assert a["sha256"] == b["sha256"]
    assert len({r["sha256"] for r in got}) == 1  # every rank holds the same parameters


def test_sigkill_of_one_hosts_agent_ends_the_job(tmp_path):
    env = base_env(SHARDWISE_TIMEOUT=str(TIMEOUT_S))
    proc = multi_host(tmp_path, 400, pause=0.1, env=env, wait=False)
    out = tmp_path / "out"
    try:
        deadline = time.monotonic() + 90
        while not all((out / f"pid{r}").exists() for r in range(4)):
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "ranks did not start"
            time.sleep(0.1)
        hosts = {}
        for r in range(4):  # the parent of a rank is its host's torchrun
            pid, parent = map(int, (out / f"pid{r}").read_text().split())
            hosts.setdefault(parent, []).append(r)
        assert len(hosts) == 2, hosts
        victim, ranks = max(hosts.items(), key=lambda kv: min(kv[1]))  # the host of ranks 2, 3
        time.sleep(1.0)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=TIMEOUT_S + 15 + 30)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert took <= TIMEOUT_S + 15, f"the job ended {took:.1f} s after the kill (bound {TIMEOUT_S + 15} s)"
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"shardwise run: host h2 \(ranks {ranks[0]}, {ranks[1]}\) failed first: torchrun "
                        rf"\(pid {victim}\) was killed by SIGKILL", last), stderr[-3000:]
    time.sleep(0.5)
    assert not leftovers(tmp_path), leftovers(tmp_path)


def test_host_that_never_joins_is_named(tmp_path):
    """h2's stand-in for ssh hangs: h1's agent gives up after the join timeout, h2 is named.
    (A launch command that fails, as ssh does when it cannot connect, is named at once:
    tests/unit/test_launcher_multinode.py::test_hosts_whose_launch_command_fails_are_named.)"""
    join = 3
    env = base_env(SHARDWISE_TEST_BROKEN_HOST="h2:hang")
    start = time.monotonic()
    code, _, stderr = multi_host(tmp_path, 2, env=env, extra=("--join-timeout", str(join)))
    took = time.monotonic() - start
    assert code != 0
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"shardwise run: host h2 never joined the rendezvous at h1:\d+ \(join timeout {join} s\): "
                        r"h2: its agent never started \(the launch command was still running\)", last), stderr[-3000:]
    assert took <= join + 15 + 15, took  # + the agents' start-up on a loaded machine
    assert not leftovers(tmp_path), leftovers(tmp_path)
