"""Activation checkpointing in one process: the config's automatic wrapping and DeepSpeed's
``checkpointing.checkpoint`` train exactly as without checkpointing (fp32, bitwise), and the
activations really are dropped and recomputed."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import shardwise
import shardwise.checkpointing as ckpt
from shardwise.errors import ConfigError, UsageError
from model import GPT, GPTConfig

CFG = GPTConfig.preset("tiny")
STEPS = 3


def batches(n: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, CFG.vocab_size, (4, CFG.seq_len + 1), generator=g) for _ in range(n)]


def config(stage: int, **ac) -> dict:
    out = {"train_batch_size": 4, "steps_per_print": 1000, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": stage}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    if ac:
        out["activation_checkpointing"] = ac
    return out


class Counter:
    """Calls of each block's attention (its hooks run at the forward and again when the block
    is recomputed; the block's own hooks run once per call) and bytes autograd saves during
    the forward passes."""

    def __init__(self, model: nn.Module):
        self.calls = 0
        self.saved = 0
        for block in model.blocks:
            block.attn.register_forward_pre_hook(self._call)

    def _call(self, *_):
        self.calls += 1

    def pack(self, t: torch.Tensor):
        self.saved += t.numel() * t.element_size()
        return t


def train(stage: int, **ac) -> tuple[list[float], dict[str, torch.Tensor], Counter]:
    torch.manual_seed(0)
    model = GPT(CFG)
    counter = Counter(model)
    engine, *_ = shardwise.initialize(model=model, config=config(stage, **ac))
    losses = []
    for x in batches():
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            loss = engine(x[:, :-1], x[:, 1:])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    with shardwise.zero.GatheredParameters(list(model.parameters())):
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return losses, params, counter


@pytest.fixture(scope="module")
def plain():
    return {stage: train(stage) for stage in (0, 3)}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("ac", [{"modules": "blocks"}, {"modules": ["Block"], "cpu_checkpointing": True},
                                {"modules": "blocks", "every": 2}], ids=["blocks", "by-class+cpu", "every-2"])
def test_config_checkpointing_trains_bitwise_like_none(stage, ac, plain):
    want_losses, want_params, base = plain[3 if stage == 3 else 0]
    losses, params, counter = train(stage, **ac)
    assert losses == want_losses
    for k, v in want_params.items():
        assert torch.equal(params[k], v), k
    wrapped = CFG.n_layer // ac.get("every", 1)
    # each wrapped block runs twice per step (forward, then recomputed in backward) and keeps
    # only its input instead of its intermediate activations
    assert counter.calls == STEPS * (CFG.n_layer + wrapped)
    if stage < 3:  # stage 3's own saved-tensor hooks take the saved tensors there
        assert counter.saved < base.saved


def test_wrapping_keeps_names_and_refuses_twice():
    torch.manual_seed(0)
    model = GPT(CFG)
    names = [n for n, _ in model.named_parameters()]
    policy = shardwise.config.load_config(config(0, modules="blocks"), world_size=1).activation_checkpointing
    ckpt.apply_activation_checkpointing(model, policy)
    assert [n for n, _ in model.named_parameters()] == names
    assert all("forward" in b.__dict__ for b in model.blocks) and "forward" not in model.__dict__
    with pytest.raises(UsageError, match="already has an instance-level forward"):
        ckpt.apply_activation_checkpointing(model, policy)


def test_unknown_class_and_no_blocks_are_named():
    with pytest.raises(UsageError, match="do not occur in GPT"):
        shardwise.initialize(model=GPT(CFG), config=config(0, modules=["Blok"]))
    with pytest.raises(UsageError, match="selects no module of Linear"):
        shardwise.initialize(model=nn.Linear(2, 2), config=config(0, modules="blocks"))


@pytest.mark.parametrize("ac, path", [({"partition_activations": "yes"}, "partition_activations"),
                                      ({"modules": "all"}, "modules"), ({"every": 0}, "every"),
                                      ({"module": "blocks"}, "module")])
def test_config_problems(ac, path):
    with pytest.raises(ConfigError, match=f"activation_checkpointing.{path}"):
        shardwise.config.load_config(config(0, **ac), world_size=1)


def test_tuning_keys_are_accepted_with_a_warning():
    with pytest.warns(UserWarning, match="contiguous_memory_optimization has no effect"):
        plan = shardwise.config.load_config(config(0, contiguous_memory_optimization=True, number_checkpoints=4),
                                            world_size=1)
    assert plan.activation_checkpointing.modules is None


class DeepSpeedStyleGPT(GPT):
    """Model code written for ``deepspeed.checkpointing.checkpoint`` (import changed)."""

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.shape[1])
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = ckpt.checkpoint(block, x)
        logits = self.head(self.ln_f(x))
        return nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


@pytest.mark.parametrize("cpu", [False, True])
def test_deepspeed_checkpoint_call_shape(cpu, plain):
    ckpt.configure(None, checkpoint_in_cpu=cpu, contiguous_checkpointing=False, num_checkpoints=CFG.n_layer)
    assert ckpt.is_configured()
    try:
        torch.manual_seed(0)
        model = DeepSpeedStyleGPT(CFG)
        counter = Counter(model)
        engine, *_ = shardwise.initialize(model=model, config=config(0))
        losses = []
        for x in batches():
            loss = engine(x[:, :-1], x[:, 1:])
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        assert losses == plain[0][0]
        assert counter.calls == 2 * STEPS * CFG.n_layer
    finally:
        ckpt.configure(None, checkpoint_in_cpu=False)


def test_cpu_checkpointing_never_moves_parameters():
    weight = nn.Parameter(torch.randn(3, 3))
    seen = []

    def region(x, w):
        seen.append(w)
        return (x @ w).sum()

    out = ckpt.checkpoint(region, torch.randn(2, 3, requires_grad=True), weight, cpu_checkpointing=True)
    out.backward()
    assert all(w is weight for w in seen) and len(seen) == 2 and weight.grad is not None


def test_partitioning_without_tensor_parallelism_has_no_effect(caplog):
    """DeepSpeed's rule: without model parallelism there is nothing to partition over; the key is
    accepted (a warning) and checkpoints keep their inputs whole (tp 2: test_stage3_tp.py)."""
    plan = shardwise.config.load_config(config(0, partition_activations=True, modules="blocks"), world_size=1)
    assert plan.activation_checkpointing.partition_activations is True
    model = GPT(CFG)
    with caplog.at_level("WARNING", logger="shardwise"):
        ckpt.apply_activation_checkpointing(model, plan.activation_checkpointing, None)
    assert "partition_activations has no effect without tensor parallelism" in caplog.text
    made = []
    orig = ckpt._Partitioned.__init__
    try:
        ckpt._Partitioned.__init__ = lambda self, *a, **k: (made.append(1), orig(self, *a, **k))[1]
        x = torch.randint(0, CFG.vocab_size, (2, 8))
        model(x[:, :-1], x[:, 1:]).backward()
    finally:
        ckpt._Partitioned.__init__ = orig
        ckpt._SETTINGS.partition_activations = False
    assert made == []
    with pytest.raises(UsageError, match="mpu_"):
        ckpt.configure(object(), partition_activations=True)
