"""Checkpoints: atomic save on every rank, verified load at any world size / ZeRO stage / mesh (dp, tp, pp),
streaming consolidation and Hugging Face export. See manifest.py for the format."""
from shardwise.checkpoint.load import load_checkpoint
from shardwise.checkpoint.manifest import FORMAT_VERSION, SUPPORTED_VERSIONS, committed_tags, read_latest
from shardwise.checkpoint.save import require_one_replica, save_checkpoint
from shardwise.checkpoint.export import consolidate, export_hf, info, iter_consolidated, read_client_state

__all__ = ["save_checkpoint", "load_checkpoint", "consolidate", "iter_consolidated", "export_hf", "info",
           "read_client_state", "committed_tags", "read_latest", "FORMAT_VERSION", "SUPPORTED_VERSIONS", "require_one_replica"]
