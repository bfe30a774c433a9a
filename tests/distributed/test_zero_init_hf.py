"""``shardwise.zero.Init`` with Hugging Face ``transformers`` (``resize_token_embeddings``,
``from_pretrained``) and with ranks that start from different random seeds, against
single-process plain transformers / PyTorch (issue 11). Small configs, random init, no
downloads. Tolerances as in test_stage3.py: losses rtol 1e-6, parameters atol 1e-5; what
construction produces is compared bitwise."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face tests need transformers (pip install -e '.[test]')")

from init_workers import pretrained_run, resize_run, save_random, seeded_run  # noqa: E402
from shardwise.testing import run_distributed

STEPS = 4
NEW_VOCAB = 104


def _close(got: dict, want: dict) -> None:
    torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-6, atol=0)
    assert got["params"].keys() == want["params"].keys()
    for k, v in want["params"].items():
        torch.testing.assert_close(got["params"][k], v, rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def _equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("inside", [False, True], ids=["after-init", "inside-init"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_resize_token_embeddings_under_zero_init(kind, inside):
    want = resize_run(kind, False, inside, NEW_VOCAB, STEPS)
    for r in run_distributed(resize_run, 2, kind, True, inside, NEW_VOCAB, STEPS):
        assert r["vocab"] == NEW_VOCAB and r["shapes"] == want["shapes"]
        _equal(r["after_resize"], want["after_resize"])  # old rows copied, new rows drawn as plain
        _close(r, want)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_from_pretrained_under_zero_init(kind, tmp_path):
    save_random(kind, str(tmp_path))
    want = pretrained_run(str(tmp_path), False, STEPS)
    for r in run_distributed(pretrained_run, 2, str(tmp_path), True, STEPS):
        assert r["kinds"] == ["InitParameter"]  # nothing whole survived loading
        _equal(r["loaded"], want["loaded"])
        torch.testing.assert_close(r["probe"], want["probe"], rtol=1e-6, atol=1e-6)
        _close(r, want)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", ["gpt", "gpt2"])
def test_ranks_seeded_differently_get_rank0s_model(kind, world):
    """torch.manual_seed(rank) before building under Init: every rank ends up with the model a
    plain build with rank 0's seed makes (parameters, buffers, HF resize's random new rows),
    and trains like it."""
    want = seeded_run(kind, False, STEPS)
    for r in run_distributed(seeded_run, world, kind, True, STEPS):
        assert r["kinds"] == ["InitParameter"]
        _equal(r["built"], want["built"])
        _close(r, want)


def test_gathered_parameters_before_initialize():
    from init_workers import gathered_under_init

    want = torch.full((128, 32), 2.0)
    want[0] = 0.0
    for r in run_distributed(gathered_under_init, 2):
        assert torch.equal(r["fc"], want)
        assert torch.equal(r["ln_f"], torch.zeros(8))
