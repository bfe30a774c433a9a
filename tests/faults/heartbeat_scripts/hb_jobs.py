"""Run many short 2-rank gloo jobs back to back, each rank in its own UTS namespace with its own
host name, so that shardwise sees ranks on different hosts and runs the heartbeat; count the
ranks that did not exit cleanly.

usage: hb_jobs.py JOBS OUT_DIR [--mode min|train|stop] [--fresh] [--cores] [--same-host]

Each rank is a real interpreter that ends with a normal exit (atexit hooks, thread shutdown,
``Py_FinalizeEx``): the subject is how a finished rank exits. By default the ranks are forked
from this process after torch and shardwise are imported (a job then costs well under a second
instead of two interpreter start-ups); the child unshares its UTS namespace, sets its host
name, runs the job and raises SystemExit, which unwinds to the top level like any script's end.
``--fresh`` starts every rank as ``unshare --uts sh -c 'hostname H; exec python -c ...'``
instead (the slow, most literal form). ``--same-host`` keeps one host name for all ranks (the
heartbeat runs on one host too; /proc is then asked about peers first).

Modes: ``min`` init_context + 3 all-reduces; ``train`` shardwise.initialize + 3 ZeRO-2 steps;
``stop`` (one job) rank 1 stops itself with SIGSTOP before the second all-reduce, and rank 0
prints the named error and how long it took (the heartbeat path, host names differ).

Prints one line per bad rank and a final JSON line:
{"jobs": N, "ranks": 2N, "bad": k, "aborts": a, "seconds": s}.
Exit code 0 iff no rank was bad. Needs root (or CAP_SYS_ADMIN) for unshare.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CLONE_NEWUTS = 0x04000000
JOB_TIMEOUT_S = 60.0
COMM_TIMEOUT_S = 20.0


def job_min() -> None:
    """The subject is the exit: a few collectives whose tensors Python drops at once (what the
    gloo workers must not free during shutdown), with the heartbeat beating fast enough that
    its thread is often inside a store call when the rank finishes."""
    import torch

    from shardwise.comm import collectives as C
    from shardwise.comm import health
    from shardwise.comm.context import init_context

    health.HEARTBEAT_S = float(os.environ.get("HB_INTERVAL", "0.01"))
    ctx = init_context(timeout_s=COMM_TIMEOUT_S)
    assert ctx.health is not None and ctx.health.beating, "the heartbeat is not running"
    g = ctx.world
    for _ in range(3):
        t = torch.ones(4)
        C.all_reduce(t, g)
        assert float(t[0]) == g.size
    C.all_gather_object({"rank": ctx.rank}, g)
    C.broadcast_object([1, 2, 3], g)
    C.all_gather_shard(torch.zeros(2 * g.size), g, async_op=False)
    peer = 1 - ctx.rank
    deadline = time.monotonic() + 5
    while ctx.health._store.add(f"hb/{peer}", 0) == 0:  # the peer's heartbeat reached the store
        assert time.monotonic() < deadline, "no heartbeat from the peer within 5 s"
        time.sleep(0.005)
    C.all_reduce(torch.ones(4), g)  # the last collective: a temporary


def job_train() -> None:
    import torch

    import shardwise

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    cfg = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "zero_optimization": {"stage": 2}, "comms_timeout": COMM_TIMEOUT_S, "steps_per_print": 1000}
    engine, *_ = shardwise.initialize(model=model, config=cfg)
    for _ in range(3):
        loss = engine(torch.randn(2, 8)).pow(2).mean()
        engine.backward(loss)
        engine.step()


def job_stop() -> None:
    import torch

    from shardwise.comm import collectives as C
    from shardwise.comm.context import init_context

    ctx = init_context(timeout_s=float(os.environ.get("HB_TIMEOUT", "5")))
    assert ctx.health is not None and ctx.health.beating, "the heartbeat is not running"
    t = torch.ones(4)
    C.all_reduce(t, ctx.world)
    time.sleep(1.5)  # a heartbeat or two from both ranks
    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    start = time.monotonic()
    try:
        C.all_reduce(t, ctx.world)
    except Exception as exc:  # noqa: BLE001 - the driver reads the message
        print(f"RESULT after {time.monotonic() - start:.2f}s: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        raise SystemExit(3)
    print("RESULT: no error", file=sys.stderr, flush=True)


JOBS = {"min": job_min, "train": job_train, "stop": job_stop}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, port: int, same_host: bool) -> dict:
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
           "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    return env


def fork_rank(job: int, rank: int, port: int, mode: str, rank_dir: str, same_host: bool,
              cores: bool) -> int:
    pid = os.fork()
    if pid:
        return pid
    # the child: a rank. Everything below ends in SystemExit, which unwinds to the module's top
    # level, so the interpreter finalises as at the end of any script.
    code = 0
    try:
        os.chdir(rank_dir)
        err = os.open("stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(err, 2)
        os.close(err)
        if cores:
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        if not same_host:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWUTS) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUTS)")
            socket.sethostname(f"hb{job}r{rank}")
        os.environ.update(rank_env(rank, port, same_host))
        JOBS[mode]()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported through stderr and the exit code
        import traceback

        traceback.print_exc()
        code = 1
    raise _RankDone(code)


class _RankDone(BaseException):
    """Raised in a forked rank to leave every frame of the driver; caught at the top level."""

    def __init__(self, code: int):
        self.code = code


def spawn_fresh(job: int, rank: int, port: int, mode: str, rank_dir: str, same_host: bool,
                cores: bool) -> subprocess.Popen:
    env = dict(os.environ, **rank_env(rank, port, same_host))
    py = (f"import sys; sys.path.insert(0, {HERE!r}); import hb_jobs; "
          f"hb_jobs.JOBS[{mode!r}]()")
    argv = [sys.executable, "-c", py]
    pre = "ulimit -c unlimited; " if cores else ""
    if same_host:
        cmd = ["sh", "-c", pre + 'exec "$@"', "sh", *argv]
    else:
        cmd = ["unshare", "--uts", "sh", "-c", pre + f'hostname hb{job}r{rank} && exec "$@"', "sh", *argv]
    err = open(os.path.join(rank_dir, "stderr"), "wb")
    try:
        return subprocess.Popen(cmd, env=env, cwd=rank_dir, stdout=subprocess.DEVNULL, stderr=err)
    finally:
        err.close()


def wait_pid(pid: int, deadline: float) -> int:
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -9
        time.sleep(0.01)


def main(argv: list[str]) -> int:
    jobs, out = int(argv[0]), os.path.abspath(argv[1])
    opts = argv[2:]
    mode = opts[opts.index("--mode") + 1] if "--mode" in opts else "min"
    fresh, cores, same_host = "--fresh" in opts, "--cores" in opts, "--same-host" in opts
    if not fresh:
        import importlib

        for name in ("torch", "torch.distributed", "shardwise", "shardwise.comm.context"):
            importlib.import_module(name)  # imported once here, inherited by every forked rank
    os.makedirs(out, exist_ok=True)
    start = time.monotonic()
    bad = aborts = 0
    for job in range(jobs):
        port = free_port()
        dirs = [os.path.join(out, f"job{job}", f"rank{r}") for r in range(2)]
        for d in dirs:
            os.makedirs(d, exist_ok=True)
        deadline = time.monotonic() + JOB_TIMEOUT_S
        if fresh:
            procs = [spawn_fresh(job, r, port, mode, dirs[r], same_host, cores) for r in range(2)]
            codes = []
            if mode == "stop":
                try:
                    procs[0].wait(timeout=JOB_TIMEOUT_S)
                finally:
                    procs[1].kill()
            for p in procs:
                try:
                    codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    p.kill()
                    codes.append(p.wait())
        else:
            pids = [fork_rank(job, r, port, mode, dirs[r], same_host, cores) for r in range(2)]
            codes = [wait_pid(pids[0], deadline)]
            if mode == "stop":  # rank 1 stopped itself: it is ended once rank 0 has reported
                os.kill(pids[1], signal.SIGKILL)
            codes.append(wait_pid(pids[1], deadline))
        for r, code in enumerate(codes):
            with open(os.path.join(dirs[r], "stderr"), errors="replace") as f:
                err = f.read()
            if mode == "stop":
                print(f"job {job} rank {r} exit {code}\n{err}", flush=True)
                continue
            terminated = "terminate called" in err
            if code != 0 or terminated:
                bad += 1
                aborts += code == -signal.SIGABRT or terminated
                tail = "\n    ".join(err.strip().splitlines()[-4:])
                print(f"job {job} rank {r}: exit {code}\n    {tail}", flush=True)
    print(json.dumps({"jobs": jobs, "ranks": 2 * jobs, "bad": bad, "aborts": aborts, "mode": mode,
                      "fresh": fresh, "same_host": same_host,
                      "seconds": round(time.monotonic() - start, 1)}), flush=True)
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except _RankDone as done:  # a forked rank leaving the driver's frames: a normal script end
        code = done.code
    raise SystemExit(code)
