"""Launcher test script: rank 1 exits with code 3, rank 0 succeeds (no collectives, no hang)."""
import os
import sys

sys.exit(3 if os.environ.get("RANK") == "1" else 0)
