"""The public API in one plain process (no torchrun, no process group)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import shardwise
from shardwise.errors import UsageError
from model import GPT, GPTConfig

CFG = GPTConfig.preset("tiny")


def data(n: int = 8, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (n, CFG.seq_len + 1), generator=g)


def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG)


def base(**extra) -> dict:
    return {"train_batch_size": 4, "steps_per_print": 1000, "gradient_clipping": 0.0, **extra}


def test_plain_process_returns_the_four_tuple():
    m = model()
    engine, optimizer, loader, scheduler = shardwise.initialize(
        model=m, config=base(optimizer={"type": "AdamW", "params": {"lr": 1e-3}}))
    assert isinstance(engine, shardwise.Engine) and engine.module is m
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    assert loader is None and scheduler is None
    assert engine.train_batch_size() == 4 and engine.train_micro_batch_size_per_gpu() == 4
    assert engine.gradient_accumulation_steps() == 1
    x = data(4)
    loss = engine(x[:, :-1], x[:, 1:])
    engine.backward(loss)
    assert engine.is_gradient_accumulation_boundary()
    engine.step()
    assert engine.global_steps == 1 and engine.global_samples == 4 and engine.was_step_applied()
    assert engine.get_global_grad_norm() > 0 and engine.get_lr() == [1e-3]
    report = engine.memory_report()
    assert list(report) == ["params", "grads", "master_params", "optimizer_state", "total"]
    assert all(isinstance(v, int) for v in report.values())
    n = sum(p.numel() for p in m.parameters())
    # fp32 AdamW at stage 0, one rank: 4 bytes per parameter for values and gradients, Adam's
    # two moments 8, plus one 4-byte step counter per flat bucket the optimizer sees
    buckets = len(engine.strategy.buckets)
    assert report == {"params": 4 * n, "grads": 4 * n, "master_params": 0, "optimizer_state": 8 * n + 4 * buckets,
                      "total": 16 * n + 4 * buckets}
    assert engine.eval() is engine and not m.training
    assert engine.train() is engine and m.training


def test_param_groups_and_client_optimizer_and_scheduler_match_plain_pytorch():
    """HF-style groups (no decay on biases/norms) with a user optimizer and scheduler."""
    def groups(m):
        decay = [p for n, p in m.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in m.named_parameters() if p.dim() < 2]
        return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]

    ref = model()
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2, fused=True)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
    m = model()
    opt = torch.optim.AdamW(groups(m), lr=1e-2, fused=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    engine, optimizer, _, scheduler = shardwise.initialize(model=m, optimizer=opt, lr_scheduler=sched, config=base())
    assert optimizer is opt and scheduler is sched
    for i in range(3):
        x = data(4, seed=i)
        loss_ref = ref(x[:, :-1], x[:, 1:])
        loss_ref.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ref_sched.step()
        loss = engine(x[:, :-1], x[:, 1:])
        engine.backward(loss)
        engine.step()
        assert loss.item() == loss_ref.item()
    assert engine.get_lr() == ref_sched.get_last_lr()
    for (name, a), b in zip(ref.named_parameters(), m.parameters()):
        assert torch.equal(a, b), name


def test_callables_for_optimizer_and_scheduler():
    m = model()
    engine, optimizer, _, scheduler = shardwise.initialize(
        model=m, config=base(),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1)))
    assert isinstance(optimizer, torch.optim.SGD)
    x = data(4)
    engine.backward(engine(x[:, :-1], x[:, 1:]))
    engine.step()
    assert engine.get_lr() == [0.05]


def test_config_scheduler_is_built_and_stepped():
    m = model()
    cfg = base(optimizer={"type": "Adam", "params": {"lr": 1e-3}},
               scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3,
                                                         "warmup_num_steps": 4, "warmup_type": "linear"}})
    engine, _, _, scheduler = shardwise.initialize(model=m, config=cfg)
    lrs = []
    for i in range(5):
        x = data(4, seed=i)
        engine.backward(engine(x[:, :-1], x[:, 1:]))
        engine.step()
        lrs.append(engine.get_lr()[0])
    assert lrs == sorted(lrs) and lrs[-1] == pytest.approx(1e-3)


def test_training_data_gets_a_distributed_sampler_and_micro_batches():
    ds = TensorDataset(torch.arange(20))
    _, _, loader, _ = shardwise.initialize(
        model=model(), training_data=ds,
        config=base(train_batch_size=8, gradient_accumulation_steps=2, optimizer={"type": "SGD", "params": {"lr": 0.1}}))
    assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
    assert loader.batch_size == 4
    seen = torch.cat([b[0] for b in loader])
    assert sorted(seen.tolist()) == list(range(20))


def test_misuse_is_named():
    with pytest.raises(shardwise.ConfigError, match="no optimizer"):
        shardwise.initialize(model=model(), config=base())
    with pytest.warns(UserWarning, match="the optimizer= argument is used, as in DeepSpeed"):
        engine, opt, *_ = shardwise.initialize(model=model(), config=base(optimizer={"type": "SGD", "params": {"lr": 1}}),
                                               optimizer=lambda p: torch.optim.Adam(p, lr=0.5))
    assert isinstance(opt, torch.optim.Adam) and engine.get_lr() == [0.5]  # the client's wins
    engine, *_ = shardwise.initialize(model=model(), config=base(optimizer={"type": "SGD", "params": {"lr": 1}}))
    x = data(4)
    with pytest.raises(shardwise.ShardwiseError, match="scalar"):
        engine.backward(engine(x[:, :-1]))  # logits, not a loss
    with pytest.raises(shardwise.ConfigError) as err:
        shardwise.initialize(model=model(), config={"train_batch_size": 4, "zero_optimisation": {"stage": 2},
                                                    "fp16": {"enabled": True}, "bf16": {"enabled": True}})
    text = str(err.value)
    assert "zero_optimization" in text and "fp16" in text


def test_gradient_accumulation_boundary_counts_micro_steps():
    engine, *_ = shardwise.initialize(model=model(), config=base(
        train_batch_size=8, gradient_accumulation_steps=4, optimizer={"type": "SGD", "params": {"lr": 0.1}}))
    x = data(8)
    boundaries = []
    for k in range(8):
        xb = x[2 * (k % 4): 2 * (k % 4) + 2]
        boundaries.append(engine.is_gradient_accumulation_boundary())
        engine.backward(engine(xb[:, :-1], xb[:, 1:]))
        engine.step()
    assert boundaries == [False, False, False, True] * 2
    assert engine.global_steps == 2 and engine.micro_steps == 8


def test_step_after_a_backward_that_bypassed_the_engine_is_a_named_error():
    m = model()
    engine, *_ = shardwise.initialize(model=m, config=base(optimizer={"type": "SGD", "params": {"lr": 0.1}}))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = data(4)
    engine.module(x[:, :-1], x[:, 1:]).backward()  # not through the engine's forward
    with pytest.raises(UsageError, match=r"not engine\.module\(batch\)"):
        engine.step()
    assert engine.global_steps == 0
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # nothing was applied
    engine.zero_grad()
    engine.backward(engine(x[:, :-1], x[:, 1:]))  # the right way still works afterwards
    engine.step()
    assert engine.global_steps == 1


class _SharedAcrossCheckpoint(torch.nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4)
        self.reentrant = reentrant

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self.lin, x, use_reentrant=self.reentrant)
        return self.lin(torch.tanh(h)).pow(2).mean()


@pytest.mark.parametrize("stage", [0, 2])
def test_shared_parameter_across_checkpoint(stage):
    """Non-reentrant checkpointing around a shared parameter matches plain PyTorch; the reentrant
    form (two autograd passes feed one parameter) is a named error, not a silently wrong step."""
    x = torch.randn(4, 4, requires_grad=True)
    ref = _SharedAcrossCheckpoint(False)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref(x).backward()
    ref_opt.step()
    cfg = base(optimizer={"type": "SGD", "params": {"lr": 0.1}}, zero_optimization={"stage": stage})
    m = _SharedAcrossCheckpoint(False)
    engine, *_ = shardwise.initialize(model=m, config=cfg)
    engine.backward(engine(x))
    engine.step()
    for a, b in zip(ref.parameters(), m.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    engine, *_ = shardwise.initialize(model=_SharedAcrossCheckpoint(True), config=cfg)
    with pytest.raises(shardwise.ShardwiseError, match="use_reentrant=False"):
        engine.backward(engine(x))


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_frozen_parameters_stay_put_and_the_rest_matches_pytorch(stage):
    """LoRA-style: a frozen block is neither reduced nor stepped; the rest is bitwise plain PyTorch."""
    def frozen_model():
        m = model()
        for name, p in m.named_parameters():
            if name.startswith("blocks.0."):
                p.requires_grad_(False)
        return m

    ref = frozen_model()
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, fused=True)
    m = frozen_model()
    before = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    engine, *_ = shardwise.initialize(
        model=m, model_parameters=[p for p in m.parameters() if p.requires_grad],
        config=base(optimizer={"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
                    zero_optimization={"stage": stage}))
    for i in range(3):
        x = data(4, seed=i)
        loss_ref = ref(x[:, :-1], x[:, 1:])
        loss_ref.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        engine.backward(engine(x[:, :-1], x[:, 1:]))
        engine.step()
    for (name, a), b in zip(ref.named_parameters(), m.parameters()):
        assert torch.equal(a, b), name
    for name, p in m.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]) and p.grad is None, name
