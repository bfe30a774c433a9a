"""The parallel context without a process group, and the collective policy decided once."""
from __future__ import annotations

import pytest

from shardwise.comm.context import CommPolicy, init_context, mesh_dp_size, pick_device, single_process_context
from shardwise.errors import UsageError


def test_policy_is_decided_from_backend_and_config():
    assert CommPolicy.for_backend("gloo") == CommPolicy(reduce_scatter_via_all_reduce=True,
                                                        all_gather_via_broadcast=True)
    assert CommPolicy.for_backend("nccl") == CommPolicy(reduce_scatter_via_all_reduce=False,
                                                        all_gather_via_broadcast=False)
    assert CommPolicy.for_backend("nccl", reduce_scatter=False).reduce_scatter_via_all_reduce


def test_single_process_has_a_trivial_dp_and_no_mesh(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_context()
    assert ctx == single_process_context(ctx.device)
    assert ctx.mesh is None and not ctx.is_distributed
    assert (ctx.dp.name, ctx.dp.rank, ctx.dp.size, ctx.dp.global_ranks) == ("dp", 0, 1, (0,))
    assert ctx.dp_replicas == 1 and ctx.device == pick_device(0)[0]
    with pytest.raises(UsageError, match="no dimension 'tp'"):
        ctx.dim("tp")


def test_mesh_must_be_a_device_mesh():
    with pytest.raises(UsageError, match="must be a torch.distributed.device_mesh.DeviceMesh"):
        mesh_dp_size(("dp", 2))
