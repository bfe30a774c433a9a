import pytest

from shardwise.config import plan_for
from shardwise.errors import LossScaleError, NonFiniteError
from shardwise.precision import DynamicLossScaler, NoLossScaler, StaticLossScaler, make_loss_scaler


def precision(**fp16):
    """The resolved precision plan of a config with these fp16 keys (``enabled`` defaults on)."""
    return plan_for({"fp16": {"enabled": True, **fp16}}).precision


def loss_scale(**fp16):
    return precision(**fp16).loss_scale


def test_factory():
    assert isinstance(make_loss_scaler(plan_for({}).precision), NoLossScaler)
    assert isinstance(make_loss_scaler(plan_for({"bf16": {"enabled": True}}).precision), NoLossScaler)
    assert isinstance(make_loss_scaler(precision()), DynamicLossScaler)
    assert isinstance(make_loss_scaler(precision(loss_scale=128)), StaticLossScaler)


def test_hysteresis_then_halving_then_growth():
    s = DynamicLossScaler(loss_scale(initial_scale_power=4, hysteresis=2, loss_scale_window=3))
    assert s.scale == 16
    assert s.update(False, 0) is False and s.scale == 16  # hysteresis absorbs the first
    assert s.update(False, 1) is False and s.scale == 8  # then it halves
    assert s.update(False, 2) is False and s.scale == 4  # hysteresis not refilled yet
    for i in range(2):
        assert s.update(True, 3 + i) and s.scale == 4
    assert s.update(True, 5) and s.scale == 8  # window of 3 good steps: doubles


def test_error_at_min_scale():
    s = DynamicLossScaler(loss_scale(initial_scale_power=1, hysteresis=1, min_loss_scale=1))
    assert s.update(False, 0) is False and s.scale == 1
    with pytest.raises(LossScaleError, match="min_loss_scale"):
        s.update(False, 1)


def test_nonfinite_without_fp16_is_named_error():
    with pytest.raises(NonFiniteError, match="step 7"):
        NoLossScaler().update(False, 7)


def test_state_round_trip():
    """Every field survives (scale, hysteresis left, good steps): the loaded scaler then grows
    and backs off exactly when the original does."""
    plan = loss_scale(initial_scale_power=5, hysteresis=3, loss_scale_window=4)
    a = DynamicLossScaler(plan)
    for i, finite in enumerate([False, True, True, True]):  # hysteresis 2 left, 3 good steps
        a.update(finite, i)
    state = a.state_dict()
    assert state == {"scale": 32.0, "hysteresis_left": 2, "good_steps": 3}
    b = DynamicLossScaler(plan)
    b.load_state_dict(state)
    assert b.state_dict() == state
    assert b.update(True, 4) and b.scale == 64.0  # the 4th good step completes the window
    c = DynamicLossScaler(plan)
    c.load_state_dict(state)
    c.update(False, 4)
    assert c.update(False, 5) is False and c.scale == 16.0  # hysteresis_left=2 was kept
