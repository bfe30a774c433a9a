"""Ranks from SLURM or an MPI launcher, for scripts started without torchrun.

[Note: rank discovery]
``srun python train.py`` or ``mpirun -np 8 python train.py`` start every rank themselves; torch's
``env://`` rendezvous needs ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (and
shardwise ``LOCAL_RANK`` for the device). :func:`apply_launcher_env` fills them in from the
launcher's variables, before ``init_distributed`` reads them; nothing is changed when ``RANK`` is
already set (torchrun, the user) or no launcher is recognised. Sources, first match wins:

* Open MPI: ``OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE``;
* MVAPICH2: ``MV2_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE``;
* MPICH / Intel MPI (hydra, PMI): ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``, ``MPI_LOCALNRANKS``;
* SLURM (an srun step): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``, the node
  list. Only inside an srun step: the batch script itself also has ``SLURM_PROCID=0`` and the
  allocation's ``SLURM_NTASKS``, and is one process.

A world of one process is left alone (no process group, as without a launcher).

(MPI before SLURM: ``mpirun`` inside an allocation sees both, and its own numbering is the one
its ranks use.) ``MASTER_ADDR``: kept when set; else under SLURM the first host of
``SLURM_STEP_NODELIST``/``SLURM_JOB_NODELIST`` (compressed lists are expanded here, no
``scontrol``); else ``127.0.0.1`` when every rank is on this host (local size == world size);
otherwise an error naming the variable to set (``mpirun -x MASTER_ADDR=...``). ``MASTER_PORT``:
kept when set, else 29500.
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULT_PORT = "29500"

# source -> (rank, size, local rank, local size) variable names
_MPI = (
    ("openmpi", ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                 "OMPI_COMM_WORLD_LOCAL_SIZE")),
    ("mvapich2", ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
                  "MV2_COMM_WORLD_LOCAL_SIZE")),
    ("pmi", ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")),
)


def _int(env, name: str, source: str) -> int:
    from shardwise.errors import DistributedSetupError

    try:
        return int(env[name])
    except (KeyError, ValueError):
        raise DistributedSetupError(f"{source} launcher: {name}={env.get(name)!r} is not a number") from None


def detect(env: MutableMapping[str, str] | None = None) -> dict[str, str] | None:
    """The torch variables this launcher environment stands for (``{"RANK": ..., ...,
    "SHARDWISE_RANKS_FROM": source}``), or None when ``RANK`` is set or no launcher is found."""
    from shardwise.errors import DistributedSetupError

    env = os.environ if env is None else env
    if env.get("RANK") is not None:
        return None
    for source, (rank_v, size_v, local_v, lsize_v) in _MPI:
        if rank_v in env and size_v in env:
            rank, size = _int(env, rank_v, source), _int(env, size_v, source)
            if size == 1:
                return None  # one process: shardwise runs it without a process group, as before
            local = _int(env, local_v, source) if local_v in env else None
            lsize = _int(env, lsize_v, source) if lsize_v in env else None
            master = env.get("MASTER_ADDR")
            if master is None and "SLURM_PROCID" in env:
                master = _slurm_master(env)
            if master is None and lsize is not None and lsize == size:
                master = "127.0.0.1"
            if master is None:
                raise DistributedSetupError(
                    f"{source} launcher ({rank_v}={rank}, {size_v}={size}): the ranks span hosts and MASTER_ADDR is "
                    "not set; give rank 0's host, e.g. `mpirun -x MASTER_ADDR=$(hostname) -x MASTER_PORT=29500 ...`")
            return _result(source, rank, size, local, lsize, master, env)
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:  # an srun step (not the batch script)
        rank = _int(env, "SLURM_PROCID", "slurm")
        size = _int(env, "SLURM_STEP_NUM_TASKS", "slurm")
        if size == 1:
            return None
        local = _int(env, "SLURM_LOCALID", "slurm") if "SLURM_LOCALID" in env else None
        lsize = _slurm_tasks_on_node(env)
        master = env.get("MASTER_ADDR") or _slurm_master(env)
        if master is None:
            raise DistributedSetupError("slurm launcher: no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST and no MASTER_ADDR; "
                                        "set MASTER_ADDR to rank 0's host")
        return _result("slurm", rank, size, local, lsize, master, env)
    return None


def _result(source, rank, size, local, lsize, master, env) -> dict[str, str]:
    from shardwise.errors import DistributedSetupError

    if not 0 <= rank < size:
        raise DistributedSetupError(f"{source} launcher: rank {rank} is outside the world of {size}")
    out = {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(local if local is not None else 0),
           "MASTER_ADDR": master, "MASTER_PORT": env.get("MASTER_PORT") or DEFAULT_PORT,
           "SHARDWISE_RANKS_FROM": source}
    if lsize is not None:
        out["LOCAL_WORLD_SIZE"] = str(lsize)
    return out


def _slurm_master(env) -> str | None:
    from shardwise.launcher.hostfile import expand_hostlist

    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    return expand_hostlist(nodes)[0] if nodes else None


def _slurm_tasks_on_node(env) -> int | None:
    """This node's task count from ``SLURM_STEP_TASKS_PER_NODE`` (``2(x3),1``) and ``SLURM_NODEID``."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    counts: list[int] = []
    for part in spec.split(","):
        n, _, rep = part.partition("(x")
        try:
            counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
        except ValueError:
            return None
    node = int(env.get("SLURM_NODEID", "0") or 0)
    return counts[node] if node < len(counts) else None


def apply_launcher_env(env: MutableMapping[str, str] | None = None) -> str | None:
    """[Note: rank discovery]: set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
    ``MASTER_PORT`` in ``env`` (default ``os.environ``) from SLURM or MPI; returns the source
    (``"slurm"``, ``"openmpi"``, ``"mvapich2"``, ``"pmi"``) or None when nothing was changed."""
    env = os.environ if env is None else env
    found = detect(env)
    if found is None:
        return None
    for k, v in found.items():
        if k in ("MASTER_ADDR", "MASTER_PORT") and env.get(k):
            continue
        env[k] = v
    return found["SHARDWISE_RANKS_FROM"]
