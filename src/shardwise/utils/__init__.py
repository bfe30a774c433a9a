"""Helpers under DeepSpeed's names (``deepspeed.utils.X`` becomes ``shardwise.utils.X``):
:mod:`shardwise.utils.zero_to_fp32`, ``RepeatingLoader``, ``set_z3_leaf_modules`` and
``logger`` (shardwise's log)."""
import logging

from shardwise.data import RepeatingLoader
from shardwise.zero.units import set_z3_leaf_modules
from shardwise.utils import zero_to_fp32  # noqa: E402,F401  (DeepSpeed scripts reach it as an attribute)

logger = logging.getLogger("shardwise")

__all__ = ["RepeatingLoader", "set_z3_leaf_modules", "logger"]
