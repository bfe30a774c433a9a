"""Ranks that build different weights (a per-rank seed, a checkpoint loaded on rank 0 only)
train rank 0's model: ``initialize`` broadcasts rank 0's parameters and buffers (issue 11 A)."""
from __future__ import annotations

import pytest
import torch

from parity_workers import reference_run, shardwise_run
from shardwise.testing import run_distributed
from test_parity import GLOBAL_BATCH, STEPS, _assert_params_close, config


@pytest.fixture(scope="module")
def reference():
    return reference_run(GLOBAL_BATCH, STEPS)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_per_rank_seed_trains_rank0s_model(stage, world, reference):
    out = run_distributed(shardwise_run, world, config(stage), STEPS, None, True)
    torch.testing.assert_close(out[0]["losses"], reference["losses"], rtol=1e-6, atol=0)
    for r in out:
        _assert_params_close(r["params"], reference["params"], rtol=0, atol=1e-5)


def _broadcast_mixed(chunk_bytes: int) -> list[torch.Tensor]:
    import torch.distributed as dist

    from shardwise.comm.context import init_context
    from shardwise.comm.replicate import broadcast_tensors

    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    base = torch.randn(6, 5, generator=g)
    tensors = [torch.randn(7, generator=g), torch.randn(3, 3, generator=g).bfloat16(),
               torch.randint(0, 9, (5,), generator=g), torch.rand(11, generator=g) > 0.5,
               torch.randn(2, generator=g).half(), base.t()]  # the last one is not contiguous
    broadcast_tensors(tensors, init_context().world, chunk_bytes=chunk_bytes)
    return tensors


@pytest.mark.parametrize("chunk_bytes", [1, 64, 1 << 20])
def test_broadcast_tensors_is_bitwise_for_every_dtype(chunk_bytes):
    out = run_distributed(_broadcast_mixed, 3, chunk_bytes)
    for other in out[1:]:
        for a, b in zip(out[0], other):
            assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            raw = lambda t: t.contiguous().view(-1).view(torch.uint8)  # noqa: E731 - bitwise, NaN-safe
            assert torch.equal(raw(a), raw(b))
    assert not torch.equal(out[0][0], run_distributed(_unsent, 2)[1][0])  # the ranks did differ


def _unsent() -> list[torch.Tensor]:
    import torch.distributed as dist

    return [torch.randn(7, generator=torch.Generator().manual_seed(dist.get_rank()))]
