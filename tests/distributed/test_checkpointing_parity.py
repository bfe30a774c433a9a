"""Activation checkpointing through the config at 2-3 ranks, stages 0-3: the same losses and
parameters as plain single-process PyTorch without checkpointing (tolerances of
test_parity.py)."""
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
def test_checkpointed_blocks_train_like_plain_pytorch(stage, world, reference):
    cfg = config(stage, activation_checkpointing={"modules": "blocks", "cpu_checkpointing": stage == 3})
    out = run_distributed(shardwise_run, world, cfg, STEPS)
    torch.testing.assert_close(out[0]["losses"], reference["losses"], rtol=1e-6, atol=0)
    for r in out:
        _assert_params_close(r["params"], reference["params"], rtol=0, atol=1e-5)
