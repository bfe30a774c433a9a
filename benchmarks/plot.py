"""Plot compare.py's JSON: per model, step time vs DDP and model-state MiB per rank.

    .venv/bin/python benchmarks/plot.py [--json benchmarks/results.json] [--out benchmarks/results.png]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def plot(results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # rows without a timed sample (failed: see compare.py's "failures") are left out of the plot
    models = [m for m, res in results["models"].items() if any(_ok(r) for r in res["rows"])]
    if not models:
        raise SystemExit("plot.py: no measured rows in the JSON (every run failed); nothing to plot")
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 3.6 * len(models)), squeeze=False)
    noted = False
    for row, m in zip(axes, models):
        res = results["models"][m]
        rows = [r for r in res["rows"] if _ok(r)]
        names = [r["system"] for r in rows]
        x = range(len(rows))
        colors = ["tab:gray" if n in ("ddp", "plain") else "tab:orange" if n == "fsdp2"
                  else "tab:green" if n.startswith("ds") else "tab:blue" for n in names]
        ratio = [r["ratio_vs_ddp"] for r in rows]
        err = [[r["ratio_vs_ddp"] - r["ratio_iqr"][0] for r in rows],
               [r["ratio_iqr"][1] - r["ratio_vs_ddp"] for r in rows]]
        ax = row[0]
        ax.bar(x, ratio, color=colors, yerr=err, capsize=3)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        for i, v in enumerate(ratio):
            ax.text(i, v + err[1][i] + 0.02, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, 1.15 * max(v + e for v, e in zip(ratio, err[1])))
        ax.set_xticks(list(x), names, rotation=20)
        ax.set_ylabel("step time / DDP\n(median of paired ratios; IQR)")
        flag = " (*)" if any(r.get("note") for r in rows) else ""
        noted = noted or bool(flag)
        ax.set_title(f"{m} ({res['n_params'] / 1e6:.2f}M params, {res.get('precision', 'fp32')}): "
                     f"step time vs DDP{flag}")
        ax = row[1]
        mib = [r["model_state_bytes"] / 2**20 for r in rows]
        ax.bar(x, mib, color=colors)
        ax.scatter(list(x), [r["ideal_bytes"] / 2**20 for r in rows], marker="_", s=400, color="k",
                   zorder=3, label="ideal")
        for i, v in enumerate(mib):
            ax.text(i, v * 1.01, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, 1.2 * max(mib + [r["ideal_bytes"] / 2**20 for r in rows]))
        ax.set_xticks(list(x), names, rotation=20)
        ax.set_ylabel("MiB per rank")
        ax.set_title(f"{m}: model state per rank (params + grads + optimizer)")
        ax.legend(loc="upper center", fontsize=8, ncol=1, framealpha=0.9)
    fig.suptitle(f"shardwise vs peers, {results['cores']} cores of {results['cpu']}, torch {results['torch']}, "
                 f"{results['date']}" + ("\n(*) busy machine or failed rounds: see the rows' notes in the JSON"
                                          if noted else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def _ok(row: dict) -> bool:
    return row.get("status", "ok") == "ok" and row.get("ratio_vs_ddp") is not None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=str(_HERE / "results.json"))
    ap.add_argument("--out", default=str(_HERE / "results.png"))
    args = ap.parse_args(argv)
    print(f"wrote {plot(json.loads(Path(args.json).read_text()), Path(args.out))}")


if __name__ == "__main__":
    main()
