"""``shardwise.integrations.lightning.ShardwiseStrategy`` against Lightning's own ``"ddp"``.

One 2-rank launch (``run_distributed``; inside it every rank builds its own ``Trainer(devices=2,
accelerator="cpu", plugins=[LightningEnvironment()])`` over the existing process group) runs
every training case in turn: DDP, stage 3, stage 2 (by its registered name), DDP and stage 3
with ``accumulate_grad_batches=2`` + ``gradient_clip_val``, a stage-3 epoch saved with
``trainer.save_checkpoint`` and resumed with ``fit(ckpt_path=...)``, and the refusals that need
running ranks. One more run goes through Lightning's own launcher (a subprocess re-running
``lightning_workers.py``, as a user's script would).

Model: a 3-layer MLP (fp32, seed 0), synthetic regression data, 56 samples, batch 4 per rank
(7 batches per rank and epoch, so accumulation 2 ends the epoch with a 1-batch window that
Lightning steps on), AdamW + a per-step StepLR that Lightning steps; SGD with momentum for the
clipping case (Adam is nearly blind to a gradient's scale).

Tolerances (fp32): losses rtol 1e-6, parameters atol 1e-6 (observed: bitwise equal without
accumulation; <= 1e-7 with accumulation + clipping, where the clip coefficient is computed from
a differently summed norm). A resumed run equals the uninterrupted one exactly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lightning", reason="the Lightning tests need lightning (pip install lightning)")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.strategies import StrategyRegistry  # noqa: E402

import lightning_workers as W  # noqa: E402
from shardwise.errors import ConfigError, UsageError  # noqa: E402
from shardwise.integrations.lightning import ShardwiseStrategy, fill_config  # noqa: E402
from shardwise.testing import run_distributed  # noqa: E402

RTOL, ATOL = 1e-6, 1e-6


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return run_distributed(W.suite, 2, str(tmp_path_factory.mktemp("lightning")), timeout_s=300)


def _same_run(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert len(a["losses"]) == len(b["losses"]) > 0
    torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(a["val_losses"]), torch.tensor(b["val_losses"]), rtol=RTOL, atol=0)
    assert a["lrs"] == b["lrs"]
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        torch.testing.assert_close(a["params"][name], b["params"][name], rtol=0, atol=ATOL, msg=name)


def test_stage3_and_stage2_match_ddp(suite):
    for rank in suite:
        assert rank["ddp"]["strategy"] == "DDPStrategy"
        assert (rank["sw3"]["strategy"], rank["sw3"]["stage"], rank["sw3"]["sharded"]) == ("ShardwiseStrategy", 3, True)
        assert (rank["sw2"]["strategy"], rank["sw2"]["stage"]) == ("ShardwiseStrategy", 2)
        assert rank["ddp"]["global_step"] == 14 and len(rank["ddp"]["val_losses"]) == 4  # 2 epochs x 2 val batches
        assert rank["ddp"]["lrs"][0] != rank["ddp"]["lrs"][-1]  # Lightning stepped the scheduler
        _same_run(rank["sw3"], rank["ddp"])
        _same_run(rank["sw2"], rank["ddp"])
    assert suite[0]["sw3"]["losses"] != suite[1]["sw3"]["losses"]  # each rank saw its own shard of the data


def test_accumulation_and_clipping_match_ddp(suite):
    for rank in suite:
        sw, ddp = rank["sw3_acc"], rank["ddp_acc"]
        assert ddp["global_step"] == 4  # windows of 2, 2, 2 and the epoch's last batch alone
        assert len(sw["losses"]) == 7
        # some steps clipped (norm above gradient_clip_val), some not: a wrong gradient scale shows
        assert min(sw["grad_norms"]) < W.CLIP / 1.2 and max(sw["grad_norms"]) > W.CLIP * 1.2
        _same_run(sw, ddp)


def test_save_and_resume_continues_exactly(suite):
    for rank in suite:
        first, resumed, whole = rank["first"], rank["resumed"], rank["sw3"]
        assert rank["ckpt_entries"] == ["checkpoint", "latest"]  # a shardwise checkpoint directory
        assert first["losses"] == whole["losses"][:7] and first["global_step"] == 7
        assert resumed["losses"] == whole["losses"][7:]  # the second epoch only, exactly
        assert resumed["lrs"] == whole["lrs"][7:]  # the LR scheduler's state came back
        assert (resumed["global_step"], resumed["epoch"]) == (14, 2)
        for name, p in whole["params"].items():
            assert torch.equal(resumed["params"][name], p), name


def test_refusals_while_running(suite):
    got = suite[0]["refusals"]
    assert got == suite[1]["refusals"]  # every rank raises alike (nobody left in a collective)
    assert got["validate"][0] == "UsageError" and "Trainer.validate()" in got["validate"][1]
    assert got["manual"][0] == "UsageError" and "manual optimization" in got["manual"][1]
    kind, text = got["accumulation_conflict"]
    assert kind == "ConfigError" and "gradient_accumulation_steps" in text and "accumulate_grad_batches=2" in text
    assert got["plain_ckpt"][0] == "CheckpointError" and "not a shardwise checkpoint directory" in got["plain_ckpt"][1]


def test_lightning_launcher_runs_the_readme_example(suite, tmp_path):
    """``Trainer(strategy="shardwise_stage_3", devices=2, accelerator="cpu")`` in a script: Lightning
    starts rank 1 itself and makes the process group; the default ModelCheckpoint saves a
    shardwise checkpoint directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                              "MASTER_PORT", "NODE_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run([sys.executable, W.__file__, str(tmp_path)], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in (0, 1):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert (got["stage"], got["world"], got["step"]) == (3, 2, 7)
        assert got["losses"] == suite[r]["first"]["losses"]  # the same run as under run_distributed
    ckpt = tmp_path / "checkpoints" / "epoch=0-step=7.ckpt"
    assert got["best"] == str(ckpt)
    assert sorted(os.listdir(ckpt)) == ["checkpoint", "latest"]
    assert (ckpt / "checkpoint" / "manifest.json").is_file()


# -- in this process: registration, construction, the config the Trainer fills ---------------------


def test_registered_names_resolve():
    for name, stage in (("shardwise", None), ("shardwise_stage_1", 1), ("shardwise_stage_2", 2),
                        ("shardwise_stage_3", 3)):
        assert name in StrategyRegistry.available_strategies()
        trainer = pl.Trainer(strategy=name, devices=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        assert isinstance(trainer.strategy, ShardwiseStrategy) and trainer.strategy.stage == stage
        assert trainer.precision == "32-true"


def test_bad_config_key_is_a_config_error():
    with pytest.raises(ConfigError, match=r"zero_optimization\.stag.*did you mean 'stage'"):
        ShardwiseStrategy(stage=3, config={"zero_optimization": {"stag": 3}})
    with pytest.raises(ConfigError, match="gradient_clipingg"):
        ShardwiseStrategy(gradient_clipingg=1.0)
    with pytest.raises(ConfigError, match="ZeRO stage must be"):
        ShardwiseStrategy(stage=4)


def test_foreign_strategy_arguments_are_refused():
    with pytest.raises(UsageError, match="DeepSpeedStrategy.*zero_optimization.offload_optimizer"):
        ShardwiseStrategy(stage=3, offload_optimizer=True)
    with pytest.raises(UsageError, match="FSDPStrategy"):
        ShardwiseStrategy(sharding_strategy="FULL_SHARD")
    with pytest.raises(UsageError, match="find_unused_parameters"):
        ShardwiseStrategy(find_unused_parameters=True)


@pytest.mark.parametrize("precision", ["64-true", "bf16-true", "16-true"])
def test_unsupported_precision_is_refused(precision):
    with pytest.raises(UsageError, match=f"precision={precision!r}"):
        pl.Trainer(strategy="shardwise_stage_2", devices=2, accelerator="cpu", precision=precision, logger=False)


def _fill(base=None, **kw):
    args = dict(stage=3, precision="32-true", accumulate=2, clip_val=None, micro_batch=4, world_size=2)
    return fill_config(base or {}, **{**args, **kw})


def test_fill_config_from_the_trainer():
    cfg = _fill({"train_micro_batch_size_per_gpu": "auto", "fp16": {"enabled": "auto"}})
    assert cfg["zero_optimization"]["stage"] == 3
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (4, 2, 16)
    assert cfg["gradient_clipping"] == 0.0  # Lightning's default: no clipping (shardwise's own default is 1.0)
    assert cfg["fp16"]["enabled"] is False and "bf16" not in cfg
    assert _fill(clip_val=0.5)["gradient_clipping"] == 0.5
    assert _fill({"gradient_clipping": 2.0})["gradient_clipping"] == 2.0
    assert _fill(precision="bf16-mixed")["bf16"] == {"enabled": True}
    assert _fill(precision="16-mixed")["fp16"] == {"enabled": True}
    assert _fill({"zero_optimization": {"stage": 1}}, stage=None)["zero_optimization"]["stage"] == 1
    assert _fill(stage=None)["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("base, kw, where", [
    ({"gradient_accumulation_steps": 4}, {}, "gradient_accumulation_steps"),
    ({"train_micro_batch_size_per_gpu": 8}, {}, "train_micro_batch_size_per_gpu"),
    ({"train_batch_size": 32}, {}, "train_batch_size"),
    ({"gradient_clipping": 1.0}, {"clip_val": 0.5}, "gradient_clipping"),
    ({"bf16": {"enabled": True}}, {}, "bf16.enabled"),
    ({"fp16": {"enabled": True}}, {"precision": "bf16-mixed"}, "fp16.enabled"),
    ({"bf16": {"enabled": False}}, {"precision": "bf16-mixed"}, "bf16.enabled"),
    ({"zero_optimization": {"stage": 2}}, {}, "zero_optimization.stage"),
])
def test_fill_config_refuses_conflicts(base, kw, where):
    with pytest.raises(ConfigError, match=rf"{where}: the config"):
        _fill(base, **kw)
