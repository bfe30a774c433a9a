"""Launcher test script: rank 1 raises, before or after joining the gloo group; rank 0 waits.

usage: raising_script.py [--local_rank N] MODE   (strict argparse, as DeepSpeed example scripts)
MODE: before (ValueError before init_process_group) | after (KeyError after it) |
custom (an exception class defined here, not named ...Error, after init).
"""
import argparse
import os
import time

import torch.distributed as dist


class Boom(Exception):
    pass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("mode", choices=["before", "after", "custom"])
    args = p.parse_args()
    assert args.local_rank == int(os.environ["LOCAL_RANK"]), (args.local_rank, os.environ["LOCAL_RANK"])
    rank = int(os.environ["RANK"])
    if args.mode == "before" and rank == 1:
        raise ValueError("rank 1 failed before init_process_group")
    dist.init_process_group("gloo")
    if rank == 1:
        if args.mode == "after":
            raise KeyError("missing after init")
        if args.mode == "custom":
            raise Boom("multi-line\nmessage")
    time.sleep(30)  # rank 0: stopped by torchrun once rank 1 failed


if __name__ == "__main__":
    main()
