"""``add_config_arguments``: DeepSpeed's command-line flags for scripts (``--deepspeed``,
``--deepspeed_config``); ``initialize(args=...)`` reads ``args.deepspeed_config``."""
from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add DeepSpeed's flags to ``parser`` and return it: ``--deepspeed`` (a switch scripts
    test), ``--deepspeed_config PATH`` (the JSON config ``initialize(args=args)`` loads), and
    the old ``--deepscale`` / ``--deepscale_config`` spellings."""
    group = parser.add_argument_group("shardwise", "DeepSpeed-compatible configuration")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="enable shardwise (the script decides what this switches)")
    group.add_argument("--deepspeed_config", default=None, type=str,
                       help="DeepSpeed-style JSON config for shardwise.initialize(args=...)")
    group.add_argument("--deepscale", default=False, action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--deepscale_config", default=None, type=str, help=argparse.SUPPRESS)
    return parser
