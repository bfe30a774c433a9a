"""benchmarks/gpu_check.sh and gpu_report.py on CPU: the report script's dry run (tiny sizes, gloo,
the same code paths as on a GPU) writes a JSON + Markdown report of the agreed shape, its
parts pass, a report of the wrong shape is caught, the time guard skips what does not fit, and
the shell scripts parse. The GPU run itself: `bash benchmarks/gpu_check.sh` on a lent GPU."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_report_format as fmt  # noqa: E402

# the launcher part starts torchrun in a child (~10 s on CPU); tests/launch covers `shardwise run`
DRY_PARTS = "parity,collectives,checkpoint_rng,throughput,offload"


def _run(out: Path, *extra: str, timeout: float = 150) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), "--cpu-dry-run",
                        "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=timeout)
    rep = json.loads((out / "gpu_report.json").read_text()) if (out / "gpu_report.json").exists() else {}
    return p, rep


@pytest.fixture(scope="module")
def dry_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_report")
    p, rep = _run(out, "--parts", DRY_PARTS)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, rep, p.stdout


def test_dry_run_writes_a_valid_report_and_every_part_passes(dry_report):
    out, rep, stdout = dry_report
    assert fmt.validate(rep) == []
    assert rep["env"]["mode"] == "cpu-dry-run" and rep["env"]["backend"] == "gloo"
    assert rep["env"]["torch_pin"] and rep["env"]["torch_matches_pin"] in (True, False)
    assert {k: v["status"] for k, v in rep["parts"].items()} == dict.fromkeys(DRY_PARTS.split(","), "pass")
    assert "[gpu_report" in stdout and "part throughput" in stdout  # progress lines
    assert set(rep["budget_s"]) == set(fmt.PARTS) and sum(rep["budget_s"].values()) <= 450


def test_parity_rows_cover_stages_0_to_3_in_fp32_and_bf16(dry_report):
    rows = dry_report[1]["parts"]["parity"]["rows"]
    assert sorted((r["precision"], r["stage"]) for r in rows) == sorted(
        (p, s) for p in ("fp32", "bf16") for s in range(4))
    for r in rows:  # on CPU at world size 1 shardwise matches plain PyTorch exactly, and plain PyTorch itself
        assert r["pass"] and r["loss_max_rel_diff"] == 0.0 and r["param_max_abs_diff"] == 0.0, r
        assert r["reference_noise"] == {"loss_max_rel_diff": 0.0, "param_max_abs_diff": 0.0}
        assert (r["rtol"], r["atol"]) == ((1e-5, 1e-4) if r["precision"] == "fp32" else (2e-2, 2e-2))


def test_throughput_memory_and_offload_rows(dry_report):
    parts = dry_report[1]["parts"]
    rows = {r["system"]: r for r in parts["throughput"]["rows"]}
    assert set(rows) == {"plain", "fsdp2", "zero0", "zero1", "zero2", "zero3"}
    assert parts["throughput"]["errors"] == {}
    for name, r in rows.items():
        assert r["tokens_per_s"] > 0 and r["timed_steps"] >= 1
        assert r["mfu"] is None and r["peak_memory_bytes"] is None  # no peak FLOP/s, no device memory on CPU
        if name.startswith("zero"):
            assert r["estimate_bytes"] > r["estimate_states_bytes"] > 0 and r["memory_report_bytes"]
            assert r["states_match_estimate"] is True, r  # the estimator is exact for the states
    off = parts["offload"]
    assert off["tokens_per_s"] > 0 and set(off["split_ms"]) == {"forward", "backward", "step"}
    assert all(v > 0 for v in off["split_ms"].values())
    assert off["zero2_on_device_tokens_per_s"] == rows["zero2"]["tokens_per_s"]
    assert parts["collectives"]["checks"]["policy_reduce_scatter"] is True
    assert parts["checkpoint_rng"]["checks"]["same_draw_after_load"] is True


def test_markdown_report_has_every_section(dry_report):
    out, rep, _ = dry_report
    md = (out / "gpu_report.md").read_text()
    assert md == fmt.markdown(rep)
    for head in ("# shardwise GPU report (cpu-dry-run)", "## Parity against plain PyTorch", "## collectives",
                 "## checkpoint_rng", "## Throughput and memory", "## CPU offload"):
        assert head in md
    assert "plain vs itself" in md and "| zero3 |" in md and "| fsdp2 |" in md and "| launcher | skipped |" in md


def test_validate_catches_a_report_of_the_wrong_shape(dry_report):
    rep = dry_report[1]
    for mutate, words in ((lambda r: r.update(schema="x/0"), "schema"),
                          (lambda r: r["parts"]["parity"].pop("rows"), "parity: no 'rows'"),
                          (lambda r: r["parts"]["offload"].update(status="ok"), "offload: status 'ok'"),
                          (lambda r: r["parts"]["throughput"]["rows"][2].pop("estimate_bytes"), "no estimate"),
                          (lambda r: r["parts"]["collectives"].update(status="error"), "without an error"),
                          (lambda r: r["env"].pop("torch_pin"), "torch_pin")):
        bad = copy.deepcopy(rep)
        mutate(bad)
        assert any(words in p for p in fmt.validate(bad)), (words, fmt.validate(bad))


def test_global_time_guard_skips_parts_and_still_writes_the_report(tmp_path):
    p, rep = _run(tmp_path, "--budget-s", "0", "--parts", "collectives,offload", timeout=60)
    assert p.returncode == 1
    assert fmt.validate(rep) == []
    assert {k: (v["status"], v["error"]) for k, v in rep["parts"].items()} == {
        "collectives": ("skipped", "global time guard"), "offload": ("skipped", "global time guard")}
    assert (tmp_path / "gpu_report.md").exists()


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh"])
def test_shell_scripts_parse(script):
    bash = shutil.which("bash")
    assert bash, "bash is needed for benchmarks/*.sh"
    p = subprocess.run([bash, "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True, timeout=10)
    assert p.returncode == 0, p.stderr
