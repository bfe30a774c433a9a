"""``shardwise report RUN_DIR``: one PNG and a Markdown summary of a monitored run.

RUN_DIR is a monitor's log directory (``<output_path>/<job_name>``). The report reads the
``run.jsonl`` the monitor writes there whatever writer is on (one file, every tag, and what a
CSV or event file lacks: world size, parameters, config, where a resumed run started); a
directory with only DeepSpeed-style ``csv_monitor`` files (``Train_Samples_train_loss.csv``, ...)
is read from those. Each ``start`` line of ``run.jsonl`` begins a run: a run resumed at
sample S keeps the earlier lines up to S, a run from 0 replaces them.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
from dataclasses import dataclass, field

from shardwise.monitor.metrics import (GRAD_NORM, LOSS, LR, MEMORY_KEYS, MFU, SAMPLES_PER_S, SKIPPED,
                                       TFLOPS, TOKENS_PER_S, memory_tag)
from shardwise.monitor.writers import RUN_LOG, MonitorError

PNG, MARKDOWN = "report.png", "report.md"
MIB = 2.0 ** 20


@dataclass
class Run:
    run_dir: str
    source: str  # "run.jsonl" or "csv"
    meta: dict = field(default_factory=dict)  # the last start line
    rows: list[dict] = field(default_factory=list)  # per interval: step, samples, seconds, tokens, scalars
    runs: int = 1  # runs joined into the curves (a resumed run continues its checkpoint's)
    others: int = 0  # runs in the same run.jsonl not shown (restarted before, or sharing the directory)

    def series(self, tag: str) -> tuple[list[float], list[float]]:
        pts = [(r["samples"], r["scalars"][tag]) for r in self.rows if tag in r["scalars"]]
        return [p[0] for p in pts], [p[1] for p in pts]

    def ranks(self) -> list[int]:
        found = {int(m.group(1)) for r in self.rows for t in r["scalars"]
                 if (m := re.match(r"Memory/rank(\d+)/", t))}
        return sorted(found)


def _load_jsonl(run_dir: str, path: str) -> Run:
    starts: dict = {}  # run id -> its start line, in file order
    rows: dict = {}  # run id -> its interval lines
    last_run = None  # the run of the last interval line: the one reported
    with open(path) as f:
        for line in f:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue  # empty, or cut short by a killed run
            rid = obj.get("run", len(starts) - 1 if obj.get("event") == "interval" else len(starts))
            if obj.get("event") == "start":
                starts[rid], rows[rid] = obj, []
            elif obj.get("event") == "interval" and "samples" in obj and rid in starts:
                rows[rid].append(obj)
                last_run = rid
    run = Run(run_dir, RUN_LOG, runs=0)
    if last_run is None:
        return run
    # the runs before it that it resumed: each start keeps the earlier lines up to its sample
    for rid, start in starts.items():
        if not rows[rid] and rid != last_run:
            continue  # started, never logged (or another run still at its first interval)
        s0 = start.get("start_samples", 0) or 0
        run.rows = [r for r in run.rows if r["samples"] <= s0] + rows[rid]
        run.runs = 1 if s0 == 0 else run.runs + 1
        run.meta = start
        if rid == last_run:
            break
    run.others = len([r for r in starts if rows[r]]) - run.runs
    return run


def _csv_tag(stem: str) -> str:
    if stem.startswith("Train_Samples_"):
        return "Train/Samples/" + stem[len("Train_Samples_"):]
    m = re.fullmatch(r"Memory_rank(\d+)_(\w+)", stem)
    return memory_tag(int(m.group(1)), m.group(2)) if m else stem


def _load_csvs(run_dir: str, files: list[str]) -> Run:
    by_samples: dict[int, dict] = {}
    for path in files:
        tag = _csv_tag(os.path.splitext(os.path.basename(path))[0])
        with open(path, newline="") as f:
            for row in csv.reader(f):
                if len(row) != 2 or row[0] == "step":
                    continue
                try:
                    x, v = int(float(row[0])), float(row[1])
                except ValueError:
                    continue
                by_samples.setdefault(x, {"samples": x, "scalars": {}})["scalars"][tag] = v
    return Run(run_dir, "csv", rows=[by_samples[x] for x in sorted(by_samples)])


def load_run(run_dir: str) -> Run:
    """The run in ``run_dir`` (``run.jsonl``, else DeepSpeed-style CSVs); :class:`MonitorError`
    saying where to look when there is neither."""
    if not os.path.isdir(run_dir):
        raise MonitorError(f"{run_dir}: no such directory. Pass a monitor's log directory, "
                           "<output_path>/<job_name> of the tensorboard or csv_monitor section.")
    log = os.path.join(run_dir, RUN_LOG)
    if os.path.isfile(log):
        run = _load_jsonl(run_dir, log)
    else:
        files = sorted(glob.glob(os.path.join(run_dir, "*.csv")))
        if not files:
            below = sorted(os.path.relpath(os.path.dirname(p), run_dir)
                           for p in glob.glob(os.path.join(run_dir, "*", RUN_LOG)))
            hint = (f" It has run directories below it: {', '.join(below)}." if below else
                    " Turn on tensorboard or csv_monitor in the config; the monitor writes run.jsonl "
                    "under <output_path>/<job_name>.")
            raise MonitorError(f"{run_dir}: no {RUN_LOG} or csv_monitor files to report.{hint}")
        run = _load_csvs(run_dir, files)
    if not run.rows:
        raise MonitorError(f"{run_dir}: the run logged no interval yet (the monitor writes every "
                           "steps_per_print steps and at engine.destroy()). Train longer or lower steps_per_print.")
    return run


# -- the numbers ------------------------------------------------------------------------------
def _finite(values: list[float]) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def summarize(run: Run) -> dict:
    last = run.rows[-1]
    _, loss = run.series(LOSS)
    loss_f = _finite(loss)
    out = {"steps": last.get("step"), "samples": last["samples"], "intervals": len(run.rows),
           "final_loss": loss[-1] if loss else None, "min_loss": min(loss_f) if loss_f else None,
           "first_loss": loss[0] if loss else None}
    for key, tag in (("final_lr", LR), ("skipped_steps", SKIPPED), ("final_grad_norm", GRAD_NORM)):
        vals = run.series(tag)[1]
        out[key] = vals[-1] if vals else None
    timed = [r for r in run.rows if r.get("tokens") and r.get("seconds") and math.isfinite(r["seconds"])]
    if timed:  # tokens over time, not the mean of interval rates
        out["tokens_per_s"] = sum(r["tokens"] for r in timed) / sum(r["seconds"] for r in timed)
    else:
        vals = _finite(run.series(TOKENS_PER_S)[1])
        out["tokens_per_s"] = sum(vals) / len(vals) if vals else None
    for key, tag in (("samples_per_s", SAMPLES_PER_S), ("tflops", TFLOPS), ("mfu", MFU)):
        vals = _finite(run.series(tag)[1])
        out[key] = sum(vals) / len(vals) if vals else None
    secs = _finite([r.get("seconds", float("nan")) for r in run.rows])
    out["train_seconds"] = sum(secs) if secs else None
    out["peak_memory"] = {r: {k: max(_finite(run.series(memory_tag(r, k))[1]), default=None) for k in MEMORY_KEYS}
                          for r in run.ranks()}
    return out


def _fmt(v, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format(v, spec)


def _mib(v) -> str:
    return "n/a" if v is None else f"{v / MIB:,.2f}"


def markdown(run: Run, s: dict, png: str) -> str:
    m = run.meta
    lines = [f"# Run report: {os.path.basename(os.path.abspath(run.run_dir))}", "",
             f"![training curves]({os.path.basename(png)})", "", "| | |", "|---|---|"]
    facts = [("run directory", os.path.abspath(run.run_dir)), ("config", m.get("config") or "unknown"),
             ("read from", run.source + (f" ({run.runs} runs joined: each resumed the one before)"
                                         if run.runs > 1 else "")
              + (f"; {run.others} other run(s) in the file not shown" if run.others else "")),
             ("ranks (data parallel)", f"{m['world_size']} ({m.get('dp_size')})" if "world_size" in m else "unknown"),
             ("trainable parameters", f"{m['parameters']:,}" if m.get("parameters") else "unknown"),
             ("optimizer steps", _fmt(s["steps"], "d") if s["steps"] is not None else "n/a"),
             ("samples", f"{s['samples']:,}"),
             ("loss: first / final / min", f"{_fmt(s['first_loss'])} / {_fmt(s['final_loss'])} / {_fmt(s['min_loss'])}"),
             ("final learning rate", _fmt(s["final_lr"])),
             ("final grad norm", _fmt(s["final_grad_norm"])),
             ("mean tokens/s", _fmt(s["tokens_per_s"], ",.0f")),
             ("mean samples/s", _fmt(s["samples_per_s"], ",.1f")),
             ("mean TFLOPS per device", _fmt(s["tflops"], ".4g")),
             ("mean MFU", _fmt(s["mfu"], ".2%") if s["mfu"] is not None else "n/a (peak unknown or CPU)"),
             ("skipped steps", _fmt(s["skipped_steps"], ".0f")),
             ("training time in intervals (s)", _fmt(s["train_seconds"], ".1f"))]
    lines += [f"| {k} | {v} |" for k, v in facts]
    if s["peak_memory"]:
        lines += ["", "## Peak memory per rank (MiB)", "",
                  "| rank | model state | process RSS | CUDA max allocated |", "|---:|---:|---:|---:|"]
        for r, mem in s["peak_memory"].items():
            lines.append(f"| {r} | {_mib(mem['total_bytes'])} | {_mib(mem['rss_bytes'])} | "
                         f"{_mib(mem['max_allocated_bytes'])} |")
    lines += ["", "Model state is `engine.memory_report()['total']` (parameters, gradients, fp32 masters, "
              "optimizer state held by the rank); x-axis of every curve: samples."]
    return "\n".join(lines) + "\n"


# -- the figure ---------------------------------------------------------------------------------
def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.5")


def plot(run: Run, s: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.2), constrained_layout=True)
    (ax_loss, ax_tput, ax_gn), (ax_mem, ax_rss, ax_skip) = axes
    title = os.path.basename(os.path.abspath(run.run_dir))
    bits = [f"{s['steps']} steps" if s["steps"] is not None else None, f"{s['samples']:,} samples",
            f"{run.meta['world_size']} rank(s)" if "world_size" in run.meta else None,
            f"config {run.meta['config']}" if run.meta.get("config") else None]
    fig.suptitle(f"{title}: " + ", ".join(b for b in bits if b), fontsize=13)

    x, y = run.series(LOSS)
    if x:
        ax_loss.plot(x, y, "o-", color="tab:blue", ms=3, label="train loss")
        ax_loss.set_ylabel("train loss (mean over ranks)", color="tab:blue")
    else:
        _empty(ax_loss, "no loss logged")
    xl, yl = run.series(LR)
    if xl:
        ax_lr = ax_loss.twinx()
        ax_lr.plot(xl, yl, "-", color="tab:orange", lw=1.5)
        ax_lr.set_ylabel("learning rate", color="tab:orange")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_loss.set_title(f"loss (final {_fmt(s['final_loss'])}, min {_fmt(s['min_loss'])}) and lr")

    tag = TOKENS_PER_S if run.series(TOKENS_PER_S)[0] else SAMPLES_PER_S
    x, y = run.series(tag)
    if x:
        ax_tput.plot(x, y, "o-", color="tab:green", ms=3)
        ax_tput.set_ylabel(tag.rsplit("/", 1)[-1].replace("_per_s", "/s"))
        ax_tput.set_ylim(bottom=0)
        mean = s["tokens_per_s"] if tag == TOKENS_PER_S else s["samples_per_s"]
        ttl = f"throughput (mean {_fmt(mean, ',.0f')} {'tokens' if tag == TOKENS_PER_S else 'samples'}/s"
        if s["tflops"] is not None:
            ttl += f", {_fmt(s['tflops'], '.3g')} TFLOPS/device"
        if s["mfu"] is not None:
            ttl += f", MFU {s['mfu']:.1%}"
        ax_tput.set_title(ttl + ")")
    else:
        _empty(ax_tput, "no throughput logged")
        ax_tput.set_title("throughput")

    x, y = run.series(GRAD_NORM)
    if x:
        ax_gn.plot(x, y, "o-", color="tab:purple", ms=3)
        ax_gn.set_ylim(bottom=0)
    else:
        _empty(ax_gn, "no gradient norm logged")
    ax_gn.set_title("gradient norm (before clipping)")

    ranks = run.ranks()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, keys, name in ((ax_mem, ("total_bytes",), "model state per rank (MiB)"),
                           (ax_rss, ("rss_bytes", "max_allocated_bytes"), "process memory per rank (MiB)")):
        drawn = False
        for i, r in enumerate(ranks):
            for key, style in zip(keys, ("-", "--")):
                x, y = run.series(memory_tag(r, key))
                if x:
                    label = f"rank {r}" + ("" if len(keys) == 1 else f" {key.replace('_bytes', '')}")
                    ax.plot(x, [v / MIB for v in y], style, color=colors[i % len(colors)], label=label)
                    drawn = True
        if drawn:
            ax.set_ylabel("MiB")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=8, ncol=2 if len(ranks) > 4 else 1)
        else:
            _empty(ax, "no memory logged")
        ax.set_title(name)

    x, y = run.series(SKIPPED)
    if x:
        ax_skip.step(x, y, where="post", color="tab:red")
        ax_skip.set_ylim(bottom=0, top=max(1.0, max(_finite(y), default=0) * 1.2))
        ax_skip.yaxis.get_major_locator().set_params(integer=True)
    else:
        _empty(ax_skip, "no skipped-step count logged")
    ax_skip.set_title(f"skipped steps (cumulative; {_fmt(s['skipped_steps'], '.0f')} in all)")

    for ax in axes.flat:
        ax.set_xlabel("samples")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(run_dir: str, out_dir: str | None = None) -> tuple[str, str]:
    """Write ``report.png`` and ``report.md`` into ``out_dir`` (default: ``run_dir``); their paths."""
    run = load_run(run_dir)
    out_dir = out_dir or run_dir
    os.makedirs(out_dir, exist_ok=True)
    png, md = os.path.join(out_dir, PNG), os.path.join(out_dir, MARKDOWN)
    s = summarize(run)
    plot(run, s, png)
    with open(md, "w") as f:
        f.write(markdown(run, s, png))
    return os.path.abspath(png), os.path.abspath(md)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardwise report", description="A PNG of the training curves and "
                                "a Markdown summary of a monitored run (tensorboard / csv_monitor log dir).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the monitor's log directory: <output_path>/<job_name>")
    p.add_argument("--out", default=None, help="where report.png and report.md go (default: RUN_DIR)")
    args = p.parse_args(argv)
    png, md = report(args.run_dir, args.out)
    print(png)
    print(md)
    return 0
