"""The report of ``benchmarks/gpu_report.py``: its schema (``validate``) and its Markdown.
Imports nothing heavy (the tests check reports with it)."""
from __future__ import annotations

SCHEMA = "shardwise.gpu_report/1"
PARTS = ("parity", "collectives", "checkpoint_rng", "throughput", "offload", "launcher")
# seconds per part on one H200 (sum 420); with ~15 s of imports and CUDA start and ~30 s of set-up
# in gpu_check.sh the whole run is under 8 min (gpu_check.sh stops the report at 450 s)
BUDGET_S = {"parity": 60, "collectives": 10, "checkpoint_rng": 20, "throughput": 180, "offload": 90, "launcher": 60}
STATUSES = ("pass", "fail", "error", "skipped")


# -- markdown ---------------------------------------------------------------------------------
def _fmt_bytes(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def markdown(rep: dict) -> str:
    e = rep["env"]
    out = [f"# shardwise GPU report ({e['mode']})", "",
           f"{e['device']} | torch {e['torch']} (project pin {e['torch_pin']}"
           f"{'' if e['torch_matches_pin'] else ': NOT the pin, the machine’s own build'}) | CUDA {e['cuda_runtime']}"
           f" | backend {e['backend']} | Python {e['python']} | commit {e['shardwise_commit']} | "
           f"{rep['started_utc']}, {rep['wall_s']:.0f} s of a {rep['budget_total_s']} s budget", "",
           "| part | status | seconds | budget s |", "|---|---|---:|---:|"]
    for name in PARTS:
        p = rep["parts"].get(name, {"status": "skipped", "seconds": 0})
        out.append(f"| {name} | {p['status']}{': ' + p['error'] if p.get('error') else ''} | "
                   f"{p.get('seconds', 0):.1f} | {BUDGET_S[name]} |")
    par = rep["parts"].get("parity", {})
    if par.get("rows"):
        out += ["", f"## Parity against plain PyTorch ({par['model_params']:,} parameters, world size 1)", "",
                "| precision | stage | loss max rel diff | param max abs diff | plain vs itself (loss / param) "
                "| tolerance (loss / param) | |", "|---|---:|---:|---:|---|---|---|"]
        out += [f"| {r['precision']} | {r['stage']} | {r['loss_max_rel_diff']:.2e} | {r['param_max_abs_diff']:.2e} | "
                f"{r['reference_noise']['loss_max_rel_diff']:.1e} / {r['reference_noise']['param_max_abs_diff']:.1e} | "
                f"{r['rtol']:.1e} / {r['atol']:.1e} | {'pass' if r['pass'] else 'FAIL'} |" for r in par["rows"]]
    for name in ("collectives", "checkpoint_rng"):
        p = rep["parts"].get(name, {})
        if p.get("checks"):
            out += ["", f"## {name}", "", ", ".join(f"{k}: {v}" for k, v in p["checks"].items())
                    + (f" ({p['note']})" if p.get("note") else "")]
    thr = rep["parts"].get("throughput", {})
    if thr.get("rows"):
        m = thr["model"]
        out += ["", f"## Throughput and memory: GPT {m['params'] / 1e9:.2f}B, bf16, micro {m['micro_batch']} x "
                f"seq {m['seq_len']} (MFU: 6N x tokens / time / {thr['mfu_peak_tflops']} TFLOP/s)", "",
                "| system | median step | tokens/s | MFU | peak memory | estimate | peak / estimate | states = estimate |",
                "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in thr["rows"]:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            ratio = f"{r['peak_over_estimate']:.2f}" if r.get("peak_over_estimate") else "n/a"
            out.append(f"| {r['system']} | {r['median_step_s'] * 1e3:.1f} ms | {r['tokens_per_s']:,.0f} | {mfu} | "
                       f"{_fmt_bytes(r['peak_memory_bytes'])} | {_fmt_bytes(r.get('estimate_bytes'))} | {ratio} | "
                       f"{r.get('states_match_estimate', 'n/a')} |")
        for k, v in thr.get("errors", {}).items():
            out.append(f"\n{k}: {v}")
    off = rep["parts"].get("offload", {})
    if off.get("tokens_per_s"):
        s = off["split_ms"] or {}
        out += ["", "## CPU offload (stage 2, offload_optimizer: cpu, pinned)", "",
                f"{off['tokens_per_s']:,.0f} tokens/s ({off['median_step_s'] * 1e3:.0f} ms/step; on-device stage 2: "
                f"{off['zero2_on_device_tokens_per_s'] or float('nan'):,.0f} tokens/s); split (ms, device-synchronised): "
                f"forward {s.get('forward', float('nan')):.1f}, backward {s.get('backward', float('nan')):.1f}, "
                f"step {s.get('step', float('nan')):.1f}; host masters pinned: {off['host_masters_pinned']}"]
    lau = rep["parts"].get("launcher", {})
    if lau.get("runs"):
        out += ["", "## The example through `shardwise run` (1 rank)", ""]
        out += [f"- {r['config']}: {'pass' if r['pass'] else 'FAIL'}, exit {r['returncode']}"
                + "".join(f"; `{ln}`" for ln in r.get("loss_lines", [])) for r in lau["runs"]]
    return "\n".join(out) + "\n"


def validate(rep: dict) -> list[str]:
    """What is wrong with a report's shape (the schema ``SCHEMA``); [] when nothing is."""
    bad = []
    if rep.get("schema") != SCHEMA:
        bad.append(f"schema is {rep.get('schema')!r}, not {SCHEMA!r}")
    for key in ("started_utc", "finished_utc", "wall_s", "budget_total_s", "budget_s", "env", "parts"):
        if key not in rep:
            bad.append(f"no {key!r}")
    for key in ("mode", "torch", "torch_pin", "torch_matches_pin", "device", "backend"):
        if key not in rep.get("env", {}):
            bad.append(f"env has no {key!r}")
    need = {"parity": ("rows", "model_params"), "collectives": ("checks", "backend"), "checkpoint_rng": ("checks",),
            "throughput": ("rows", "model", "errors"), "offload": ("tokens_per_s", "split_ms", "median_step_s"),
            "launcher": ("runs",)}
    for name, part in rep.get("parts", {}).items():
        if name not in PARTS:
            bad.append(f"unknown part {name!r}")
            continue
        if part.get("status") not in STATUSES or not isinstance(part.get("seconds"), (int, float)):
            bad.append(f"{name}: status {part.get('status')!r} / seconds {part.get('seconds')!r}")
        if part.get("status") in ("pass", "fail"):
            bad += [f"{name}: no {k!r}" for k in need[name] if k not in part]
        elif not part.get("error"):
            bad.append(f"{name}: {part.get('status')} without an error")
    for r in rep.get("parts", {}).get("throughput", {}).get("rows", []):
        for k in ("system", "median_step_s", "tokens_per_s", "mfu", "peak_memory_bytes"):
            if k not in r:
                bad.append(f"throughput row {r.get('system')!r}: no {k!r}")
        if r.get("system", "").startswith("zero") and not r.get("estimate_bytes"):
            bad.append(f"throughput row {r.get('system')!r}: no estimate")
    return bad


