"""``compare.py``'s rows and tables: one row per system from the measured samples, the markdown
tables it prints, and the list of what failed. A row whose system has no timed sample (its
calibration launch failed, or every timed round did) is kept with ``status: "failed"``, its
timing fields ``None``, and whatever the calibration launch measured (model state, peak RSS);
every row carries a ``note`` that the table prints (busy machine, rounds lost, failure)."""
from __future__ import annotations

import statistics

import peers
from ranks import GLOBAL_BATCH, seq_len

MIB = 2**20


def make_rows(model_name: str, systems: list[tuple[str, str, int]], args, samples: dict, losses: dict,
              mems: dict, phases: dict, rss: dict, n_params: int, notes: dict) -> list[dict]:
    """One row per (label, system, bucket) in ``systems``; ``samples[label]`` are the paired step
    times (empty: failed), ``losses[label]`` one loss curve per launch."""
    measured = [label for label, _, _ in systems if samples.get(label)]
    base = "ddp" if "ddp" in measured else (measured[0] if measured else None)
    tokens = GLOBAL_BATCH * seq_len(model_name)
    ref_loss = losses[base][0][-1] if base else None
    rows = []
    for label, system, bucket in systems:
        ideal = peers.ideal_bytes(system, n_params, args.world, args.precision) if n_params else None
        mem = mems.get(label)
        row = {
            "system": label,
            "stage": int(system[-1]) if system[-1].isdigit() and system != "fsdp2" else None,
            "bucket_elements": bucket or None,
            "status": "ok" if label in measured else "failed",
            "note": notes.get(label, ""),
            "median_step_s": None, "samples_s": [], "ratio_vs_ddp": None, "ratio_iqr": None,
            "ratio_of_medians": None, "phases_s": None, "paired_ratios": [], "tokens_per_s": None,
            "model_state_bytes": mem["total"] if mem else None,
            "model_state_breakdown": mem,
            "ideal_bytes": ideal,
            "state_vs_ideal": mem["total"] / ideal if mem and ideal else None,
            "peak_rss_mib_ranks": rss.get(label, []),
            "last_loss": None, "last_loss_spread_across_launches": None, "loss_rel_diff_vs_ddp": None,
            "losses": [],
        }
        if label in measured:
            ratios = [s / b for s, b in zip(samples[label], samples[base])]
            last = [lo[-1] for lo in losses[label]]
            med = statistics.median(samples[label])
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            row.update({
                "median_step_s": med,
                "samples_s": samples[label],
                "ratio_vs_ddp": statistics.median(ratios),
                "ratio_iqr": [q[0], q[2]],
                "ratio_of_medians": med / statistics.median(samples[base]),
                "phases_s": dict(zip(("forward", "backward", "step"), phases[label])) if label in phases else None,
                "paired_ratios": ratios,
                "tokens_per_s": tokens / med,
                "last_loss": last[0],
                "last_loss_spread_across_launches": max(last) - min(last),
                "loss_rel_diff_vs_ddp": abs(last[0] - ref_loss) / abs(ref_loss),
                "losses": losses[label][0],
            })
        rows.append(row)
    return rows


def _f(v, fmt: str, suffix: str = "") -> str:
    return "–" if v is None else format(v, fmt) + suffix


def print_table(out: dict, busy_cores: float) -> None:
    how = ("steps interleaved in one process group" if out["mode"] == "steps"
           else "systems launched in interleaved rounds")
    rows = out["rows"]
    n_pairs = max((len(r["paired_ratios"]) for r in rows), default=0)
    ok_rounds = sum(1 for r in out.get("rounds_info", []) if r["ok"])
    print(f"\n#### {out['model']} model ({out['n_params'] / 1e6:.2f}M params, seq {out['seq_len']}), "
          f"{out['world']} ranks x 1 thread, global batch {GLOBAL_BATCH}, {out['precision']}; {how}: "
          f"{ok_rounds} of {out['rounds']} x ({out['warmup']} warmup + {out['steps']} timed steps), "
          f"{n_pairs} paired samples; {out['elapsed_s']:.0f} s\n")
    print("| system | bucket (elems) | median step | vs DDP (median of paired ratios) | IQR of ratios | tokens/s "
          "| model state / rank | ideal | state / ideal | peak RSS / rank | last loss | rel. diff vs DDP | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        iqr = "–" if r["ratio_iqr"] is None else f"{r['ratio_iqr'][0]:.2f}-{r['ratio_iqr'][1]:.2f}"
        ms = None if r["median_step_s"] is None else 1e3 * r["median_step_s"]
        state = None if r["model_state_bytes"] is None else r["model_state_bytes"] / MIB
        ideal = None if r["ideal_bytes"] is None else r["ideal_bytes"] / MIB
        rss = " / ".join("%.0f" % x for x in r["peak_rss_mib_ranks"]) + " MiB" if r["peak_rss_mib_ranks"] else "–"
        name = r["system"] if r["status"] == "ok" else f"**{r['system']} (FAILED)**"
        print(f"| {name} | {'' if r['bucket_elements'] is None else '%.3g' % r['bucket_elements']} "
              f"| {_f(ms, '.1f', ' ms')} | {_f(r['ratio_vs_ddp'], '.3f', 'x')} | {iqr} "
              f"| {_f(r['tokens_per_s'], ',.0f')} "
              f"| {_f(state, '.1f', ' MiB')} | {_f(ideal, '.1f', ' MiB')} | {_f(r['state_vs_ideal'], '.3f')} "
              f"| {rss} | {_f(r['last_loss'], '.6f')} | {_f(r['loss_rel_diff_vs_ddp'], '.1e')} | {r['note']} |")
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        diffs = [r["loss_rel_diff_vs_ddp"] for r in ok]
        spread = max(r["last_loss_spread_across_launches"] for r in ok)
        start = max(out["rss_at_rank_start_mib"], default=0)
        print(f"\nmax relative difference of last losses vs DDP: {max(diffs):.2e} "
              f"(a system's last loss varies across launches by up to {spread:.1e}); peak RSS includes the "
              f"torch runtime (~{start:.0f} MiB at rank start)")
        if max(diffs) > 1e-5:
            print(f"WARNING: last losses differ from DDP's by up to {max(diffs):.1e} (relative): the systems "
                  "did not train the same problem (initialisation, data or optimizer settings differ)")
    with_phases = [r for r in ok if r["phases_s"]]
    if with_phases:
        print("\nwhere a step's time goes (median ms per phase, mean over ranks; 'step' = optimizer step "
              "incl. waits for gradient reductions and the parameter all-gather):\n")
        print("| system | forward | backward (incl. hooks, overlapped reductions) | step | sum |")
        print("|---|---:|---:|---:|---:|")
        for r in with_phases:
            ph = r["phases_s"]
            print(f"| {r['system']} | {1e3 * ph['forward']:.1f} | {1e3 * ph['backward']:.1f} "
                  f"| {1e3 * ph['step']:.1f} | {1e3 * sum(ph.values()):.1f} |")
    busy = max(out["other_load_cores"], default=0.0)
    if busy > busy_cores:
        print(f"WARNING: other processes used up to {busy:.2f} cores during the timed runs; the numbers above "
              "are kept but unreliable: rerun on a quiet machine")
    for f in out.get("failures", []):
        print(f"FAILED: {_failure_line(f)}")


def _failure_line(f: dict) -> str:
    where = " ".join(str(x) for x in (f.get("model"), f.get("what")) if x)
    return f"{where}: {f['error']}"


def print_failures(results: dict) -> None:
    """The run's closing summary of everything that failed (also in ``results["failures"]``)."""
    fails = results.get("failures", [])
    if not fails:
        return
    print(f"\n{len(fails)} part(s) of this run failed and were skipped (details in the JSON's \"failures\"); "
          "everything else above was measured and kept:")
    for f in fails:
        print(f"  - {_failure_line(f)}")
    if not results.get("measured"):
        print("nothing at all was measured: exiting with status 1")
