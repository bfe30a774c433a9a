"""The bundled example runs end to end through the real launcher (what `make demo` runs)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _check_memory_table(out: str, stage: int, world: int) -> None:
    """The printed per-rank model state is the configured stage's (fp32 AdamW): parameters
    4Ψ (sharded at stage 3), gradients 4Ψ (sharded from stage 2), Adam's moments 8Ψ
    (sharded from stage 1), in MiB to two decimals."""
    from model import GPT, GPTConfig

    psi = sum(p.numel() for p in GPT(GPTConfig.preset("tiny")).parameters())
    lines = out[out.index("model state per rank (MiB):"):].splitlines()
    header = lines[1].split()[1:]
    want = {"params": 4 / (world if stage == 3 else 1), "grads": 4 / (world if stage >= 2 else 1),
            "master_params": 0, "optimizer_state": 8 / (world if stage >= 1 else 1)}
    for row in lines[2:2 + world]:
        got = dict(zip(header, map(float, row.split()[1:])))
        for key, bytes_per_param in want.items():
            assert abs(got[key] - bytes_per_param * psi / 2**20) < 0.01, (stage, key, got)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_example_trains_on_two_ranks(stage, tmp_path):
    metrics = tmp_path / "metrics.csv"
    cmd = [sys.executable, "-c", "from shardwise.cli import main; raise SystemExit(main())",
           "run", "--nproc-per-node", "2", os.path.join(ROOT, "examples", "gpt", "train.py"),
           "--config", os.path.join(ROOT, "examples", "gpt", f"ds_zero{stage}.json"),
           "--preset", "tiny", "--steps", "6", "--log-every", "2", "--metrics-csv", str(metrics)]
    # a scratch working directory: ds_zero2.json's monitors write under ./runs (make demo's too)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    _check_memory_table(out, stage, world=2)
    rows = list(csv.DictReader(open(metrics)))
    assert len(rows) >= 3
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])  # it learns
