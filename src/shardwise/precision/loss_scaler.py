"""Loss scaling: what multiplies the loss before backward, and what a non-finite step means.

[Note: agreed overflow]
``update(finite)`` is called with a value every rank agrees on (the all-reduced squared
gradient norm is finite or not), so every rank skips, or steps, together.
"""
from __future__ import annotations

import logging
import math

from shardwise.config.plan import LossScalePlan, PrecisionPlan
from shardwise.errors import LossScaleError, NonFiniteError

log = logging.getLogger("shardwise")


class LossScaler:
    """Interface. ``scale`` multiplies the loss; ``update(finite, step)`` says whether to step."""

    scale: float = 1.0

    def update(self, finite: bool, step: int) -> bool:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NoLossScaler(LossScaler):
    """fp32 / bf16: nothing to scale. A non-finite loss or gradient norm (agreed on by every
    rank) is an error on every rank (``nonfinite: "error"``), or skips the step on every rank
    (``nonfinite: "skip"``), leaving parameters, optimizer state and scheduler untouched."""

    def __init__(self, nonfinite: str = "error"):
        self.nonfinite = nonfinite

    def update(self, finite: bool, step: int) -> bool:
        if finite:
            return True
        if self.nonfinite == "skip":
            log.warning("non-finite loss or gradient norm at optimizer step %d: step skipped on "
                        "every rank (nonfinite: skip)", step)
            return False
        raise NonFiniteError(
            f"the loss or gradient norm is NaN or inf at optimizer step {step} (agreed on by all "
            "ranks); the optimizer step was not taken. Lower the learning rate, enable "
            'gradient_clipping, check the data of this step, or set "nonfinite": "skip" to skip '
            "such steps."
        )


class StaticLossScaler(LossScaler):
    """fp16 with a fixed ``loss_scale``: overflowing steps are skipped, the scale never moves."""

    def __init__(self, scale: float):
        self.scale = float(scale)

    def update(self, finite: bool, step: int) -> bool:
        if not finite:
            log.warning("fp16 overflow at step %d with static loss scale %g: step skipped", step, self.scale)
        return finite


class DynamicLossScaler(LossScaler):
    """fp16 dynamic scaling with DeepSpeed's meaning of the knobs.

    - starts at ``2 ** initial_scale_power``;
    - an overflow consumes one unit of hysteresis; once none is left, the scale halves
      (never below ``min_loss_scale``);
    - after ``loss_scale_window`` steps without overflow the scale doubles and hysteresis
      refills (``consecutive_hysteresis`` refills it after every good step instead);
    - an overflow while already at ``min_loss_scale`` with no hysteresis left is a
      :class:`LossScaleError`: training cannot make progress.
    """

    FACTOR = 2.0

    def __init__(self, plan: LossScalePlan):
        self.plan = plan
        self.scale = float(2 ** plan.initial_scale_power)
        self.hysteresis_left = plan.hysteresis
        self.good_steps = 0  # consecutive non-overflow steps since the last overflow or growth

    def update(self, finite: bool, step: int) -> bool:
        p = self.plan
        if finite:
            self.good_steps += 1
            if p.consecutive_hysteresis:
                self.hysteresis_left = p.hysteresis
            if self.good_steps % p.loss_scale_window == 0:
                self.hysteresis_left = p.hysteresis
                self.scale *= self.FACTOR
            return True
        self.good_steps = 0
        if self.hysteresis_left > 1:
            self.hysteresis_left -= 1
            log.warning("fp16 overflow at step %d: step skipped, loss scale stays %g (hysteresis %d left)",
                        step, self.scale, self.hysteresis_left)
            return False
        if self.scale <= p.min_loss_scale:
            raise LossScaleError(
                f"fp16 gradients overflow at step {step} with the loss scale already at "
                f"min_loss_scale={p.min_loss_scale:g}: training cannot make progress. Use bf16, "
                "lower the learning rate, or check the model for values that overflow fp16."
            )
        old = self.scale
        self.scale = max(self.scale / self.FACTOR, p.min_loss_scale)
        log.warning("fp16 overflow at step %d: step skipped, loss scale %g -> %g", step, old, self.scale)
        return False

    def state_dict(self) -> dict:
        return {"scale": self.scale, "hysteresis_left": self.hysteresis_left, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.hysteresis_left = int(state["hysteresis_left"])
        self.good_steps = int(state["good_steps"])


def make_loss_scaler(plan: PrecisionPlan) -> LossScaler:
    if plan.compute != "fp16":
        return NoLossScaler(plan.nonfinite)
    ls = plan.loss_scale
    if ls is None:  # resolve.py always sets it for fp16
        raise ValueError("an fp16 PrecisionPlan needs its loss_scale (build plans with shardwise.config.load_config)")
    if ls.static_scale > 0:
        return StaticLossScaler(ls.static_scale)
    return DynamicLossScaler(ls)


def is_finite(x: float) -> bool:
    return math.isfinite(x)
