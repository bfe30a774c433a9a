"""wall_clock_breakdown on CUDA times the device, not kernel launches: every phase boundary waits
for the device before the clock is read ([Note: device-synchronised timers] in
profiling/timers.py); on the CPU nothing is waited for. No GPU needed: the wait is replaced by
a recorder that also sleeps, standing for queued kernels still running."""
from __future__ import annotations

import time
import types

import pytest
import torch

from shardwise.profiling import timers
from shardwise.profiling.timers import WallClockBreakdown, device_sync

KERNELS_S = 0.02  # what the fake "device" still has to run when the phase's Python returns


@pytest.fixture
def fake_sync(monkeypatch):
    calls = []

    def sync(device):
        calls.append(torch.device(device))
        time.sleep(KERNELS_S)

    monkeypatch.setattr(timers, "_cuda_synchronize", sync)
    return calls


def _ctx(device):
    return types.SimpleNamespace(rank=0, device=device)


def _one_step(timer, step=1):
    timer.forward_begin((), {})
    timer.forward_end(None)
    timer.backward_begin(None)
    timer.backward_end()
    timer.step_begin()
    timer.step_end(types.SimpleNamespace(step=step))


def test_cuda_phases_wait_for_the_device_inside_the_timed_window(fake_sync):
    timer = WallClockBreakdown(1, _ctx(torch.device("cuda", 0)))
    try:
        _one_step(timer)
        ms = timer.last_interval_ms()
    finally:
        timer.close()
    # one wait before each phase starts (the previous work is not charged to it) and one before
    # each stops (its own kernels are): 2 x 3 phases, on the engine's device
    assert fake_sync == [torch.device("cuda", 0)] * 6
    for phase in ("forward", "backward", "step"):  # the stop's wait is inside the phase's time
        assert ms[phase] >= KERNELS_S * 1e3 * 0.9, ms


def test_cpu_phases_do_not_synchronise(fake_sync):
    timer = WallClockBreakdown(1, _ctx(torch.device("cpu")))
    try:
        _one_step(timer)
        ms = timer.last_interval_ms()
    finally:
        timer.close()
    assert fake_sync == []
    assert all(ms[p] < KERNELS_S * 1e3 for p in ("forward", "backward", "step")), ms


def test_device_sync_accepts_names_and_devices(fake_sync):
    device_sync("cpu")
    device_sync(torch.device("cpu"))
    assert fake_sync == []
    device_sync("cuda:1")
    device_sync(torch.device("cuda"))
    assert fake_sync == [torch.device("cuda", 1), torch.device("cuda")]


def test_the_real_wait_is_torch_cuda_synchronize(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: seen.append(device))
    timers._cuda_synchronize(torch.device("cuda", 0))
    assert seen == [torch.device("cuda", 0)]
