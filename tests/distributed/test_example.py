"""The bundled example runs end to end through the real launcher (what `make demo` runs)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_example_trains_on_two_ranks(stage, tmp_path):
    metrics = tmp_path / "metrics.csv"
    cmd = [sys.executable, "-c", "from shardwise.cli import main; raise SystemExit(main())",
           "run", "--nproc-per-node", "2", os.path.join(ROOT, "examples", "gpt", "train.py"),
           "--config", os.path.join(ROOT, "examples", "gpt", f"ds_zero{stage}.json"),
           "--preset", "tiny", "--steps", "6", "--log-every", "2", "--metrics-csv", str(metrics)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "model state per rank" in out
    rows = list(csv.DictReader(open(metrics)))
    assert len(rows) >= 3
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])  # it learns
