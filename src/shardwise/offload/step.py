"""The optimizer step over state on disk: tiles walked through a bounded pool of aligned buffers.

[Note: the tile walk]
``ShardedStep`` (``zero/sharded_optimizer.py``) decides first, from gradients that are in
memory: the global norm, the non-finite / overflow decision and the clip coefficient. A
skipped step therefore does no I/O and leaves every swap file unchanged. Only then does the
:class:`TileWalk` of a :class:`~shardwise.offload.tiers.DiskTier` run:

1. the resident chunks (``ratio`` < 1) step together, with no I/O;
2. the offloaded chunks are grouped into *tiles*: runs of consecutive chunks of at most
   ``sub_group_size`` elements (a larger chunk is a tile of its own). For each tile: wait for
   its read; point the chunks' masters (when swapped) and optimizer-state tensors at views of
   the tile's buffers; run the user's optimizer on that tile only (``optimizer.step()`` with
   gradients on the tile's chunks alone, so torch skips the others); copy the masters into the
   parameters; put 0-element placeholders back; issue the tile's write; issue the read of the
   next tile that has no read yet.

A *slot* is one tile's buffers, one page-aligned buffer per swapped kind (master, exp_avg,
...), so ``buffer_count`` buffers make ``buffer_count // kinds`` slots (at least one: a pool
smaller than one slot is raised to one with a warning). With ``pipeline_read`` the walk keeps
``slots - 1`` reads ahead of the tile it steps, and the first of them start in the last
backward of the step (:meth:`TileWalk.prefetch`: the state does not depend on gradients);
with ``pipeline_write`` a tile's write stays in flight until its slot is needed again. A
read ahead never waits for a write (it is issued once a slot is free, or when its tile's
turn comes), so a tile's write overlaps the next tile's step.
Without either, each tile is read, stepped and written in turn (DeepSpeed's defaults).

The optimizer state is learned, not declared: at a chunk's first step torch creates its
state in ordinary tensors; the walk copies every per-element tensor it finds into the tile's
buffers, writes them and frees the originals. Any torch optimizer whose state is per element
(AdamW, Adam, SGD with momentum, Adagrad, ...) works, fused or not, and the values are
bitwise those of the same optimizer stepping in memory: the same kernel runs on the same
tensors, only fewer of them per call.
"""
from __future__ import annotations

import warnings
from collections import deque
from typing import Sequence

import torch

from shardwise.offload.tiers import PAGE, _placeholder, step_together


_LIBC = None


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    [Note: first-step state and the heap]
    At a chunk's first step torch allocates its optimizer state in ordinary tensors, which the
    walk copies into the tile's buffers and frees. glibc raises its mmap threshold after the
    first such free (up to 32 MB), so later tiles' state comes from the heap, and freed heap
    memory is kept by the process: measured, the resident size grew by the whole state over
    the first step (1 MB chunks, 12 tiles), the very thing offload avoids. Trimming after
    each tile that created state keeps the peak at one tile's state (tested in
    test_offload_memory.py); later steps allocate nothing and never trim."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


class TileWalk:
    def __init__(self, tier):
        self.tier = tier
        chunks = tier.off_chunks
        total = sum(b.numel for b in chunks)
        size = max(min(tier.plan.sub_group_size, max(total, 1)), max((b.numel for b in chunks), default=1))
        self.tile_numel = size
        self.tiles: list[list[int]] = []  # indices into tier.off_chunks
        cur, acc = [], 0
        for j, b in enumerate(chunks):
            if cur and acc + b.numel > size:
                self.tiles.append(cur)
                cur, acc = [], 0
            cur.append(j)
            acc += b.numel
        if cur:
            self.tiles.append(cur)
        self.has: list[set[str]] = [set() for _ in chunks]  # per chunk: the state kinds on disk
        self.slots: list[dict[str, torch.Tensor]] = []  # allocated slots
        self.free: list[dict[str, torch.Tensor]] = []
        self.reads: dict[int, tuple[dict, list]] = {}  # tile -> (slot, handles)
        self.writes: deque = deque()  # (slot, handles)
        self.warned = False
        self.expected_kinds = 1

    # -- the pool -------------------------------------------------------------------------------
    def n_slots(self) -> int:
        kinds = max(len(self.tier.kinds()), self.expected_kinds)
        n = self.tier.plan.optimizer.buffer_count // kinds
        if n < 1 and not self.warned:
            self.warned = True
            warnings.warn(f"offload_optimizer.buffer_count={self.tier.plan.optimizer.buffer_count} is fewer than "
                          f"the {kinds} tensors each tile swaps ({', '.join(self.tier.kinds())}): using {kinds} "
                          f"buffers (one tile at a time); set buffer_count to {3 * kinds} to pipeline reads and "
                          "writes", stacklevel=3)
        return max(1, n)

    def tile_layout(self, kind: str, t: int) -> list[tuple[int, object]]:
        """Per chunk of tile ``t``: (byte position in the slot's buffer of ``kind``, its ChunkSlot)."""
        out, pos = [], 0
        for j in self.tiles[t]:
            cs = self.tier.slots[kind][j]
            out.append((pos, cs))
            pos += cs.nbytes
        return out

    def max_tile_bytes(self, kind: str) -> int:
        return max((sum(self.tier.slots[kind][j].nbytes for j in js) for js in self.tiles), default=PAGE)

    def pool_bytes(self) -> int:
        return sum(buf.numel() for slot in self.slots for buf in slot.values())

    def predicted_pool_bytes(self, kinds: int) -> int:
        """The pool's bytes once the state kinds are known (fp32), for the host-memory budget."""
        per = -(-self.tile_numel * 4 // PAGE) * PAGE + PAGE * len(self.tiles[0]) if self.tiles else 0
        slots = max(1, self.tier.plan.optimizer.buffer_count // max(1, kinds))
        return slots * kinds * per

    def _buffer(self, slot: dict, kind: str) -> torch.Tensor:
        if kind not in slot:
            from shardwise.offload.aio import aligned_empty

            slot[kind] = aligned_empty(self.max_tile_bytes(kind))
        return slot[kind]

    def _acquire(self, block: bool = True) -> dict | None:
        """A free slot: a new one while the pool may grow, else the oldest written one (waiting
        for its write, or, with ``block=False``, only if that write is done; else None)."""
        if self.free:
            return self.free.pop()
        if len(self.slots) < self.n_slots() or not self.writes:
            slot: dict = {}
            self.slots.append(slot)
            return slot
        if not block and not all(h.done() for h in self.writes[0][1]):
            return None
        slot, handles = self.writes.popleft()
        for h in handles:
            h.wait()
        return slot

    def _release(self, slot: dict) -> None:
        self.free.append(slot)

    # -- I/O ------------------------------------------------------------------------------------
    def _read_kinds(self, t: int) -> list[str]:
        kinds = ["master"] if any(self.tier.master_for[j] for j in self.tiles[t]) else []
        present = set().union(*(self.has[j] for j in self.tiles[t]))
        return kinds + [k for k in (self.tier.keys or []) if k in present]

    def _wanted(self, kind: str, j: int) -> bool:
        return self.tier.master_for[j] if kind == "master" else kind in self.has[j]

    def _issue_read(self, t: int, block: bool = True) -> None:
        """Start tile ``t``'s read; a read ahead (``block=False``) never waits for a write: it
        is issued later, when a slot is free or the tile's turn comes."""
        if t in self.reads or t >= len(self.tiles):
            return
        slot = self._acquire(block)
        if slot is None:
            return
        handles = []
        for kind in self._read_kinds(t):
            buf = self._buffer(slot, kind)
            for j, (pos, cs) in zip(self.tiles[t], self.tile_layout(kind, t)):
                if self._wanted(kind, j):
                    handles.append(self.tier.engine.read(cs.file, cs.offset, buf[pos: pos + cs.nbytes]))
        self.reads[t] = (slot, handles)

    def _wait_read(self, t: int) -> dict:
        self._issue_read(t)
        slot, handles = self.reads.pop(t)
        for h in handles:
            h.wait()
        return slot

    def _views(self, slot: dict, kind: str, t: int) -> list[torch.Tensor]:
        """Per chunk of tile ``t``: its tensor of ``kind`` inside the slot's buffer."""
        buf = self._buffer(slot, kind)
        dtype = self.tier.dtypes[kind]
        return [buf[pos: pos + cs.nbytes].view(dtype)[: self.tier.off_chunks[j].numel]
                for j, (pos, cs) in zip(self.tiles[t], self.tile_layout(kind, t))]

    def _issue_write(self, slot: dict, t: int, kinds: Sequence[str]) -> list:
        handles = []
        for kind in kinds:
            buf = self._buffer(slot, kind)
            for j, (pos, cs) in zip(self.tiles[t], self.tile_layout(kind, t)):
                if self._wanted(kind, j):
                    handles.append(self.tier.engine.write(cs.file, cs.offset, buf[pos: pos + cs.nbytes]))
        if "master" in kinds and self.tier.master_written is not None:
            mine = [(self.tier.off_chunks[j], v) for j, v in zip(self.tiles[t], self._views(slot, "master", t))
                    if self.tier.master_in_params[j]]
            self.tier.master_written([c for c, _ in mine], [v for _, v in mine])
        return handles

    def drain(self) -> None:
        """Wait for every read and write in flight; all slots free (prefetched reads dropped)."""
        for slot, handles in list(self.reads.values()):
            for h in handles:
                h.wait()
            self._release(slot)
        self.reads.clear()
        while self.writes:
            slot, handles = self.writes.popleft()
            for h in handles:
                h.wait()
            self._release(slot)

    def _ahead(self) -> int:
        return self.n_slots() - 1 if self.tier.plan.optimizer.pipeline_read else 0

    def prefetch(self) -> None:
        """The last backward of a step began: start the first tiles' reads."""
        if not self.tier.plan.optimizer.pipeline_read or self.tier.keys is None:
            return
        for t in range(min(len(self.tiles), self._ahead() + 1)):
            self._issue_read(t, block=False)

    # -- the step -------------------------------------------------------------------------------
    def step(self, optimizer, chunks: Sequence, grads: Sequence, frozen: Sequence[bool]) -> None:
        tier = self.tier
        res = [(b, g, f) for b, g, f, o in zip(chunks, grads, frozen, tier.offloaded) if not o]
        step_together(optimizer, [r[0] for r in res], [r[1] for r in res], [r[2] for r in res])
        pos = {id(b): i for i, b in enumerate(chunks)}
        pipeline_write = tier.plan.optimizer.pipeline_write
        for t in range(len(self.tiles)):
            slot = self._wait_read(t)
            tile = [tier.off_chunks[j] for j in self.tiles[t]]
            creates = any(not self.has[j] for j in self.tiles[t])  # torch makes its state now
            self._bind(slot, t, optimizer)
            try:
                step_together(optimizer, tile, [grads[pos[id(b)]] for b in tile],
                              [frozen[pos[id(b)]] for b in tile])
                kinds = self._capture(slot, t, optimizer)
            finally:
                self._unbind(t, optimizer)
            if creates:
                release_freed_memory()  # [Note: first-step state and the heap]
            handles = self._issue_write(slot, t, kinds)
            if pipeline_write:
                self.writes.append((slot, handles))
            else:
                for h in handles:
                    h.wait()
                self._release(slot)
            if tier.plan.optimizer.pipeline_read:  # (tile t's write stays in flight meanwhile)
                for ahead in range(t + 1, t + 2 + self._ahead()):
                    self._issue_read(ahead, block=False)
        while self.writes:
            slot, handles = self.writes.popleft()
            for h in handles:
                h.wait()
            self._release(slot)

    def _bind(self, slot: dict, t: int, optimizer) -> None:
        tier = self.tier
        if tier.swap_master:
            for j, v in zip(self.tiles[t], self._views(slot, "master", t)):
                if tier.master_for[j]:
                    tier.off_chunks[j].opt_param.data = v
        for kind in tier.keys or []:
            views = None
            for i, j in enumerate(self.tiles[t]):
                if kind in self.has[j]:
                    views = views or self._views(slot, kind, t)
                    optimizer.state[tier.off_chunks[j].opt_param][kind] = views[i]

    def _capture(self, slot: dict, t: int, optimizer) -> list[str]:
        """After the tile's step: learn new state kinds, copy state the optimizer replaced (or
        created) into the slot; returns the kinds to write."""
        tier = self.tier
        for j in self.tiles[t]:
            b = tier.off_chunks[j]
            st = optimizer.state.get(b.opt_param)
            if st:
                tier.learn(st, b.numel)
        written = ["master"] if any(tier.master_for[j] for j in self.tiles[t]) else []
        for kind in tier.keys or []:
            views = self._views(slot, kind, t)
            wrote = False
            for i, j in enumerate(self.tiles[t]):
                st = optimizer.state.get(tier.off_chunks[j].opt_param)
                cur = st.get(kind) if st else None
                if cur is None or not isinstance(cur, torch.Tensor) or cur.numel() == 0:
                    continue
                if cur.data_ptr() != views[i].data_ptr():
                    views[i].copy_(cur.reshape(-1))
                self.has[j].add(kind)
                wrote = True
            if wrote:
                written.append(kind)
        return written

    def _unbind(self, t: int, optimizer) -> None:
        tier = self.tier
        for j in self.tiles[t]:
            b = tier.off_chunks[j]
            if tier.master_for[j]:
                b.opt_param.data = _placeholder(torch.float32)
            st = optimizer.state.get(b.opt_param)
            if st:
                for kind in list(st):
                    if kind in (tier.keys or []):
                        st[kind] = _placeholder(tier.dtypes[kind])

    # -- whole-state moves (initialisation, checkpoints) ----------------------------------------
    def write_tensors(self, tensors: dict[str, list]) -> None:
        """Write ordinary tensors (per kind, per offloaded chunk; None: the chunk has none) to
        the files, tile by tile through one slot."""
        self.drain()
        for t in range(len(self.tiles)):
            slot = self._acquire()
            kinds = []
            for kind, per_chunk in tensors.items():
                views = self._views(slot, kind, t)
                any_ = False
                for i, j in enumerate(self.tiles[t]):
                    v = per_chunk[j]
                    if v is None or v.numel() == 0:
                        continue
                    views[i].copy_(v.reshape(-1))
                    if kind != "master":
                        self.has[j].add(kind)
                    any_ = True
                if any_:
                    kinds.append(kind)
            for h in self._issue_write(slot, t, kinds):
                h.wait()
            self._release(slot)

    def read_all(self) -> dict[str, list]:
        """Every swapped tensor as an ordinary tensor (per kind, per offloaded chunk; None
        where the chunk has none)."""
        self.drain()
        out: dict[str, list] = {k: [None] * len(self.tier.off_chunks) for k in self.tier.kinds()}
        for t in range(len(self.tiles)):
            slot = self._wait_read(t)
            for kind in self._read_kinds(t):
                for j, v in zip(self.tiles[t], self._views(slot, kind, t)):
                    if self._wanted(kind, j):
                        out[kind][j] = v.clone()
            self._release(slot)
        return out


__all__ = ["TileWalk"]
