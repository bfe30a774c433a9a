"""shardwise.optim.Lamb against a straightforward per-parameter LAMB: on plain tensors, on one
flat buffer (stage 0's layout) and on a flat buffer split over 2 gloo ranks (stages 1-2)."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from shardwise.comm.buckets import assign_buckets
from shardwise.errors import UsageError
from shardwise.optim.lamb import FlatPieces, Lamb, bind_flat_chunks, flat_pieces
from shardwise.testing import run_distributed
from shardwise.zero.flat_bucket import FlatBucket

SHAPES = [(7, 5), (5,), (13, 3), (1,), (4, 4, 2)]  # odd sizes: pieces straddle chunk borders


def reference_lamb(params, grads_per_step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                   bias_correction=True, eps_inside_sqrt=False, max_coeff=10.0, min_coeff=0.01):
    """LAMB written out per parameter, in float64 (DeepSpeed FusedLamb's arithmetic)."""
    params = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    b1, b2 = betas
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.double()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            denom = torch.sqrt(v[i] + eps) if eps_inside_sqrt else torch.sqrt(v[i]) + eps
            u = m[i] / denom + weight_decay * p
            wn, un = float(p.norm()), float(u.norm())
            ratio = min(max(wn / un, min_coeff), max_coeff) if wn > 0 and un > 0 else 1.0
            c = math.sqrt(1 - b2 ** t) / (1 - b1 ** t) if bias_correction else 1.0
            params[i] = p - lr * c * ratio * u
    return params


def _model(seed=0, zero_index=None):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g) for s in SHAPES]
    if zero_index is not None:
        ps[zero_index].zero_()  # a zero-initialised tensor: ratio 1
    return ps


def _grads(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) * (10.0 ** (i - 2)) for i, s in enumerate(SHAPES)] for _ in range(steps)]


CASES = [
    {},
    {"weight_decay": 0.01, "lr": 1e-2},
    {"bias_correction": False, "eps_inside_sqrt": True, "eps": 1e-6},
    {"max_coeff": 0.3, "min_coeff": 0.01, "weight_decay": 0.1},  # clamps hit (DeepSpeed's example config)
    {"max_coeff": 100.0, "min_coeff": 5.0},
]


@pytest.mark.parametrize("kw", CASES)
def test_plain_tensors_match_reference(kw):
    init, grads = _model(zero_index=1), _grads(4)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = Lamb(params, **kw)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    for got, want in zip(params, reference_lamb(init, grads, **kw)):
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-6)


def _buckets(params, world, rank, bucket_numel):
    layouts = assign_buckets([p.numel() for p in params], [(0, p.dtype, p.device) for p in params],
                             bucket_numel, world)
    dp = SimpleNamespace(rank=rank, size=world)
    return [FlatBucket(i, lay, [params[s.param_index] for s in lay.slots], dp, optimizer_sees_chunk=world > 1)
            for i, lay in enumerate(layouts)]


def _step_flat(buckets, opt, gs, params):
    by_param = {id(p): g for p, g in zip(params, gs)}
    for b in buckets:
        flat = torch.zeros(b.layout.padded_numel)
        for slot, p in zip(b.layout.slots, b.params):
            flat[slot.offset:slot.offset + slot.numel] = by_param[id(p)].reshape(-1)
        b.opt_param.grad = b.own(flat).clone()
    opt.step()


@pytest.mark.parametrize("bucket_numel", [10_000, 40])  # one bucket for all / several buckets
def test_one_flat_buffer_matches_reference_when_bound(bucket_numel):
    """Stage 0's view: whole flat buckets. Bound: exact LAMB; unbound: one ratio per bucket."""
    kw = {"weight_decay": 0.01, "lr": 1e-2}
    init, grads = _model(zero_index=3), _grads(3)
    want = reference_lamb(init, grads, **kw)
    for bind in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        buckets = _buckets(params, 1, 0, bucket_numel)
        opt = Lamb([b.opt_param for b in buckets], **kw)
        if bind:
            bind_flat_chunks(opt, buckets, reduce=None)
        for gs in grads:
            _step_flat(buckets, opt, gs, params)
        close = all(torch.allclose(p.detach().double(), w, rtol=1e-5, atol=1e-6) for p, w in zip(params, want))
        assert close == bind


def _sharded_worker(kw, steps):
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    init, grads = _model(zero_index=3), _grads(steps)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    buckets = _buckets(params, world, rank, 60)
    opt = Lamb([b.opt_param for b in buckets], **kw)
    bind_flat_chunks(opt, buckets, reduce=lambda t: dist.all_reduce(t))
    for gs in grads:
        _step_flat(buckets, opt, gs, params)
        for b in buckets:  # what the engine's gather_after_step does
            full = torch.zeros_like(b.param_flat)
            dist.all_gather_into_tensor(full, b.param_flat[b.lo:b.hi].contiguous())
            b.param_flat.copy_(full)
    return [p.detach().double() for p in params]


def test_sharded_chunks_match_reference():
    """Stages 1-2's view: each rank steps its chunk; partial norms are all-reduced."""
    kw = {"weight_decay": 0.01, "lr": 1e-2, "max_coeff": 0.5}
    want = reference_lamb(_model(zero_index=3), _grads(3), **kw)
    for got in run_distributed(_sharded_worker, 2, kw, 3):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_flat_pieces_cut_slots_at_the_chunk():
    slots = [SimpleNamespace(offset=0, numel=10), SimpleNamespace(offset=16, numel=5),
             SimpleNamespace(offset=32, numel=20)]
    assert flat_pieces(slots, 0, 64) == FlatPieces(((0, 0, 10), (1, 16, 5), (2, 32, 20)), 3)
    assert flat_pieces(slots, 8, 40) == FlatPieces(((0, 0, 2), (1, 8, 5), (2, 24, 8)), 3)
    assert flat_pieces(slots, 52, 64) == FlatPieces((), 3)


def test_misuse_is_named():
    p = torch.nn.Parameter(torch.ones(8))
    opt = Lamb([p])
    with pytest.raises(UsageError, match="not one of this optimizer's parameters"):
        opt.bind_flat(torch.ones(8), FlatPieces(((0, 0, 8),), 1))
    with pytest.raises(UsageError, match="bad piece"):
        opt.bind_flat(p, FlatPieces(((0, 4, 8),), 1))
    # a client optimizer whose groups were re-pointed to other tensors (what initialize does)
    other = torch.nn.Parameter(torch.ones(8))
    other.grad = torch.ones(8)
    opt.param_groups[0]["params"] = [other]
    with pytest.raises(UsageError, match="trust ratio would be computed per bucket"):
        opt.step()
    # add_param_group is fine
    opt2 = Lamb([torch.nn.Parameter(torch.ones(2))])
    q = torch.nn.Parameter(torch.ones(3))
    opt2.add_param_group({"params": [q]})
    q.grad = torch.ones(3)
    opt2.step()
    with pytest.raises(ValueError, match="gradient_clipping"):
        Lamb([p], max_grad_norm=1.0)
    with pytest.raises(ValueError, match="amsgrad"):
        Lamb([p], amsgrad=True)
    with pytest.raises(ValueError, match="min_coeff <= max_coeff"):
        Lamb([p], min_coeff=1.0, max_coeff=0.5)


def test_state_dict_round_trip():
    init, grads = _model(), _grads(4)
    a = [torch.nn.Parameter(p.clone()) for p in init]
    b = [torch.nn.Parameter(p.clone()) for p in init]
    oa, ob = Lamb(a, weight_decay=0.01), Lamb(b, weight_decay=0.01)
    for k, gs in enumerate(grads):
        if k == 2:
            ob.load_state_dict(copy.deepcopy(oa.state_dict()))
            for x, y in zip(a, b):
                y.data.copy_(x.data)
        for ps, o in ((a, oa), (b, ob)):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            o.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
