"""The method x domain summary of a set of runs: mean and spread over seeds, the delta vs random
paired by seed with a 95% t-interval, and the files ``daar-ops evaluate`` writes (JSON, CSV,
Markdown, bar chart). The report with controls and detectable effects is
:mod:`daar_ops.evaluation_report`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from daar_ops.evaluation.runs import BASE, FULL, RANDOM, write_json_atomic

def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t interval); half-width nan for fewer than 2 values."""
    from scipy import stats

    arr = np.asarray(values, dtype=float)
    if arr.size < 2:
        return float(arr.mean()) if arr.size else float("nan"), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, arr.size - 1) * arr.std(ddof=1) / np.sqrt(arr.size)
    return float(arr.mean()), float(half)


def summarize(results: Sequence[Mapping[str, Any]], reference: str = RANDOM) -> dict[str, Any]:
    """Per method: per-domain and average loss (mean, std over seeds), delta vs ``reference``.

    The delta is paired by seed (method seed s minus reference seed s, the same data order and
    LoRA initialisation) and carries a 95% t-interval over seeds; ``outside_spread`` is true when
    that interval excludes 0.
    """
    by_method: dict[str, dict[Any, Mapping[str, Any]]] = {}
    for r in results:
        by_method.setdefault(r["method"], {})[r["seed"]] = r
    domains = sorted({d for r in results for d in r["losses"]})
    ref = by_method.get(reference, {})
    rows = []
    for method, runs in by_method.items():
        seeds = sorted(runs, key=lambda s: -1 if s is None else s)
        row: dict[str, Any] = {"method": method, "seeds": [s for s in seeds if s is not None],
                               "n_selected": runs[seeds[0]]["n_selected"]}
        for d in domains:
            vals = [runs[s]["losses"][d]["loss"] for s in seeds if d in runs[s]["losses"]]
            row[d] = float(np.mean(vals))
            row[f"{d}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        avg = [runs[s]["avg_loss"] for s in seeds]
        row["avg_loss"] = float(np.mean(avg))
        row["avg_loss_std"] = float(np.std(avg, ddof=1)) if len(avg) > 1 else 0.0
        if method != reference:
            for d in domains:  # per-domain paired deltas, for the chart
                diffs = [runs[s]["losses"][d]["loss"] - ref[s]["losses"][d]["loss"]
                         for s in seeds if s in ref and d in runs[s]["losses"]
                         and d in ref[s]["losses"]]
                if diffs:
                    row[f"{d}_delta"], row[f"{d}_delta_ci95"] = t_interval(diffs)
        paired = [runs[s]["avg_loss"] - ref[s]["avg_loss"] for s in seeds if s in ref]
        if method != reference and paired:
            mean, half = t_interval(paired)
            row.update(delta_vs_random=mean, delta_ci95=half, delta_n=len(paired),
                       outside_spread=bool(half == half and abs(mean) > half))
        row["train_seconds"] = float(np.mean([runs[s].get("train_seconds", 0.0) for s in seeds]))
        for task in sorted({t for s in seeds for t in runs[s].get("benchmarks", {})}):
            scores = [_main_metric(runs[s]["benchmarks"][task]) for s in seeds
                      if task in runs[s].get("benchmarks", {})]
            row[f"bench:{task}"] = float(np.mean(scores))
        rows.append(row)
    # the best selection at the budget: neither the untuned model nor the whole-slice reference
    tuned = [r for r in rows if r["method"] not in (BASE, FULL)]
    best = min(tuned, key=lambda r: r["avg_loss"]) if tuned else None
    return {"domains": domains, "reference": reference, "rows": rows,
            "best_method": best["method"] if best else None}


def _main_metric(metrics: Mapping[str, float]) -> float:
    """The first accuracy-like metric lm-eval reported for a task (acc, exact_match, pass@1)."""
    for prefix in ("acc_norm", "acc", "exact_match", "pass@1", "pass_at_1"):
        for key, value in metrics.items():
            if key.split(",")[0] == prefix:
                return float(value)
    return float(next(iter(metrics.values()), float("nan")))


def format_table(summary: Mapping[str, Any]) -> str:
    """Markdown: method x domain loss (mean +- std over seeds), average, delta vs random (CI95)."""
    domains = summary["domains"]
    head = (["method", "n", "seeds"] + domains
            + ["avg loss", f"delta vs {summary['reference']} (95% CI)", "outside spread"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        cells = [r["method"], str(r["n_selected"]), str(len(r["seeds"]) or "-")]
        cells += [f"{r[d]:.4f} ± {r[f'{d}_std']:.4f}" for d in domains]
        cells.append(f"{r['avg_loss']:.4f} ± {r['avg_loss_std']:.4f}")
        if "delta_vs_random" in r:
            cells += [f"{r['delta_vs_random']:+.4f} ± {r['delta_ci95']:.4f}",
                      "yes" if r["outside_spread"] else "no"]
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    bench = sorted({k for r in summary["rows"] for k in r if k.startswith("bench:")})
    if bench:
        lines += ["", "| method | " + " | ".join(b[6:] for b in bench) + " |",
                  "|" + "---|" * (len(bench) + 1)]
        lines += ["| " + r["method"] + " | " + " | ".join(
            f"{r[b]:.4f}" if b in r else "-" for b in bench) + " |" for r in summary["rows"]]
    return "\n".join(lines) + "\n"


def plot_losses(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Grouped bar chart: held-out loss per domain (and the average) for each method, std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(summary["domains"]) + ["avg_loss"]
    rows = summary["rows"]
    width = 0.8 / max(len(rows), 1)
    compared = [r for r in rows if "delta_vs_random" in r]
    fig, axes = plt.subplots(2 if compared else 1, 1, squeeze=False, figsize=(
        max(6.0, 1.6 * len(groups) + 0.25 * len(rows)), 7.6 if compared else 4.2))
    ax = axes[0][0]
    x = np.arange(len(groups))
    for i, r in enumerate(rows):
        means = [r[g] for g in groups]
        stds = [r[f"{g}_std"] for g in groups]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, means, width, yerr=stds, capsize=2,
               label=r["method"])
    ax.set_xticks(x, [g.replace("avg_loss", "average") for g in groups])
    ax.set_ylabel("held-out loss per answer token (nats)")
    lows = [r[g] - r[f"{g}_std"] for r in rows for g in groups]
    highs = [r[g] + r[f"{g}_std"] for r in rows for g in groups]
    if lows:
        pad = 0.1 * (max(highs) - min(lows) + 1e-6)
        ax.set_ylim(max(0.0, min(lows) - pad), max(highs) + pad)
    ax.legend(fontsize=7, ncol=min(4, len(rows)))
    ax.set_title("Fine-tuned on each selection: held-out loss by domain (lower is better)")
    if compared:
        # Domains differ in loss far more than methods do: the paired difference shows the effect.
        dx = axes[1][0]
        w = 0.8 / len(compared)
        keys = [f"{d}_delta" for d in summary["domains"]] + ["delta_vs_random"]
        for i, r in enumerate(compared):
            means = [r.get(k, np.nan) for k in keys]
            cis = [r.get(f"{k}_ci95" if k != "delta_vs_random" else "delta_ci95", np.nan)
                   for k in keys]
            dx.bar(x + (i - (len(compared) - 1) / 2) * w, means, w,
                   yerr=np.nan_to_num(cis), capsize=2, label=r["method"],
                   color=f"C{rows.index(r)}")
        dx.axhline(0.0, color="black", linewidth=0.8)
        dx.set_xticks(x, [g.replace("avg_loss", "average") for g in groups])
        dx.set_ylabel(f"loss - {summary['reference']} (paired, 95% CI)")
        dx.legend(fontsize=7, ncol=min(4, len(compared)))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(results: Sequence[Mapping[str, Any]], out_dir: str | Path,
                  context: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """results.json, table.csv, table.md, losses.png and summary.md under ``out_dir``."""
    import csv

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    payload = {"context": dict(context or {}), "summary": summary, "runs": list(results)}
    write_json_atomic(out_dir / "results.json", payload)
    table = format_table(summary)
    (out_dir / "table.md").write_text(table)
    cols = sorted({k for r in summary["rows"] for k in r if k != "seeds"},
                  key=lambda k: (k != "method", k))
    with open(out_dir / "table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=cols)
        writer.writeheader()
        for r in summary["rows"]:
            writer.writerow({c: r.get(c, "") for c in cols})
    plot_losses(summary, out_dir / "losses.png")
    ctx = "\n".join(f"- {k}: {v}" for k, v in (context or {}).items())
    (out_dir / "summary.md").write_text(
        "# Fine-tuned on each selection: held-out loss per domain\n\n"
        "Mean negative log-likelihood per answer token (nats) on held-out records of each domain "
        "(never in any selection), mean ± std over seeds; the delta vs random is paired by seed "
        "with a 95% t-interval; 'outside spread' = the interval excludes 0.\n\n"
        f"{ctx}\n\n{table}\n![losses](losses.png)\n")
    return summary
