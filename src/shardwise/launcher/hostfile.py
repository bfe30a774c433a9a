"""DeepSpeed's host vocabulary: the hostfile, ``--include``/``--exclude``, SLURM host lists.

[Note: hostfile and filters]
A hostfile is DeepSpeed's: one ``HOST slots=N`` line per host (``N`` ranks there, the GPU
indices ``0..N-1``), ``#`` starts a comment, blank lines are skipped; anything else is a
:class:`LaunchError` naming ``file:line`` and the expected form. A host listed twice is an
error too. ``--include`` / ``--exclude`` take ``HOST[:SLOT,SLOT...]@HOST...``: a bare host means
all its slots. ``--include`` keeps only what it names (in hostfile order), ``--exclude`` removes
what it names; they are exclusive, and neither combines with ``--num_nodes``/``--num_gpus``
(DeepSpeed's rules). ``--num_nodes N`` keeps the first N hosts, ``--num_gpus G`` the first G
slots of each. The result is an ordered ``{host: [slots]}``; a host whose slots were narrowed
gets ``CUDA_VISIBLE_DEVICES`` set to them (see [Note: multi-host launch]).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

DEFAULT_HOSTFILE = "/job/hostfile"  # DeepSpeed's default, read only when it exists

_LINE = re.compile(r"^(?P<host>[^\s=#]+)\s+slots\s*=\s*(?P<slots>\d+)$")
EXPECTED = "expected `HOSTNAME slots=N` (N >= 1), a `# comment` or a blank line"


def _error(msg: str):
    from shardwise.launcher.run import LaunchError

    return LaunchError(msg)


def parse_hostfile_text(text: str, path: str = "<hostfile>") -> dict[str, int]:
    """``{host: slots}`` in file order from a DeepSpeed hostfile's text."""
    hosts: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if m is None or int(m.group("slots")) < 1:
            raise _error(f"{path}:{n}: malformed hostfile line {raw.strip()!r}: {EXPECTED}")
        host = m.group("host")
        if host in hosts:
            raise _error(f"{path}:{n}: host {host!r} is listed twice (first with slots={hosts[host]}): "
                         "give each host one line")
        hosts[host] = int(m.group("slots"))
    if not hosts:
        raise _error(f"{path}: no hosts in the hostfile: {EXPECTED}")
    return hosts


def read_hostfile(path: str) -> dict[str, int]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise _error(f"cannot read hostfile {path}: {exc.strerror or exc}") from None
    return parse_hostfile_text(text, path)


def parse_filter(spec: str, option: str) -> dict[str, list[int] | None]:
    """``h1:0,1@h2`` -> ``{"h1": [0, 1], "h2": None}`` (None: every slot)."""
    out: dict[str, list[int] | None] = {}
    for part in spec.split("@"):
        part = part.strip()
        if not part:
            raise _error(f"{option} {spec!r}: empty host entry; expected HOST[:SLOT,SLOT...]@HOST...")
        host, colon, slots = part.partition(":")
        if not colon:
            out[host] = None
            continue
        try:
            values = [int(s) for s in slots.split(",")]
        except ValueError:
            raise _error(f"{option} {spec!r}: slots of {host!r} must be integers, e.g. {host}:0,1") from None
        if any(v < 0 for v in values):
            raise _error(f"{option} {spec!r}: slots of {host!r} must be >= 0")
        if host in out and out[host] is None:
            continue  # the whole host was named already
        out[host] = sorted({*(out.get(host) or []), *values})
    return out


def select(hosts: Mapping[str, int], include: str | None = None, exclude: str | None = None,
           num_nodes: int | None = None, num_gpus: int | None = None) -> dict[str, list[int]]:
    """The hosts and slots a run uses ([Note: hostfile and filters])."""
    if include and exclude:
        raise _error("--include and --exclude are exclusive: give one of them")
    if (include or exclude) and ((num_nodes or -1) > 0 or (num_gpus or -1) > 0):
        raise _error("--include/--exclude cannot be combined with --num_nodes/--num_gpus (as in DeepSpeed): "
                     "name the slots in the filter instead")
    pool = {h: list(range(n)) for h, n in hosts.items()}
    if include or exclude:
        option, spec = ("--include", include) if include else ("--exclude", exclude)
        wanted = parse_filter(spec, option)
        for host, slots in wanted.items():
            if host not in pool:
                raise _error(f"{option} {spec!r}: host {host!r} is not in the hostfile (hosts: {', '.join(pool)})")
            bad = [s for s in (slots or []) if s not in pool[host]]
            if bad:
                raise _error(f"{option} {spec!r}: {host} has slots 0-{len(pool[host]) - 1}; no slot {bad}")
        if include:
            pool = {h: (list(wanted[h]) if wanted[h] is not None else s) for h, s in pool.items() if h in wanted}
        else:
            pool = {h: ([] if wanted.get(h, [0]) is None else [x for x in s if x not in (wanted.get(h) or [])])
                    for h, s in pool.items()}
            pool = {h: s for h, s in pool.items() if s}
    if num_nodes is not None and num_nodes > 0:
        if num_nodes > len(pool):
            raise _error(f"--num_nodes {num_nodes}: the hostfile has {len(pool)} host(s)")
        pool = dict(list(pool.items())[:num_nodes])
    if num_gpus is not None and num_gpus > 0:
        short = [h for h, s in pool.items() if len(s) < num_gpus]
        if short:
            raise _error(f"--num_gpus {num_gpus}: host(s) {', '.join(short)} have fewer slots in the hostfile")
        pool = {h: s[:num_gpus] for h, s in pool.items()}
    if not pool:
        raise _error("no hosts left after --include/--exclude")
    return pool


# --- SLURM's compressed host lists ----------------------------------------------------------

def _split_top(text: str, sep: str = ",") -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in (s.strip() for s in parts) if p]


def _expand_range(body: str, where: str) -> list[str]:
    out = []
    for item in body.split(","):
        lo, dash, hi = item.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise _error(f"SLURM host list {where!r}: cannot read the range {item!r}")
        if not dash:
            out.append(lo)
            continue
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        if int(hi) < int(lo):
            raise _error(f"SLURM host list {where!r}: range {item!r} goes down")
        out += [str(v).zfill(width) for v in range(int(lo), int(hi) + 1)]
    return out


def expand_hostlist(text: str) -> list[str]:
    """SLURM's ``node[01-03,7],login-1`` -> ``["node01", "node02", "node03", "node7", "login-1"]``
    (several bracket groups in a name, e.g. ``r[1-2]n[1-2]``, expand in order)."""
    hosts: list[str] = []
    for name in _split_top(text):
        if name.count("[") != name.count("]"):
            raise _error(f"SLURM host list {text!r}: unbalanced brackets in {name!r}")
        expanded = [""]
        for m in re.finditer(r"\[([^\]]*)\]|([^\[]+)", name):
            pieces = _expand_range(m.group(1), text) if m.group(1) is not None else [m.group(2)]
            expanded = [e + p for e in expanded for p in pieces]
        hosts += expanded
    return hosts


def slurm_step(env: Mapping[str, str]) -> dict | None:
    """Inside an ``srun`` step: ``{nodes, node_rank, master, job_id, tasks_per_node, gpus}``; else None."""
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if step is None or not nodelist or env.get("SLURM_NODEID") is None:
        return None
    nodes = expand_hostlist(nodelist)
    nnodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or len(nodes))
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or nnodes)
    return {"nodes": nodes[:nnodes], "nnodes": nnodes, "node_rank": int(env["SLURM_NODEID"]),
            "master": nodes[0], "job_id": f"{env.get('SLURM_JOB_ID', 'slurm')}.{step}",
            "tasks_per_node": max(1, ntasks // max(nnodes, 1)), "gpus": env.get("SLURM_GPUS_ON_NODE")}


def is_local(host: str) -> bool:
    """``localhost``, a loopback address or this machine's name."""
    import socket

    return host in ("localhost", "127.0.0.1", "::1", socket.gethostname())


def default_hostfile(given: str | None) -> str | None:
    """The hostfile to read: ``--hostfile``, else DeepSpeed's ``/job/hostfile`` when it exists."""
    if given:
        return given
    return DEFAULT_HOSTFILE if os.path.isfile(DEFAULT_HOSTFILE) else None


def parse_env_file(path: str) -> dict[str, str]:
    """DeepSpeed's ``.deepspeed_env``: ``NAME=VALUE`` lines (``#`` comments, blank lines)."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, eq, value = line.partition("=")
            if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name.strip()):
                raise _error(f"{path}:{n}: malformed line {line!r}: expected NAME=VALUE")
            out[name.strip()] = value.strip()
    return out


def host_summary(pool: Mapping[str, Sequence[int]]) -> str:
    return ", ".join(f"{h} x{len(s)}" for h, s in pool.items())
