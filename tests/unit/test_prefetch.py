"""The stage-3 prefetch policy alone (zero/prefetch.py, [Note: prefetch]): no tensors, no ranks."""
from __future__ import annotations

from dataclasses import dataclass

from shardwise.zero.prefetch import PrefetchPolicy


@dataclass(eq=False)
class U:
    index: int
    numel: int


def policy(prefetch=None, max_live=10 ** 9, reuse=0) -> PrefetchPolicy:
    return PrefetchPolicy(prefetch_bucket_size=prefetch, max_live_parameters=max_live, max_reuse_distance=reuse)


def record(p: PrefetchPolicy, units, grad=True) -> None:
    p.open_forward()
    for u in units:
        p.track(u, grad)
    p.close_forward(grad)


ROOT, A, B, C = U(0, 5), U(1, 10), U(2, 20), U(3, 30)
ALWAYS = lambda u: True  # noqa: E731


def test_first_forward_with_grad_records_order_and_no_grad_does_not():
    p = policy()
    record(p, [ROOT, A, B], grad=False)
    assert p.recording and p.order == []
    record(p, [ROOT, A, B, A])
    assert not p.recording and p.order == [ROOT, A, B, A]
    record(p, [ROOT, C])  # later forwards never re-record
    assert p.order == [ROOT, A, B, A]


def test_forward_candidates_follow_the_order_and_stop_off_it():
    p = policy()
    record(p, [ROOT, A, B, C])
    assert p.forward_candidates() == ()  # pos is None until the next forward opens
    p.open_forward()
    assert p.forward_candidates() == [ROOT, A, B, C]
    p.track(ROOT, True)
    p.track(A, True)
    assert p.forward_candidates() == [B, C]
    p.track(C, True)  # off the recorded order: on demand for the rest of this forward
    assert p.pos is None and p.forward_candidates() == ()


def test_default_budget_is_the_next_sharded_unit_only():
    p = policy(prefetch=None)
    assert p.select([A, B, C], 0, ALWAYS) == [A]
    assert p.select([A, B, C], 0, lambda u: u is not A) == []  # next one gathered already: nothing


def test_bucket_budget_in_elements_and_max_live():
    p = policy(prefetch=25)
    assert p.select([A, B, C], 0, ALWAYS) == [A, B]  # 10 < 25, then 30 >= 25 stops
    assert p.select([A, B, C], 0, lambda u: u is not A) == [B, C]  # gathered units cost nothing
    p = policy(prefetch=100, max_live=35)
    assert p.select([A, B, C], 0, ALWAYS) == [A, B]  # 10 + 20 <= 35 < 60
    assert p.select([A, B, C], 20, ALWAYS) == [A]  # 20 live + 10 <= 35, + 20 more is not
    assert policy(prefetch=100, max_live=25).select([A, B, C], 20, ALWAYS) == []  # stops at the first too big


def test_repeated_unit_is_chosen_once():
    assert policy(prefetch=100).select([A, A, B], 0, ALWAYS) == [A, B]


def test_zero_prefetch_disables_both_directions():
    p = policy(prefetch=0)
    record(p, [ROOT, A, B])
    p.open_forward()
    assert p.forward_candidates() == () and p.backward_candidates(ROOT) == ()


def test_backward_order_is_reversed_without_root_and_repeats():
    p = policy()
    record(p, [ROOT, A, B, A, C])
    assert list(p.backward_candidates(ROOT)) == [C, A, B]
    assert list(p.backward_candidates(C)) == [A, B]
    assert list(p.backward_candidates(B)) == []
    assert list(p.backward_candidates(U(9, 1))) == []


def test_reuse_distance():
    p = policy(reuse=25)
    record(p, [ROOT, A, B, A, C])
    p.open_forward()
    for u in (ROOT, A):
        p.track(u, True)
    assert p.reused_soon(A)  # B (20) comes between: 20 <= 25
    assert not policy(reuse=0).reused_soon(A)
    q = policy(reuse=15)
    record(q, [ROOT, A, B, A])
    q.open_forward()
    q.track(ROOT, True)
    q.track(A, True)
    assert not q.reused_soon(A)  # 20 > 15
    assert not q.reused_soon(C)  # not in the rest of the order


def test_needed_first_in_backward_only_after_recording_with_grad():
    p = policy()
    assert not p.needed_first_in_backward(ROOT, True)  # still recording
    record(p, [ROOT, A, B])
    p.open_forward()
    assert p.needed_first_in_backward(ROOT, True) and p.needed_first_in_backward(B, True)
    assert not p.needed_first_in_backward(A, True)
    assert not p.needed_first_in_backward(B, False)
    p.track(C, True)  # off the order
    assert not p.needed_first_in_backward(B, True)
