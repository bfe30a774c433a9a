from shardwise.precision.loss_scaler import DynamicLossScaler, LossScaler, NoLossScaler, StaticLossScaler, make_loss_scaler
from shardwise.precision.policy import compute_dtype, map_tensors, prepare_inputs

__all__ = [
    "DynamicLossScaler",
    "LossScaler",
    "NoLossScaler",
    "StaticLossScaler",
    "make_loss_scaler",
    "compute_dtype",
    "map_tensors",
    "prepare_inputs",
]
