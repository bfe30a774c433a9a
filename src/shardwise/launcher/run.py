"""``shardwise run``: build the torchrun command line and run it.

[Note: launcher passthrough]
Everything before the training script is a torchrun option and is passed through verbatim;
everything after it belongs to the script, even when it looks like a torchrun option
(``shardwise run --nproc-per-node 2 train.py --nproc-per-node 5`` gives the script
``--nproc-per-node 5``). To find where the script starts we only need to know which torchrun
options take a value; that is read from torchrun's own argument parser, so the launcher follows
whatever torch version is installed. The only option added is ``--standalone``, when nothing
says the run spans several nodes or names a rendezvous. Two things change what torchrun runs:
the script runs inside ``worker.py`` ([Note: launcher failure report]; not with
``--no-python``/``--run-path``), and gets ``--local_rank=N`` first, as under DeepSpeed's
launcher ([Note: --local_rank]); DeepSpeed launcher options are handled as in
[Note: DeepSpeed launcher options]. Processes are managed by torchrun:
shardwise starts it and returns its exit code, with two additions (see [Note: launcher on
failure]).

[Note: launcher on failure]
1. torchrun's stderr (which the workers share) is passed through unchanged while its tail is
   kept; when torchrun fails, the launcher ends with one line naming the rank that failed first
   and why (signal or exit code, and that rank's exception), read from torchrun's "Root Cause"
   report and the exception line ``worker.py`` prints for a failed rank (falling back to the
   report's traceback and the ranks' ``[rankN]:`` lines; see [Note: launcher failure report]).
   A script that rejects ``--local_rank`` gets a hint naming ``--no-local-rank``.
2. torchrun stops a failed group with SIGTERM and waits 30 s before SIGKILL. A worker that is
   *stopped* (SIGSTOP, state T) cannot act on SIGTERM, so the job would outlive its timeout by
   those 30 s. Once a worker of the group has exited, the launcher sends SIGCONT to the workers
   that are stopped, so that the pending SIGTERM (or the dead peer) ends them at once.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from shardwise.errors import ShardwiseError
from shardwise.launcher import deepspeed_flags as ds

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")

TORCHRUN = ("-m", "torch.distributed.run")

# shardwise's own options of `shardwise run` (not passed to torchrun)
DRY_RUN = "--dry-run"
HELP = ("-h", "--help")

# Options that make `--standalone` wrong or pointless: the user chose the rendezvous.
_RENDEZVOUS_DESTS = ("rdzv_backend", "rdzv_endpoint", "rdzv_id", "master_addr", "master_port")

# Used only if torchrun's parser cannot be inspected: torchrun's flags that take no value.
_FALLBACK_FLAGS = {
    "--standalone": "standalone",
    "-m": "module",
    "--module": "module",
    "--no-python": "no_python",
    "--no_python": "no_python",
    "--run-path": "run_path",
    "--run_path": "run_path",
    "--virtual-local-rank": "virtual_local_rank",
    "--virtual_local_rank": "virtual_local_rank",
}

USAGE = """\
usage: shardwise run [--dry-run] [--no-local-rank] [torchrun options] script.py [script args]

Runs `python -m torch.distributed.run [torchrun options] script.py --local_rank=N [script args]`.
Common torchrun options: --nproc-per-node N, --nnodes N, --node-rank R,
--master-addr HOST, --master-port PORT, --rdzv-backend, --rdzv-endpoint, --rdzv-id,
--max-restarts, --monitor-interval, --redirects, --tee, --log-dir
(all of them: python -m torch.distributed.run --help).
DeepSpeed launcher options: --num_gpus N (= --nproc-per-node N), --num_nodes N,
--master_port, --master_addr, --hostfile FILE (`HOST slots=N` lines; /job/hostfile is read
when it exists), --include/--exclude HOST[:SLOT,...]@HOST..., --ssh_port P.
Multi-host (one torchrun agent per host, c10d rendezvous at MASTER_ADDR:MASTER_PORT):
  --launcher-cmd CMD  start each host's agent with CMD instead of ssh ({host} in CMD is the
                      host name, else it is appended; then `sh -c '<agent command>'`)
  --export NAME[=V]   also propagate NAME (repeatable); see README "Multi-node" for the list
  --join-timeout S    seconds for every host to join (default 600); a host that has not is named
Under an srun step (SLURM_STEP_ID, SLURM_NODEID, ...) nnodes, node rank and the rendezvous
come from SLURM.

  --dry-run         print the command instead of running it
  --no-local-rank   do not pass --local_rank=N to the script (as DeepSpeed's --no_local_rank);
                    LOCAL_RANK is in the environment either way

Without --nnodes > 1 or a rendezvous/master option, --standalone is added (single node, free
port). On a machine without CUDA, OMP_NUM_THREADS=1 is set unless already set.
Arguments after the script belong to the script. A rank's uncaught exception is named in the
last line when the run fails.
"""


class LaunchError(ShardwiseError):
    """``shardwise run`` was given a command line it cannot turn into a torchrun command."""


@dataclass(frozen=True)
class RunArgs:
    """``shardwise run`` arguments, split at the training script."""

    torchrun_args: tuple[str, ...]  # verbatim, without shardwise's own options
    script: str
    script_args: tuple[str, ...]
    dry_run: bool = False
    help: bool = False  # -h/--help before the script: show USAGE
    options: tuple[tuple[str, str | bool], ...] = ()  # (torchrun dest, value) as given; last wins
    local_rank: bool = True  # pass --local_rank=N to the script ([Note: --local_rank])
    multinode: tuple[tuple[str, str], ...] = ()  # (ds.MULTI_NODE_DESTS key, value) in order given

    def option(self, dest: str) -> str | bool | None:
        return dict(self.options).get(dest)

    def host_option(self, dest: str) -> str | None:
        """The last value of a multi-node option (``hostfile``, ``include``, ...), or None."""
        return dict(self.multinode).get(dest)


@lru_cache(maxsize=1)
def _torchrun_options() -> tuple[dict[str, tuple[str, bool]], bool]:
    """(option string -> (dest, takes_value), complete), from the installed torchrun's parser.

    ``complete`` is False when the parser could not be inspected and only the known
    value-less flags are listed; any other option is then assumed to take a value.
    """
    try:
        from torch.distributed.run import get_args_parser

        table = {
            s: (a.dest, a.nargs != 0)
            for a in get_args_parser()._actions
            for s in a.option_strings
            if s not in HELP
        }
        if table:
            return table, True
    except Exception:  # an unexpected torch layout: fall back to the known flags
        pass
    return {s: (d, False) for s, d in _FALLBACK_FLAGS.items()}, False


def _lookup(name: str) -> tuple[str, bool]:
    """Resolve an option name as argparse does (exact, else a unique prefix of a long option)."""
    table, complete = _torchrun_options()
    if name in table:
        return table[name]
    if name.startswith("--"):
        matches = {table[s] for s in table if s.startswith("--") and s.startswith(name)}
        if len(matches) == 1:
            return matches.pop()
        if len(matches) > 1:
            raise LaunchError(f"ambiguous torchrun option {name!r}: spell it out in full")
        if not complete:
            return name.lstrip("-").replace("-", "_"), True
    raise LaunchError(
        f"unknown torchrun option {name!r} before the training script; "
        "see `python -m torch.distributed.run --help` for the options torchrun accepts "
        "(arguments for your script go after the script path)"
    )


def _lookup_quiet(arg: str) -> str | None:
    """The torchrun dest of a flag token such as ``-m`` (None for values and unknown names)."""
    if not arg.startswith("-"):
        return None
    try:
        return _lookup(arg.partition("=")[0])[0]
    except LaunchError:
        return None


def split_run_args(argv: Sequence[str]) -> RunArgs:
    """Split ``shardwise run`` arguments at the script (see [Note: launcher passthrough]);
    DeepSpeed launcher options are translated or refused ([Note: DeepSpeed launcher options])."""
    argv = list(argv)
    passthrough: list[str] = []
    options: list[tuple[str, str | bool]] = []
    deepspeed_given: dict[str, str] = {}  # torchrun dest -> the DeepSpeed option that set it
    multinode: list[tuple[str, str]] = []
    dry_run, local_rank = False, True
    table, _ = _torchrun_options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":  # explicit end of options: the script follows
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        if arg == DRY_RUN:
            dry_run = True
            i += 1
            continue
        if arg in ds.NO_LOCAL_RANK:
            local_rank = False
            i += 1
            continue
        if arg in HELP:
            return RunArgs(tuple(passthrough), "", (), dry_run, help=True)
        if arg.startswith("--"):
            name, has_eq, attached = arg.partition("=")
        elif len(arg) > 2:  # short option with an attached value, e.g. -r3
            name, has_eq, attached = arg[:2], True, arg[2:]
        else:
            name, has_eq, attached = arg, False, ""
        flag = ds.lookup(name) if name not in table else None
        if flag is not None:
            if flag.takes_value and not has_eq:
                if i + 1 >= len(argv):
                    raise LaunchError(f"DeepSpeed launcher option {name!r} needs a value")
                value, i = argv[i + 1], i + 2
            else:
                value, i = (attached if has_eq else None), i + 1
            if flag.dest in ds.MULTI_NODE_DESTS:
                multinode.append((flag.dest, str(value)))
            for dest, val in ds.translate(flag, name, value):
                passthrough += [f"--{dest.replace('_', '-')}", val]
                options.append((dest, val))
                deepspeed_given[dest] = f"{name} {value}"
            continue
        dest, takes_value = _lookup(name)
        passthrough.append(arg)
        i += 1
        if not takes_value:
            if has_eq:
                raise LaunchError(f"torchrun option {name!r} takes no value (got {arg!r})")
            options.append((dest, True))
            continue
        if has_eq:
            options.append((dest, attached))
            continue
        if i >= len(argv):
            raise LaunchError(f"torchrun option {name!r} needs a value")
        passthrough.append(argv[i])
        options.append((dest, argv[i]))
        i += 1
    if i >= len(argv):
        raise LaunchError(
            "no training script given; usage: shardwise run [torchrun options] script.py [args]"
        )
    for dest, given in deepspeed_given.items():
        values = {str(v) for d, v in options if d == dest}
        if len(values) > 1:
            raise LaunchError(f"{given} conflicts with torchrun's --{dest.replace('_', '-')} "
                              f"(values {sorted(values)}): give one of them")
    return RunArgs(
        torchrun_args=tuple(passthrough),
        script=argv[i],
        script_args=tuple(argv[i + 1 :]),
        dry_run=dry_run,
        options=tuple(options),
        local_rank=local_rank,
        multinode=tuple(multinode),
    )


def _max_nodes(nnodes: str) -> int | None:
    """``"2"`` -> 2, ``"1:4"`` -> 4; None when it is not a node count we can read."""
    try:
        return int(str(nnodes).split(":")[-1])
    except ValueError:
        return None


def _is_set(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "") not in ("", "0")


def needs_standalone(run: RunArgs, env: Mapping[str, str]) -> bool:
    """True when nothing says the run spans nodes or names a rendezvous (CLI or PET_* env)."""
    if run.option("standalone") or _is_set(env, "PET_STANDALONE"):
        return False  # already standalone
    nnodes = run.option("nnodes") or env.get("PET_NNODES") or "1"
    max_nodes = _max_nodes(str(nnodes))
    if max_nodes is None or max_nodes > 1:
        return False
    for dest in _RENDEZVOUS_DESTS:
        if run.option(dest) is not None or env.get(f"PET_{dest.upper()}"):
            return False
    return True


def _cuda_available() -> bool:
    from shardwise.comm.context import uses_cuda  # the device choice initialize() makes

    return uses_cuda()


def build_torchrun_command(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    cuda_available: bool | None = None,
    python: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The torchrun command for ``shardwise run ARGV`` and the environment to run it in.

    Pure apart from looking up CUDA when ``cuda_available`` is None. ``env`` is not changed;
    the returned dict is the child's whole environment.
    """
    return torchrun_command(
        split_run_args(argv), env, cuda_available=cuda_available, python=python
    )


def torchrun_command(
    run: RunArgs,
    env: Mapping[str, str],
    *,
    cuda_available: bool | None = None,
    python: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """:func:`build_torchrun_command` for arguments already split by :func:`split_run_args`."""
    if run.help:
        raise LaunchError("-h/--help asks for usage, not a command: see `shardwise run --help`")
    torchrun_args, program = list(run.torchrun_args), [run.script]
    if not (run.option("no_python") or run.option("run_path")):
        # [Note: launcher failure report] the script runs inside worker.py; with torchrun's
        # -m/--module, worker.py is the program and runs the module itself
        if run.option("module"):
            torchrun_args = [a for a in torchrun_args if _lookup_quiet(a) != "module"]
            program = [WORKER, "--module", run.script]
        else:
            program = [WORKER, run.script]
    if run.local_rank:
        program.append(ds.LOCAL_RANK_ARG)
    cmd = [python or sys.executable, *TORCHRUN, *torchrun_args]
    if needs_standalone(run, env):
        cmd.append("--standalone")
    cmd += [*program, *run.script_args]

    child_env = dict(env)
    if "OMP_NUM_THREADS" not in child_env:
        if cuda_available is None:
            cuda_available = _cuda_available()
        if not cuda_available:
            # [Note: one thread per rank on CPU] each rank is a process; more intra-op threads
            # than cores per rank oversubscribes the machine (torchrun would also set 1, with a
            # warning banner, when nproc-per-node > 1).
            child_env["OMP_NUM_THREADS"] = "1"
    return cmd, child_env


def format_command(cmd: Sequence[str], env: Mapping[str, str], base: Mapping[str, str]) -> str:
    """A shell-ready line: environment changes relative to ``base``, then the command."""
    import shlex

    changed = [f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()) if base.get(k) != v]
    return " ".join([*changed, *(shlex.quote(c) for c in cmd)])


_ROOT_CAUSE = re.compile(
    r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)"
    r"(?: \(pid: (\d+)\))?(?:\s*\((\w+)\))?(.*?)(?:^={20,}|\Z)", re.S | re.M)
_PREFIX = r"^(?:\[[\w-]*\]:)?"  # torchrun's --tee/--local-ranks-filter line prefix, e.g. "[default1]:"
_MARK_LINE = re.compile(_PREFIX + r"\[shardwise rank (\d+)\] failed: (.*)$", re.M)  # worker.py's line
_RANK_LINE = re.compile(_PREFIX + r"\[(?:shardwise )?rank ?(\d+)\]:? ?(.*)$", re.M)
_EXCEPTION = re.compile(r"^((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)\b.*)$")
_EXC_HEAD = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?::|$)")  # "pkg.Type: ..." or "Type"


def _last_exception(lines: Sequence[str]) -> str | None:
    """The exception line of the last traceback in ``lines`` (any exception type), else the last
    line that looks like one (``...Error: ...``)."""
    found, in_tb, fallback = None, False, None
    for line in lines:
        if line.strip() == "Traceback (most recent call last):":
            in_tb = True
            continue
        if in_tb and line and not line[0].isspace() and _EXC_HEAD.match(line):
            found, in_tb = line.strip(), False
        elif not in_tb and _EXCEPTION.match(line.strip()):
            fallback = line.strip()
    return found or fallback


def _short(text: str) -> str:
    return text if len(text) <= 300 else text[:297] + "..."


def _local_rank_hint(stderr_tail: str) -> str:
    """[Note: --local_rank]: a script that rejects the --local_rank=N the launcher passed."""
    for line in stderr_tail.splitlines():
        if "--local_rank=" in line and ("unrecognized arguments" in line or "Error" in line):
            return (" (the script does not accept the --local_rank=N that shardwise run passes, as DeepSpeed's "
                    "launcher does: add `parser.add_argument('--local_rank', type=int, default=-1)` to it, or "
                    "run `shardwise run --no-local-rank ...`)")
    return ""


def failure_summary(stderr_tail: str) -> str | None:
    """One line naming the rank that failed first and why, from torchrun's report, or None.

    The exception is, in order: the rank's ``[shardwise rank R] failed:`` line (worker.py),
    the traceback in torchrun's root-cause report (from the rank's error file), the rank's
    ``[rankR]:`` traceback lines (see [Note: launcher failure report])."""
    m = None
    for m in _ROOT_CAUSE.finditer(stderr_tail):
        pass
    if m is None:
        return None
    rank, code, pid, sig = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
    if code < 0:
        name = sig or (signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}")
        why = f"killed by {name} (exit code {code})"
    else:
        why = f"exit code {code}"
    last = None
    for mm in _MARK_LINE.finditer(stderr_tail):
        if int(mm.group(1)) == rank:
            last = mm.group(2).strip()
    if last is None:
        block = m.group(5) or ""
        if "traceback :" in block:
            tb = block.split("traceback :", 1)[1].splitlines()
            last = _last_exception([tb[0].strip(), *(ln[2:] if ln.startswith("  ") else ln for ln in tb[1:])])
    if last is None:
        last = _last_exception([rm.group(2) for rm in _RANK_LINE.finditer(stderr_tail) if int(rm.group(1)) == rank])
    if last:
        why += f": {_short(last)}"
    if code == 2 or last:
        why += _local_rank_hint(stderr_tail)
    where = f", pid {pid}" if pid else ""
    return f"shardwise run: rank {rank} failed first{where}: {why}"


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                out.update(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
        return text[text.rfind(")") + 2:].split()[0]
    except (OSError, IndexError):
        return None


def _watch_stopped_workers(proc: subprocess.Popen, done: threading.Event, interval: float = 0.5) -> None:
    """[Note: launcher on failure] item 2."""
    seen: set[int] = set()
    while not done.wait(interval):
        alive = {c for c in _children(proc.pid) if _state(c) not in (None, "Z", "X")}
        if seen - alive:  # a worker of this group has exited: the group is ending or restarting
            for c in alive:
                if _state(c) in ("T", "t"):
                    try:
                        os.kill(c, signal.SIGCONT)
                    except OSError:
                        pass
        seen = alive


def run_torchrun(cmd: Sequence[str], env: Mapping[str, str]) -> int:
    """Run torchrun and return its exit code (128 + N when it dies of signal N).

    SIGTERM/SIGHUP sent to this process are forwarded to torchrun, which stops its workers.
    Ctrl-C reaches torchrun directly (same process group), so on KeyboardInterrupt we keep
    waiting for it to shut its workers down instead of killing it. On failure the last line
    names the rank that failed first (see [Note: launcher on failure]).
    """
    proc = subprocess.Popen(list(cmd), env=dict(env), stderr=subprocess.PIPE)
    tail = bytearray()
    done = threading.Event()

    def tee() -> None:
        fd, out = proc.stderr.fileno(), getattr(sys.stderr, "buffer", None)
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            tail.extend(chunk)
            del tail[:-262144]
            try:
                if out is not None:
                    out.write(chunk)
                    out.flush()
                else:
                    sys.stderr.write(chunk.decode("utf-8", "replace"))
                    sys.stderr.flush()
            except (OSError, ValueError):
                pass

    reader = threading.Thread(target=tee, name="torchrun-stderr", daemon=True)
    reader.start()
    watcher = threading.Thread(target=_watch_stopped_workers, args=(proc, done), daemon=True)
    watcher.start()
    previous: dict[int, object] = {}

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                previous[sig] = signal.signal(sig, forward)
            except ValueError:  # not the main thread: no forwarding
                break
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:
                continue
    finally:
        done.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    reader.join(timeout=5)  # orphaned workers could hold the pipe open: do not wait on them
    if code != 0:
        line = failure_summary(bytes(tail).decode("utf-8", "replace"))
        if line:
            print(line, file=sys.stderr, flush=True)
    return 128 - code if code < 0 else code


def launch(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """``shardwise run ARGV``: print (``--dry-run``) or run the torchrun command."""
    env = dict(os.environ if env is None else env)
    run = split_run_args(argv)
    if run.help:
        print(USAGE, end="")
        return 0
    from shardwise.launcher import multinode

    # [Note: multi-host launch]: a hostfile of remote hosts gives one agent per host; one local
    # host, or an srun step, gives this node's torchrun command with the options filled in
    run, env, hosts = multinode.resolve(run, env)
    if hosts is not None:
        return multinode.run_hosts(hosts, dry_run=run.dry_run)
    cmd, child_env = torchrun_command(run, env)
    if run.dry_run:
        print(format_command(cmd, child_env, env), flush=True)
        return 0
    return run_torchrun(cmd, child_env)
