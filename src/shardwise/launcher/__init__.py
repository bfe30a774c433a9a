"""``shardwise run``: start a training script on every rank through torchrun."""
from shardwise.launcher.run import (
    LaunchError,
    RunArgs,
    build_torchrun_command,
    launch,
    split_run_args,
)

__all__ = ["LaunchError", "RunArgs", "build_torchrun_command", "launch", "split_run_args"]
