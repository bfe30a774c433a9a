"""The ``shardwise`` console entry: ``shardwise <command> [args]``.

Each command is a handler taking its own raw argument list and returning an exit code, so a
command like ``run`` can pass arguments through untouched. Add a command to ``COMMANDS``.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from shardwise.errors import ShardwiseError


class Command(NamedTuple):
    summary: str
    handler: Callable[[list[str]], int]


def _run(argv: list[str]) -> int:
    from shardwise.launcher.run import launch

    return launch(argv)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shardwise")
    except PackageNotFoundError:
        return "unknown"


def env_report() -> dict[str, str]:
    """What ``shardwise env`` prints: the facts that decide how a run is set up here."""
    import platform

    import torch
    import torch.distributed as dist

    from shardwise.comm.context import pick_device

    cuda = torch.cuda.is_available()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    report = {
        "shardwise": _version(),
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": torch.__version__,
        "cuda available": str(cuda),
    }
    if cuda:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        report["cuda"] = f"{torch.version.cuda}; {len(names)} device(s): {', '.join(names)}"
    report |= {
        "distributed": str(dist.is_available()),
        "backend": pick_device(0)[1],  # the one place initialize() chooses it
        "gloo / nccl built": f"{dist.is_available() and dist.is_gloo_available()} / "
        f"{dist.is_available() and dist.is_nccl_available()}",
        "cpu count": f"{os.cpu_count()} ({usable} usable by this process)",
        "torch threads": str(torch.get_num_threads()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
    }
    return report


def _env(argv: list[str]) -> int:
    argparse.ArgumentParser(
        prog="shardwise env", description=COMMANDS["env"].summary
    ).parse_args(argv)
    report = env_report()
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _checkpoint(argv: list[str]) -> int:
    from shardwise.checkpoint.cli import main as checkpoint_main

    return checkpoint_main(argv)


def _estimate(argv: list[str]) -> int:
    from shardwise.estimate import main as estimate_main

    return estimate_main(argv)


def _plan(argv: list[str]) -> int:
    from shardwise.planner import main as plan_main

    return plan_main(argv)


COMMANDS: dict[str, Command] = {
    "run": Command("run a training script on every rank (through torchrun)", _run),
    "env": Command("show python, torch, CUDA, the backend that would be used and CPUs", _env),
    "checkpoint": Command("checkpoint info (verify) / export (Hugging Face safetensors)", _checkpoint),
    "estimate": Command("per-rank memory of ZeRO stages 0-3 (device, host, disk per offload choice; "
                        "--tp/--pp: on a 3-D mesh)", _estimate),
    "plan": Command("dry-run a config + model at N ranks: bytes per rank, units, comm, fits; --fit: "
                    "cheapest stage + offload; --tp/--pp: per dimension on a 3-D mesh", _plan),
    "report": Command("a PNG of a monitored run's curves and a Markdown summary (RUN_DIR: its log dir)",
                      lambda argv: __import__("shardwise.monitor.report", fromlist=["main"]).main(argv)),
    "zero_to_fp32": Command("the whole fp32 model of a checkpoint as safetensors (DeepSpeed's zero_to_fp32.py)",
                            lambda argv: __import__("shardwise.utils.zero_to_fp32", fromlist=["main"]).main(argv)),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardwise",
        description="ZeRO-sharded PyTorch training with a DeepSpeed-compatible config.",
        epilog="commands:\n"
        + "\n".join(f"  {name:<10} {cmd.summary}" for name, cmd in COMMANDS.items())
        + "\n\n`shardwise COMMAND --help` shows a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"shardwise {_version()}")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        try:  # prints help / version, or the usage error naming the commands
            _parser().parse_args(argv[:1])
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 2
        return 2
    name, rest = argv[0], argv[1:]
    try:
        return COMMANDS[name].handler(rest)
    except ShardwiseError as exc:
        print(f"shardwise {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
