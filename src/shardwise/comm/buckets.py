"""Pure bucket layout: which parameters share a flat buffer, at which offsets, with what padding.

[Note: bucket layout]
Trainable parameters are packed, in *reverse* registration order (backward produces gradients
roughly last-layer-first), into buckets of at most ``bucket_numel`` elements. A parameter is
never split across buckets; one larger than the bucket size gets a bucket of its own. Buckets
never mix optimizer param groups, dtypes or devices. Each bucket's flat buffer is padded to a
multiple of ``world_size * align`` so that every rank owns one equal, aligned, contiguous
chunk of it: rank r owns elements ``[r * chunk, (r + 1) * chunk)``. Padding stays zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence


@dataclass(frozen=True)
class Slot:
    """One parameter's place in a bucket's flat buffer."""

    param_index: int  # index into the caller's parameter list
    offset: int
    numel: int


@dataclass(frozen=True)
class BucketLayout:
    slots: tuple[Slot, ...]
    numel: int  # elements used by parameters
    padded_numel: int  # multiple of world_size * align
    group_key: Hashable  # (param group, dtype, device) the bucket belongs to

    def chunk_numel(self, world_size: int) -> int:
        return self.padded_numel // world_size

    def chunk_range(self, rank: int, world_size: int) -> tuple[int, int]:
        c = self.chunk_numel(world_size)
        return rank * c, (rank + 1) * c


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def assign_buckets(
    numels: Sequence[int],
    group_keys: Sequence[Hashable],
    bucket_numel: int,
    world_size: int,
    align: int = 16,
) -> list[BucketLayout]:
    """Lay out parameters (given by element count and group key) into buckets.

    Returns buckets in the order their gradients are expected to become ready (reverse of the
    parameter order). Offsets inside a bucket are aligned to ``align`` elements.
    """
    if len(numels) != len(group_keys):
        raise ValueError("numels and group_keys must have the same length")
    if bucket_numel < 1 or world_size < 1 or align < 1:
        raise ValueError("bucket_numel, world_size and align must be positive")
    open_buckets: dict[Hashable, list[Slot]] = {}
    open_sizes: dict[Hashable, int] = {}
    done: list[tuple[Hashable, list[Slot], int]] = []
    order: list[Hashable] = []  # ordering key: first parameter seen closes buckets in sequence

    def close(key: Hashable) -> None:
        slots = open_buckets.pop(key)
        done.append((key, slots, open_sizes.pop(key)))

    for index in reversed(range(len(numels))):
        key, n = group_keys[index], int(numels[index])
        if key not in order:
            order.append(key)
        used = open_sizes.get(key, 0)
        start = _round_up(used, align)
        if key in open_buckets and start + n > bucket_numel:
            close(key)
            used, start = 0, 0
        open_buckets.setdefault(key, []).append(Slot(index, start, n))
        open_sizes[key] = start + n
    for key in list(open_buckets):
        close(key)

    multiple = world_size * align
    return [
        BucketLayout(tuple(slots), used, max(_round_up(used, multiple), multiple), key)
        for key, slots, used in done
    ]
