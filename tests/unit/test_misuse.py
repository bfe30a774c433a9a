"""API misuse at ``initialize`` and in the training loop: named errors that say what and how to
fix, raised before anything changes (issue 11, items 10-11). One plain process."""
from __future__ import annotations

import pytest
import torch

import shardwise
from shardwise.errors import UsageError
from model import GPT, GPTConfig

CFG = GPTConfig.preset("tiny")
X = torch.randint(0, CFG.vocab_size, (4, CFG.seq_len + 1), generator=torch.Generator().manual_seed(5))


def config(stage: int = 0) -> dict:
    return {"train_batch_size": 4, "steps_per_print": 1000, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}


def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG)


def meta_model() -> GPT:
    with torch.device("meta"):
        return GPT(CFG)


def frozen_model() -> GPT:
    return model().requires_grad_(False)


BAD_MODELS = [
    (lambda: (lambda x: x), "must be a torch.nn.Module; got function"),
    (lambda: {"weight": torch.zeros(2)}, "must be a torch.nn.Module; got dict"),
    (meta_model, "parameter 'tok_emb.weight' of the model is on the meta device"),
    (frozen_model, "no parameter given to initialize() requires grad"),
]


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("make, message", BAD_MODELS, ids=["function", "dict", "meta", "all-frozen"])
def test_models_initialize_cannot_train_are_named_errors(make, message, stage):
    with pytest.raises(UsageError) as err:
        shardwise.initialize(model=make(), config=config(stage))
    assert message in str(err.value)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_initialize_twice_on_one_model_is_named(stage):
    m = model()
    shardwise.initialize(model=m, config=config(stage))
    with pytest.raises(UsageError, match="was already passed to shardwise.initialize"):
        shardwise.initialize(model=m, config=config(stage))


def _params(engine) -> dict[str, torch.Tensor]:
    with shardwise.zero.GatheredParameters(list(engine.module.parameters())):
        return {k: v.detach().clone() for k, v in engine.module.named_parameters()}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_step_without_any_backward_is_named(stage):
    engine, *_ = shardwise.initialize(model=model(), config=config(stage))
    with pytest.raises(UsageError, match="without a backward since the previous step"):
        engine.step()
    assert engine.global_steps == 0
