"""shardwise: ZeRO-sharded PyTorch training with a DeepSpeed-compatible config."""
from shardwise.errors import ConfigError, ShardwiseError
from shardwise.engine import Engine
from shardwise.api import initialize
from shardwise import checkpointing, zero

__version__ = "0.1.0"

__all__ = ["initialize", "Engine", "ShardwiseError", "ConfigError", "__version__"]
