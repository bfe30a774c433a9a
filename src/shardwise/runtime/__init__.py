"""DeepSpeed's ``deepspeed.runtime`` import paths that scripts use (``deepspeed.runtime.utils.
set_random_seed``, ``deepspeed.runtime.dataloader.RepeatingLoader``), so that ``import
shardwise as deepspeed`` keeps them working. The implementations live where they belong."""
from shardwise.runtime import dataloader, utils  # noqa: F401
