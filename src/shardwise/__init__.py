"""shardwise: ZeRO-sharded PyTorch training with a DeepSpeed-compatible config.

``import shardwise as deepspeed`` keeps a DeepSpeed script's calls working: ``initialize``,
``init_distributed``, ``add_config_arguments``, ``comm``, ``zero``, ``checkpointing``,
``accelerator.get_accelerator``, ``pipe`` (``PipelineModule``), ``utils`` and ``runtime`` (the
import paths scripts use).
"""
from shardwise.errors import ConfigError, ShardwiseError
from shardwise.engine import Engine
from shardwise.api import initialize
from shardwise.args import add_config_arguments
from shardwise.comm.script_api import init_distributed
from shardwise import accelerator, checkpointing, comm, ops, pipe, runtime, zero

DeepSpeedEngine = Engine  # DeepSpeed's class name, for isinstance checks in scripts

__version__ = "0.1.0"

__all__ = ["initialize", "init_distributed", "add_config_arguments", "Engine", "DeepSpeedEngine",
           "ShardwiseError", "ConfigError", "accelerator", "checkpointing", "comm", "ops", "pipe", "runtime", "zero",
           "__version__"]


def __getattr__(name: str):  # shardwise.utils is built by its own module (zero_to_fp32 and helpers)
    if name == "utils":
        import importlib

        return importlib.import_module("shardwise.utils")
    raise AttributeError(name)
