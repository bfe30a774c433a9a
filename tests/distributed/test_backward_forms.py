"""How DeepSpeed scripts run backward, on 2 ranks at every ZeRO stage (issue 14, items 4-5).

``loss.backward()`` on the engine's output must give exactly what ``engine.backward(loss)``
gives ([Note: direct backward]: the same factor, applied to the output gradient instead of
the loss): compared bitwise. Two backward passes per micro-step (half the micro-batch each)
must give the gradient of their sum ([Note: several backward passes per step]): the same
math in another summation order, so compared at fp32 rounding (atol 1e-6 after 2 Adam steps
with accumulation; a lost or doubled pass is off by ~1e-3). The GAN loop (two engines, D's
parameters reached by G's backward) must train like plain PyTorch on one process."""
from __future__ import annotations

import pytest
import torch

from backward_workers import forms_run, gan_run, lamb_reference, lamb_run, predivide_run
from shardwise.testing import run_distributed

STAGES = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def forms():
    return run_distributed(forms_run, 2, STAGES, 2, 2)


@pytest.mark.parametrize("stage", STAGES)
def test_loss_backward_equals_engine_backward_bitwise(forms, stage):
    for r in forms:
        want, got = r[(stage, "engine")], r[(stage, "direct")]
        assert got["steps"] == want["steps"] == 2
        for k in want["params"]:
            assert torch.equal(got["params"][k], want["params"][k]), (stage, k)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("form", ["twice", "twice_direct"])
def test_two_backward_passes_per_micro_step_add_up(forms, stage, form):
    for r in forms:
        want, got = r[(stage, "engine")], r[(stage, form)]
        assert got["steps"] == 2
        for k in want["params"]:
            torch.testing.assert_close(got["params"][k], want["params"][k], rtol=0, atol=1e-6,
                                       msg=lambda m, k=k: f"stage {stage} {form} {k}: {m}")


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_gan_two_engines_train_like_plain_pytorch(stage):
    want = gan_run(None, 4, 8)
    for r in run_distributed(gan_run, 2, stage, 4, 8):
        torch.testing.assert_close(r["losses"], want["losses"], rtol=1e-5, atol=1e-6)
        for net in ("D", "G"):
            for k in want[net]:
                torch.testing.assert_close(r[net][k], want[net][k], rtol=0, atol=2e-6,
                                           msg=lambda m, k=k, net=net: f"{net}.{k}: {m}")


def test_prescale_and_predivide_give_the_mean_gradient():
    """DeepSpeed's keys ([Note: where gradients are divided]): prescale and a power-of-two
    predivide factor move where the 1/dp happens, exactly (bitwise on 2 ranks); 1.5 only
    changes rounding. Gradient norms and SGD updates are scale-sensitive, so a lost or doubled
    division cannot pass."""
    for r in run_distributed(predivide_run, 2, [1, 3], 3):
        for stage in (1, 3):
            want = r[(stage, "default")]
            for name in ("prescale", "predivide4", "predivide1.5"):
                got = r[(stage, name)]
                exact = name != "predivide1.5"
                tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-6}
                torch.testing.assert_close(got["norms"], want["norms"], **tol)
                torch.testing.assert_close(got["losses"], want["losses"], **tol)
                for k in want["params"]:
                    torch.testing.assert_close(got["params"][k], want["params"][k], **tol)


def test_lamb_in_the_engine_equals_per_parameter_lamb():
    """DeepSpeed's Lamb: one trust ratio per model tensor although the optimizer steps flat
    buckets split over ranks (the strategy binds the layouts: [Note: LAMB over flat buffers]).
    Buckets of 3000 elements hold several tensors each, so a per-bucket ratio cannot pass."""
    want = lamb_reference(3, 4)
    for r in run_distributed(lamb_run, 2, [0, 1, 2, 3], 3, 4):
        for stage, got in r.items():
            torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-5, atol=0)
            for k in want["params"]:
                torch.testing.assert_close(got["params"][k], want["params"][k], rtol=0, atol=2e-6,
                                           msg=lambda m, k=k, stage=stage: f"stage {stage} {k}: {m}")
