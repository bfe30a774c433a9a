"""benchmarks/compare.py end to end on the 1M GPT: every row trains the same problem as DDP and
holds the model state its formula says. DeepSpeed rows run where ``deepspeed`` is installed
(not in CI: see benchmarks/README.md)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import compare  # noqa: E402
import peers  # noqa: E402

DS = ["ds0", "ds1", "ds2", "ds3"] if peers.HAVE_DEEPSPEED else []


def test_compare_rows_train_the_same_problem(tmp_path):
    systems = ["ddp", "zero1", "zero3", "plain"] + DS
    out = compare.main(["--model", "1m", "--steps", "2", "--warmup", "1", "--busy-retries", "0",
                        "--systems", *systems, "--out", str(tmp_path / "r.json")])
    rows = {r["system"]: r for r in out["models"]["1m"]["rows"]}
    assert sorted(rows) == sorted(systems)
    # nothing failed; DeepSpeed's ops were prepared before anything timed; the guard came from the pace
    assert out["measured"] and out["failures"] == [], out["failures"]
    assert all(r["status"] == "ok" for r in rows.values())
    if DS:
        assert out["deepspeed_prepare"]["ok"]
    res = out["models"]["1m"]
    assert all(c["ok"] and c["step_s"] > 0 for c in res["calibration"].values())
    assert res["hang_guard_s"] > res["predicted_s"] > 0
    ddp = rows["ddp"]["losses"]
    # it trained: the first loss is the untrained model's on that batch; the later ones are not
    untrained = _untrained_losses(len(ddp))
    assert len(ddp) == 3 and ddp[0] == pytest.approx(untrained[0], rel=1e-5)
    # (fp noise between the two is ~1e-7 relative; one AdamW step moves it by ~3e-4)
    assert all(abs(a - b) > 3e-5 * abs(b) for a, b in zip(ddp[1:], untrained[1:])), (ddp, untrained)
    for name, r in rows.items():
        # plain sums the global batch in another order; DeepSpeed's Adam kernel rounds differently
        tol = 0 if name.startswith("zero") else 1e-6
        assert r["loss_rel_diff_vs_ddp"] <= tol, (name, r["losses"], ddp)
        assert r["median_step_s"] > 0 and all(x > 0 for x in r["peak_rss_mib_ranks"])
    for name in ("ddp", "zero1", "zero3"):
        assert rows[name]["state_vs_ideal"] == pytest.approx(1.0, rel=0.01), name
    for name in DS:
        # DeepSpeed keeps more than the formula (fp32 master copy at stages 1-2, buckets,
        # persistent parameters at stage 3), never less
        assert rows[name]["state_vs_ideal"] >= 0.99, (name, rows[name]["model_state_breakdown"])


def _untrained_losses(steps: int) -> list[float]:
    """The losses of the benchmark's initial 1M model on each of its global batches, no step taken."""
    import torch
    from model import GPT, GPTConfig

    torch.manual_seed(compare.SEED)
    model = GPT(GPTConfig.preset("1m"))
    with torch.no_grad():
        return [float(model(x, y)) for x, y in compare._batches(GPTConfig.preset("1m"), steps, 0, 1)]
