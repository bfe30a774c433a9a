"""All communication goes through this package (see architecture principle 6)."""
from shardwise.comm.context import CommPolicy, GroupContext, ParallelContext, init_context, pick_device
from shardwise.comm.collectives import (Handle, all_gather_shard, all_reduce, all_reduce_scalar, reduce_to_shard,
                                        require_all_ranks)

__all__ = [
    "CommPolicy",
    "GroupContext",
    "ParallelContext",
    "init_context",
    "pick_device",
    "Handle",
    "all_gather_shard",
    "all_reduce",
    "all_reduce_scalar",
    "reduce_to_shard",
    "require_all_ranks",
]
