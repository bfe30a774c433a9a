"""faults.md rows 11, 14, 19 and the fault-handling config keys, in process (no launcher)."""
from __future__ import annotations

import pytest
import torch

import shardwise
from shardwise.comm.collectives import require_all_ranks
from shardwise.comm.context import init_context, resolve_timeout
from shardwise.config import load_config
from shardwise.errors import ConfigError, DistributedSetupError, NonFiniteError
from shardwise.launcher.run import failure_summary
from shardwise.testing import RankFailedError, run_distributed

BASE = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "steps_per_print": 1000}


# --- config keys -----------------------------------------------------------------------------


def test_fault_keys_resolve():
    plan = load_config({**BASE, "comms_timeout": 30, "nonfinite": "skip",
                        "checkpoint": {"dir": "ck", "auto_resume": True, "save_interval": 5}}, 1)
    assert plan.comms_timeout_s == 30.0 and plan.precision.nonfinite == "skip"
    assert (plan.checkpoint.dir, plan.checkpoint.auto_resume, plan.checkpoint.save_interval) == ("ck", True, 5)
    default = load_config(BASE, 1)
    assert default.comms_timeout_s is None and default.precision.nonfinite == "error"


def test_fault_keys_problems_all_reported():
    with pytest.raises(ConfigError) as err:
        load_config({**BASE, "comms_timeout": -1, "nonfinite": "ignore", "checkpoint": {"auto_resume": True}}, 1)
    text = str(err.value)
    assert "comms_timeout" in text and "nonfinite" in text and "'error' or 'skip'" in text
    with pytest.raises(ConfigError, match="checkpoint.auto_resume: needs checkpoint.dir"):
        load_config({**BASE, "checkpoint": {"auto_resume": True}}, 1)


def test_timeout_env_overrides_config():
    assert resolve_timeout(None, {}) is None
    assert resolve_timeout(30.0, {}) == 30.0
    assert resolve_timeout(30.0, {"SHARDWISE_TIMEOUT": "7.5"}) == 7.5
    for bad in ("0", "-3", "soon", "inf"):
        with pytest.raises(DistributedSetupError, match="SHARDWISE_TIMEOUT"):
            resolve_timeout(30.0, {"SHARDWISE_TIMEOUT": bad})


# --- non-finite values -----------------------------------------------------------------------


def _engine(cfg_extra: dict, stage: int = 0):
    torch.manual_seed(0)
    from model import GPT, GPTConfig

    model = GPT(GPTConfig.preset("tiny"))
    cfg = {**BASE, "zero_optimization": {"stage": stage, "reduce_bucket_size": 6000},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3,
                                                        "warmup_num_steps": 10}}, **cfg_extra}
    engine, *_ = shardwise.initialize(model=model, config=cfg)
    return engine, model


def _snapshot(engine, model):
    opt = [{k: v.clone() for k, v in engine.optimizer.state[b.opt_param].items()} for b in engine.strategy.buckets]
    return ({k: v.clone() for k, v in model.state_dict().items()}, opt,
            [b.opt_param.detach().clone() for b in engine.strategy.buckets],
            engine.lr_scheduler.state_dict(), engine.get_lr())


def _same(a, b) -> bool:
    params_a, opt_a, master_a, sched_a, lr_a = a
    params_b, opt_b, master_b, sched_b, lr_b = b
    return (all(torch.equal(params_a[k], params_b[k]) for k in params_a)
            and all(torch.equal(x[k], y[k]) for x, y in zip(opt_a, opt_b) for k in x)
            and all(torch.equal(x, y) for x, y in zip(master_a, master_b))
            and sched_a == sched_b and lr_a == lr_b)


def _train(engine, steps: int, nan_at: int | None = None, rank: int = 0, nan_rank: int = 0):
    g = torch.Generator().manual_seed(3 + rank)
    for step in range(steps):
        x = torch.randint(0, 64, (2, 17), generator=g)
        loss = engine(x[:, :-1], x[:, 1:])
        if step == nan_at and rank == nan_rank:
            loss = loss + float("nan")  # finite gradients, NaN loss
        engine.backward(loss)
        engine.step()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_nonfinite_skip_leaves_state_bitwise_unchanged(dtype):
    engine, model = _engine({"nonfinite": "skip", "bf16": {"enabled": dtype == "bf16"}}, stage=1)
    _train(engine, 2)
    before = _snapshot(engine, model)
    _train(engine, 1, nan_at=0)
    assert _same(before, _snapshot(engine, model))
    assert engine.skipped_steps == 1 and engine.global_steps == 3 and not engine.was_step_applied()
    _train(engine, 1)
    assert engine.was_step_applied() and not _same(before, _snapshot(engine, model))


def test_nan_loss_default_is_named_error_before_the_step():
    engine, model = _engine({})
    _train(engine, 1)
    before = _snapshot(engine, model)
    with pytest.raises(NonFiniteError, match=r"optimizer step 1 .*The loss was NaN/inf on rank\(s\) \[0\]"):
        _train(engine, 1, nan_at=0)
    assert _same(before, _snapshot(engine, model))


def _skip_two_ranks(stage: int):
    import torch.distributed as dist

    engine, model = _engine({"nonfinite": "skip"}, stage=stage)
    rank = dist.get_rank()
    _train(engine, 2, rank=rank)
    before = _snapshot(engine, model)
    _train(engine, 1, nan_at=0, rank=rank, nan_rank=1)
    unchanged = _same(before, _snapshot(engine, model))
    return unchanged, engine.skipped_steps, engine.global_steps


def test_nan_loss_on_one_rank_skips_on_every_rank():
    for unchanged, skipped, steps in run_distributed(_skip_two_ranks, 2, 2, timeout_s=120):
        assert unchanged and skipped == 1 and steps == 3


# --- API misuse ---------------------------------------------------------------------------------


def _only_rank0_calls():
    import torch.distributed as dist

    ctx = init_context()
    if dist.get_rank() == 0:
        require_all_ranks(ctx.world, "engine.some_collective_api", timeout_s=2)
    else:
        import time

        time.sleep(4)
    return True


def test_collective_api_on_one_rank_is_named():
    with pytest.raises(RankFailedError) as err:
        run_distributed(_only_rank0_calls, 2, timeout_s=60)
    text = str(err.value)
    assert "UsageError: engine.some_collective_api must be called on every rank: rank(s) [1] did not call it" in text


# --- launcher summary -------------------------------------------------------------------------


def test_failure_summary_names_first_failure():
    tail = """[rank1]: ValueError: boom at step 3
Root Cause (first observed failure):
[0]:
  time      : 2026-01-01_00:00:00
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 4242)
  error_file: <N/A>
"""
    assert failure_summary(tail) == "shardwise run: rank 1 failed first, pid 4242: exit code 1: ValueError: boom at step 3"
    killed = tail.replace("exitcode  : 1 (pid: 4242)", "exitcode  : -9 (pid: 4242)  (SIGKILL)")
    assert "killed by SIGKILL (exit code -9)" in failure_summary(killed)
    assert failure_summary("no report here") is None


def test_a_peer_that_exited_is_named_as_exited_not_as_a_timeout():
    """gloo's monitored barrier fails at once when a peer is gone; the message must say that
    (with the real elapsed time), not that the 30 s limit ran out."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_scripts", "peer_exit.py")
    proc = subprocess.run([sys.executable, "-c", "from shardwise.cli import main; raise SystemExit(main())", "run",
                           "--nproc-per-node", "2", "--no-local-rank", script], capture_output=True, text=True,
                          timeout=120)
    line = next((ln for ln in (proc.stdout + proc.stderr).splitlines() if "RESULT after" in ln), None)
    assert line is not None, proc.stderr[-3000:]
    assert "exited" in line and "within 30 s" not in line, line
    assert float(line.split("RESULT after ")[1].split("s:")[0]) < 10, line
