"""shardwise ZeRO stages 0/1/2/3 vs torch DDP and FSDP2, side by side, on gloo CPU ranks.

Run from the repository root (see benchmarks/README.md)::

    .venv/bin/python benchmarks/compare.py                       # both models, ~2 min on a quiet machine
    .venv/bin/python benchmarks/compare.py --model 25m --steps 16
    .venv/bin/python benchmarks/compare.py --model 25m --bucket 5e5 2e6 6.25e6   # bucket sweep
    .venv/bin/python benchmarks/compare.py --model 1m --profile zero2            # where time goes
    .venv/bin/python benchmarks/compare.py --model 1m --compile-only             # eager vs torch.compile

Setup (peers.md): ``--world`` ranks x 1 intra-op thread, fp32, global batch 8 sequences
(micro-batch 8/world per rank, no accumulation), AdamW lr 1e-3 with weight decay 0.01 set
explicitly on both sides (torch DDP: ``AdamW(fused=True)``; shardwise: the config's ``AdamW``,
fused on CPU), the same initial weights (one seed) and the same data (one seeded stream of
random tokens, rank r taking rows ``[r*mb, (r+1)*mb)`` of each global batch) for every system.

[Note: interleaved measurement]
Absolute step times drift by tens of percent between runs, even minutes apart, on these
machines, so every number is paired with a DDP number taken at the same time.

- ``--mode steps`` (default): all systems live in one process group (separate model copies in
  the same ranks) and take steps in turn, rotating who goes first; each step starts after a
  barrier and is timed as the max over ranks. Step i gives one paired sample per system; the
  ratio to DDP is the median over steps of ``t_system / t_ddp``. Peak RSS comes from one
  short extra launch of each system alone.
- ``--mode launches``: each system is its own process group (``run_distributed``: fresh gloo
  ranks), launched in rounds ``A B C D  A B C D ...``; a round gives one sample per system
  (median of its timed steps) and the ratio is the median over rounds.

A run during which other processes used more than ``BUSY_CORES`` of CPU is repeated
(``--busy-retries``) and otherwise flagged. Every system must end with the same loss as DDP.

[Note: how a run proceeds]
1. DeepSpeed's CPU ops are built (first run only) before anything timed or hang-guarded, when a
   ``ds*`` system is asked for (``prepare.prepare_deepspeed``).
2. Per model, a calibration launch of each system alone (1 warmup + 1 timed step) measures its
   peak RSS and its pace; the timed runs' hang guard is sized from that pace
   (``prepare.guard``), not from a fixed guess.
3. The timed runs; rank 0 prints a progress line (step, elapsed, ETA) after each step, at
   most every ``ranks.PROGRESS_EVERY_S``.
4. A failure (a rank raised, or the hang guard fired) skips that round, or that system when its
   calibration failed, says so, and keeps everything else: the rows are still built from the
   rounds that completed, failed rows are marked, ``results.json`` is written with the failures
   recorded, and the process exits non-zero only when nothing at all was measured.

[Note: compile rows]
``--compile`` (after the rows above) or ``--compile-only`` (instead of them): per ZeRO stage of
``--compile-stages``, shardwise eager vs the same engine with ``compile.enabled`` (backend
``--compile-backend``, default inductor: its C++ backend on CPU), in one launch, stepping in
turn (``compile_ranks.py``); medians of the timed steps side by side, the compile time (first
compiled step minus its median) on its own, the graphs and graph breaks of the compile report,
and the loss difference (compiled vs eager, same seed and batches).

Modules: ``ranks.py`` (what runs in the ranks), ``prepare.py`` (steps 1-2), ``report.py`` (rows
and tables), ``peers.py`` (FSDP2, plain, DeepSpeed builders, ideal model state),
``compile_ranks.py`` (the compile rows).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
_ROOT = Path(__file__).resolve().parent.parent
for _p in (str(_ROOT / "benchmarks"), str(_ROOT), str(_ROOT / "examples" / "gpt")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import peers  # noqa: E402  (benchmarks/peers.py: fsdp2, plain, DeepSpeed)
import prepare  # noqa: E402  (benchmarks/prepare.py: DeepSpeed's ops, calibration, hang guards)
import ranks  # noqa: E402  (benchmarks/ranks.py: what runs in the ranks; sets DS_ACCELERATOR)
import report  # noqa: E402  (benchmarks/report.py: rows and tables)
from ranks import GLOBAL_BATCH, LR, SEED, WEIGHT_DECAY, _batches  # noqa: E402,F401  (re-exported)
from shardwise.testing.distributed import RankFailedError  # noqa: E402

DEFAULT_BUCKET = 2_000_000  # elements; see README.md "Bucket size"
# per mode and model: (rounds, warmup steps per launch, timed steps per launch)
DEFAULTS = {
    "steps": {"25m": (1, 2, 8), "1m": (1, 5, 40)},
    "launches": {"25m": (3, 2, 4), "1m": (5, 5, 25)},
}
ALL_SYSTEMS = ("ddp", "fsdp2", "zero0", "zero1", "zero2", "zero3", "plain") + peers.DS_SYSTEMS
SYSTEMS = ALL_SYSTEMS if peers.HAVE_DEEPSPEED else ALL_SYSTEMS[: -len(peers.DS_SYSTEMS)]  # the default
NO_BUCKET = ("ddp", "fsdp2", "plain")  # systems without a reduce-bucket size
BUSY_CORES = 0.25  # other processes' CPU use (cores) above which a round counts as disturbed


def _busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (from /proc/stat; 0 where unavailable)."""
    try:
        f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    v = [int(x) for x in f]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _systems(names: list[str], buckets: list[int]) -> list[tuple[str, str, int]]:
    """(label, system, bucket) in launch order."""
    out = []
    for s in names:
        if s in NO_BUCKET:
            out.append((s, s, 0))
        else:
            for b in buckets:
                label = s if len(buckets) == 1 else f"{s}@{b:g}"
                out.append((label, s, b))
    return out


def _launch(fn, args, *fargs, timeout: float, **fkw):
    """run_distributed + how much CPU (in cores) anything other than our ranks used meanwhile.
    Raises ``RankFailedError`` when a rank raised or the hang guard ``timeout`` fired."""
    from shardwise.testing import run_distributed

    b0, w0 = _busy_s(), time.perf_counter()
    res = run_distributed(fn, args.world, *fargs, timeout_s=timeout, **fkw)
    foreign = (_busy_s() - b0 - sum(x["cpu_s"] for x in res)) / (time.perf_counter() - w0)
    return res, max(0.0, foreign)


def _with_retries(what: str, args, attempt_fn):
    """Run ``attempt_fn() -> (result, foreign_cores, line)``; repeat while the machine was busy,
    keeping the least disturbed result. A failing repeat keeps the earlier (busy) result; a
    failing first attempt raises (``RankFailedError``)."""
    best = None
    for attempt in range(args.busy_retries + 1):
        try:
            result, busy, line = attempt_fn()
        except RankFailedError as e:
            if best is None:
                raise
            print(f"{what}: the repeat FAILED ({prepare.short_error(e)}); keeping the earlier, busy "
                  "measurement", flush=True)
            break
        flag = ""
        if busy > BUSY_CORES:
            flag = "  <-- BUSY MACHINE" + (", repeating" if attempt < args.busy_retries else ", kept but flagged")
        print(f"{what}: {line} (other load up to {busy:.2f} cores){flag}", flush=True)
        if best is None or busy < best[1]:
            best = (result, busy)
        if busy <= BUSY_CORES:
            break
    return best


def _failed(failures: list, model: str, what: str, e: BaseException, consequence: str) -> None:
    print(f"[{model}] {what} FAILED: {prepare.short_error(e)}\n[{model}] {consequence}", flush=True)
    failures.append({"model": model, "what": what, "error": prepare.short_error(e), "detail": str(e)})


def _timed_steps(model_name, args, systems, cal, warmup, steps, rounds, acc) -> None:
    """``--mode steps``: ``rounds`` interleaved launches of ``systems`` ([Note: interleaved measurement])."""
    predicted = prepare.predict_interleaved([cal[label] for label, _, _ in systems], warmup, steps)
    acc["predicted_s"], acc["hang_guard_s"] = predicted, prepare.guard(predicted)
    for r in range(rounds):
        what = f"[{model_name}] interleaved run {r + 1}/{rounds}"
        print(f"{what}: {len(systems)} systems x ({warmup} warmup + {steps} timed steps) in turn; predicted "
              f"{predicted:.0f} s from the calibration, hang guard {acc['hang_guard_s']:.0f} s", flush=True)

        def attempt():
            t0 = time.perf_counter()
            res, busy = _launch(ranks.rank_interleaved, args, systems, model_name, warmup, steps,
                                timeout=acc["hang_guard_s"], precision=args.precision, progress=what)
            sysres = res[0]["systems"]
            line = "  ".join(f"{k}={1e3 * statistics.median(v['times']):.0f}ms" for k, v in sysres.items())
            warm = sum(sum(v["warmup_times"]) for v in sysres.values())
            return sysres, busy, line + (f"  (build {res[0]['build_s']:.0f} s, warmup {warm:.0f} s; "
                                         f"{time.perf_counter() - t0:.0f} s)")

        try:
            sysres, busy = _with_retries(what, args, attempt)
        except RankFailedError as e:
            _failed(acc["failures"], model_name, f"interleaved run {r + 1}/{rounds}", e,
                    "this round is skipped; the rounds that completed are kept")
            acc["rounds_info"].append({"round": r + 1, "ok": False, "error": prepare.short_error(e)})
            continue
        acc["rounds_info"].append({"round": r + 1, "ok": True, "other_load_cores": busy})
        for label, _, _ in systems:
            acc["samples"][label].extend(sysres[label]["times"])
            acc["losses"][label].append(sysres[label]["losses"])
            acc["mems"][label] = sysres[label]["mem"]
            acc["phases"][label] = sysres[label]["phases"]


def _timed_launches(model_name, args, systems, cal, warmup, steps, rounds, acc) -> None:
    """``--mode launches``: rounds of one launch per system ([Note: interleaved measurement])."""
    guards = {label: prepare.guard(prepare.predict_launch(cal[label], warmup, steps)) for label, _, _ in systems}
    acc["hang_guard_s"] = guards
    for r in range(rounds):
        what = f"[{model_name}] round {r + 1}/{rounds}"

        def attempt():
            t0 = time.perf_counter()
            round_runs, busy = {}, 0.0
            for k, (label, system, bucket) in enumerate(systems):
                print(f"{what}: {label} ({k + 1}/{len(systems)}), {warmup} warmup + {steps} timed steps, "
                      f"hang guard {guards[label]:.0f} s", flush=True)
                res, foreign = _launch(ranks.rank_run, args, system, model_name, warmup, steps, bucket,
                                       precision=args.precision, timeout=guards[label], progress=f"{what} {label}")
                res[0]["rss_ranks"] = [x["rss_peak_mib"] for x in res]
                round_runs[label] = res[0]
                busy = max(busy, foreign)
            line = "  ".join(f"{k}={1e3 * statistics.median(v['times']):.0f}ms" for k, v in round_runs.items())
            return round_runs, busy, line + f"  ({time.perf_counter() - t0:.0f} s)"

        try:
            round_runs, busy = _with_retries(what, args, attempt)
        except RankFailedError as e:
            _failed(acc["failures"], model_name, f"round {r + 1}/{rounds}", e,
                    "this round is skipped (for every system, to keep the samples paired); the rounds that "
                    "completed are kept")
            acc["rounds_info"].append({"round": r + 1, "ok": False, "error": prepare.short_error(e)})
            continue
        acc["rounds_info"].append({"round": r + 1, "ok": True, "other_load_cores": busy})
        for label, _, _ in systems:
            run = round_runs[label]
            acc["samples"][label].append(statistics.median(run["times"]))
            acc["losses"][label].append(run["losses"])
            acc["mems"][label] = run["mem"]
            acc["rss"][label] = [max(a, b) for a, b in zip(acc["rss"][label], run["rss_ranks"])]


def bench_model(model_name: str, args, failures: list | None = None) -> dict:
    """Calibrate, run the timed rounds and build the rows of one model ([Note: how a run proceeds]).
    Failures are appended to ``failures`` (and to the result's own ``failures``)."""
    d = DEFAULTS[args.mode][model_name]
    rounds = args.rounds or d[0]
    warmup = args.warmup if args.warmup is not None else d[1]
    steps = args.steps or d[2]
    systems = _systems(args.systems, args.bucket)
    labels = [label for label, _, _ in systems]
    t0 = time.perf_counter()
    own_failures: list[dict] = []

    print(f"\n[{model_name}] calibration: each system alone, 1 warmup + 1 timed step (its pace sizes the "
          "hang guard of the timed runs; its peak RSS goes into the table)", flush=True)
    cal = prepare.calibrate(model_name, systems, args, _launch)
    acc = {"samples": {label: [] for label in labels},   # paired step times
           "losses": {label: [] for label in labels},    # one loss curve per launch
           "mems": {}, "phases": {}, "rss": {}, "rounds_info": [], "failures": own_failures,
           "predicted_s": None, "hang_guard_s": None}
    notes: dict[str, str] = {}
    n_params, rss_start = 0, []
    for label, c in cal.items():
        if c["ok"]:
            acc["mems"][label], acc["rss"][label] = c["mem"], c["rss"]
            n_params, rss_start = c["n_params"], c["rss_start"]
        else:
            notes[label] = f"calibration failed: {c['error']}"
            own_failures.append({"model": model_name, "what": f"calibration of {label}", "error": c["error"],
                                 "detail": c.get("error_detail", "")})
    ok_systems = [s for s in systems if cal[s[0]]["ok"]]
    if ok_systems:
        timed = _timed_steps if args.mode == "steps" else _timed_launches
        timed(model_name, args, ok_systems, cal, warmup, steps, rounds, acc)
    else:
        print(f"[{model_name}] every calibration launch failed: no timed runs for this model", flush=True)

    n_failed = sum(1 for r in acc["rounds_info"] if not r["ok"])
    busy_rounds = [r["other_load_cores"] for r in acc["rounds_info"] if r["ok"]]
    for label, _, _ in ok_systems:
        note = []
        if n_failed:
            note.append(f"{n_failed} of {rounds} timed rounds failed" + ("" if busy_rounds else " (all)"))
        if busy_rounds and max(busy_rounds) > BUSY_CORES:
            note.append(f"busy machine (other load up to {max(busy_rounds):.2f} cores)")
        notes[label] = "; ".join(note)
    rows = report.make_rows(model_name, systems, args, acc["samples"], acc["losses"], acc["mems"],
                            acc["phases"], acc["rss"], n_params, notes)
    out = {"model": model_name, "n_params": n_params, "seq_len": ranks.seq_len(model_name),
           "world": args.world, "precision": args.precision, "mode": args.mode, "rounds": rounds,
           "warmup": warmup, "steps": steps,
           "elapsed_s": time.perf_counter() - t0, "other_load_cores": busy_rounds,
           "rounds_info": acc["rounds_info"], "predicted_s": acc["predicted_s"], "hang_guard_s": acc["hang_guard_s"],
           "calibration": {label: {k: v for k, v in c.items() if k not in ("mem", "error_detail")}
                           for label, c in cal.items()},
           "failures": own_failures, "rss_at_rank_start_mib": rss_start, "rows": rows}
    report.print_table(out, BUSY_CORES)
    if args.profile:
        _profile(model_name, args, systems, cal, warmup, steps, out)
    if failures is not None:
        failures.extend(out["failures"])
    return out


def _profile(model_name, args, systems, cal, warmup, steps, out) -> None:
    label, system, bucket = next(s for s in systems if args.profile in (s[0], s[1]))
    if not cal[label]["ok"]:
        return
    # the profiler slows a step down several times: a guard of 4x the usual
    timeout = prepare.guard(4 * prepare.predict_launch(cal[label], warmup, steps))
    try:
        res, _ = _launch(ranks.rank_run, args, system, model_name, warmup, steps, bucket, precision=args.precision,
                         profile=args.profile_kind, timeout=timeout, progress=f"[{model_name}] profile of {label}")
    except RankFailedError as e:
        _failed(out["failures"], model_name, f"profile of {label}", e, "no profile; the table above is kept")
        return
    print(f"\n### profile of {label} ({model_name}), rank 0\n{res[0]['profile']}")
    out["profile"] = {label: res[0]["profile"]}


def bench_compile(model_name: str, args) -> dict:
    """The compile rows of one model ([Note: compile rows]); prints their table."""
    import tempfile

    import compile_ranks

    warmup = args.warmup if args.warmup is not None else 2
    steps = args.steps or 10
    print(f"\n[{model_name}] compile rows: shardwise eager vs compiled ({args.compile_backend}), stages "
          f"{args.compile_stages}, {warmup} warmup + {steps} timed steps each, in turn", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shardwise-inductor-") as cache:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache)
        try:
            res, busy = _launch(compile_ranks.rank_compile, args, model_name, args.compile_stages, warmup, steps,
                                args.compile_backend, timeout=args.compile_timeout)
        finally:
            if os.environ.get("TORCHINDUCTOR_CACHE_DIR") == cache:
                del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    rows = []
    for stage, r in res[0]["stages"].items():
        e, c = r["eager"], r["compiled"]
        rel = max(abs(a - b) / abs(b) for a, b in zip(c["losses"], e["losses"]))
        rows.append({"stage": int(stage), "eager_median_ms": 1e3 * e["median_step_s"],
                     "compiled_median_ms": 1e3 * c["median_step_s"],
                     "speedup": e["median_step_s"] / c["median_step_s"], "compile_s": r["compile_s"],
                     "eager_first_step_s": e["first_step_s"], "compiled_first_step_s": c["first_step_s"],
                     "graphs": r["graphs"], "graph_breaks": r["graph_breaks"], "regions": r["regions"],
                     "compiled_runs": r["compiled_runs"], "loss_rel_diff": rel})
    out = {"model": model_name, "world": args.world, "backend": args.compile_backend, "warmup": warmup,
           "steps": steps, "other_load_cores": busy, "elapsed_s": time.perf_counter() - t0, "rows": rows}
    print(f"\n| {model_name} world {args.world} | eager ms | compiled ms | speedup | compile s | graphs | breaks "
          "| loss rel diff |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| zero{r['stage']} | {r['eager_median_ms']:.1f} | {r['compiled_median_ms']:.1f} | "
              f"{r['speedup']:.2f}x | {r['compile_s']:.1f} | {r['graphs']} | {r['graph_breaks']} | "
              f"{r['loss_rel_diff']:.1e} |")
    print(f"(other load up to {busy:.2f} cores{'  <-- BUSY MACHINE' if busy > BUSY_CORES else ''}; "
          f"{out['elapsed_s']:.0f} s)", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("25m", "1m", "both"), default=None,
                    help="default: both for fp32, 1m for bf16 (bf16 is ~10x slower on CPU)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: shardwise/DeepSpeed bf16 config; DDP/FSDP2/plain autocast the forward")
    ap.add_argument("--mode", choices=("steps", "launches"), default="steps",
                    help="steps: all systems in one process group taking steps in turn (default; "
                         "paired per step); launches: each system its own process group, rounds of launches")
    dflt = "; ".join(f"{m}: " + ", ".join(f"{k} {v}" for k, v in d.items()) for m, d in DEFAULTS.items())
    ap.add_argument("--rounds", type=int, default=None, help=f"launches per system ({dflt}; (rounds, warmup, steps))")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per launch")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per launch")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--bucket", type=float, nargs="+", default=[DEFAULT_BUCKET],
                    help="shardwise reduce_bucket_size in elements; several values = a sweep "
                         f"(default {DEFAULT_BUCKET:g})")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=ALL_SYSTEMS,
                    help="default: all (the ds* ones when deepspeed is installed)")
    ap.add_argument("--busy-retries", type=int, default=1,
                    help="repeat a timed launch/round up to this many times when other processes loaded "
                         "the machine (more than %.2f cores)" % BUSY_CORES)
    ap.add_argument("--profile", default=None,
                    help="afterwards, profile one more launch of this system (e.g. zero2) on rank 0")
    ap.add_argument("--profile-kind", default="cprofile", choices=("cprofile", "torch"))
    ap.add_argument("--compile", action="store_true",
                    help="after the rows above, the compile rows: shardwise eager vs torch.compile'd")
    ap.add_argument("--compile-only", action="store_true", help="only the compile rows")
    ap.add_argument("--compile-stages", type=int, nargs="+", default=[0, 2, 3], choices=(0, 1, 2, 3))
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile rows")
    ap.add_argument("--compile-timeout", type=float, default=1800.0,
                    help="hang guard of the compile launch, seconds (inductor compiles slowly on CPU)")
    ap.add_argument("--out", default=str(_ROOT / "benchmarks" / "results.json"))
    args = ap.parse_args(argv)
    args.bucket = [int(b) for b in args.bucket]
    if GLOBAL_BATCH % args.world:
        ap.error(f"--world must divide the global batch {GLOBAL_BATCH}")
    ds = [s for s in args.systems if s in peers.DS_SYSTEMS]
    if ds and not peers.HAVE_DEEPSPEED:
        ap.error(f"{' '.join(ds)} need deepspeed (make bench installs it; see benchmarks/README.md)")

    t0 = time.perf_counter()
    if args.model is None:
        args.model = "both" if args.precision == "fp32" else "1m"
    models = ["25m", "1m"] if args.model == "both" else [args.model]
    results = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "cpu": _cpu_name(), "cores": os.cpu_count(), "precision": args.precision,
               "systems": list(args.systems), "failures": [], "models": {}}
    if ds:  # [Note: how a run proceeds], step 1: before anything timed or guarded
        prep = prepare.prepare_deepspeed([(s, s, args.bucket[0]) for s in ds], args, _launch)
        results["deepspeed_prepare"] = {k: v for k, v in prep.items() if k != "error_detail"}
        if not prep["ok"]:
            results["failures"].append({"model": None, "what": f"DeepSpeed preparation ({' '.join(ds)} skipped)",
                                        "error": prep["error"], "detail": prep.get("error_detail", "")})
            args.systems = [s for s in args.systems if s not in peers.DS_SYSTEMS]
    if args.compile_only:
        args.systems = []
    for m in models:
        if not args.systems:
            break
        try:
            results["models"][m] = bench_model(m, args, results["failures"])
        except Exception as e:  # noqa: BLE001 - keep the other models and write what was measured
            traceback.print_exc()
            print(f"[{m}] FAILED: {type(e).__name__}: {e}; skipping this model", flush=True)
            results["failures"].append({"model": m, "what": "benchmark", "error": f"{type(e).__name__}: {e}",
                                        "detail": traceback.format_exc()})
    if args.compile or args.compile_only:
        results["compile"] = {}
        for m in models:
            try:
                results["compile"][m] = bench_compile(m, args)
            except Exception as e:  # noqa: BLE001 - keep what was measured
                traceback.print_exc()
                results["failures"].append({"model": m, "what": "compile rows", "error": f"{type(e).__name__}: {e}",
                                            "detail": traceback.format_exc()})
    results["measured"] = any(r["status"] == "ok" for res in results["models"].values() for r in res["rows"]) \
        or bool(results.get("compile"))
    results["elapsed_s"] = time.perf_counter() - t0
    print(f"\n[compare.py ran in {results['elapsed_s']:.0f} s; torch {torch.__version__}; "
          f"{results['cpu']}, {results['cores']} cores]")
    report.print_failures(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}" + (" (with the failures recorded)" if results["failures"] else ""))
    return results


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(0 if main()["measured"] else 1)
