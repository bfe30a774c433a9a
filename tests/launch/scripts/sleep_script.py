"""Launcher test script: write "PID PARENT_PID" to OUT_DIR/pid{RANK}, then sleep (to be stopped)."""
import os
import sys
import time
from pathlib import Path

out = Path([a for a in sys.argv[1:] if not a.startswith("--local_rank=")][0])
(out / f"pid{os.environ['RANK']}.tmp").write_text(f"{os.getpid()} {os.getppid()}")
os.replace(out / f"pid{os.environ['RANK']}.tmp", out / f"pid{os.environ['RANK']}")
time.sleep(60)
