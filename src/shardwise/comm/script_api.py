"""``shardwise.comm`` for scripts: DeepSpeed's ``deepspeed.comm`` functions, same names and
arguments, so that ``import shardwise.comm as dist`` (or ``deepspeed.comm`` after ``import
shardwise as deepspeed``) keeps working.

[Note: two comm layers]
shardwise's own collectives (``comm/collectives.py``, typed, on a ``GroupContext``, with
named failures) are what the library uses inside; this module is the user-facing surface,
torch.distributed's calling convention (``group=None`` is the whole job). Each call still goes
through one entry point (``_call``) that names a failed collective and reports it to the
comms logger (``comms_logger`` in the config) the way the internal layer does, so a
script's own all-reduce shows in the same summary as shardwise's.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed import ReduceOp

from shardwise.errors import CollectiveError

def _nbytes(t: Any) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


class _ScriptGroup:
    """What the comms logger reads of a group (its size) for a script's own collective."""

    def __init__(self, group: Any):
        self.size = dist.get_world_size(group)
        self.name = "script"


def _call(name: str, fn: Callable, payload: Any, group: Any, /, *args: Any, **kwargs: Any) -> Any:
    """Run one torch.distributed call: recorded for the comms logger ([Note: collective
    recorder] in collectives.py; an async call is timed up to its issue), failures named."""
    from shardwise.comm import collectives

    rec = collectives._begin(name, _ScriptGroup(group), name, _nbytes(payload)) \
        if collectives._RECORDER is not None else None
    try:
        out = fn(*args, **kwargs)
    except RuntimeError as exc:  # DistBackendError, gloo's and NCCL's errors
        raise CollectiveError(f"{name} on rank {get_rank()} failed: {exc}") from exc
    if rec is not None:
        collectives._end(rec)
    return out


# -- set-up ---------------------------------------------------------------------------------

def init_distributed(dist_backend: str | None = None, auto_mpi_discovery: bool = True,
                     distributed_port: int = 29500, verbose: bool = True,
                     timeout: timedelta | None = None, init_method: str | None = None,
                     dist_init_required: bool | None = None, config: Any = None,
                     rank: int = -1, world_size: int = -1) -> None:
    """Join the job's process group from the launcher's environment (``shardwise run`` /
    torchrun set ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), with shardwise's
    join check and named failures; a no-op when already initialised or in a single process.
    The backend is chosen in one place (NCCL with CUDA, else gloo): a different
    ``dist_backend`` is refused. Under srun or mpirun without torchrun (``auto_mpi_discovery``,
    the default), the ranks come from SLURM's or the MPI launcher's variables ([Note: rank
    discovery]). ``init_method`` and explicit ranks are refused if set."""
    from shardwise.comm.context import init_context, pick_device, resolve_timeout
    from shardwise.comm.env_discovery import apply_launcher_env
    from shardwise.errors import UsageError

    if dist.is_available() and dist.is_initialized():
        return
    if init_method is not None or rank != -1 or world_size != -1:
        raise UsageError("init_distributed(init_method=/rank=/world_size=) is not supported: launch with "
                         "`shardwise run --nproc-per-node N script.py` (torchrun), which sets the environment")
    if auto_mpi_discovery:
        apply_launcher_env()  # before LOCAL_RANK is read for the device
    backend = pick_device(int(os.environ.get("LOCAL_RANK", 0)))[1]
    if dist_backend is not None and dist_backend != backend:
        raise UsageError(f"init_distributed(dist_backend={dist_backend!r}): shardwise picks {backend!r} on this "
                         "machine (NCCL with CUDA, gloo on CPU); drop the argument")
    if "RANK" not in os.environ:
        return  # one plain process: nothing to join (initialize() runs single-process too)
    # SHARDWISE_TIMEOUT, if set, wins over timeout= (as it wins over the config's comms_timeout)
    init_context(timeout_s=resolve_timeout(timeout.total_seconds() if timeout is not None else None))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_available() -> bool:
    return dist.is_available()


def get_rank(group: Any = None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group: Any = None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def get_global_rank(group: Any = None, group_rank: int = 0) -> int:
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank


def get_backend(group: Any = None) -> str:
    return str(dist.get_backend(group))


def new_group(ranks: list[int] | None = None, **kwargs: Any):
    return dist.new_group(ranks, **kwargs)


def get_world_group():
    return dist.group.WORLD


def destroy_process_group(group: Any = None) -> None:
    if is_initialized():
        dist.destroy_process_group(group)


# -- collectives (torch.distributed's arguments) ---------------------------------------------------

def _need() -> bool:
    """Whether there is a process group to talk to. Without one (``python script.py``, one
    process) every collective acts as on a world of one rank: reductions and broadcasts leave
    the tensor as it is, gathers copy it, as DeepSpeed's single-process runs do."""
    return is_initialized()


def barrier(group: Any = None, async_op: bool = False, device_ids: Any = None):
    if not _need():
        return None
    return _call("barrier", dist.barrier, None, group, group=group, async_op=async_op)


def all_reduce(tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM, group: Any = None, async_op: bool = False):
    if not _need():
        return None
    return _call("all_reduce", dist.all_reduce, tensor, group, tensor, op=op, group=group, async_op=async_op)


def inference_all_reduce(tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM, group: Any = None):
    return all_reduce(tensor, op, group)


def reduce(tensor: torch.Tensor, dst: int, op: ReduceOp = ReduceOp.SUM, group: Any = None,
           async_op: bool = False):
    if not _need():
        return None
    return _call("reduce", dist.reduce, tensor, group, tensor, dst, op=op, group=group, async_op=async_op)


def broadcast(tensor: torch.Tensor, src: int, group: Any = None, async_op: bool = False):
    if not _need():
        return None
    return _call("broadcast", dist.broadcast, tensor, group, tensor, src, group=group, async_op=async_op)


def all_gather(tensor_list: list[torch.Tensor], tensor: torch.Tensor, group: Any = None, async_op: bool = False):
    if not _need():
        tensor_list[0].copy_(tensor)
        return None
    return _call("all_gather", dist.all_gather, tensor_list, group, tensor_list, tensor, group=group,
                 async_op=async_op)


def all_gather_into_tensor(output_tensor: torch.Tensor, tensor: torch.Tensor, group: Any = None,
                           async_op: bool = False):
    if not _need():
        output_tensor.copy_(tensor.reshape(output_tensor.shape))
        return None
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return _call("all_gather_into_tensor", fn, output_tensor, group, output_tensor, tensor, group=group,
                 async_op=async_op)


allgather_fn = all_gather_into_tensor


def reduce_scatter_tensor(output_tensor: torch.Tensor, tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM,
                          group: Any = None, async_op: bool = False):
    if not _need():
        output_tensor.copy_(tensor.reshape(output_tensor.shape))
        return None
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return _call("reduce_scatter_tensor", fn, tensor, group, output_tensor, tensor, op=op, group=group,
                 async_op=async_op)


def reduce_scatter_fn(output_tensor: torch.Tensor, tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM,
                      group: Any = None, async_op: bool = False, **_: Any):
    return reduce_scatter_tensor(output_tensor, tensor, op, group, async_op)


def reduce_scatter(output: torch.Tensor, input_list: list[torch.Tensor], op: ReduceOp = ReduceOp.SUM,
                   group: Any = None, async_op: bool = False):
    if not _need():
        return None
    return _call("reduce_scatter", dist.reduce_scatter, input_list, group, output, input_list, op=op,
                 group=group, async_op=async_op)


def all_to_all_single(output: torch.Tensor, tensor: torch.Tensor, output_split_sizes=None,
                      input_split_sizes=None, group: Any = None, async_op: bool = False):
    if not _need():
        return None
    return _call("all_to_all_single", dist.all_to_all_single, tensor, group, output, tensor,
                 output_split_sizes, input_split_sizes, group=group, async_op=async_op)


def gather(tensor: torch.Tensor, gather_list=None, dst: int = 0, group: Any = None, async_op: bool = False):
    if not _need():
        return None
    return _call("gather", dist.gather, tensor, group, tensor, gather_list, dst, group=group, async_op=async_op)


def scatter(tensor: torch.Tensor, scatter_list=None, src: int = 0, group: Any = None, async_op: bool = False):
    if not _need():
        return None
    return _call("scatter", dist.scatter, tensor, group, tensor, scatter_list, src, group=group, async_op=async_op)


def send(tensor: torch.Tensor, dst: int, group: Any = None, tag: int = 0):
    if not _need():
        return None
    return _call("send", dist.send, tensor, group, tensor, dst, group=group, tag=tag)


def recv(tensor: torch.Tensor, src: int | None = None, group: Any = None, tag: int = 0):
    if not _need():
        return None
    return _call("recv", dist.recv, tensor, group, tensor, src, group=group, tag=tag)


def isend(tensor: torch.Tensor, dst: int, group: Any = None, tag: int = 0):
    if not _need():
        return None
    return _call("isend", dist.isend, tensor, group, tensor, dst, group=group, tag=tag)


def irecv(tensor: torch.Tensor, src: int | None = None, group: Any = None, tag: int = 0):
    if not _need():
        return None
    return _call("irecv", dist.irecv, tensor, group, tensor, src, group=group, tag=tag)


def all_gather_object(object_list: list, obj: Any, group: Any = None) -> None:
    if not _need():
        object_list[0] = obj
        return
    _call("all_gather_object", dist.all_gather_object, None, group, object_list, obj, group=group)


def broadcast_object_list(object_list: list, src: int = 0, group: Any = None) -> None:
    if not _need():
        return
    _call("broadcast_object_list", dist.broadcast_object_list, None, group, object_list, src, group=group)


def monitored_barrier(group: Any = None, timeout: timedelta | None = None, wait_all_ranks: bool = False):
    if not _need():
        return None
    return _call("monitored_barrier", dist.monitored_barrier, None, group, group=group, timeout=timeout,
                 wait_all_ranks=wait_all_ranks)


def log_summary(show_straggler: bool = False) -> None:
    """Print the comms logger's table now (DeepSpeed's ``deepspeed.comm.log_summary``); needs
    ``comms_logger.enabled`` in the config."""
    from shardwise.profiling.comms import log_summary as summary

    summary()


__all__ = ["ReduceOp", "init_distributed", "is_initialized", "is_available", "get_rank", "get_world_size",
           "get_local_rank", "get_global_rank", "get_backend", "new_group", "get_world_group",
           "destroy_process_group", "barrier", "all_reduce", "inference_all_reduce", "reduce", "broadcast",
           "all_gather", "all_gather_into_tensor", "allgather_fn", "reduce_scatter_tensor", "reduce_scatter_fn",
           "reduce_scatter", "all_to_all_single", "gather", "scatter", "send", "recv", "isend", "irecv",
           "all_gather_object", "broadcast_object_list", "monitored_barrier", "log_summary"]
