"""Process groups, device and backend, chosen once and passed explicitly.

[Note: one place for the device]
CUDA + NCCL when a GPU is present, CPU + gloo otherwise (:func:`pick_device`). Nothing else in
shardwise looks at ``torch.cuda.is_available()`` or at the backend name to choose; components
read ``ctx.device`` and the collective choices recorded here (:class:`CommPolicy`).
See [Note: parallel context] for the mesh and its named dimensions.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

from shardwise.comm.health import RankHealth
from shardwise.errors import DistributedSetupError, JoinError, UsageError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_ENV = "SHARDWISE_TIMEOUT"


@dataclass(frozen=True)
class CommPolicy:
    """How shardwise implements two collectives, decided once per context from the backend and
    the config (``zero_optimization.reduce_scatter``); nothing changes it later."""

    # [Note: reduce-to-shard implementation]
    # gloo's reduce_scatter is about twice as slow as its all_reduce of the same buffer
    # (peers.md; benchmarks/collectives.py re-measures it), so on gloo a rank all-reduces the
    # bucket and keeps its chunk. NCCL's reduce-scatter moves half the data and wins there.
    # DeepSpeed's ``"reduce_scatter": false`` asks for the plain all-reduce on every backend.
    reduce_scatter_via_all_reduce: bool = True
    # [Note: all-gather implementation]
    # gloo's all_gather is 2-3x slower than every rank broadcasting its own chunk (async, all
    # at once) into the same flat buffer at 2 ranks (240k-4.8M fp32 elements: 1.2 vs 0.55 ms,
    # 4.8 vs 1.65 ms, 15.4 vs 6.2 ms), and still 1.3-1.8x slower at 3-4 ranks for >= 1M
    # elements (benchmarks/collectives.py). NCCL's all-gather is the right tool there.
    all_gather_via_broadcast: bool = False

    @staticmethod
    def for_backend(backend: str, reduce_scatter: bool = True) -> "CommPolicy":
        gloo = backend == "gloo"
        return CommPolicy(reduce_scatter_via_all_reduce=gloo or not reduce_scatter, all_gather_via_broadcast=gloo)


@dataclass(frozen=True)
class GroupContext:
    """One process group a collective runs on: this rank's index in it, its size, and the
    global rank of each member (``global_ranks[i]`` is group rank ``i``)."""

    name: str
    group: "dist.ProcessGroup | None"  # None: torch's default group (or no process group)
    rank: int
    size: int
    global_ranks: tuple[int, ...]
    device: torch.device
    backend: Literal["gloo", "nccl", "none"]
    policy: CommPolicy = CommPolicy()
    health: "RankHealth | None" = field(default=None, compare=False, repr=False)

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    def global_rank(self, group_rank: int) -> int:
        return self.global_ranks[group_rank]

    @property
    def is_world(self) -> bool:
        return self.global_ranks == tuple(range(len(self.global_ranks))) and self.group is None


# [Note: parallel context]
# One ParallelContext per engine holds the device, the backend, the collective policy and a
# torch DeviceMesh whose dimensions are named: "dp" (data parallel), and with model
# parallelism "pp" (pipeline stages) and "tp" (tensor parallel), laid out as DeepSpeed's
# topology: (pp, dp, tp), pipeline outermost and tensor innermost, so that global rank =
# (pp_rank * dp + dp_rank) * tp + tp_rank and a tp group is consecutive ranks (one node's
# GPUs). ``ctx.tp`` / ``ctx.pp`` are trivial groups of size 1 when the mesh has no such
# dimension. Every other dimension of a user's mesh *replicates*: its coordinates index
# independent data-parallel groups that never talk to each other during training.
# For each mesh dimension there is a GroupContext (``ctx.dp``, ``ctx.dim("replica")``): its
# process group, this rank's *group-local* rank and its size. Collectives (comm/collectives.py)
# take the GroupContext they run on, index chunks by the group rank, and convert to global
# ranks only where torch asks for them (broadcast ``src``, monitored barrier, naming a failed
# rank). ``ctx.world`` is the whole job (start-up fingerprint, checkpoint agreement,
# auto-resume); ``ctx.rank`` / ``ctx.world_size`` stay the global rank and world size.
# Who uses which dim: the ZeRO strategies (grad sync, flat buckets and shard padding, stage 3,
# the backward scale 1/dp, the grad-norm reduction), the data sampler and the batch triangle
# use ``dp``; zero.Init splits over ``dp``; tensor parallelism runs over ``tp`` and pipeline
# stages over ``pp``; nothing uses the replicating dims but checkpoints, which accept dp, tp and
# pp and refuse any other dimension (more than one replica group) for now.
# Without a process group (a plain single process): no mesh, a trivial dp of size 1.
DP = "dp"
TP = "tp"
PP = "pp"
MODEL_PARALLEL = (TP, PP)


@dataclass(frozen=True)
class ParallelContext:
    rank: int  # global
    world_size: int
    local_rank: int
    device: torch.device
    backend: Literal["gloo", "nccl", "none"]
    policy: CommPolicy
    world: GroupContext
    dims: dict[str, GroupContext]
    mesh: "DeviceMesh | None" = field(default=None, compare=False, repr=False)
    # join check, heartbeats, naming the rank behind a failed collective ([Note: rank health]);
    # None when the caller built the process group itself
    health: "RankHealth | None" = field(default=None, compare=False, repr=False)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp(self) -> GroupContext:
        return self.dims[DP]

    @property
    def tp(self) -> GroupContext:
        return self.dims.get(TP) or self._trivial(TP)

    @property
    def pp(self) -> GroupContext:
        return self.dims.get(PP) or self._trivial(PP)

    def _trivial(self, name: str) -> GroupContext:
        return GroupContext(name, None, 0, 1, (self.rank,), self.device, self.backend, self.policy, self.health)

    @property
    def model_parallel(self) -> tuple[GroupContext, ...]:
        """The model-parallel groups of size > 1 (tp, pp): what a gradient norm is also summed over."""
        return tuple(g for g in (self.tp, self.pp) if g.size > 1)

    def coords(self) -> str:
        """This rank's mesh coordinates, e.g. ``"dp=1 tp=0 pp=2"`` (dimensions of size > 1; "" on
        a plain data-parallel mesh): for error messages that name a rank."""
        if not self.model_parallel:
            return ""
        return " ".join(f"{n}={g.rank}" for n, g in (("dp", self.dp), ("tp", self.tp), ("pp", self.pp))
                        if g.size > 1 or n == "dp")

    def where(self) -> str:
        """``"rank 3 (dp=1 tp=1)"``: the global rank and its coordinates."""
        c = self.coords()
        return f"rank {self.rank}" + (f" ({c})" if c else "")

    def dim(self, name: str) -> GroupContext:
        try:
            return self.dims[name]
        except KeyError:
            raise UsageError(f"the device mesh has no dimension {name!r} (it has {list(self.dims)})") from None

    @property
    def dp_replicas(self) -> int:
        """How many independent model replicas the mesh holds (1 for a 1-D dp mesh and for a
        (pp, dp, tp) mesh): the world over dp x tp x pp."""
        return self.world_size // (self.dp.size * self.tp.size * self.pp.size)


def pick_device(local_rank: int = 0, backend: str | None = None) -> tuple[torch.device, Literal["gloo", "nccl"]]:
    """The device and backend for this process: the one place shardwise decides them.

    ``backend`` given (an existing process group): its device (NCCL -> this local rank's GPU,
    anything else -> CPU). Otherwise CUDA + NCCL when a GPU is present, CPU + gloo if not. The
    CLI (``shardwise env``), the launcher (threads per rank) and the RNG state use it too."""
    if backend is not None:
        if "nccl" in str(backend).lower():
            return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1)), "nccl"
        return torch.device("cpu"), "gloo"
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count()), "nccl"
    return torch.device("cpu"), "gloo"


def uses_cuda() -> bool:
    """Whether :func:`pick_device` would choose a GPU (without creating a process group)."""
    return pick_device(0)[1] == "nccl"


def single_process_context(device: torch.device | None = None) -> ParallelContext:
    """A plain single process: no process group, no mesh, a dp of size 1."""
    if device is None:
        device = pick_device(int(os.environ.get("LOCAL_RANK", 0)))[0]
    policy = CommPolicy()
    world = GroupContext("world", None, 0, 1, (0,), device, "none", policy)
    return ParallelContext(0, 1, 0, device, "none", policy, world, {DP: replace(world, name=DP)})


def mesh_dp_size(mesh: "DeviceMesh | None") -> int:
    """The number of ranks one model replica's plan covers (dp x tp x pp; the world size on the
    default mesh), known before any communication (the batch triangle is resolved for it, after
    dividing by tp and pp); a named UsageError for a mesh without a ``"dp"`` dimension."""
    if mesh is None:
        return expected_world_size()
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise UsageError(f"initialize(mesh=...) must be a torch.distributed.device_mesh.DeviceMesh; "
                         f"got {type(mesh).__name__}")
    names = tuple(mesh.mesh_dim_names or ())
    if DP not in names:
        raise UsageError(f"the device mesh passed to initialize(mesh=...) has no {DP!r} dimension (its "
                         f"dimensions: {list(names) or 'unnamed'}). Name the data-parallel dimension "
                         f"{DP!r}, e.g. init_device_mesh('cpu', (2, 4), mesh_dim_names=('replica', '{DP}')).")
    return int(math.prod(mesh.size(names.index(n)) for n in (DP, TP, PP) if n in names))


def _group_context(name: str, group, device: torch.device, backend, policy: CommPolicy,
                   health: RankHealth | None) -> GroupContext:
    ranks = tuple(dist.get_process_group_ranks(group))
    if ranks == tuple(range(dist.get_world_size())):
        group = None  # the default group: collectives run on it exactly as before meshes
    return GroupContext(name, group, ranks.index(dist.get_rank()), len(ranks), ranks, device, backend, policy, health)


def _timed_mesh(device_type: str, shape: tuple[int, ...], names: tuple[str, ...],
                timeout_s: float | None) -> "DeviceMesh":
    """``init_device_mesh(device_type, shape, mesh_dim_names=names)``, but every dimension's
    process groups get the job's timeout: groups torch creates for a mesh wait its default 30
    minutes whatever the world group's timeout is, so a stopped peer would hang dp / tp / pp
    collectives that long instead of ``comms_timeout``."""
    from torch.distributed.device_mesh import DeviceMesh

    rank = dist.get_rank()
    grid = torch.arange(dist.get_world_size()).view(shape)
    timeout = timedelta(seconds=timeout_s) if timeout_s else None
    mine = []
    for d, size in enumerate(shape):  # every rank creates every group, in the same order
        for row in grid.movedim(d, -1).reshape(-1, size).tolist():
            group = dist.new_group(row, timeout=timeout)
            if rank in row:
                mine.append(group)
    return DeviceMesh.from_group(mine, device_type, mesh=grid, mesh_dim_names=names)


def _mesh_context(mesh: "DeviceMesh | None", policy: CommPolicy, device: torch.device, backend,
                  local_rank: int, health: RankHealth | None, pp: int = 1, tp: int = 1,
                  timeout_s: float | None = None) -> ParallelContext:
    from torch.distributed.device_mesh import DeviceMesh

    rank, world = dist.get_rank(), dist.get_world_size()
    if mesh is None and pp * tp > 1:  # [Note: parallel context]: DeepSpeed's (pp, dp, tp) layout
        if world % (pp * tp):
            raise UsageError(f"the job has {world} ranks, which pipeline stages x tensor parallel = {pp} x {tp} "
                             f"= {pp * tp} does not divide; use a world size that is a multiple of {pp * tp}")
        mesh = _timed_mesh(device.type, (pp, world // (pp * tp), tp), (PP, DP, TP), timeout_s)
    if mesh is None:  # the default: one "dp" dimension over the whole world, on torch's default group
        mesh = DeviceMesh.from_group(dist.group.WORLD, device.type, mesh_dim_names=(DP,))
    mesh_dp_size(mesh)  # a DeviceMesh with a "dp" dimension
    names = tuple(mesh.mesh_dim_names)
    for dim, want in ((PP, pp), (TP, tp)):
        have = int(mesh.size(names.index(dim))) if dim in names else 1
        if have != want:
            raise UsageError(f"the device mesh's {dim!r} dimension has size {have} but the config / model asks "
                             f"for {want}; build the mesh with a {dim!r} dimension of size {want}, or pass no "
                             "mesh and let initialize build (pp, dp, tp)")
    if mesh.mesh.numel() != world:
        raise UsageError(f"the device mesh covers {mesh.mesh.numel()} ranks but the job has {world}; "
                         "build it over every rank")
    if mesh.device_type != device.type:
        raise UsageError(f"the device mesh is for {mesh.device_type!r} but the process group "
                         f"({backend}) runs on {device.type!r}; build it with "
                         f"init_device_mesh({device.type!r}, ...)")
    dims = {n: _group_context(n, mesh.get_group(n), device, backend, policy, health) for n in names}
    world_group = GroupContext("world", None, rank, world, tuple(range(world)), device, backend, policy, health)
    ctx = ParallelContext(rank, world, local_rank, device, backend, policy, world_group, dims, mesh, health)
    if health is not None and ctx.model_parallel:  # failures name mesh coordinates
        health.coords = mesh_coords(mesh)
    return ctx


def mesh_coords(mesh: "DeviceMesh") -> dict[int, str]:
    """Every global rank's coordinates in ``mesh`` (``"dp=1 tp=0 pp=2"``; dims of size > 1, dp always)."""
    names = tuple(mesh.mesh_dim_names)
    grid = mesh.mesh
    out: dict[int, str] = {}
    for index in itertools.product(*(range(n) for n in grid.shape)):
        at = {n: (i, size) for n, i, size in zip(names, index, grid.shape)}
        out[int(grid[index])] = " ".join(f"{n}={at[n][0]}" for n in (DP, TP, PP)
                                         if n in at and (at[n][1] > 1 or n == DP))
    return out


def expected_world_size() -> int:
    """The world size ``init_context`` will see, known before any communication."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def resolve_timeout(config_s: float | None, env: "os._Environ[str] | dict[str, str] | None" = None) -> float | None:
    """The process-group timeout in seconds: ``SHARDWISE_TIMEOUT`` if set (it overrides the
    config, so a job can be given a longer or shorter timeout without editing the config),
    else the config's ``comms_timeout``, else None (torch's default)."""
    env = os.environ if env is None else env
    raw = env.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return config_s
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise DistributedSetupError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds; "
                                    f"unset it or set e.g. {TIMEOUT_ENV}=600")
    return value


def _context_from_group(allow_reduce_scatter: bool, health: RankHealth | None = None,
                        mesh: "DeviceMesh | None" = None, pp: int = 1, tp: int = 1,
                        timeout_s: float | None = None) -> ParallelContext:
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device, kind = pick_device(local_rank, backend=str(dist.get_backend()))
    if kind == "nccl":
        torch.cuda.set_device(device)
    policy = CommPolicy.for_backend(kind, reduce_scatter=allow_reduce_scatter)
    return _mesh_context(mesh, policy, device, kind, local_rank, health, pp, tp, timeout_s)


_QUIESCE_REGISTERED = False
_HEALTH: "tuple[Any, RankHealth] | None" = None  # (default group, its health), when init_context made it


def _register_quiesce() -> None:
    """Once per process: before interpreter shutdown, give gloo's worker threads a moment to
    drop finished works (see [Note: tensors outlive gloo's works] in collectives.py)."""
    global _QUIESCE_REGISTERED
    if not _QUIESCE_REGISTERED:
        import atexit

        from shardwise.comm.collectives import quiesce

        atexit.register(quiesce)
        _QUIESCE_REGISTERED = True


def init_context(timeout_s: float | None = None, allow_reduce_scatter: bool = True,
                 mesh: "DeviceMesh | None" = None, pp: int = 1, tp: int = 1) -> ParallelContext:
    """Join (or create) the default process group and describe it as a :class:`ParallelContext`.

    - A process group already initialised by the caller is used as it is.
    - Under torchrun (``RANK``/``WORLD_SIZE`` set) the group is created from the environment.
    - Otherwise this is a plain single process: world size 1, no process group, no mesh.

    ``mesh``: the caller's DeviceMesh (it needs a ``"dp"`` dimension; see [Note: parallel
    context]); default: a 1-D mesh named ``("dp",)`` over the whole world, or ``(pp, dp, tp)``
    when ``pp`` (pipeline stages) or ``tp`` (tensor-parallel size) is above 1.
    ``allow_reduce_scatter``: the config's ``zero_optimization.reduce_scatter`` (the
    :class:`CommPolicy` is decided here, once).
    """
    global _HEALTH
    if dist.is_available() and dist.is_initialized():
        _register_quiesce()
        health = _HEALTH[1] if _HEALTH is not None and _HEALTH[0] is dist.group.WORLD else None
        return _context_from_group(allow_reduce_scatter, health, mesh=mesh, pp=pp, tp=tp, timeout_s=timeout_s)
    if mesh is not None:
        raise UsageError("initialize(mesh=...) needs the process group that built the mesh; none is "
                         "initialised in this process")
    from shardwise.comm.env_discovery import apply_launcher_env

    apply_launcher_env()  # [Note: rank discovery] srun/mpirun without torchrun: RANK etc. from SLURM/MPI
    env_set = [v for v in _TORCHRUN_VARS if v in os.environ]
    if env_set and len(env_set) < len(_TORCHRUN_VARS):
        missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
        raise DistributedSetupError(
            f"torch.distributed environment is incomplete: {', '.join(env_set)} set but "
            f"{', '.join(missing)} missing. Launch with `shardwise run` (torchrun), or unset them "
            "to run as a single process."
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device, backend = pick_device(local_rank)
    if not env_set:
        if pp * tp > 1:
            raise UsageError(f"pipeline stages x tensor parallel = {pp} x {tp} needs {pp * tp} ranks or a multiple; "
                             "this is a single process. Launch with `shardwise run --nproc-per-node N`")
        return single_process_context(device)
    if backend == "nccl":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s) if timeout_s else dist.default_pg_timeout
    where = f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}"
    # [Note: rank health] the store comes from torch's own env:// rendezvous (under torchrun: a
    # client of the agent's store), so that shardwise can check who joined before gloo/NCCL
    # wires the ranks together, and can ask the store about peers after a failure.
    try:
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        store.set_timeout(timeout)
    except Exception as exc:  # noqa: BLE001 - re-raised as a named error with the cause
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        import re

        m = re.search(r"(\d+)/(\d+) clients joined", text)
        if m:  # rank 0 hosts the store (no torchrun agent) and not everyone connected
            raise JoinError(f"{where}: {m.group(1)} of {m.group(2)} ranks joined within "
                            f"{timeout.total_seconds():g} s; missing ranks: unknown (they never "
                            f"connected to the store at {os.environ.get('MASTER_ADDR')}:"
                            f"{os.environ.get('MASTER_PORT')}). ({text})") from exc
        raise DistributedSetupError(
            f"could not reach the rendezvous store for {where} at {os.environ.get('MASTER_ADDR')}:"
            f"{os.environ.get('MASTER_PORT')} within {timeout.total_seconds():g} s: {text}") from exc
    health = RankHealth(store, rank, world, timeout.total_seconds())
    health.join()
    try:
        # torchrun's agent keeps one store across restarts: a per-attempt prefix keeps a
        # restarted group from reading the addresses its previous attempt published
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"default_pg/{attempt}", store),
                                rank=rank, world_size=world, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - re-raised as a named error with the cause
        raise DistributedSetupError(
            f"could not initialise torch.distributed ({backend}) for {where}: {exc}"
        ) from exc
    _register_quiesce()
    # [Note: heartbeat on every rank] every rank of a job started here runs the heartbeat
    # (health.py): peers on other hosts can only be told apart from a frozen process by it,
    # and on one host it names a rank that /proc sees as alive but that stopped taking part
    # (stuck holding the GIL, in uninterruptible I/O); /proc is still asked first. It was
    # once switched off on one host after finished ranks aborted at exit. Verified cause (core
    # dumps of aborted ranks: the aborting thread is a gloo worker in runLoop freeing a
    # finished work's Python tensors after Py_FinalizeEx began, the heartbeat thread already
    # joined): [Note: tensors outlive gloo's works] in collectives.py, not the heartbeat.
    health.start_heartbeat()
    _HEALTH = (dist.group.WORLD, health)  # for a later init_context on this group (initialize() after
    # shardwise.init_distributed())
    return _context_from_group(allow_reduce_scatter, health, pp=pp, tp=tp, timeout_s=timeout_s)


def subgroup_contexts(ctx: ParallelContext, name: str, groups: "list[list[int]]") -> GroupContext | None:
    """Process groups over lists of global ranks (e.g. a tied weight's pipeline stages): every
    rank calls this with the same ``groups`` in the same order (torch's ``new_group`` rule);
    returns this rank's GroupContext, or None when it is in none of them."""
    mine = None
    for ranks in groups:
        ranks = sorted(int(r) for r in ranks)
        group = dist.new_group(ranks) if ctx.is_distributed else None
        if ctx.rank in ranks:
            mine = GroupContext(name, group, ranks.index(ctx.rank), len(ranks), tuple(ranks), ctx.device,
                                ctx.backend, ctx.policy, ctx.health)
    return mine
