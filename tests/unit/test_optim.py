"""Unit tests for shardwise.optim: DeepSpeed-named optimizers and lr schedules."""
from __future__ import annotations

import math

import pytest
import torch

from shardwise.config.plan import OptimizerPlan, SchedulerPlan
from shardwise.errors import ConfigError
from shardwise.optim import (LRRangeTest, OneCycle, WarmupCosineLR, WarmupDecayLR, WarmupLR,
                             build_optimizer, build_scheduler, check_optimizer_spec,
                             check_scheduler_spec)


def opt_plan(type_: str, **params) -> OptimizerPlan:
    return OptimizerPlan(type_, tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                             for k, v in params.items())))


def sched_plan(type_: str, **params) -> SchedulerPlan:
    return SchedulerPlan(type_, tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                             for k, v in params.items())))


def sgd(lr: float = 0.1, groups: int = 1) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(2))]}
                            for _ in range(groups)], lr=lr)


def adam(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=lr, betas=(0.9, 0.999))


def lr_after(sched, optimizer, k: int) -> float:
    """The lr in effect for optimizer step k (after k scheduler steps)."""
    for _ in range(k):
        optimizer.step()
        sched.step()
    return optimizer.param_groups[0]["lr"]


def lrs(sched, optimizer, n: int) -> list[float]:
    out = [optimizer.param_groups[0]["lr"]]
    for _ in range(n):
        optimizer.step()
        sched.step()
        out.append(optimizer.param_groups[0]["lr"])
    return out


# --- WarmupLR / WarmupDecayLR ----------------------------------------------------------

LO, HI, W = 0.01, 0.1, 10


def warm(i: int, kind: str) -> float:
    """DeepSpeed's warmup progress at batch index i (i = k - 1 after k steps)."""
    return math.log(i + 1) / math.log(W) if kind == "log" else i / W


@pytest.mark.parametrize("kind", ["log", "linear"])
def test_warmup_lr_curve(kind):
    opt = sgd()
    s = WarmupLR(opt, warmup_min_lr=LO, warmup_max_lr=HI, warmup_num_steps=W, warmup_type=kind)
    seq = lrs(s, opt, 30)
    assert seq[0] == pytest.approx(LO)  # step 0: DeepSpeed's construction value
    assert seq[1] == pytest.approx(LO)  # index 0: log(1) = 0, 0 / W = 0
    for k in (2, 5, 9, 10):  # mid-warmup through the last warmup index
        assert seq[k] == pytest.approx(LO + (HI - LO) * warm(k - 1, kind))
    assert seq[11] == pytest.approx(HI) and seq[30] == pytest.approx(HI)
    assert s.get_last_lr() == [pytest.approx(HI)]


def test_warmup_lr_defaults_to_optimizer_lr():
    opt = sgd(lr=0.5)
    s = WarmupLR(opt, warmup_num_steps=4, warmup_type="linear")
    assert lrs(s, opt, 6) == pytest.approx([0, 0, 0.125, 0.25, 0.375, 0.5, 0.5])


@pytest.mark.parametrize("kind", ["log", "linear"])
def test_warmup_decay_lr_curve(kind):
    total = 30
    opt = sgd()
    s = WarmupDecayLR(opt, total_num_steps=total, warmup_min_lr=LO, warmup_max_lr=HI,
                      warmup_num_steps=W, warmup_type=kind)
    seq = lrs(s, opt, 45)

    def decay(i):
        return max(0.0, (total - i) / (total - W))

    assert seq[0] == pytest.approx(LO)
    assert seq[5] == pytest.approx(LO + (HI - LO) * warm(4, kind))
    assert seq[11] == pytest.approx(HI)  # index W: decay starts at 1
    assert seq[21] == pytest.approx(LO + (HI - LO) * decay(20))  # half way: 0.5
    assert seq[31] == pytest.approx(LO)  # index total: decayed to the min
    assert seq[45] == pytest.approx(LO)


def test_warmup_decay_lr_default_max_is_deepspeeds():
    opt = sgd(lr=0.5)
    s = build_scheduler(sched_plan("WarmupDecayLR", total_num_steps=10, warmup_num_steps=2,
                                   warmup_type="linear"), opt)
    assert lr_after(s, opt, 3) == pytest.approx(0.001)


# --- WarmupCosineLR ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["log", "linear"])
def test_warmup_cosine_lr_curve(kind):
    total, base, wmin, cmin = 30, 0.2, 0.1, 0.01
    opt = sgd(lr=base)
    s = build_scheduler(sched_plan("WarmupCosineLR", total_num_steps=total,
                                   warmup_min_ratio=wmin, warmup_num_steps=W,
                                   cos_min_ratio=cmin, warmup_type=kind), opt)
    seq = lrs(s, opt, 40)

    def cos(i):
        p = min(1.0, (i - W + 1) / (total - W))
        return cmin + (1 - cmin) * 0.5 * (1 + math.cos(math.pi * p))

    assert seq[0] == 0.0  # DeepSpeed's ratio before the first step() is 0
    assert seq[1] == pytest.approx(base * wmin)
    for k in (4, 10):
        assert seq[k] == pytest.approx(base * (wmin + warm(k - 1, kind) * (1 - wmin)))
    for k in (11, 20, 25):
        assert seq[k] == pytest.approx(base * cos(k - 1))
    assert seq[30] == pytest.approx(base * cmin)  # index total - 1: end of the cosine
    assert seq[40] == pytest.approx(base * cmin)  # held, not oscillating back up
    assert isinstance(s, WarmupCosineLR) and s.ratio_at(-1) == 0.0


# --- OneCycle / LRRangeTest --------------------------------------------------------------


def test_one_cycle_lr_and_momentum():
    opt = adam()
    s = OneCycle(opt, cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=4,
                 cycle_second_step_size=6, decay_lr_rate=0.5, decay_step_size=2,
                 cycle_min_mom=0.8, cycle_max_mom=0.9, decay_mom_rate=0.1)
    seq, moms = [], []
    for _ in range(16):
        seq.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["betas"])
        opt.step()
        s.step()
    # step 0: DeepSpeed's construction values (lr min, beta1 = cycle_min_mom)
    assert seq[0] == pytest.approx(0.01) and moms[0][0] == pytest.approx(0.8)
    assert seq[2] == pytest.approx(0.01 + 0.09 * 2 / 4)  # index 1, batch 2 of 4 up
    assert seq[4] == pytest.approx(0.1) and moms[4][0] == pytest.approx(0.8)  # peak
    assert seq[7] == pytest.approx(0.01 + 0.09 * 3 / 6)  # 3 of 6 down
    assert moms[7][0] == pytest.approx(0.9 - 0.1 * 3 / 6)
    assert seq[10] == pytest.approx(0.01) and moms[10][0] == pytest.approx(0.9)  # cycle end
    for k in (11, 14):  # decay: d = k - 10 steps after the cycle
        assert seq[k] == pytest.approx(0.01 / (1 + 0.5 * (k - 10) / 2))
        assert moms[k][0] == pytest.approx(0.9 * (1 + 0.1 * (k - 10) / 2))
    assert all(b[1] == 0.999 for b in moms)  # beta2 untouched


def test_one_cycle_stairs():
    opt = sgd()
    with pytest.warns(UserWarning, match="no 'betas'"):  # SGD: no momentum cycling, as in DS
        s = OneCycle(opt, cycle_min_lr=0.0, cycle_max_lr=1.0, cycle_first_step_size=6,
                     cycle_first_stair_count=3)
    seq = lrs(s, opt, 12)
    assert seq == pytest.approx([0, 0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1, 2 / 3, 2 / 3, 1 / 3, 1 / 3,
                                 0, 0])


def test_lr_range_test():
    opt = sgd()
    s = LRRangeTest(opt, lr_range_test_min_lr=0.01, lr_range_test_step_size=4,
                    lr_range_test_step_rate=2.0, lr_range_test_staircase=True)
    assert lrs(s, opt, 5) == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.03, 0.03])


# --- state_dict round trip ---------------------------------------------------------------

SCHEDULES = [
    ("WarmupLR", dict(warmup_min_lr=0.0, warmup_max_lr=0.1, warmup_num_steps=8)),
    ("WarmupDecayLR", dict(total_num_steps=20, warmup_max_lr=0.1, warmup_num_steps=8)),
    ("WarmupCosineLR", dict(total_num_steps=20, warmup_num_steps=8, warmup_min_ratio=0.1)),
    ("OneCycle", dict(cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=5,
                      decay_step_size=2, decay_lr_rate=0.3, decay_mom_rate=0.1)),
    ("LRRangeTest", dict(lr_range_test_step_size=3)),
    ("CosineAnnealingLR", dict(T_max=12)),
]


def trace(sched, optimizer, n: int) -> list[float]:
    """lr, beta1, lr, beta1, ... in effect for the next n + 1 optimizer steps."""
    group = optimizer.param_groups[0]
    out = [group["lr"], group["betas"][0]]
    for _ in range(n):
        optimizer.step()
        sched.step()
        out += [group["lr"], group["betas"][0]]
    return out


@pytest.mark.parametrize("name,params", SCHEDULES, ids=[n for n, _ in SCHEDULES])
def test_state_dict_round_trip_resumes_curve(name, params):
    plan = sched_plan(name, **params)
    opt = adam()
    full = trace(build_scheduler(plan, opt), opt, 25)

    opt = adam()
    s = build_scheduler(plan, opt)
    head = trace(s, opt, 9)
    saved_opt, saved_sched = opt.state_dict(), s.state_dict()

    opt2 = adam()
    s2 = build_scheduler(plan, opt2)  # before load_state_dict, as torch recommends
    opt2.load_state_dict(saved_opt)
    s2.load_state_dict(saved_sched)
    assert s2.get_last_lr() == pytest.approx([head[-2]])
    tail = trace(s2, opt2, 16)
    assert head + tail[2:] == pytest.approx(full)


def test_scheduler_per_group_lists():
    opt = sgd(groups=2)
    s = build_scheduler(sched_plan("WarmupLR", warmup_min_lr=[0.0, 0.1], warmup_max_lr=[1.0, 2.0],
                                   warmup_num_steps=2, warmup_type="linear"), opt)
    lr_after(s, opt, 3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.0, 2.0])
    with pytest.raises(ConfigError, match="param groups"):
        build_scheduler(sched_plan("WarmupLR", warmup_min_lr=[0.0, 0.1, 0.2]), sgd(groups=2))


# --- scheduler validation ----------------------------------------------------------------


def test_check_scheduler_spec():
    assert check_scheduler_spec("WarmupLR", {"warmup_num_steps": 10}) == []
    assert "did you mean 'WarmupCosineLR'?" in check_scheduler_spec("WarmupCosine", {})[0]
    (msg,) = check_scheduler_spec("WarmupLR", {"warmup_num_step": 10})
    assert "warmup_num_step" in msg and "did you mean 'warmup_num_steps'?" in msg
    (msg,) = check_scheduler_spec("WarmupDecayLR", {})
    assert "total_num_steps" in msg and "missing" in msg
    assert check_scheduler_spec("WarmupLR", {"warmup_type": "cosine"})
    assert check_scheduler_spec("WarmupLR", {"warmup_num_steps": 0})
    assert check_scheduler_spec("OneCycle", {"cycle_min_lr": 0.1})  # cycle_max_lr missing
    assert check_scheduler_spec("StepLR", {"step_size": 3, "gamma": 0.5}) == []
    assert "did you mean 'gamma'?" in check_scheduler_spec("StepLR", {"step_size": 3,
                                                                      "gama": 0.5})[0]
    assert "callable" in check_scheduler_spec("LambdaLR", {})[0]


def test_build_scheduler_errors_match_check():
    bad = {"warmup_num_step": 10}
    with pytest.raises(ConfigError) as info:
        build_scheduler(sched_plan("WarmupLR", **bad), sgd())
    assert [f"{p.message} ({p.hint})" if p.hint else p.message
            for p in info.value.problems] == check_scheduler_spec("WarmupLR", bad)


def test_torch_scheduler_by_name():
    opt = sgd(lr=1.0)
    s = build_scheduler(sched_plan("StepLR", step_size=2, gamma=0.5), opt)
    assert isinstance(s, torch.optim.lr_scheduler.StepLR)
    assert lrs(s, opt, 4) == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25])


# --- optimizers --------------------------------------------------------------------------


def train(make_opt, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = make_opt(model.parameters())
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


HP = dict(lr=0.01, betas=[0.8, 0.95], eps=1e-6, weight_decay=0.1)
TORCH_HP = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)


@pytest.mark.parametrize("type_,extra,reference", [
    ("Adam", {}, torch.optim.AdamW),  # adam_w_mode defaults to True
    ("Adam", {"adam_w_mode": True}, torch.optim.AdamW),
    ("Adam", {"adam_w_mode": False}, torch.optim.Adam),
    ("adam", {"adam_w_mode": False, "torch_adam": True}, torch.optim.Adam),
    ("AdamW", {}, torch.optim.AdamW),
    ("AdamW", {"adam_w_mode": False}, torch.optim.AdamW),  # the name forces AdamW, as in DS
])
def test_deepspeed_adam_matches_torch(type_, extra, reference):
    plan = opt_plan(type_, **HP, **extra)
    built = train(lambda ps: build_optimizer(plan, ps))
    expected = train(lambda ps: reference(ps, **TORCH_HP, foreach=False))
    for a, b in zip(built, expected):
        torch.testing.assert_close(a, b)
    assert type(build_optimizer(plan, [torch.nn.Parameter(torch.zeros(1))])) is reference


def test_adam_weight_decay_default_is_fusedadams():
    p = [torch.nn.Parameter(torch.zeros(1))]
    assert build_optimizer(opt_plan("Adam"), p).defaults["weight_decay"] == 0.0
    # with torch_adam DeepSpeed hands the params to torch.optim.AdamW unchanged
    assert build_optimizer(opt_plan("Adam", torch_adam=True), p).defaults["weight_decay"] == 0.01


@pytest.mark.parametrize("type_", ["AdamW", "Adam", "SGD", "Adagrad"])
def test_fused_kernel_on_cpu(type_):
    opt = build_optimizer(opt_plan(type_, lr=0.01), torch.nn.Linear(3, 2).parameters())
    assert opt.defaults["fused"] is True


def test_falls_back_when_fused_is_unavailable(monkeypatch):
    from shardwise.optim import optimizers

    monkeypatch.setattr(optimizers, "_fused_works", lambda cls, device, dtype: False)
    opt = build_optimizer(opt_plan("AdamW"), torch.nn.Linear(3, 2).parameters())
    assert not opt.defaults["fused"]  # torch's default on CPU (foreach on CUDA)
    built = optimizers._kernel_choice(torch.optim.AdamW, [torch.zeros(1)], {})
    assert built == {}


def test_fused_kwarg_missing_in_older_torch(monkeypatch):
    class OldSGD(torch.optim.SGD):  # stands in for a torch whose SGD has no ``fused``
        def __init__(self, params, lr=1e-3, momentum=0.0):
            super().__init__(params, lr=lr, momentum=momentum)

    from shardwise.optim import optimizers

    monkeypatch.setattr(optimizers, "_FUSABLE", optimizers._FUSABLE + (OldSGD,))
    monkeypatch.setattr(optimizers, "_fused_works", lambda cls, device, dtype: True)
    monkeypatch.setattr(optimizers, "_resolve", lambda type_: ("torch", OldSGD))
    opt = build_optimizer(opt_plan("SGD", lr=0.1), torch.nn.Linear(3, 2).parameters())
    assert isinstance(opt, OldSGD)


def test_user_kernel_choice_is_respected():
    opt = build_optimizer(opt_plan("AdamW", foreach=True), torch.nn.Linear(3, 2).parameters())
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]


def test_param_groups_and_generators():
    model = torch.nn.Linear(3, 2)
    groups = [{"params": (p for p in [model.weight]), "weight_decay": 0.1},
              {"params": model.bias, "weight_decay": 0.0}]
    opt = build_optimizer(opt_plan("AdamW", lr=0.01), groups)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_torch_optimizer_by_name():
    opt = build_optimizer(opt_plan("RMSprop", lr=0.01, momentum=0.9),
                          torch.nn.Linear(3, 2).parameters())
    assert isinstance(opt, torch.optim.RMSprop) and opt.defaults["momentum"] == 0.9
    opt = build_optimizer(opt_plan("sgd", lr=0.1, momentum=0.9, nesterov=True),
                          torch.nn.Linear(3, 2).parameters())
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] is True


def test_unknown_type_did_you_mean():
    (msg,) = check_optimizer_spec("AdamX", {})
    assert "unknown optimizer type 'AdamX'" in msg and "did you mean 'Adam" in msg
    assert "did you mean 'RMSprop'?" in check_optimizer_spec("rmsprop", {})[0]
    with pytest.raises(ConfigError, match="did you mean 'RMSprop'"):
        build_optimizer(opt_plan("RMSProp"), [torch.nn.Parameter(torch.zeros(1))])


@pytest.mark.parametrize("type_", ["lion", "MuAdam", "MuAdamW", "MuSGD", "CPUAdam", "Muon"])
def test_deepspeed_only_optimizers_not_implemented(type_):
    (msg,) = check_optimizer_spec(type_, {"lr": 0.1})
    assert "not implemented" in msg and "AdamW" in msg
    with pytest.raises(ConfigError, match="not implemented"):
        build_optimizer(opt_plan(type_, lr=0.1), [torch.nn.Parameter(torch.zeros(1))])


# --- Lamb and the 1-bit optimizers ([Note: DeepSpeed Lamb and 1-bit optimizers]) -------------


def test_lamb_params_checked_like_fused_lamb():
    msgs = check_optimizer_spec("Lamb", {"max_grad_norm": 1.0, "amsgrad": True, "max_cof": 1.0, "lr": "x"})
    text = "\n".join(msgs)
    assert len(msgs) == 4, msgs
    assert "gradient_clipping" in text and "amsgrad is not part of LAMB" in text
    assert "did you mean 'max_coeff'?" in text and "'lr' must be a number" in text
    assert check_optimizer_spec("Lamb", {"max_grad_norm": 0.0}) == []


def test_lamb_builds_when_the_engine_binds(monkeypatch):
    from shardwise.optim import optimizers
    from shardwise.optim.lamb import Lamb

    monkeypatch.setattr(optimizers, "LAMB_IN_ENGINE", True)
    assert check_optimizer_spec("Lamb", {"lr": 1e-3, "betas": [0.9, 0.99], "max_grad_norm": 0}) == []
    opt = build_optimizer(opt_plan("Lamb", lr=1e-3, betas=[0.9, 0.99], max_coeff=0.3, bias_correction=False),
                          [torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, Lamb)
    g = opt.param_groups[0]
    assert (g["betas"], g["max_coeff"], g["min_coeff"], g["bias_correction"]) == ((0.9, 0.99), 0.3, 0.01, False)
    # OneBitLamb's alternative becomes Lamb
    assert 'use "type": "Lamb"' in check_optimizer_spec("OneBitLamb", {"lr": 1e-3})[0]


@pytest.mark.parametrize("type_, instead", [("OneBitAdam", "Adam"), ("onebitadam", "Adam"),
                                            ("ZeroOneAdam", "Adam"), ("OneBitLamb", "Lamb")])
def test_one_bit_optimizers_refused_with_the_uncompressed_alternative(type_, instead):
    params = {"lr": 1e-4, "weight_decay": 0.01, "freeze_step": 400, "cuda_aware": False,
              "comm_backend_name": "nccl", "var_freeze_step": 100}
    (msg,) = check_optimizer_spec(type_, params)
    assert "is not supported: it compresses the gradient all-reduce to 1 bit" in msg
    assert "error feedback" in msg and "plain all-reduce / reduce-scatter" in msg
    assert f'use "type": "{instead}" with the same hyper-parameters, minus the 1-bit-only ones' in msg
    assert "same convergence without the bandwidth saving" in msg
    with pytest.raises(ConfigError) as info:
        build_optimizer(opt_plan(type_, **params), [torch.nn.Parameter(torch.zeros(1))])
    assert info.value.problems[0].path == "optimizer.type"


def test_one_bit_refusal_through_the_config_loader():
    from shardwise.config import load_config

    doc = {"train_micro_batch_size_per_gpu": 1,
           "optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-4, "freeze_step": 10}}}
    with pytest.raises(ConfigError) as info:
        load_config(doc, 1)
    (problem,) = info.value.problems
    assert problem.path == "optimizer.type" and "OneBitAdam" in str(info.value)
    doc["optimizer"] = {"type": "Lamb", "params": {"lr": 1e-3}}
    assert load_config(doc, 1).optimizer.type == "Lamb"  # the engine binds bucket layouts for it


def test_adafactor_refused_on_flat_buckets():
    (msg,) = check_optimizer_spec("Adafactor", {})
    assert "torch.optim.Adafactor is not supported" in msg and "flat 1-D buckets" in msg


def test_optimizer_param_problems():
    assert check_optimizer_spec("Adam", dict(HP, adam_w_mode=False, torch_adam=True)) == []
    msgs = check_optimizer_spec("Adam", {"betaz": [0.9, 0.99], "lr": "fast",
                                         "max_grad_norm": 1.0, "bias_correction": False,
                                         "adam_w_mode": "yes"})
    text = "\n".join(msgs)
    assert len(msgs) == 5
    assert "did you mean 'betas'?" in text and "gradient_clipping" in text
    assert "'lr' must be a number" in text and "bias_correction" in text
    assert "'adam_w_mode' must be true or false" in text
    assert "must be a list of 2" in check_optimizer_spec("AdamW", {"betas": [0.9]})[0]
    assert "closure" in check_optimizer_spec("LBFGS", {})[0]
    assert check_optimizer_spec("SGD", {"lr": 0.1, "momentum": 0.9}) == []


def test_build_optimizer_errors():
    p = [torch.nn.Parameter(torch.zeros(1))]
    bad = {"betaz": [0.9, 0.99]}
    with pytest.raises(ConfigError) as info:
        build_optimizer(opt_plan("AdamW", **bad), p)
    assert [f"{q.message} ({q.hint})" if q.hint else q.message
            for q in info.value.problems] == check_optimizer_spec("AdamW", bad)
    with pytest.raises(ConfigError, match="'lr' must be greater than or equal to 0"):
        build_optimizer(opt_plan("AdamW", lr=-1.0), p)  # refused before torch sees it
    with pytest.raises(ConfigError, match="rejected"):  # torch's own check: beta2 < 1
        build_optimizer(opt_plan("AdamW", betas=[0.9, 1.0]), p)


# --- refusals of DeepSpeed features outside the optimizer (schema_keys Section.why) ---------

SECTION_REFUSALS = [
    ({"autotuning": {"enabled": True, "fast": True}}, "autotuning.enabled",
     ["DeepSpeed's autotuner launches trial runs", "`shardwise plan CONFIG --model FILE:FACTORY --world-size N "
      "--fit 80GB`", "`shardwise estimate`", 'README "Planning"'], "remove it or set it to false"),
    ({"compression_training": {"weight_quantization": {"shared_parameters": {"enabled": True}}}},
     "compression_training", ["DeepSpeed's compression library rewrites the model's layers",
                              "torch.ao.quantization (prepare_qat)", "torch.nn.utils.prune"], "remove it"),
]


def test_section_refusal_texts_are_catalogued():
    from shardwise.config import schema_keys as K

    assert "shardwise plan" in K.TOP_LEVEL["autotuning"][0].why
    assert "torch.ao.quantization" in K.TOP_LEVEL["compression_training"][0].why


@pytest.mark.parametrize("extra, path, words, fix", SECTION_REFUSALS, ids=[r[1] for r in SECTION_REFUSALS])
def test_section_refusals_name_the_alternative(extra, path, words, fix):
    from shardwise.config import load_config

    with pytest.raises(ConfigError) as info:
        load_config({"train_micro_batch_size_per_gpu": 1, **extra}, 1)
    (problem,) = info.value.problems
    assert problem.path == path
    for w in words:
        assert w in problem.message, problem.message
    assert problem.message.endswith(fix)
