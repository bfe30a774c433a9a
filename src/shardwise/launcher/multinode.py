"""``shardwise run --hostfile``: one torchrun agent per host, and SLURM steps.

[Note: multi-host launch]
With a hostfile (``--hostfile``, else DeepSpeed's ``/job/hostfile`` when it exists and no torchrun
node/rendezvous option is given) the hosts and slots are chosen as in [Note: hostfile and
filters]. One local host (``localhost``, this machine's name) runs as before, with
``--nproc-per-node`` = its slots. Otherwise every host gets one command::

    LAUNCH HOST sh -c 'cd CWD && exec env VARS... PYTHON agent.py HOST -- PYTHON -m torch.distributed.run
        --nnodes N --nproc-per-node SLOTS --rdzv-backend c10d --rdzv-endpoint MASTER:PORT
        --rdzv-id JOB --rdzv-conf join_timeout=S --tee 3 [torchrun options] worker.py script ...'

* LAUNCH is ``ssh -o BatchMode=yes [-p SSH_PORT] HOST 'the command'`` by default, or the words of
  ``--launcher-cmd`` with ``{host}`` replaced by the host (else the host appended), followed by
  ``sh -c 'the command'``. The same python, cwd, worker.py path are assumed on every host (as
  DeepSpeed assumes).
* The master is ``--master_addr`` (default: the first host), port ``--master_port`` (29500);
  torch's c10d rendezvous orders the nodes by host name (``--node-rank`` is ignored by c10d and is
  not passed), so each host's ranks are learned from its output, not assumed.
* VARS: the variables of :data:`ENV_NAMES` / :data:`ENV_PREFIXES` that are set here,
  ``.deepspeed_env`` (``~`` then the cwd; ``DS_ENV_FILE`` names another), ``--export NAME`` /
  ``NAME=VALUE``, ``CUDA_VISIBLE_DEVICES`` for a host whose slots were narrowed, and
  ``OMP_NUM_THREADS=1`` on a machine without CUDA unless set.
* Output: torchrun tees every rank's lines with the prefix ``[HOST rank R]: ``
  (``TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE``); the agent's own lines get ``[HOST] ``.
* Failure (see [Note: host agent] for what happens on the host): when a host's command exits
  non-zero the launcher stops the others at once (their stdin closed, SIGTERM to their launch
  command, SIGKILL to its process group 20 s later) and its last line names that host, its ranks
  and the cause (the one-node summary of that host's output where there is one). SIGTERM goes to
  the launch command only, not its process group: torchrun would get it twice (from the agent
  and the group), and a second SIGTERM cuts torchrun's own shutdown short.
* A host that never joins is named: at once when its command exits before its agent started
  (ssh failed); when c10d's join timeout (``--join-timeout``, ``SHARDWISE_JOIN_TIMEOUT``, default
  600 s) ends the rendezvous on the others while its agent has not started; and in any case the
  launcher stops the job 15 s after that timeout if some host's agent has still not started.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from shardwise.launcher import deepspeed_flags as ds
from shardwise.launcher import hostfile as hf
from shardwise.launcher.agent import MARK as AGENT_MARK
from shardwise.launcher.agent import STARTED as AGENT_STARTED

AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agent.py")
DEFAULT_PORT = 29500
DEFAULT_JOIN_TIMEOUT = 600.0  # c10d's own default join_timeout
STOP_GRACE_S = 20.0

# [Note: multi-host launch] what is propagated to every host (if set here)
ENV_NAMES = ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "LD_LIBRARY_PATH",
             "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_HOME", "CUDA_LAUNCH_BLOCKING")
ENV_PREFIXES = ("NCCL_", "GLOO_", "SHARDWISE_", "TORCH_", "TORCHINDUCTOR_", "PYTORCH_", "HF_", "TRANSFORMERS_",
                "PYTHON", "UCX_", "FI_", "MV2_")
PREFIX_TEMPLATE = "[{host} rank ${{rank}}]: "
STARTED = "[shardwise rank {rank}] started"  # worker.py's line when SHARDWISE_LAUNCH_HOST is set
_LINE_PREFIX = re.compile(r"^\[(?P<host>[^\s\]]+) rank (?P<rank>\d+)\]: ?")
_STARTED = re.compile(r"^\[shardwise rank \d+\] started$")
_CONFLICTS = ("nnodes", "node_rank", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "standalone")


def _error(msg: str):
    from shardwise.launcher.run import LaunchError

    return LaunchError(msg)


@dataclass
class Host:
    name: str
    slots: list[int]
    command: list[str]
    narrowed: bool = False
    proc: subprocess.Popen | None = None
    ranks: set[int] = field(default_factory=set)
    tail: list[str] = field(default_factory=list)  # this host's output, prefixes stripped
    code: int | None = None  # exit code, 128 + N for signal N
    signal: int | None = None  # the launch command died of this signal
    agent_up: bool = False  # agent.py has started torchrun there
    ended: float | None = None
    on_its_own: bool = False  # it ended before the launcher stopped the job


@dataclass
class HostPlan:
    hosts: list[Host]
    master: str
    port: int
    job_id: str
    join_timeout: float
    source: str  # the hostfile


def _exports(run, env: Mapping[str, str]) -> dict[str, str]:
    out = {k: v for k, v in env.items() if k in ENV_NAMES or k.startswith(ENV_PREFIXES)}
    files = [os.path.join(os.path.expanduser("~"), ".deepspeed_env"), os.path.join(os.getcwd(), ".deepspeed_env")]
    if env.get("DS_ENV_FILE"):
        files = [env["DS_ENV_FILE"]]
    for path in dict.fromkeys(files):
        if os.path.isfile(path):
            out.update(hf.parse_env_file(path))
    for dest, value in run.multinode:
        if dest != "export":
            continue
        name, eq, val = value.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise _error(f"--export {value!r}: expected NAME or NAME=VALUE")
        if eq:
            out[name] = val
        elif name in env:
            out[name] = env[name]
        else:
            raise _error(f"--export {name}: {name} is not set here (give --export {name}=VALUE)")
    return out


def _number(run, dest: str, kind=int):
    value = run.host_option(dest)
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        raise _error(f"--{dest} {value}: expected a number") from None


def _join_timeout(run, env: Mapping[str, str]) -> float:
    value = run.host_option("join_timeout") or env.get("SHARDWISE_JOIN_TIMEOUT")
    try:
        t = float(value) if value else DEFAULT_JOIN_TIMEOUT
    except ValueError:
        raise _error(f"join timeout {value!r}: expected seconds") from None
    if t <= 0:
        raise _error(f"join timeout {value!r}: must be > 0 seconds")
    return t


def resolve(run, env: Mapping[str, str]):
    """``(run, env, hosts)``: ``hosts`` is a :class:`HostPlan` to run with :func:`run_hosts`, or
    None and ``run``/``env`` are this node's (one local host of a hostfile, an srun step)."""
    given = run.host_option("hostfile")
    user_nodes = any(run.option(d) is not None for d in _CONFLICTS)
    path = hf.default_hostfile(given) if (given or not user_nodes) else None
    num_nodes = _number(run, "num_nodes")
    nproc = run.option("nproc_per_node")
    if path is None:
        for dest in ("include", "exclude"):
            if run.host_option(dest):
                return _local_filter(run, env, dest)
        if num_nodes is not None and num_nodes > 1:
            raise _error(f"--num_nodes {num_nodes} needs a hostfile (--hostfile FILE with `HOST slots=N` lines) "
                         "or an srun step; " + ds._MULTI_NODE)
        return from_slurm(run, env), env, None
    if given is None:
        print(f"shardwise run: using DeepSpeed's default hostfile {path} (it exists)", file=sys.stderr, flush=True)
    if user_nodes:
        bad = [d for d in _CONFLICTS if run.option(d) is not None]
        raise _error(f"--hostfile {path}: the hostfile decides the nodes and the rendezvous; drop torchrun's "
                     f"{', '.join('--' + d.replace('_', '-') for d in bad)}")
    if nproc is not None and not str(nproc).isdigit():
        raise _error(f"--nproc-per-node {nproc} with a hostfile: give a number (the slots used on each host)")
    pool = hf.select(hf.read_hostfile(path), run.host_option("include"), run.host_option("exclude"),
                     num_nodes, int(nproc) if nproc is not None else None)
    if len(pool) == 1 and hf.is_local(next(iter(pool))):
        host, slots = next(iter(pool.items()))
        return _one_local(run, env, slots, narrowed=slots != list(range(len(slots))) or None)
    return run, env, _plan(run, env, pool, path)


def _without(run, dests) -> object:
    """``run`` without the torchrun options ``dests`` (from both the passthrough and options)."""
    from shardwise.launcher.run import _lookup_quiet

    args, skip = [], False
    table = list(run.torchrun_args)
    for i, a in enumerate(table):
        if skip:
            skip = False
            continue
        dest = _lookup_quiet(a)
        if dest in dests:
            skip = "=" not in a and dest not in ("standalone",)
            continue
        args.append(a)
    return replace(run, torchrun_args=tuple(args), options=tuple((d, v) for d, v in run.options if d not in dests))


def _one_local(run, env, slots, narrowed):
    run = _without(run, ("nproc_per_node",))
    run = replace(run, torchrun_args=(*run.torchrun_args, "--nproc-per-node", str(len(slots))),
                  options=(*run.options, ("nproc_per_node", str(len(slots)))))
    env = dict(env)
    if narrowed:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, slots))
    return run, env, None


def _local_filter(run, env, dest):
    spec = run.host_option(dest)
    if dest == "exclude":
        raise _error(f"--exclude {spec}: needs a hostfile (--hostfile FILE); on this node choose the devices with "
                     "--include localhost:0,1 or CUDA_VISIBLE_DEVICES")
    wanted = hf.parse_filter(spec, "--include")
    if len(wanted) != 1 or not hf.is_local(next(iter(wanted))) or next(iter(wanted.values())) is None:
        raise _error(f"--include {spec}: without a hostfile only this node's slots can be chosen "
                     "(--include localhost:0,1); for other hosts give --hostfile FILE")
    return _one_local(run, env, next(iter(wanted.values())), narrowed=True)


def _plan(run, env, pool: Mapping[str, list[int]], path: str) -> HostPlan:
    from shardwise.launcher.run import WORKER, _cuda_available

    master = str(run.option("master_addr") or next(iter(pool)))
    port = int(run.option("master_port") or DEFAULT_PORT)
    job_id = env.get("SLURM_JOB_ID") or f"shardwise-{socket.gethostname()}-{os.getpid()}-{int(time.time())}"
    join = _join_timeout(run, env)
    base = _without(run, ("nproc_per_node", "master_addr", "master_port", "tee", "redirects"))
    rdzv_conf = str(run.option("rdzv_conf") or "")
    if "join_timeout" not in rdzv_conf:
        rdzv_conf = ",".join(x for x in (rdzv_conf, f"join_timeout={join:g}") if x)
    base = _without(base, ("rdzv_conf",))
    program = [WORKER, run.script]
    if run.option("no_python") or run.option("run_path"):
        program = [run.script]
    elif run.option("module"):
        base = _without(base, ("module",))
        program = [WORKER, "--module", run.script]
    if run.local_rank:
        program.append(ds.LOCAL_RANK_ARG)
    exports = _exports(run, env)
    if "OMP_NUM_THREADS" not in exports and not _cuda_available():
        exports["OMP_NUM_THREADS"] = "1"  # [Note: one thread per rank on CPU]
    launcher = run.host_option("launcher_cmd")
    ssh_port = run.host_option("ssh_port")
    python = sys.executable
    hosts = []
    for name, slots in pool.items():
        narrowed = slots != list(range(len(slots)))
        host_env = dict(exports)
        if narrowed:
            host_env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, slots))
        host_env["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] = PREFIX_TEMPLATE.format(host=name)
        host_env["SHARDWISE_LAUNCH_HOST"] = name
        torchrun = [python, "-m", "torch.distributed.run", "--nnodes", str(len(pool)),
                    "--nproc-per-node", str(len(slots)), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", f"{master}:{port}", "--rdzv-id", job_id, "--rdzv-conf", rdzv_conf,
                    "--tee", "3", *base.torchrun_args, *program, *run.script_args]
        script = " ".join(["cd", shlex.quote(os.getcwd()), "&&", "exec", "env",
                           *(f"{k}={shlex.quote(v)}" for k, v in sorted(host_env.items())),
                           *map(shlex.quote, [python, "-u", AGENT, name, "--", *torchrun])])
        if launcher:
            words = shlex.split(launcher)
            if any("{host}" in w for w in words):
                words = [w.replace("{host}", name) for w in words]
            else:
                words.append(name)
            command = [*words, "sh", "-c", script]
        else:
            command = ["ssh", "-o", "BatchMode=yes", *(["-p", ssh_port] if ssh_port else []), name, script]
        hosts.append(Host(name, list(slots), command, narrowed))
    return HostPlan(hosts, master, port, job_id, join, path)


# --- SLURM: `srun --ntasks-per-node 1 shardwise run ...` ------------------------------------

def from_slurm(run, env: Mapping[str, str]):
    """Inside an srun step of several nodes: add ``--nnodes --node-rank --rdzv-*`` from SLURM
    (unless the user gave node or rendezvous options), else ``run`` unchanged."""
    step = hf.slurm_step(env)
    if step is None and not any(run.option(d) is not None for d in _CONFLICTS) \
            and str(env.get("SLURM_NNODES", "1")).isdigit() and int(env.get("SLURM_NNODES", "1")) > 1:
        print(f"shardwise run: a SLURM allocation of {env['SLURM_NNODES']} nodes, but this is not an srun step: "
              "starting the ranks of this node only; run `srun --ntasks-per-node 1 shardwise run ...` to use "
              "every node", file=sys.stderr, flush=True)
    if step is None or any(run.option(d) is not None for d in _CONFLICTS):
        return run
    if step["nnodes"] <= 1:
        return run
    if step["tasks_per_node"] > 1:
        raise _error(f"SLURM step with {step['tasks_per_node']} tasks per node: shardwise run starts the ranks of "
                     "a node itself, so run it once per node (`srun --ntasks-per-node 1 shardwise run ...`), or "
                     "start the script directly with srun (ranks then come from SLURM_PROCID: README \"Multi-node\")")
    master = str(run.option("master_addr") or step["master"])
    port = int(run.option("master_port") or env.get("MASTER_PORT") or DEFAULT_PORT)
    args = ["--nnodes", str(step["nnodes"]), "--node-rank", str(step["node_rank"]), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{master}:{port}", "--rdzv-id", step["job_id"]]
    opts = [("nnodes", str(step["nnodes"])), ("node_rank", str(step["node_rank"])), ("rdzv_backend", "c10d"),
            ("rdzv_endpoint", f"{master}:{port}"), ("rdzv_id", step["job_id"])]
    if run.option("nproc_per_node") is None:
        n = step["gpus"] if step["gpus"] and str(step["gpus"]).isdigit() else "1"
        args += ["--nproc-per-node", n]
        opts.append(("nproc_per_node", n))
    run = _without(run, ("master_addr", "master_port"))
    return replace(run, torchrun_args=(*args, *run.torchrun_args), options=(*opts, *run.options))


# --- running the hosts -----------------------------------------------------------------------

def _pump(host: Host, stream, out, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\n")
        m = _LINE_PREFIX.match(line)
        body = line[m.end():] if m else line
        with lock:
            if m:
                host.ranks.add(int(m.group("rank")))
            host.tail.append(body)
            del host.tail[:-2000]
        if m and _STARTED.match(body):
            continue  # worker.py's start line: only for the launcher
        if not m and body.startswith(AGENT_MARK) and AGENT_STARTED in body:
            host.agent_up = True
            continue  # agent.py's start line: only for the launcher
        text = line if m else f"[{host.name}] {line}"
        try:
            out.write(text + "\n")
            out.flush()
        except (OSError, ValueError):
            pass


def _ranks(host: Host) -> str:
    if not host.ranks:
        return "no rank had started"
    r = sorted(host.ranks)
    return ("rank " if len(r) == 1 else "ranks ") + ", ".join(map(str, r))


def _why(host: Host) -> str:
    from shardwise.launcher.run import failure_summary

    tail = "\n".join(host.tail)
    for line in reversed(host.tail):
        if line.startswith(AGENT_MARK) and "was killed by" in line:
            return line[len(AGENT_MARK):].split(": ", 1)[-1]
    summary = failure_summary(tail)
    if summary:
        return summary.removeprefix("shardwise run: ")
    code, sig = host.code, host.signal
    if sig:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        what = f"its launch command died of {name}"
    else:
        what = f"its launch command exited with code {code}"
    last = next((ln.strip() for ln in reversed(host.tail) if ln.strip()), "")
    return what + (f" ({last[:240]})" if last else "")


def _stop(hosts, sig=signal.SIGTERM) -> None:
    for h in hosts:
        if h.proc is None or h.proc.poll() is not None:
            continue
        if sig == signal.SIGTERM:
            try:
                h.proc.stdin.close()
            except (OSError, AttributeError):
                pass
        try:  # SIGTERM to the launch command (the agent forwards it once); SIGKILL to its whole group
            os.killpg(h.proc.pid, sig) if sig == signal.SIGKILL else h.proc.send_signal(sig)
        except OSError:
            pass


def run_hosts(plan: HostPlan, dry_run: bool = False) -> int:
    """Start every host's command and supervise them ([Note: multi-host launch])."""
    if dry_run:
        print(f"# {len(plan.hosts)} hosts from {plan.source}; rendezvous c10d {plan.master}:{plan.port} "
              f"id {plan.job_id}, join timeout {plan.join_timeout:g} s", flush=True)
        for h in plan.hosts:
            print(f"# {h.name}: {len(h.slots)} rank(s), slots {','.join(map(str, h.slots))}", flush=True)
            print(" ".join(map(shlex.quote, h.command)), flush=True)
        return 0
    lock = threading.Lock()
    pumps = []
    start = time.monotonic()
    for h in plan.hosts:
        try:
            h.proc = subprocess.Popen(h.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            _stop(plan.hosts, signal.SIGKILL)
            raise _error(f"cannot start the launch command for host {h.name} ({h.command[0]}): "
                         f"{exc.strerror or exc}") from None
        for stream, out in ((h.proc.stdout, sys.stdout), (h.proc.stderr, sys.stderr)):
            t = threading.Thread(target=_pump, args=(h, stream, out, lock), daemon=True)
            t.start()
            pumps.append(t)
    failed: Host | None = None
    missing: list[Host] = []
    stop_at = None
    forwarded: list[int] = []
    previous = {}

    def forward(signum, _frame):
        forwarded.append(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, forward)
        except ValueError:
            break
    try:
        while True:
            now = time.monotonic()
            for h in plan.hosts:
                if h.code is None and h.proc.poll() is not None:
                    rc = h.proc.returncode
                    h.code, h.signal = (rc, None) if rc >= 0 else (128 - rc, -rc)
                    h.ended = now
                    h.on_its_own = stop_at is None
                    if h.code != 0 and failed is None and not missing and stop_at is None:
                        time.sleep(0.3)  # the last lines of its output
                        absent = [x for x in plan.hosts if not x.agent_up]
                        if not h.agent_up:
                            missing = [h]
                        elif not h.ranks and absent:  # it gave up waiting for them in the rendezvous
                            missing = absent
                        else:
                            failed = h
            running = [h for h in plan.hosts if h.code is None]
            if not running:
                break
            if forwarded and stop_at is None:
                stop_at = now
                _stop(running)
            if (failed or missing) and stop_at is None:
                stop_at = now
                _stop(running)
            if stop_at is None and now - start > plan.join_timeout + 15:
                # (ranks that have not started yet are left to c10d's own join timeout: a script
                # run with --no-python prints no start line)
                late = [h for h in plan.hosts if not h.agent_up]
                if late:
                    missing = late
                    stop_at = now
                    _stop(running)
            if stop_at is not None and now - stop_at > STOP_GRACE_S:
                _stop(running, signal.SIGKILL)
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(plan.hosts)
        for h in plan.hosts:
            try:
                h.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _stop([h], signal.SIGKILL)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for t in pumps:
        t.join(timeout=2)
    if forwarded and not failed and not missing:
        name = signal.Signals(forwarded[0]).name
        print(f"shardwise run: stopped by {name}: every host's agent was stopped", file=sys.stderr, flush=True)
        return 128 + forwarded[0]
    if not failed and not missing:  # e.g. the agents gave up waiting in the rendezvous
        missing = [h for h in plan.hosts if not h.agent_up] or [h for h in plan.hosts if not h.ranks and h.code]
    if not failed and not missing:
        bad = [h for h in plan.hosts if h.code]
        if not bad:
            return 0
        failed = min(bad, key=lambda h: h.ended)
    if missing and not failed:
        never = [h for h in plan.hosts if h in missing or (not h.agent_up and h.on_its_own and h.code)]
        names = ", ".join(h.name for h in never)
        reasons = "; ".join(f"{h.name}: " + (_why(h) if h.on_its_own and h.code else
                                             "its ranks had not started" if h.agent_up else
                                             "its agent never started (the launch command was still running)")
                            for h in never)
        print(f"shardwise run: host{'s' if len(never) > 1 else ''} {names} never joined the rendezvous at "
              f"{plan.master}:{plan.port} (join timeout {plan.join_timeout:g} s): {reasons}",
              file=sys.stderr, flush=True)
        return next((h.code for h in never if h.code), 1)
    print(f"shardwise run: host {failed.name} ({_ranks(failed)}) failed first: {_why(failed)}",
          file=sys.stderr, flush=True)
    return failed.code or 1
