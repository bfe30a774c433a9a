"""``FusedAdam`` and ``DeepSpeedCPUAdam`` with DeepSpeed's arguments, over ``torch.optim.Adam``
(``fused=True`` where torch has the fused kernel for the device; ``adam_w_mode`` selects
decoupled weight decay, i.e. AdamW)."""
from __future__ import annotations

from typing import Any

import torch

from shardwise.errors import UsageError


def _adam_kwargs(lr, bias_correction, betas, eps, adam_w_mode, weight_decay, amsgrad, who: str) -> dict[str, Any]:
    if not bias_correction:
        raise UsageError(f"{who}(bias_correction=False) is not available: torch's Adam always corrects the "
                         "moment bias; drop the argument")
    return {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "amsgrad": amsgrad,
            "decoupled_weight_decay": bool(adam_w_mode)}


class FusedAdam(torch.optim.Adam):
    """DeepSpeed's ``FusedAdam(params, lr, bias_correction, betas, eps, adam_w_mode,
    weight_decay, amsgrad, set_grad_none)``."""

    def __init__(self, params, lr: float = 1e-3, bias_correction: bool = True, betas=(0.9, 0.999),
                 eps: float = 1e-8, adam_w_mode: bool = True, weight_decay: float = 0.0, amsgrad: bool = False,
                 set_grad_none: bool = True):
        super().__init__(params, **_adam_kwargs(lr, bias_correction, betas, eps, adam_w_mode, weight_decay,
                                                amsgrad, "FusedAdam"))


class DeepSpeedCPUAdam(torch.optim.Adam):
    """DeepSpeed's ``DeepSpeedCPUAdam(model_params, lr, bias_correction, betas, eps,
    weight_decay, amsgrad, adamw_mode, fp32_optimizer_states)``: with offload, shardwise steps
    the optimizer on the host tier itself ([Note: offload tiers]); this is torch's Adam."""

    def __init__(self, model_params, lr: float = 1e-3, bias_correction: bool = True, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, adamw_mode: bool = True,
                 fp32_optimizer_states: bool = True):
        super().__init__(model_params, **_adam_kwargs(lr, bias_correction, betas, eps, adamw_mode, weight_decay,
                                                      amsgrad, "DeepSpeedCPUAdam"))


__all__ = ["FusedAdam", "DeepSpeedCPUAdam"]
