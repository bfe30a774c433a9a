"""``deepspeed.runtime.utils`` names scripts call."""
from shardwise.seed import set_random_seed  # noqa: F401

__all__ = ["set_random_seed"]
