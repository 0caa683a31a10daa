"""The scaling table: seconds and peak RSS of every stage at N in {10k, 50k, 200k, 1M}, with the
fitted exponent of time vs N, a markdown table and a log-log PNG.

Each (stage, N) cell runs in a fresh subprocess (``--child``), so its peak RSS (VmHWM) is its own;
it includes the stage's input (say 1M x 384 float32 = 1.5 GB), whose size is printed beside it.
Inputs are synthetic where real ones are not needed (generation is not timed):

* ``knn``: :func:`daar_ops.algorithms.knn.knn_cosine`, exact (faiss flat), k = 30, on clustered unit
  vectors of d = 384 (1,000 centres, as ``tools/bench_qdit.py --synthetic``);
* ``knn_ivf``: the same with ``index="ivf"`` (nlist ``4 sqrt(N)``, nprobe 32);
* ``ds2``: ``curate_scores`` (defaults: exact kNN, 1,500 HOC steps, 20 detection rounds) of
  ``make_synthetic_ds2(n, dim=384)``;
* ``qdit_exact`` / ``qdit_stochastic``: the public ``qdit_select`` (``method="lazy"`` /
  ``"stochastic"``, epsilon 0.01, seed 0; defaults otherwise), K = N / 20, same vectors as knn;
* ``daar_scoring``: the probe scorer (``DaarProbes.score``: psi_dom + psi_div, the paper's MLP body
  for d = 576) on precomputed features, synthetic d = 576 (weights seeded; time does not depend on
  them);
* ``features``: SmolLM2-135M-Instruct layer 3 (``LayerFeatureExtractor``, fp32, the scoring
  default) on the first N shared-pool records ("{instruction} {input} {output}"): ~30 texts/s on
  this CPU, so it is *measured* only at ``--feature-ns`` (500, 2,000) and *extrapolated* to the
  table's N with its fitted exponent (marked "extrapolated"). Model loading is not timed.

A cell whose time, predicted from the last measured cell with the larger of the fitted and the
stage's nominal exponent (2 for the quadratic stages), exceeds ``--budget-s`` (600) is not run
("skipped: > budget"); a running cell is killed at 2 x budget. Torch (and so faiss) threads:
``--threads`` (1).

Writes ``--out`` (``outputs/bench_scale/``): ``scale.json``, ``scale.md`` (the table) and ``scale.png``.
Last line: ``RESULT scale_exponents=<json stage -> exponent>``.

Usage: ``.venv/bin/python tools/bench_scale.py [--ns 10000 50000 200000 1000000] [--stages ...]``
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

STAGES = ("features", "daar_scoring", "knn", "knn_ivf", "ds2", "qdit_exact", "qdit_stochastic")
NOMINAL_EXPONENT = dict(features=1.0, daar_scoring=1.0, knn=2.0, knn_ivf=1.5, ds2=2.0,
                        qdit_exact=2.0, qdit_stochastic=2.0)
POOL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "daar_pool" / "daar_pool.jsonl.gz"


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def clustered(n: int, d: int = 384, centers: int = 1000, noise: float = 0.8, seed: int = 0
              ) -> np.ndarray:
    """Clustered unit centres plus noise, the vectors of ``tools/bench_qdit.py --synthetic``: a
    stand-in for sentence embeddings, which an ANN index can exploit (pure noise it cannot)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_qdit import synthetic_embeddings

    return synthetic_embeddings(n, d, centers, noise, seed)


def pool_texts(n: int) -> list[str]:
    from daar_ops.text import ALPACA_TEMPLATE, TextTemplate

    tpl = TextTemplate(ALPACA_TEMPLATE)
    out = []
    with gzip.open(POOL, "rt") as f:
        for line in f:
            out.append(tpl.render(json.loads(line)))
            if len(out) == n:
                break
    return out


def child(stage: str, n: int, threads: int) -> dict:
    """Run one stage at one N in this (fresh) process; returns seconds, peak RSS, input size."""
    import torch

    torch.set_num_threads(threads)
    extra: dict = {}
    if stage in ("knn", "knn_ivf", "qdit_exact", "qdit_stochastic"):
        x = clustered(n)
        data_mb = x.nbytes / 2**20
        if stage.startswith("knn"):
            from daar_ops.algorithms.knn import knn_cosine

            kw = dict(index="ivf", nprobe=32) if stage == "knn_ivf" else {}
            t, c0 = time.perf_counter(), time.process_time()
            knn_cosine(x, 30, **kw)
        else:
            from daar_ops.algorithms.qdit import qdit_select

            method = "lazy" if stage == "qdit_exact" else "stochastic"
            t, c0 = time.perf_counter(), time.process_time()
            res = qdit_select(x, select_num=max(1, n // 20), method=method, epsilon=0.01, seed=0,
                              progress=False)
            extra = dict(k=max(1, n // 20), objective=float(res.objective))
    elif stage == "ds2":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from daar_research.ds2 import make_synthetic_ds2

        from daar_ops.algorithms.ds2 import curate_scores

        data = make_synthetic_ds2(n=n, dim=384, seed=0)
        data_mb = data["embeddings"].nbytes / 2**20
        t, c0 = time.perf_counter(), time.process_time()
        res = curate_scores(data["embeddings"], data["observed"])
        extra = dict(curated_acc=float((res.curated == data["true"]).mean()),
                     raw_acc=float((data["observed"] == data["true"]).mean()))
    elif stage == "daar_scoring":
        from daar_ops.algorithms.probes import DaarProbes, ProbeMLP

        torch.manual_seed(0)
        probes = DaarProbes(ProbeMLP(576, 4), ProbeMLP(576, 1), ["a", "b", "c", "d"])
        feats = np.random.default_rng(0).standard_normal((n, 576), dtype=np.float32)
        data_mb = feats.nbytes / 2**20
        t, c0 = time.perf_counter(), time.process_time()
        probes.score(feats)
    elif stage == "features":
        from daar_ops.features import LayerFeatureExtractor

        texts = pool_texts(n)
        data_mb = sum(len(s) for s in texts) / 2**20
        ex = LayerFeatureExtractor("smollm2-135m-instruct", layer=3, dtype="float32")
        ex.encode(texts[:8], progress=False)  # warm-up (not timed)
        t, c0 = time.perf_counter(), time.process_time()
        feats = ex.encode(texts, progress=False)
        extra = dict(texts_per_s=n / (time.perf_counter() - t), dim=int(feats.layer.shape[1]))
    else:
        raise SystemExit(f"unknown stage {stage}")
    seconds = time.perf_counter() - t
    cpu_s = time.process_time() - c0  # CPU seconds of all threads: the time on an idle machine
    # the 1-minute load average at the end: on a shared machine times scale with it
    return dict(stage=stage, n=n, seconds=seconds, peak_rss_mb=peak_rss_mb(),
                input_mb=data_mb, cpu_s=cpu_s, loadavg_1m=os.getloadavg()[0], **extra)


def fit_exponent(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least squares of log t = a + b log N; returns (b, a) or None with < 2 points."""
    if len(points) < 2:
        return None
    ln = np.log([p[0] for p in points])
    lt = np.log([max(p[1], 1e-6) for p in points])
    b, a = np.polyfit(ln, lt, 1)
    return float(b), float(a)


def predict(points: list[tuple[int, float]], n: int, nominal: float) -> float:
    """Predicted seconds at n from the last measured point, with the larger of the fitted and the
    stage's nominal exponent (at small N fixed costs flatten the fit below the asymptote)."""
    if not points:
        return 0.0
    fit = fit_exponent(points)
    exponent = max(nominal, fit[0]) if fit is not None else nominal
    n0, t0 = points[-1]
    return t0 * (n / n0) ** exponent


def run_cell(stage: str, n: int, threads: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, "--n", str(n), "--threads", str(threads)]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(stage=stage, n=n, note=f"killed at {timeout:.0f} s")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("CELL ")]
    if proc.returncode or not line:
        return dict(stage=stage, n=n, note=f"failed (rc {proc.returncode}): "
                                          f"{proc.stderr.strip().splitlines()[-1:]}")
    out = json.loads(line[0].removeprefix("CELL "))
    out["wall_s"] = time.perf_counter() - t
    return out


def fmt_s(s: float) -> str:
    return f"{s:.1f}" if s < 100 else f"{s:.0f}"


def table(rows: dict, ns: list[int], exponents: dict, feature_ns: list[int]) -> str:
    head = "| stage | " + " | ".join(f"N = {n:,}" for n in ns) + " | exponent |"
    lines = [head, "|" + "---|" * (len(ns) + 2)]
    for stage, cells in rows.items():
        out = []
        for n in ns:
            c = cells.get(n)
            if c is None:
                out.append("")
            elif "seconds" in c and c.get("extrapolated"):
                out.append(f"~{fmt_s(c['seconds'])} s (extrapolated)")
            elif "seconds" in c:
                cpu = f" (cpu {fmt_s(c['cpu_s'])})" if "cpu_s" in c else ""
                out.append(f"{fmt_s(c['seconds'])} s{cpu}, {c['peak_rss_mb']:,.0f} MB")
            else:
                out.append(c["note"])
        e = exponents.get(stage)
        lines.append(f"| {stage} | " + " | ".join(out) + f" | {'' if e is None else f'{e:.2f}'} |")
    note = (f"\nWall seconds of the stage itself (CPU seconds of its process, all threads, where "
            f"recorded) and the peak RSS of its process (input included). "
            f"features: measured at N = {', '.join(f'{n:,}' for n in feature_ns)}, larger N "
            f"extrapolated with the fitted exponent.")
    return "\n".join(lines) + "\n" + note + "\n"


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for stage, cells in rows.items():
        meas = sorted((n, c["seconds"]) for n, c in cells.items()
                      if "seconds" in c and not c.get("extrapolated"))
        ext = sorted((n, c["seconds"]) for n, c in cells.items() if c.get("extrapolated"))
        if not meas:
            continue
        line, = ax.plot(*zip(*meas), "o-", label=stage)
        if ext:
            ax.plot(*zip(*([meas[-1]] + ext)), "--", color=line.get_color(), alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (records)")
    ax.set_ylabel("seconds")
    ax.set_title("daar-ops stages vs N (dashed: extrapolated)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[10_000, 50_000, 200_000, 1_000_000])
    ap.add_argument("--feature-ns", type=int, nargs="+", default=[500, 2000])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--budget-s", type=float, default=600.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="outputs/bench_scale")
    ap.add_argument("--replot", action="store_true",
                    help="rewrite scale.md / scale.png from --out's scale.json, run nothing")
    ap.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("CELL " + json.dumps(child(args.child, args.n, args.threads)), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        saved = json.loads((out / "scale.json").read_text())
        rows = {s: {int(n): c for n, c in r.items()} for s, r in saved["rows"].items()}
        feature_ns = sorted(n for n, c in rows.get("features", {}).items()
                            if "seconds" in c and not c.get("extrapolated"))
        ns_table = sorted({n for r in rows.values() for n in r})
        md = table(rows, ns_table, saved["exponents"], feature_ns)
        (out / "scale.md").write_text(md)
        plot(rows, out / "scale.png")
        print(md)
        return 0
    rows: dict[str, dict[int, dict]] = {}
    exponents: dict[str, float] = {}
    t_all = time.perf_counter()
    for stage in args.stages:
        cells: dict[int, dict] = {}
        measured: list[tuple[int, float]] = []
        run_ns = args.feature_ns if stage == "features" else args.ns
        for n in run_ns:
            guess = predict(measured, n, NOMINAL_EXPONENT[stage])
            if guess > args.budget_s:
                cells[n] = dict(stage=stage, n=n, note="skipped: > budget",
                                predicted_s=round(guess))
            else:
                cells[n] = run_cell(stage, n, args.threads, 2 * args.budget_s)
                if "seconds" in cells[n]:
                    measured.append((n, cells[n]["seconds"]))
            print(json.dumps(cells[n]), flush=True)
        fit = fit_exponent(measured)
        if fit is not None:
            exponents[stage] = round(fit[0], 3)
        if stage == "features" and fit is not None:
            for n in args.ns:
                cells[n] = dict(stage=stage, n=n, extrapolated=True,
                                seconds=math.exp(fit[1] + fit[0] * math.log(n)))
            cells = {n: c for n, c in cells.items() if n in args.ns or n in args.feature_ns}
        rows[stage] = cells
        (out / "scale.json").write_text(json.dumps(
            dict(rows={s: {str(n): c for n, c in r.items()} for s, r in rows.items()},
                 exponents=exponents, budget_s=args.budget_s, threads=args.threads), indent=1))
    ns_table = sorted(set(args.ns) | (set(args.feature_ns) if "features" in args.stages else set()))
    md = table(rows, ns_table, exponents, args.feature_ns)
    (out / "scale.md").write_text(md)
    plot(rows, out / "scale.png")
    print(md)
    print(f"# total {time.perf_counter() - t_all:.0f} s; wrote {out}/scale.json, scale.md, scale.png")
    print(f"RESULT scale_exponents={json.dumps(exponents, separators=(',', ':'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
