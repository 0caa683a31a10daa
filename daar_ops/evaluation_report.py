"""The downstream verdict from finished runs: controls, method table, chart, RESULT line.

Reads only the small per-run files ``RESULTS/runs/METHOD/seed-S/result.json`` that
:func:`daar_ops.evaluation.evaluate_selections` writes (per-record nll sums included), so the
whole report is regenerated from committed results without loading a model
(``tools/eval_downstream.py --report-only``). Statistics:
:mod:`daar_ops.algorithms.downstream_stats`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from daar_ops.algorithms.downstream_stats import PENDING, paired_comparison
from daar_ops.evaluation import (ALL_SEEDS, BASE, CONTROL_NAMES, CONTROLS, DEFAULT_METHODS, FULL,
                                 MIX_FILE, RANDOM, SINGLE_DOMAIN, write_json_atomic)

METRICS = {"answer": ("nll", "tokens"), "final": ("final_nll", "final_tokens")}


def load_runs(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every finished run under ``results_dir/runs`` (files that do not parse are skipped)."""
    runs = []
    for path in sorted(Path(results_dir).glob("runs/*/*/result.json")):
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return runs


def main_config(runs: Sequence[Mapping[str, Any]]) -> str | None:
    """The comparison key most runs share (runs of other settings/precision are not mixed in)."""
    keys = Counter(r.get("config_key") for r in runs if r.get("config_key"))
    return keys.most_common(1)[0][0] if keys else None


def run_vector(run: Mapping[str, Any], metric: str = "answer") -> tuple[np.ndarray, np.ndarray,
                                                                        np.ndarray, list[str]]:
    """(per-record nll sums, token counts, domain index, domain names) of one run (domains
    sorted)."""
    nll_key, tok_key = METRICS[metric]
    names = sorted(run["losses"])
    nll, tok, grp = [], [], []
    for g, d in enumerate(names):
        recs = run["losses"][d]["records"]
        nll += recs[nll_key]
        tok += recs[tok_key]
        grp += [g] * len(recs[nll_key])
    return np.asarray(nll, float), np.asarray(tok, float), np.asarray(grp, int), names


def compare(runs_by: Mapping[str, Mapping[Any, Mapping[str, Any]]], method: str, reference: str,
            metric: str = "answer", n_boot: int = 2000) -> dict[str, Any] | None:
    """The paired comparison of ``method`` with ``reference`` over their common seeds (the
    untuned ``base`` pairs with every seed); None when nothing pairs."""
    mine = runs_by.get(method, {})
    ref = runs_by.get(reference, {})
    if not mine or not ref:
        return None
    if reference == BASE:
        seeds = sorted(s for s in mine if s is not None)
        ref_rows = [ref[None]]
    else:
        seeds = sorted(s for s in mine if s in ref and s is not None)
        ref_rows = [ref[s] for s in seeds]
    if not seeds:
        return None
    vectors = [run_vector(mine[s], metric) for s in seeds]
    ref_vectors = [run_vector(r, metric) for r in ref_rows]
    _, tokens, groups, names = vectors[0]
    for _, t, g, n in vectors + ref_vectors:
        if n != names or not np.array_equal(t, tokens):
            raise ValueError(f"{method} and {reference} were scored on different evaluation sets")
    out = paired_comparison(np.stack([v[0] for v in vectors]),
                            np.stack([v[0] for v in ref_vectors]), tokens, groups, names,
                            n_boot=n_boot)
    return {"method": method, "reference": reference, "metric": metric, "seeds": seeds,
            "average": out["average"].to_dict(),
            "domains": {d: e.to_dict() for d, e in out["domains"].items()}}


def pairwise(runs_by: Mapping[str, Mapping[Any, Mapping[str, Any]]], methods: Sequence[str],
             n_boot: int = 2000) -> list[dict[str, Any]]:
    """Every pair of ``methods`` compared directly (paired by seed, average answer-token loss):
    ``delta`` = the later method's loss minus the earlier one's. Two fixed selections pair
    without random's draw-to-draw noise, so a pair can be told apart where each one's delta
    against random is not."""
    out = []
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            comp = compare(runs_by, b, a, "answer", n_boot)
            if comp is not None:
                out.append({"method": b, "reference": a, "seeds": comp["seeds"],
                            **{k: comp["average"][k] for k in ("delta", "ci95", "mde",
                                                                 "verdict")}})
    return out


def format_pairs(report: Mapping[str, Any]) -> str:
    """The pairwise comparisons as a table (row method minus column reference)."""
    pairs = report.get("pairs") or []
    if not pairs:
        return "(no two methods share a seed yet)\n"
    lines = ["| method | vs | seeds | delta avg | 95% CI | MDE | verdict |",
             "|---|---|---|---|---|---|---|"]
    for c in pairs:
        lines.append(f"| {c['method']} | {c['reference']} | {len(c['seeds'])} | "
                     f"{_f(c['delta'], sign=True)} | ± {_f(c['ci95'])} | {_f(c['mde'])} | "
                     f"{c['verdict']} |")
    return "\n".join(lines) + "\n"


def _f(v: Any, digits: int = 4, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "nan"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def control_outcome(pid: str, comp: Mapping[str, Any] | None, min_seeds: int = 3) -> dict:
    """Whether positive control ``pid`` passed, with the numbers it was judged on."""
    if comp is None:
        return {"id": pid, "status": PENDING, "passed": False, "seeds": 0}
    avg = comp["average"]
    dom = comp["domains"]
    numbers = {"delta": avg["delta"], "ci95": avg["ci95"], "mde": avg["mde"],
               "verdict": avg["verdict"],
               "domains": {d: {"delta": e["delta"], "ci95": e["ci95"], "p_holm": e["p_holm"],
                               "verdict": e["verdict"]} for d, e in dom.items()}}
    if len(comp["seeds"]) < 2:  # one seed: the delta is measured, its noise is not
        return {"id": pid, "status": PENDING, "passed": False, "seeds": len(comp["seeds"]),
                **numbers}

    def below_zero(e):  # the 95% interval lies entirely below 0
        return e["ci95"] is not None and e["delta"] + e["ci95"] < 0

    def above_zero(e):
        return e["ci95"] is not None and e["delta"] - e["ci95"] > 0

    if pid in ("P0", "P1"):
        passed = below_zero(avg)
    elif pid == "P2":
        single = dom.get(SINGLE_DOMAIN)
        passed = bool(single and single["delta"] < 0 and single["p_holm"] is not None
                      and single["p_holm"] < 0.05
                      and all(e["delta"] > 0 for d, e in dom.items() if d != SINGLE_DOMAIN))
    else:  # P3
        passed = above_zero(avg)
    status = "passed" if passed else ("failed" if len(comp["seeds"]) >= min_seeds else PENDING)
    return {"id": pid, "status": status, "passed": bool(passed), "seeds": len(comp["seeds"]),
            **numbers}


def selected_mix(mix: Mapping[str, Mapping[str, Mapping[str, int]]] | None, method: str,
                 seeds: Sequence[int], domains: Sequence[str] = ()) -> dict[str, float] | None:
    """The ground-truth domain counts of ``method``'s selection (``selections/domains.json``,
    written by :func:`daar_ops.evaluation.prepare_comparison`), averaged over the draws of
    ``seeds`` for a per-seed selection, 0 for each of ``domains`` it has none of; None when not
    recorded."""
    by_draw = (mix or {}).get(method)
    if not by_draw:
        return None
    draws = ([by_draw[ALL_SEEDS]] if ALL_SEEDS in by_draw
             else [by_draw[str(s)] for s in seeds if str(s) in by_draw])
    if not draws:
        return None
    names = sorted({*domains, *(d for draw in draws for d in draw)})
    return {d: float(np.mean([draw.get(d, 0) for draw in draws])) for d in names}


def format_mix(counts: Mapping[str, float] | None) -> str:
    """``"41/53/56/50"``: the counts in sorted domain order ("-" when not recorded)."""
    if not counts:
        return "-"
    return "/".join(f"{counts[d]:.0f}" if float(counts[d]).is_integer() else f"{counts[d]:.1f}"
                    for d in sorted(counts))


def load_mix(results_dir: str | Path) -> dict[str, Any] | None:
    """``selections/domains.json`` under ``results_dir`` (None when absent or unreadable)."""
    try:
        return json.loads((Path(results_dir) / "selections" / MIX_FILE).read_text())["mix"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


def build_report(runs: Sequence[Mapping[str, Any]], methods: Sequence[str] = DEFAULT_METHODS,
                 n_boot: int = 2000,
                 mix: Mapping[str, Mapping[str, Mapping[str, int]]] | None = None
                 ) -> dict[str, Any]:
    """Controls P0-P3, every method (and ``full``) vs random, per domain, both metrics; with
    ``mix`` (:func:`load_mix`) the ground-truth domain counts of each selection."""
    key = main_config(runs)
    chosen = [r for r in runs if r.get("config_key") == key]
    runs_by: dict[str, dict[Any, Mapping[str, Any]]] = {}
    for r in chosen:
        runs_by.setdefault(r["method"], {})[r["seed"]] = r
    domains = sorted(chosen[0]["losses"]) if chosen else []
    controls = {}
    for pid, (method, reference, what) in CONTROLS.items():
        comp = compare(runs_by, method, reference, "answer", n_boot)
        controls[pid] = {**control_outcome(pid, comp), "what": what, "method": method,
                         "reference": reference,
                         "mix": selected_mix(mix, method, sorted(
                             s for s in runs_by.get(method, {}) if s is not None), domains),
                         "final": (compare(runs_by, method, reference, "final", n_boot) or {}
                                   ).get("average")}
    rows = []
    for method in [m for m in [*methods, FULL] if m in runs_by]:
        seeds = sorted(s for s in runs_by[method] if s is not None)
        row: dict[str, Any] = {"method": method, "seeds": seeds,
                               "n_selected": runs_by[method][seeds[0]]["n_selected"],
                               "mix": selected_mix(mix, method, seeds, domains)}
        for d in sorted(runs_by[method][seeds[0]]["losses"]):
            row[d] = float(np.mean([runs_by[method][s]["losses"][d]["loss"] for s in seeds]))
            row[f"{d}_final"] = float(np.mean([runs_by[method][s]["losses"][d]["final_loss"]
                                               for s in seeds]))
        row["avg_loss"] = float(np.mean([runs_by[method][s]["avg_loss"] for s in seeds]))
        row["avg_final_loss"] = float(np.mean([runs_by[method][s].get("avg_final_loss", np.nan)
                                               for s in seeds]))
        if method != RANDOM:
            row["vs_random"] = compare(runs_by, method, RANDOM, "answer", n_boot)
            row["vs_random_final"] = compare(runs_by, method, RANDOM, "final", n_boot)
        rows.append(row)
    base = runs_by.get(BASE, {}).get(None)
    budget_rows = [r for r in rows if r["method"] != FULL]
    pairs = pairwise(runs_by, [r["method"] for r in budget_rows if r["method"] != RANDOM],
                     n_boot)  # each one vs random is the method table
    compared = [r for r in budget_rows if r.get("vs_random")]
    mdes = [r["vs_random"]["average"]["mde"] for r in compared
            if r["vs_random"]["average"]["mde"] is not None]
    best = min(budget_rows, key=lambda r: r["avg_loss"]) if budget_rows else None
    return {"config_key": key, "runs": len(chosen), "ignored_runs": len(runs) - len(chosen),
            "settings": chosen[0].get("settings") if chosen else None,
            "resolved": chosen[0].get("resolved") if chosen else None,
            "base": ({"avg_loss": base["avg_loss"], "avg_final_loss": base.get("avg_final_loss"),
                      **{d: v["loss"] for d, v in base["losses"].items()}} if base else None),
            "domains": domains, "controls": controls, "rows": rows, "pairs": pairs,
            "mde": float(np.median(mdes)) if mdes else None,
            "best_method": best["method"] if best else None}


def result_line(report: Mapping[str, Any]) -> str:
    """The RESULT line; ``nan`` / ``pending`` for what is not measured yet."""
    c = report["controls"]
    passed = sum(1 for v in c.values() if v["passed"])
    rows = {r["method"]: r for r in report["rows"]}
    budget = [r for r in report["rows"] if r["method"] != FULL]

    def delta(m, field="delta"):
        comp = rows.get(m, {}).get("vs_random")
        return comp["average"][field] if comp else None

    best = report["best_method"]
    mde = report["mde"] if report["mde"] is not None else c["P3"].get("mde")
    seeds = min((len(r["seeds"]) for r in budget), default=0)
    bdelta = 0.0 if best == RANDOM else delta(best)
    return (f"RESULT controls_passed={passed}/{len(c)} mde={_f(mde)} "
            f"movement={_f(c['P0'].get('delta'), sign=True)} "
            f"p3_delta={_f(c['P3'].get('delta'), sign=True)} p3_ci95={_f(c['P3'].get('ci95'))} "
            f"methods={len(budget)} seeds={seeds} "
            f"random_avg_loss={_f(rows.get(RANDOM, {}).get('avg_loss'))} "
            f"daar_delta={_f(delta('daar'), sign=True)} daar_ci95={_f(delta('daar', 'ci95'))} "
            f"daar_per_domain_delta={_f(delta('daar_per_domain'), sign=True)} "
            f"best_method={best or 'pending'} best_delta={_f(bdelta, sign=True)} "
            f"best_ci95={_f(None if best == RANDOM else delta(best, 'ci95'))}")


def format_controls(report: Mapping[str, Any]) -> str:
    mix = " / ".join(report.get("domains", []))
    lines = [f"| control | what must hold | selected ({mix}) | seeds | delta avg (answer tokens) | "
             "95% CI | MDE | verdict | per domain (delta, Holm p) | final-answer delta | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for pid, c in report["controls"].items():
        dom = "; ".join(f"{d} {_f(e['delta'], sign=True)} (p {_f(e['p_holm'], 3)}, "
                        f"{e['verdict']})" for d, e in c.get("domains", {}).items()) or "-"
        fin = c.get("final") or {}
        lines.append(
            f"| {pid} | {c['what']} | {format_mix(c.get('mix'))} | {c['seeds']} | "
            f"{_f(c.get('delta'), sign=True)} | ± {_f(c.get('ci95'))} | {_f(c.get('mde'))} | "
            f"{c.get('verdict', PENDING)} | {dom} | "
            f"{_f(fin.get('delta'), sign=True)} ± {_f(fin.get('ci95'))} | {c['status']} |")
    return "\n".join(lines) + "\n"


def format_methods(report: Mapping[str, Any]) -> str:
    rows = report["rows"]
    if not rows:
        return "(no method has a finished run yet)\n"
    domains = report["domains"]
    head = (["method", "n", f"selected ({' / '.join(domains)})", "seeds"] + domains
            + ["avg loss", "avg final-answer loss", "delta vs random (95% CI)", "MDE", "verdict",
               "final-answer delta (95% CI)", "per-domain deltas (Holm verdict)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["n_selected"]), format_mix(r.get("mix")),
                 str(len(r["seeds"]))]
        cells += [_f(r[d]) for d in domains]
        cells += [_f(r["avg_loss"]), _f(r["avg_final_loss"])]
        comp, fin = r.get("vs_random"), r.get("vs_random_final")
        if comp:
            a = comp["average"]
            cells += [f"{_f(a['delta'], sign=True)} ± {_f(a['ci95'])}", _f(a["mde"]), a["verdict"],
                      f"{_f(fin['average']['delta'], sign=True)} ± {_f(fin['average']['ci95'])}"
                      if fin else "-",
                      "; ".join(f"{d} {_f(e['delta'], sign=True)} ({e['verdict']})"
                                for d, e in comp["domains"].items())]
        else:
            cells += ["-", "-", "reference" if r["method"] == RANDOM else PENDING, "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_report(report: Mapping[str, Any], path: str | Path) -> Path | None:
    """Paired deltas vs the reference with 95% intervals and the MDE band: controls on the left,
    methods vs random on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(f"{pid} {c['method']}", c.get("delta"), c.get("ci95"), c.get("mde"))
             for pid, c in report["controls"].items() if c.get("delta") is not None]
    items += [(r["method"], r["vs_random"]["average"]["delta"], r["vs_random"]["average"]["ci95"],
               r["vs_random"]["average"]["mde"]) for r in report["rows"] if r.get("vs_random")]
    if not items:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(items) + 2), 4.5))
    x = np.arange(len(items))
    deltas = [i[1] for i in items]
    cis = [i[2] if i[2] is not None else 0.0 for i in items]
    colors = ["C1" if name[:1] == "P" else "C0" for name, *_ in items]
    ax.bar(x, deltas, yerr=cis, capsize=3, color=colors)
    for xi, (_, _, _, mde) in zip(x, items):
        if mde is not None:
            ax.hlines([-mde, mde], xi - 0.4, xi + 0.4, colors="grey", linestyles="dotted")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, [i[0] for i in items], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("paired delta in held-out loss (nats)")
    ax.set_title("Controls (orange, vs their reference) and methods (blue, vs random): 95% CI; "
                 "dotted = ± MDE", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results_dir: str | Path, methods: Sequence[str] = DEFAULT_METHODS,
                 n_boot: int = 2000) -> dict[str, Any]:
    """report.json, table.md, summary.md and deltas.png under ``results_dir`` from its runs."""
    results_dir = Path(results_dir)
    report = build_report(load_runs(results_dir), methods, n_boot, load_mix(results_dir))
    report["result_line"] = result_line(report)
    write_json_atomic(results_dir / "report.json", report)
    controls, table = format_controls(report), format_methods(report)
    (results_dir / "table.md").write_text("## Positive controls\n\n" + controls
                                          + "\n## Methods vs random\n\n" + table)
    chart = plot_report(report, results_dir / "deltas.png")
    base = report["base"]
    (results_dir / "summary.md").write_text(
        "# Downstream evaluation: controls and methods (generated; do not edit)\n\n"
        "Regenerate: `python tools/eval_downstream.py --report-only`. Loss = nats per answer "
        "token on held-out records, token-weighted per domain, averaged over domains. Deltas are "
        "paired by training seed; 95% CI and MDE (alpha 0.05, power 0.8) combine the spread over "
        "seeds with a paired bootstrap over evaluation records; per-domain verdicts are "
        "Holm-adjusted. Below the MDE: 'not detectable'.\n\n"
        f"- runs: {report['runs']} (comparison key {report['config_key']}; "
        f"{report['ignored_runs']} runs with other settings ignored)\n"
        f"- resolved: {report['resolved']}\n- settings: {report['settings']}\n"
        f"- untuned model: {base}\n\n## Positive controls\n\n{controls}\n"
        f"## Methods vs random\n\n{table}\n"
        "## Methods against each other (row minus the method in `vs`)\n\n"
        f"{format_pairs(report)}\n"
        + (f"![deltas]({chart.name})\n\n" if chart else "")
        + f"```\n{report['result_line']}\n```\n")
    return report
