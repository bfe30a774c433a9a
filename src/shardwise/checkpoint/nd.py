"""n-d regions of a tensor: blocks, ranges of a block's flattening, and assembling one region
from pieces of another tiling.

[Note: n-d pieces]
From format 5 on a piece is a *region* of a global tensor: an n-d block (``offsets`` and
``block`` shape within the tensor's global shape; a tensor-parallel rank's local shard, or
the whole tensor) and a range ``[start, stop)`` of that block's row-major flattening (a ZeRO
chunk of the flat buffer that holds the local shard). Formats 1-4 only had whole-tensor
blocks (``offsets`` all 0, ``block`` = shape), which is what their pieces are read as.

A range of a block's flattening is a union of at most ``2 * ndim - 1`` boxes that are each
contiguous in that flattening (:func:`range_boxes`: a partial last row, partial planes, ...,
the full middle, ...); intersecting two regions is intersecting their boxes, and every
intersection is copied as one strided view to another, so assembling any (block, range)
region from pieces of any other tiling costs no index tensors and touches each element once
(:func:`assemble`). A gap (an element no piece holds) or an overlap (two pieces holding one
element) is a :class:`CheckpointError` naming tensor and region.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from shardwise.errors import CheckpointError

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (lo, hi) per dimension, global coordinates


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def strides(shape: Sequence[int]) -> list[int]:
    out = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        out[i] = out[i + 1] * int(shape[i + 1])
    return out


def range_boxes(offsets: Sequence[int], block: Sequence[int], a: int, b: int) -> list[tuple[int, Box]]:
    """Elements ``[a, b)`` of the row-major flattening of ``block`` (placed at ``offsets`` in the
    global tensor) as ``(flat start, box)`` pairs, each box contiguous in the flattening, in
    order; global coordinates."""
    n = len(block)
    if b <= a:
        return []
    if n == 0:
        return [(a, ((), ()))]
    st = strides(block)
    out = []
    while a < b:
        idx, rem = [], a
        for s in st:
            idx.append(rem // s)
            rem %= s
        k = next(k for k in range(n) if a % st[k] == 0 and st[k] <= b - a)
        m = min(int(block[k]) - idx[k], (b - a) // st[k])
        lo = [offsets[i] + (idx[i] if i <= k else 0) for i in range(n)]
        hi = [offsets[i] + (idx[i] + 1 if i < k else idx[i] + m if i == k else int(block[i])) for i in range(n)]
        out.append((a, (tuple(lo), tuple(hi))))
        a += m * st[k]
    return out


def box_of(offsets: Sequence[int], block: Sequence[int]) -> Box:
    return tuple(int(o) for o in offsets), tuple(int(o) + int(d) for o, d in zip(offsets, block))


def intersect(x: Box, y: Box) -> Box | None:
    lo = tuple(max(p, q) for p, q in zip(x[0], y[0]))
    hi = tuple(min(p, q) for p, q in zip(x[1], y[1]))
    return None if any(l >= h for l, h in zip(lo, hi)) else (lo, hi)


def box_numel(box: Box) -> int:
    return numel([h - l for l, h in zip(*box)])


def _view(flat: torch.Tensor, start: int, box: Box, at: Box) -> torch.Tensor:
    """The part ``at`` of ``box``, whose elements are ``flat[start:start + |box|]`` (row-major)."""
    shape = [h - l for l, h in zip(*box)]
    v = flat[start:start + numel(shape)].view(shape) if shape else flat[start:start + 1].view(())
    for d, (l, lo, hi) in enumerate(zip(box[0], at[0], at[1])):
        v = v.narrow(d, lo - l, hi - lo)
    return v


class Region:
    """``[start, stop)`` of the flattening of the block ``offsets`` / ``block`` of a tensor."""

    __slots__ = ("offsets", "block", "start", "stop")

    def __init__(self, offsets: Sequence[int], block: Sequence[int], start: int, stop: int):
        self.offsets = tuple(int(o) for o in offsets)
        self.block = tuple(int(d) for d in block)
        self.start, self.stop = int(start), int(stop)

    @classmethod
    def whole(cls, shape: Sequence[int]) -> "Region":
        return cls([0] * len(shape), shape, 0, numel(shape))

    @property
    def size(self) -> int:
        return self.stop - self.start

    def boxes(self) -> list[tuple[int, Box]]:
        return range_boxes(self.offsets, self.block, self.start, self.stop)

    def describe(self) -> str:
        if not any(self.offsets) and self.start == 0 and self.stop == numel(self.block):
            return f"block {list(self.block)} at offsets {list(self.offsets)}"
        return f"elements [{self.start}, {self.stop}) of block {list(self.block)} at offsets {list(self.offsets)}"

    def same_block(self, other: "Region") -> bool:
        return self.offsets == other.offsets and self.block == other.block


def check_inside(shape: Sequence[int], r: Region, what: str) -> None:
    if len(r.offsets) != len(shape) or len(r.block) != len(shape) or \
            any(o < 0 or d < 0 or o + d > s for o, d, s in zip(r.offsets, r.block, shape)) or \
            not 0 <= r.start <= r.stop <= numel(r.block):
        raise CheckpointError(f"{what}: {r.describe()} is not inside a tensor of shape {list(shape)}")


def overlaps(pieces: Sequence[Region]) -> tuple[int, int] | None:
    """Indices of two pieces that share an element, or None. Pieces of one block are compared
    by their ranges (sorted), pieces of different blocks only where the blocks meet."""
    by_block: dict[tuple, list[int]] = {}
    for i, p in enumerate(pieces):
        if p.size > 0:
            by_block.setdefault((p.offsets, p.block), []).append(i)
    for idx in by_block.values():
        idx = sorted(idx, key=lambda i: (pieces[i].start, pieces[i].stop))
        for i, j in zip(idx, idx[1:]):
            if pieces[j].start < pieces[i].stop:
                return i, j
    blocks = list(by_block)
    for x in range(len(blocks)):
        for y in range(x + 1, len(blocks)):
            bx, by = box_of(*blocks[x]), box_of(*blocks[y])
            if intersect(bx, by) is None:
                continue
            for i in by_block[blocks[x]]:
                for j in by_block[blocks[y]]:
                    if any(intersect(u, v) for _, u in pieces[i].boxes() for _, v in pieces[j].boxes()):
                        return i, j
    return None


def assemble(what: str, shape: Sequence[int], want: Region, pieces: Sequence[Region],
             fetch: Callable[[int], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Region ``want`` of a tensor of global ``shape`` (``what`` names it in errors: "param
    'w'") as a 1-D tensor of ``want.size`` elements, from ``pieces`` (saved regions; ``fetch(i)``
    returns piece ``i``'s values, 1-D, verified; called at most once per piece, only for pieces
    that hold part of ``want``). A gap or an overlap is a :class:`CheckpointError`."""
    check_inside(shape, want, f"the region asked of {what}")
    wbox = box_of(want.offsets, want.block)
    relevant = []
    for i, p in enumerate(pieces):
        if p.size <= 0 or len(p.block) != len(shape):
            continue
        if p.same_block(want):
            if max(p.start, want.start) < min(p.stop, want.stop):
                relevant.append(i)
        elif intersect(box_of(p.offsets, p.block), wbox) is not None or not shape:
            relevant.append(i)
    clash = overlaps([pieces[i] for i in relevant])
    if clash is not None:
        p, q = pieces[relevant[clash[0]]], pieces[relevant[clash[1]]]
        raise CheckpointError(f"the checkpoint's pieces of {what} overlap ({p.describe()} and {q.describe()}); "
                              "the manifest is inconsistent")
    out = torch.empty(want.size, dtype=dtype)
    covered = 0
    wboxes = None
    for i in relevant:
        p = pieces[i]
        t = None
        if p.same_block(want):
            s, e = max(p.start, want.start), min(p.stop, want.stop)
            t = fetch(i)
            out[s - want.start:e - want.start] = t[s - p.start:e - p.start]
            covered += e - s
            continue
        if wboxes is None:
            wboxes = want.boxes()
        for pstart, pb in p.boxes():
            for wstart, wb in wboxes:
                x = intersect(pb, wb)
                if x is None:
                    continue
                if t is None:
                    t = fetch(i)
                _view(out, wstart - want.start, wb, x).copy_(_view(t, pstart - p.start, pb, x))
                covered += box_numel(x)
    if covered != want.size:
        raise CheckpointError(f"the checkpoint does not cover {want.describe()} of {what} (its pieces hold "
                              f"{covered} of those {want.size} elements); the manifest is inconsistent")
    return out


def tiling_problems(shape: Sequence[int], pieces: Iterable[Region]) -> str | None:
    """Why ``pieces`` do not tile a tensor of ``shape`` the way a save writes them (blocks that
    are disjoint boxes covering the tensor; inside each block, ranges covering the block's
    flattening without gaps or overlaps), or None."""
    by_block: dict[tuple, list[Region]] = {}
    n = numel(shape)
    for p in pieces:
        if len(p.offsets) != len(shape) or len(p.block) != len(shape) or \
                any(o < 0 or d < 0 or o + d > s for o, d, s in zip(p.offsets, p.block, shape)):
            return f"{p.describe()} is not inside the tensor's shape {list(shape)}"
        by_block.setdefault((p.offsets, p.block), []).append(p)
    total = 0
    for (offsets, block), ps in by_block.items():
        covered = 0
        for p in sorted(ps, key=lambda p: (p.start, p.stop)):
            if p.start != covered or p.stop < p.start:
                return (f"the pieces of block {list(block)} at offsets {list(offsets)} must cover its "
                        f"{numel(block)} elements in order without gaps or overlaps (range [{p.start}, {p.stop}); "
                        f"the range expected next starts at {covered})")
            covered = p.stop
        if covered != numel(block):
            return f"the pieces of block {list(block)} at offsets {list(offsets)} cover [0, {covered}) of {numel(block)}"
        total += covered
    blocks = [box_of(o, b) for o, b in by_block if numel(b) > 0]
    for i in range(len(blocks)):
        for j in range(i + 1, len(blocks)):
            if intersect(blocks[i], blocks[j]) is not None:
                return f"blocks {blocks[i]} and {blocks[j]} overlap"
    if total != n:
        return f"the blocks cover {total} of the tensor's {n} elements"
    return None


__all__ = ["Region", "range_boxes", "assemble", "overlaps", "tiling_problems", "numel", "check_inside"]
