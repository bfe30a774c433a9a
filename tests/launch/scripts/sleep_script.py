"""Launcher test script: write "PID PARENT_PID" to OUT_DIR/pid{RANK}, then sleep (to be stopped)."""
import os
import sys
import time
from pathlib import Path

out = Path(sys.argv[1])
(out / f"pid{os.environ['RANK']}.tmp").write_text(f"{os.getpid()} {os.getppid()}")
os.replace(out / f"pid{os.environ['RANK']}.tmp", out / f"pid{os.environ['RANK']}")
time.sleep(60)
