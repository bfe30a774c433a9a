"""``deepspeed.runtime.dataloader`` names scripts use."""
from shardwise.data import RepeatingLoader  # noqa: F401

__all__ = ["RepeatingLoader"]
