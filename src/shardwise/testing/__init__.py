"""Helpers for testing shardwise and code built on it."""
from shardwise.testing.distributed import RankFailedError, run_distributed

__all__ = ["RankFailedError", "run_distributed"]
