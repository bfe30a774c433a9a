"""DeepSpeed launcher options (``deepspeed --num_gpus 2 train.py``) in ``shardwise run``.

[Note: DeepSpeed launcher options]
``shardwise run`` takes torchrun's options; DeepSpeed users arrive with the ``deepspeed``
launcher's. Those that torchrun spells the same way (``--master_port``, ``--master_addr``,
``--node_rank``, ``--module``, ``--no_python``) are torchrun's and pass through. Of the rest:

* ``--num_gpus N`` / ``--num_accelerators N`` become ``--nproc-per-node N`` (``-1``, all
  GPUs, becomes torchrun's ``gpu``);
* the multi-node ones (``--hostfile``/``-H``, ``--include``/``-i``, ``--exclude``/``-e``,
  ``--num_nodes``, ``--ssh_port``) and shardwise's own ``--launcher-cmd``, ``--export``,
  ``--join-timeout`` are collected in ``RunArgs.multinode`` and turned into one torchrun agent
  per host ([Note: multi-host launch] in multinode.py); ``--num_nodes 1`` (or ``-1``) without a
  hostfile is this node; ``--no_ssh_check`` is accepted and does nothing (no pre-check is made);
* ``--no_local_rank`` is shardwise's own (see [Note: --local_rank]);
* the rest (``--launcher``, ``--launcher_args``, ``--no_ssh``, ``--force_multi``, elastic options,
  ...) are a :class:`LaunchError` that names what to use instead.

[Note: --local_rank]);
* the multi-node ones (``--hostfile``, ``--include``/``--exclude``, ``--num_nodes N>1``,
  ``--launcher``, ssh options, elastic options) and the few others are a :class:`LaunchError`
  that names what to use instead; ``shardwise run`` starts the ranks of one node.

[Note: --local_rank]
DeepSpeed's launcher passes ``--local_rank=<local rank>`` to every script, right after the
script path, and many DeepSpeed scripts parse it (some require it). ``shardwise run`` does the
same by default, through torchrun's ``${local_rank}`` macro (torchrun substitutes it per
worker); ``--no_local_rank`` / ``--no-local-rank`` turns it off for scripts that do not accept
it. ``LOCAL_RANK`` is in the environment either way.
"""
from __future__ import annotations

from dataclasses import dataclass

NO_LOCAL_RANK = ("--no_local_rank", "--no-local-rank")
LOCAL_RANK_ARG = "--local_rank=${local_rank}"  # torchrun's macro, substituted per worker

_MULTI_NODE = (
    "shardwise run starts one torchrun agent per host of a DeepSpeed hostfile: `shardwise run "
    "--hostfile HOSTS [--launcher-cmd 'srun -N1 -w {host}'] script.py ...` (ssh by default); or, "
    "torchrun's way, one command per node started by your scheduler: `shardwise run --nnodes N "
    "--rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id JOB --nproc-per-node G script.py ...`"
)

# RunArgs.multinode keys ([Note: multi-host launch] in multinode.py)
MULTI_NODE_DESTS = ("hostfile", "include", "exclude", "num_nodes", "launcher_cmd", "export", "join_timeout",
                    "ssh_port")


@dataclass(frozen=True)
class DeepSpeedFlag:
    dest: str
    takes_value: bool


# DeepSpeed launcher spellings (underscore, as DeepSpeed spells them, and dashed) -> meaning.
# Names torchrun also has are left to torchrun (they are looked up first).
_FLAGS: dict[str, DeepSpeedFlag] = {}


def _add(dest: str, takes_value: bool, *names: str) -> None:
    for n in names:
        _FLAGS[n] = DeepSpeedFlag(dest, takes_value)
        if n.startswith("--") and "_" in n:
            _FLAGS[n.replace("_", "-")] = DeepSpeedFlag(dest, takes_value)


_add("num_gpus", True, "--num_gpus", "--num_accelerators")
_add("num_nodes", True, "--num_nodes")
_add("no_local_rank", False, "--no_local_rank")
_add("hostfile", True, "-H", "--hostfile")
_add("include", True, "-i", "--include")
_add("exclude", True, "-e", "--exclude")
_add("launcher", True, "--launcher", "--launcher_args")
_add("ssh_port", True, "--ssh_port")
_add("launcher_cmd", True, "--launcher_cmd")
_add("export", True, "--export")
_add("join_timeout", True, "--join_timeout")
_add("no_ssh_check", False, "--no_ssh_check")
_add("ssh", False, "--no_ssh", "--force_multi")
_add("elastic", False, "--elastic_training")
_add("elastic_nodes", True, "--min_elastic_nodes", "--max_elastic_nodes")
_add("autotuning", True, "--autotuning")
_add("each_rank_log", True, "--enable_each_rank_log")
_add("bind_cores", False, "--bind_cores_to_rank")
_add("bind_core_list", True, "--bind_core_list")
_add("save_pid", False, "--save_pid")


def lookup(name: str) -> DeepSpeedFlag | None:
    """The DeepSpeed launcher option ``name`` (exact spelling), or None."""
    return _FLAGS.get(name)


def translate(flag: DeepSpeedFlag, name: str, value: str | None) -> list[tuple[str, str]]:
    """The torchrun (dest, value) pairs a DeepSpeed option stands for ([] if none), or raise
    :class:`~shardwise.launcher.run.LaunchError` naming what to use instead."""
    from shardwise.launcher.run import LaunchError

    given = f"{name} {value}" if value is not None else name
    if flag.dest == "num_gpus":
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise LaunchError(f"{given}: expected a number of processes (DeepSpeed's --num_gpus; "
                              "torchrun's --nproc-per-node N)") from None
        if n == -1:
            return [("nproc_per_node", "gpu")]  # DeepSpeed's default: every visible GPU
        if n < 1:
            raise LaunchError(f"{given}: the number of processes must be >= 1 (or -1: every GPU)")
        return [("nproc_per_node", str(n))]
    if flag.dest == "num_nodes":
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise LaunchError(f"{given}: expected a number of nodes") from None
        if n == 0 or n < -1:
            raise LaunchError(f"{given}: the number of nodes must be >= 1 (or -1: every host of the hostfile)")
        return []  # recorded in RunArgs.multinode; 1 or -1 without a hostfile: this node
    if flag.dest in ("hostfile", "include", "exclude", "launcher_cmd", "export", "join_timeout", "ssh_port",
                     "no_ssh_check"):
        return []  # recorded in RunArgs.multinode by split_run_args
    if flag.dest == "launcher":
        raise LaunchError(f"{given}: DeepSpeed's --launcher/--launcher_args are not used; give the command that "
                          "starts a process on a host instead: `--launcher-cmd 'srun -N1 -n1 -w {{host}}'` "
                          "(ssh by default). " + _MULTI_NODE)
    if flag.dest == "ssh":
        raise LaunchError(f"{given}: {_MULTI_NODE}")
    if flag.dest in ("elastic", "elastic_nodes"):
        raise LaunchError(f"{given}: DeepSpeed elasticity is not supported; torchrun's elastic options are "
                          "`--nnodes MIN:MAX` and `--max-restarts K` (with checkpoint.auto_resume in the config "
                          "to resume after a restart)")
    if flag.dest == "autotuning":
        raise LaunchError(f"{given}: DeepSpeed's autotuner is not supported; `shardwise plan` chooses the ZeRO "
                          "stage, micro-batch size and offload from a memory estimate (README \"Planning\")")
    if flag.dest == "each_rank_log":
        raise LaunchError(f"{given}: use torchrun's `--log-dir DIR --redirects 3` (one log file per rank)")
    if flag.dest in ("bind_cores", "bind_core_list"):
        raise LaunchError(f"{given}: core binding is not done by shardwise run; start it under numactl/taskset, "
                          "and set OMP_NUM_THREADS per rank")
    if flag.dest == "save_pid":
        raise LaunchError(f"{given}: not supported (torchrun's pid is the launcher's child; `--log-dir` keeps "
                          "each rank's output)")
    raise LaunchError(f"{given}: DeepSpeed launcher option not supported by shardwise run")  # pragma: no cover
