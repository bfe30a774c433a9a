import pytest

from shardwise.comm.buckets import assign_buckets


def test_reverse_order_padding_and_alignment():
    buckets = assign_buckets([10, 20, 30, 5], ["a", "a", "a", "a"], bucket_numel=40, world_size=3, align=4)
    # reverse registration order: last parameter first
    assert [s.param_index for b in buckets for s in b.slots] == [3, 2, 1, 0]
    for b in buckets:
        assert b.padded_numel % (3 * 4) == 0 and b.padded_numel >= b.numel
        for s in b.slots:
            assert s.offset % 4 == 0
        ends = [s.offset + s.numel for s in b.slots]
        assert max(ends) == b.numel
        # slots never overlap
        spans = sorted((s.offset, s.offset + s.numel) for s in b.slots)
        assert all(a[1] <= b_[0] for a, b_ in zip(spans, spans[1:]))
        assert b.numel <= 40 or len(b.slots) == 1


def test_groups_never_mix_and_large_param_gets_own_bucket():
    sizes, keys = [100, 3, 3, 4, 2, 5], [0, 1, 0, 1, 0, 1]
    buckets = assign_buckets(sizes, keys, bucket_numel=50, world_size=2)
    # every parameter is in exactly one bucket, and each bucket holds one group's parameters only
    assert sorted(s.param_index for b in buckets for s in b.slots) == list(range(len(sizes)))
    for b in buckets:
        assert {keys[s.param_index] for s in b.slots} == {b.group_key}
    assert {b.group_key for b in buckets} == {0, 1}
    big = [b for b in buckets if any(s.param_index == 0 for s in b.slots)][0]
    assert len(big.slots) == 1 and big.numel == 100


def test_chunks_cover_bucket_exactly():
    (b,) = assign_buckets([7], [0], bucket_numel=100, world_size=3, align=1)
    ranges = [b.chunk_range(r, 3) for r in range(3)]
    assert ranges[0][0] == 0 and ranges[-1][1] == b.padded_numel
    assert all(x[1] == y[0] for x, y in zip(ranges, ranges[1:]))


def test_bad_arguments():
    with pytest.raises(ValueError):
        assign_buckets([1], [0, 1], 10, 1)
    with pytest.raises(ValueError):
        assign_buckets([1], [0], 0, 1)
