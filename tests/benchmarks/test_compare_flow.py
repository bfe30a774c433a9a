"""benchmarks/compare.py's control flow with the launches faked (no ranks, no deepspeed, fast):
DeepSpeed's ops are prepared before anything timed, the hang guard comes from the calibration,
and a failed round or system is recorded while everything else is kept."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import compare  # noqa: E402
import peers  # noqa: E402
import prepare  # noqa: E402
import ranks  # noqa: E402
from shardwise.testing.distributed import RankFailedError  # noqa: E402

N = 1000  # fake parameter count
STEP_S = {"ddp": 2.0, "zero1": 2.1, "ds0": 2.2}  # fake per-step seconds


def _curve(n: int) -> list[float]:
    return [5.0 - 0.01 * i for i in range(n)]


def _one(system: str, warmup: int, steps: int) -> dict:
    t = STEP_S.get(system, 1.0)
    return {"times": [t] * steps, "warmup_times": [t] * warmup, "losses": _curve(warmup + steps),
            "mem": {"params": 4 * N, "grads": 4 * N, "master_params": 0, "optimizer_state": 8 * N, "total": 16 * N},
            "n_params": N}


def _fake(fn, fargs) -> tuple[list, float]:
    if fn is ranks.rank_run:
        system, _model, warmup, steps, _bucket = fargs
        r = {**_one(system, warmup, steps), "build_s": 0.5, "rss_peak_mib": 300.0, "rss_start_mib": 170.0,
             "cpu_s": 0.0, "profile": None}
        return [r, dict(r)], 0.0
    assert fn is ranks.rank_interleaved
    specs, _model, warmup, steps = fargs
    systems = {label: {**_one(system, warmup, steps), "phases": [0.5, 1.0, 0.1]} for label, system, _ in specs}
    return [{"systems": systems, "build_s": 1.0, "cpu_s": 0.0}] * 2, 0.0


class Recorder:
    """A stand-in for ``compare._launch``: records each call, fails the ones ``fail(call)`` picks."""

    def __init__(self, fail=lambda call: False):
        self.calls: list[dict] = []
        self.fail = fail

    def __call__(self, fn, args, *fargs, timeout, **fkw):
        call = {"fn": fn.__name__, "fargs": fargs, "timeout": timeout, "kw": fkw}
        self.calls.append(call)
        if self.fail(call):
            raise RankFailedError(f"ranks [0, 1] of 2 did not finish {fn.__name__} within {timeout:g} s "
                                  "(hang guard); all ranks were killed")
        return _fake(fn, fargs)


def _timed(call) -> bool:
    """A timed launch (not a calibration or preparation one)."""
    return call["fn"] == "rank_interleaved" and "progress" in call["kw"]


def _main(tmp_path, *argv):
    return compare.main([*argv, "--busy-retries", "0", "--out", str(tmp_path / "r.json")])


def test_failed_round_is_recorded_and_completed_rounds_kept(tmp_path, monkeypatch):
    rec = Recorder(fail=lambda call: _timed(call) and sum(map(_timed, rec.calls)) == 2)
    monkeypatch.setattr(compare, "_launch", rec)
    out = _main(tmp_path, "--model", "1m", "--rounds", "3", "--warmup", "1", "--steps", "4",
                "--systems", "ddp", "zero1")
    res = out["models"]["1m"]
    assert [r["ok"] for r in res["rounds_info"]] == [True, False, True]
    rows = {r["system"]: r for r in res["rows"]}
    for r in rows.values():
        assert r["status"] == "ok" and len(r["samples_s"]) == 8  # rounds 1 and 3, 4 steps each
        assert r["median_step_s"] > 0 and r["ratio_vs_ddp"] is not None
        assert "1 of 3 timed rounds failed" in r["note"]
    assert rows["zero1"]["ratio_vs_ddp"] == pytest.approx(2.1 / 2.0)
    assert out["measured"]
    assert [f["what"] for f in out["failures"]] == ["interleaved run 2/3"]
    assert "hang guard" in out["failures"][0]["error"]
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["failures"] == out["failures"] and written["models"]["1m"]["rows"]


def test_failed_calibration_skips_that_system_only(tmp_path, monkeypatch):
    rec = Recorder(fail=lambda call: call["fn"] == "rank_run" and call["fargs"][0] == "zero1")
    monkeypatch.setattr(compare, "_launch", rec)
    out = _main(tmp_path, "--model", "1m", "--warmup", "1", "--steps", "3", "--systems", "ddp", "zero1", "zero3")
    rows = {r["system"]: r for r in out["models"]["1m"]["rows"]}
    assert rows["zero1"]["status"] == "failed" and rows["zero1"]["median_step_s"] is None
    assert "calibration failed" in rows["zero1"]["note"]
    assert rows["ddp"]["status"] == rows["zero3"]["status"] == "ok"
    timed = [c for c in rec.calls if _timed(c)]
    assert len(timed) == 1 and [label for label, _, _ in timed[0]["fargs"][0]] == ["ddp", "zero3"]
    assert out["measured"] and out["failures"][0]["what"] == "calibration of zero1"


def test_nothing_measured_still_writes_the_json(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "_launch", Recorder(fail=lambda call: True))
    out = _main(tmp_path, "--model", "1m", "--systems", "ddp", "zero1")
    assert not out["measured"]
    assert all(r["status"] == "failed" for r in out["models"]["1m"]["rows"])
    assert json.loads((tmp_path / "r.json").read_text())["measured"] is False


def test_hang_guard_is_sized_from_the_calibration(tmp_path, monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(compare, "_launch", rec)
    out = _main(tmp_path, "--model", "25m", "--warmup", "2", "--steps", "8", "--systems", "ddp", "zero1")
    res = out["models"]["25m"]
    # calibration: build 0.5 s, startup 0 (fake launches take no time), steps 2.0 and 2.1 s
    predicted = (0.5 + 2.0) + (0.5 + 2.1) + 9 * (2.0 + 2.1)
    assert res["predicted_s"] == pytest.approx(predicted, abs=0.5)
    assert res["hang_guard_s"] == pytest.approx(prepare.GUARD_BASE_S + prepare.GUARD_FACTOR * res["predicted_s"], abs=1)
    (timed,) = [c for c in rec.calls if _timed(c)]
    assert timed["timeout"] == res["hang_guard_s"]
    assert rec.calls.index(timed) > max(i for i, c in enumerate(rec.calls) if c["fn"] == "rank_run")


def test_deepspeed_ops_are_prepared_before_anything_timed(tmp_path, monkeypatch):
    events: list = []
    rec = Recorder()

    def launch(fn, args, *fargs, timeout, **fkw):
        events.append((fn.__name__, fargs[1], timeout))
        return rec(fn, args, *fargs, timeout=timeout, **fkw)

    def build(timeout_s=prepare.BUILD_TIMEOUT_S):
        events.append(("build",))
        return {"ok": True, "seconds": 1.0, "cached_before": False, "error": None}

    monkeypatch.setattr(peers, "HAVE_DEEPSPEED", True)
    monkeypatch.setattr(prepare, "build_deepspeed_ops", build)
    monkeypatch.setattr(compare, "_launch", launch)
    out = _main(tmp_path, "--model", "25m", "--warmup", "1", "--steps", "2", "--systems", "ddp", "ds0")
    assert events[0] == ("build",)
    # then one short, generously guarded launch of the DeepSpeed systems on the 1M model
    assert events[1] == ("rank_interleaved", "1m", prepare.BUILD_TIMEOUT_S)
    assert [label for label, _, _ in rec.calls[0]["fargs"][0]] == ["ds0"] and rec.calls[0]["fargs"][2:] == (0, 1)
    # then the calibration launches, then the timed run
    assert [e[0] for e in events[2:]] == ["rank_run", "rank_run", "rank_interleaved"]
    assert _timed(rec.calls[-1]) and out["deepspeed_prepare"]["ok"] and out["measured"]


def test_failed_deepspeed_preparation_skips_only_the_deepspeed_rows(tmp_path, monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(peers, "HAVE_DEEPSPEED", True)
    monkeypatch.setattr(prepare, "build_deepspeed_ops", lambda timeout_s=0: {
        "ok": False, "seconds": 3.0, "cached_before": False, "error": "building DeepSpeed's ops failed"})
    monkeypatch.setattr(compare, "_launch", rec)
    out = _main(tmp_path, "--model", "1m", "--warmup", "1", "--steps", "2", "--systems", "ddp", "zero1", "ds0", "ds3")
    assert [r["system"] for r in out["models"]["1m"]["rows"]] == ["ddp", "zero1"]
    assert all(c["fargs"][0] not in peers.DS_SYSTEMS for c in rec.calls if c["fn"] == "rank_run")
    assert out["measured"] and "DeepSpeed preparation" in out["failures"][0]["what"]


def test_rank0_progress_lines(monkeypatch, capsys):
    monkeypatch.setattr(ranks.dist, "get_rank", lambda: 0)
    prog = ranks._Progress("[25m] interleaved run 1/1", total=4, warmup=1, t_start=100.0)
    for i, now in enumerate([110.0, 112.0, 125.0, 150.0]):
        prog.step(i, now)  # the first, then 112 (< 10 s later: silent), 125, and the last
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[25m] interleaved run 1/1: step 1/4 (warmup), 10 s elapsed, ETA 30 s",
                     "[25m] interleaved run 1/1: step 3/4, 25 s elapsed, ETA 8 s",
                     "[25m] interleaved run 1/1: step 4/4, 50 s elapsed, ETA 0 s"]
