"""The engine's data loader: a ``DistributedSampler`` whose position can be saved and resumed.

[Note: resumable loader]
:class:`ResumableDataLoader` counts the batches it has handed out in the current pass;
``state_dict()`` records that count with the sampler's epoch. After ``load_state_dict`` the
next pass over the *same* epoch skips the samples already seen, so training continues at the
next unseen batch (bit-for-bit at the same world size). At another world size the global
sample position is kept: each rank skips ``consumed_global // world_size`` of its samples.
"""
from __future__ import annotations

import base64
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can skip the first ``skip`` indices of one epoch's pass."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._skip = 0
        self._skip_epoch: int | None = None

    def skip_next(self, epoch: int, samples: int) -> None:
        self.epoch = epoch
        self._skip, self._skip_epoch = samples, epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._skip_epoch:
            self._skip, self._skip_epoch = 0, None
        super().set_epoch(epoch)

    @property
    def pending_skip(self) -> int:
        return self._skip

    def __iter__(self) -> Iterator[int]:
        skip, self._skip, self._skip_epoch = self._skip, 0, None
        indices = list(super().__iter__())
        return iter(indices[skip:])

    def __len__(self) -> int:
        return max(self.num_samples - self._skip, 0)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableDistributedSampler` that knows its position.

    It has its own ``generator`` (for worker seeds), so starting a pass does not draw from the
    global torch RNG: a resumed run's random stream (dropout, ...) matches the original's.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator().manual_seed(0)
        super().__init__(*args, **kwargs)
        self._consumed = 0  # batches handed out in the current pass (including skipped ones)

    def __iter__(self):
        skipped = self.sampler.pending_skip // self.batch_size
        inner = super().__iter__()

        def batches():
            self._consumed = skipped
            for batch in inner:
                self._consumed += 1
                yield batch

        return batches()

    def state_dict(self) -> dict:
        return {"epoch": int(self.sampler.epoch), "batches": int(self._consumed),
                "batch_size": int(self.batch_size), "world_size": int(self.sampler.num_replicas),
                "generator": base64.b64encode(bytes(self.generator.get_state().tolist())).decode()}

    def load_state_dict(self, state: dict) -> None:
        seen_global = int(state["batches"]) * int(state["batch_size"]) * int(state["world_size"])
        self.sampler.skip_next(int(state["epoch"]), seen_global // self.sampler.num_replicas)
        if state.get("generator"):
            self.generator.set_state(torch.tensor(list(base64.b64decode(state["generator"])), dtype=torch.uint8))
        self._consumed = 0


class RepeatingLoader:
    """Iterate a loader forever, starting a new pass when one ends (DeepSpeed's
    ``RepeatingLoader``, used with pipeline engines and step-counted loops). A sampler with
    ``set_epoch`` gets the next epoch at each new pass, so shuffling differs per pass."""

    def __init__(self, loader: Any):
        self.loader = loader
        self.epoch = 0
        self._it = iter(loader)

    def __iter__(self) -> "RepeatingLoader":
        return self

    def __next__(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            sampler = getattr(self.loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            self._it = iter(self.loader)
            return next(self._it)
