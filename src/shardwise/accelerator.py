"""``get_accelerator()``: DeepSpeed's device-agnostic accelerator object, for scripts that ask
it for ``device_name()``, ``set_device``, ``is_bf16_supported`` and the like. Which device it
describes is decided where shardwise decides it for training (``comm.context.pick_device``):
CUDA with NCCL when a GPU is present, else the CPU with gloo.
"""
from __future__ import annotations

import os
from typing import Any

import torch


class Accelerator:
    """The methods DeepSpeed scripts call most, over ``torch.cuda`` or the CPU."""

    def __init__(self, kind: str):
        self._name = kind  # "cuda" or "cpu" (DeepSpeed's attribute name)
        self._cuda = kind == "cuda"

    # -- which device ------------------------------------------------------------------------
    def device_name(self, device_index: int | None = None) -> str:
        if device_index is None or not self._cuda:
            return self._name
        return f"{self._name}:{device_index}"

    def device(self, device_index: int | None = None) -> torch.device:
        return torch.device(self.device_name(device_index))

    def current_device(self) -> int:
        return torch.cuda.current_device() if self._cuda else 0

    def current_device_name(self) -> str:
        return self.device_name(self.current_device()) if self._cuda else "cpu"

    def device_count(self) -> int:
        if self._cuda:
            return torch.cuda.device_count()
        return 1

    def set_device(self, device_index: int) -> None:
        if self._cuda:
            torch.cuda.set_device(device_index)

    def is_available(self) -> bool:
        return torch.cuda.is_available() if self._cuda else True

    def is_synchronized_device(self) -> bool:
        return not self._cuda  # the CPU runs ops as they are called

    def use_host_timers(self) -> bool:
        return self.is_synchronized_device()

    def synchronize(self, device_index: int | None = None) -> None:
        if self._cuda:
            torch.cuda.synchronize(device_index)

    def communication_backend_name(self) -> str:
        return "nccl" if self._cuda else "gloo"

    # -- what it supports ------------------------------------------------------------------------
    def is_bf16_supported(self) -> bool:
        return torch.cuda.is_bf16_supported() if self._cuda else True

    def is_fp16_supported(self) -> bool:
        return True  # shardwise trains fp16 on the CPU too (tests use it)

    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    # -- RNG and memory --------------------------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        torch.cuda.manual_seed(seed) if self._cuda else torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.cuda.manual_seed_all(seed) if self._cuda else torch.manual_seed(seed)

    def initial_seed(self) -> int:
        return torch.cuda.initial_seed() if self._cuda else torch.initial_seed()

    def get_rng_state(self, device_index: int | None = None) -> torch.Tensor:
        if self._cuda:
            return torch.cuda.get_rng_state(device_index if device_index is not None else "cuda")
        return torch.get_rng_state()

    def set_rng_state(self, new_state: torch.Tensor, device_index: int | None = None) -> None:
        if self._cuda:
            torch.cuda.set_rng_state(new_state, device_index if device_index is not None else "cuda")
        else:
            torch.set_rng_state(new_state)

    def empty_cache(self) -> None:
        if self._cuda:
            torch.cuda.empty_cache()

    def memory_allocated(self, device_index: int | None = None) -> int:
        return torch.cuda.memory_allocated(device_index) if self._cuda else 0

    def max_memory_allocated(self, device_index: int | None = None) -> int:
        return torch.cuda.max_memory_allocated(device_index) if self._cuda else 0

    def reset_peak_memory_stats(self, device_index: int | None = None) -> None:
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(device_index)

    def total_memory(self, device_index: int | None = None) -> int:
        if self._cuda:
            return torch.cuda.get_device_properties(device_index or 0).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    # -- tensors ---------------------------------------------------------------------------------
    def pin_memory(self, tensor: torch.Tensor, align_bytes: int = 1) -> torch.Tensor:
        return tensor.pin_memory() if self._cuda else tensor

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned() if self._cuda else False

    def on_accelerator(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == self._name

    def Stream(self, *args: Any, **kwargs: Any):  # noqa: N802 - DeepSpeed's name
        if not self._cuda:
            raise NotImplementedError("streams exist on CUDA only; on the CPU ops run in order")
        return torch.cuda.Stream(*args, **kwargs)

    def __repr__(self) -> str:
        return f"shardwise.accelerator.Accelerator({self._name!r})"


_ACCELERATOR: Accelerator | None = None


def get_accelerator() -> Accelerator:
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from shardwise.comm.context import pick_device

        _ACCELERATOR = Accelerator(pick_device(int(os.environ.get("LOCAL_RANK", 0)))[0].type)
    return _ACCELERATOR


__all__ = ["Accelerator", "get_accelerator"]
