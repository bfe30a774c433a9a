"""Rank 1 exits (cleanly, no collective) while rank 0 waits in a call that must be made on every
rank; rank 0 prints what it was told and how long it took."""
import os
import sys
import time

from shardwise.comm.collectives import require_all_ranks
from shardwise.comm.context import init_context

ctx = init_context(timeout_s=20)
if ctx.world.rank == 1:
    os._exit(0)
time.sleep(0.5)
start = time.monotonic()
try:
    require_all_ranks(ctx.world, "save_checkpoint", 30.0)
except Exception as exc:  # noqa: BLE001 - the test reads the message
    print(f"RESULT after {time.monotonic() - start:.2f}s: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    sys.exit(3)
