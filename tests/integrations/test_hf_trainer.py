"""``shardwise.integrations.hf.ShardwiseTrainer``: the Hugging Face Trainer on shardwise, against
the plain ``Trainer`` in one process. Tiny GPT-2 (tied embeddings) and Llama (untied head)
built from configs with a fixed seed, synthetic tokens, no downloads.

Same global batches: both runs use the Trainer's own seeded sampler (``seed=0``) over the
same data set; Accelerate hands rank r the micro-batches r, r+2, ... of it, so at each
micro-step the two ranks' batches (``per_device_train_batch_size=2``) are together the plain
run's batch (``per_device_train_batch_size=4``), with the same accumulation (2 micro-steps per
optimizer step, 4 steps, exactly one epoch). The Trainer divides each loss by the token count
of the whole window over all ranks, so only the order of additions differs.

Tolerances (fp32): losses and grad norms rtol 1e-5 (observed ~1e-7: different batch shapes per
matmul and summation order); parameters after 4 AdamW steps atol 1e-5 = 1% of the learning
rate (observed up to ~7e-6: Adam divides by sqrt(v), so where a gradient is tiny its relative
rounding reaches the update); logits atol 1e-5. A resumed run equals the uninterrupted one
exactly (same process layout, same arithmetic).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face Trainer tests need transformers (pip install -e '.[test]')")
pytest.importorskip("accelerate", reason="the Hugging Face Trainer tests need accelerate (pip install -e '.[test]')")

import hf_trainer_workers as W  # noqa: E402
from shardwise.errors import ConfigError, UsageError  # noqa: E402
from shardwise.testing import run_distributed  # noqa: E402

# (kind, stage, optimizer section in the config, resume): stage 3 always builds the model with
# from_pretrained under zero.Init; without an optimizer section the Trainer's AdamW (with its
# no-decay groups) is used, with one the config's AdamW ("auto" from the arguments; weight
# decay 0 in both runs so that the groups do not matter); samples: W.SHORT makes the epoch end
# with a 1-micro-batch window (the Trainer steps early there, and so must the engine)
CASES = [("gpt2", 2, False, True, W.SAMPLES), ("gpt2", 3, True, False, W.SAMPLES),
         ("llama", 2, True, False, W.SHORT), ("llama", 3, False, True, W.SAMPLES)]
_PLAIN: dict = {}


def _plain(kind: str, weight_decay: float, samples: int, tmp_path_factory) -> dict:
    key = (kind, weight_decay, samples)
    if key not in _PLAIN:
        _PLAIN[key] = W.plain_run(kind, str(tmp_path_factory.mktemp("plain")), weight_decay, samples)
    return _PLAIN[key]


def _close_params(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def _close_history(got: dict, want: dict) -> None:
    assert len(got["loss"]) == W.STEPS
    torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(want["loss"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["grad_norm"]), torch.tensor(want["grad_norm"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["learning_rate"]), torch.tensor(want["learning_rate"]),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind,stage,optimizer,resume,samples", CASES, ids=[f"{c[0]}-stage{c[1]}" for c in CASES])
def test_trainer_matches_plain_trainer(kind, stage, optimizer, resume, samples, tmp_path, tmp_path_factory):
    """Train 4 steps on 2 ranks; per-step loss / grad norm / lr, final parameters, eval loss and
    the saved directory's logits equal the plain Trainer's. With ``resume``: a run stopped after
    2 steps (checkpoint-2) and resumed by a fresh trainer and model equals the full run."""
    weight_decay = 0.0 if optimizer else 0.1
    want = _plain(kind, weight_decay, samples, tmp_path_factory)
    pretrained = None
    if stage == 3:
        pretrained = str(tmp_path / "pretrained")
        W.save_random(kind, pretrained)
    ranks = run_distributed(W.shardwise_run, W.WORLD, kind, stage, optimizer, weight_decay, str(tmp_path / "run"),
                            pretrained, resume, samples, timeout_s=240)
    got = ranks[0]
    assert got["stage"] == stage
    if stage == 3:
        assert got["kinds"] == ["InitParameter"]  # from_pretrained under zero.Init: nothing whole
    for r in ranks:
        _close_history(r, want)
        _close_params(r["params"], want["params"])
        assert r["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
    # save_model: Hugging Face layout, loads with from_pretrained, same logits (tied weights right)
    assert {"config.json", "model.safetensors"} <= set(got["saved_files"])
    torch.testing.assert_close(got["saved_logits"], got["engine_logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(got["saved_logits"], want["logits"], rtol=0, atol=1e-5)
    if resume:
        res = got["resumed"]
        assert {"latest", "global_step2", "trainer_state.json", "model.safetensors"} <= set(res["files"])
        assert res["first"]["loss"] == got["loss"][:2]
        assert res["loss"] == got["loss"]  # steps 1-2 from trainer_state.json, 3-4 trained after resuming
        assert res["grad_norm"] == got["grad_norm"]
        _close_params(res["params"], got["params"], atol=0)


# -- "auto" values, refusals (no ranks) ------------------------------------------------------------


def _args(tmp_path, **kw):
    return W.args(str(tmp_path), 1, 0.01, **kw)


def test_auto_values_are_filled_from_training_arguments(tmp_path):
    from shardwise.integrations.hf_config import fill_from_trainer

    doc = {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                          "warmup_num_steps": "auto", "total_num_steps": "auto"}},
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto"},
    }
    args = _args(tmp_path, warmup_steps=3, adam_beta1=0.8, adam_epsilon=1e-7, max_grad_norm=0.25)
    got = fill_from_trainer(doc, args, world_size=4, model=W.tiny_model("llama"), num_training_steps=10)
    assert got == {
        "train_micro_batch_size_per_gpu": 4, "train_batch_size": 4 * 4 * 2,
        "gradient_accumulation_steps": 2, "gradient_clipping": 0.25,  # absent: the Trainer's own values
        "optimizer": {"type": "AdamW", "params": {"lr": W.LR, "betas": [0.8, 0.999], "eps": 1e-7,
                                                  "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": W.LR,
                                                          "warmup_num_steps": 3, "total_num_steps": 10}},
        "bf16": {"enabled": False},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 32 * 32, "stage3_prefetch_bucket_size": 921,
                              "stage3_param_persistence_threshold": 320},
    }
    assert doc["train_batch_size"] == "auto"  # the caller's document is not changed


def test_values_that_disagree_with_the_arguments_are_config_errors(tmp_path):
    from shardwise.integrations.hf_config import fill_from_trainer

    doc = {"train_micro_batch_size_per_gpu": 3, "gradient_clipping": 2.0, "optimizer": {"params": {"lr": 0.5}}}
    with pytest.raises(ConfigError) as err:
        fill_from_trainer(doc, _args(tmp_path), world_size=1, model=None, num_training_steps=4)
    text = str(err.value)
    for needle in ("train_micro_batch_size_per_gpu: is 3", "per_device_train_batch_size gives 4",
                   "gradient_clipping: is 2.0", "max_grad_norm", "optimizer.params.lr", '"auto"'):
        assert needle in text


@pytest.mark.parametrize("flag,value", [("torch_compile", True), ("auto_find_batch_size", True),
                                        ("activation_checkpointing", True), ("bf16_full_eval", True)])
def test_unsupported_trainer_arguments_are_refused(flag, value, tmp_path):
    from shardwise.integrations.hf import ShardwiseTrainer

    with pytest.raises(UsageError, match=f"TrainingArguments.{flag}"):
        ShardwiseTrainer(model=W.tiny_model("gpt2"), args=_args(tmp_path, **{flag: value}),
                         train_dataset=W.TokenData(), shardwise_config=W.config(2, False))


def test_config_comes_from_shardwise_training_arguments(tmp_path):
    import json

    from shardwise.integrations.hf import ShardwiseTrainer, ShardwiseTrainingArguments

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(W.config(3, True)))
    args = ShardwiseTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                      shardwise_config=str(path))
    trainer = ShardwiseTrainer(model=W.tiny_model("gpt2"), args=args, train_dataset=W.TokenData())
    assert trainer.shardwise_config == W.config(3, True)
    with pytest.raises(UsageError, match="shardwise_config="):
        ShardwiseTrainer(model=W.tiny_model("gpt2"), args=_args(tmp_path), train_dataset=W.TokenData())


def test_integrations_package_imports_no_framework():
    code = ("import sys, shardwise.integrations; "
            "bad = [m for m in ('transformers', 'accelerate', 'lightning') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
