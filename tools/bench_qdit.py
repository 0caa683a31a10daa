"""Benchmark QDIT's facility-location greedy against apricot-select, side by side in one process.

Default: N = 20,000 all-MiniLM-L6-v2 embeddings of the shared pool ("{instruction} {input}"),
select 1,000, alpha = 0. Both selectors get the same clipped cosine similarity; ours computes it
in blocks on the fly, apricot gets it as a dense precomputed matrix. Embeddings are cached (as a
daar-ops artifact) under ``$DAAR_OPS_HOME/bench`` so repeated runs skip encoding.

``--synthetic --n 200000`` runs random clustered vectors (d = 384, select 10%) with the exact lazy
greedy on seeded random parts of 10,000 rows (each part its share of K, merged: GreeDi's first
round alone, ``daar_research.qdit.first_round_select``; apricot
skipped: a dense 200k x 200k float64 matrix would be 298 GB; ``--partition-size 0`` runs the exact
greedy on all rows), prints the float32 matmul rate and the exact greedy's similarity-work floor,
then compares, on a 20k subsample, the exact lazy greedy with the stochastic greedy and with the
same first-round partitioning and with GreeDi (the product's ``partition_size``, parts of at
least 4 K). Last line: ``RESULT n200k_partitioned_seconds=<s> peak_rss_mb=<m>``
(``n200k_exact_seconds`` without partitions).

``--alpha-sweep`` measures the quality-diversity trade-off instead (paper Fig. 2): for alpha in
{0, 0.1, 0.3, 0.5, 0.7, 0.9, 1} the mean normalised quality and the facility-location value d(A) of
the selection, next to random subsets, for each ``diversity_scale``, on 4,000 pool records with
seeded uniform quality (plus a plot), then the default scaling's fractions on more quality
sources, a second pool slice, seeds and budgets. Last line:
``RESULT alpha07_quality_frac=<(q(.7)-q(0))/(q(1)-q(0))> alpha07_diversity_frac=<(d(.7)-d(1))/(d(0)-d(1))>``.

Timing run (default): ours (exact lazy) and the stochastic greedy (eps 0.01, seeds 0 1 2) beside
apricot-select's lazy greedy on the precomputed dense matrix; then the float32 matmul rate of this
machine and the exact greedy's similarity-work floor at N = 200k (``--n200k run`` runs it in a child
process instead). Last line: ``RESULT time_ratio_vs_apricot_fit=<ours / apricot fit alone>
stochastic_speedup=<exact / stochastic seconds> stochastic_objective=<stochastic / exact d(A)>
n200k_exact_seconds=<> n200k_peak_rss_mb=<>`` (nan when not run).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

from daar_ops.core import default_pool

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: the research variants
from daar_research.qdit import facility_location_value  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_POOL = Path(default_pool())  # $DAAR_OPS_POOL, else the shared pool (daar_ops.core)
TEMPLATE = "{instruction} {input}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def pool_embeddings(n: int, pool: Path = DEFAULT_POOL, model: str = "all-minilm-l6-v2",
                    progress: bool = True, template: str = TEMPLATE) -> np.ndarray:
    """MiniLM embeddings of the first ``n`` pool records (``template``, default
    ``"{instruction} {input}"``), truncated at ``models.SENTENCE_MAX_TOKENS`` as every embedding
    of the package, cached as a daar-ops artifact (a cache of another truncation is not reused)."""
    from daar_ops.artifacts import ArtifactError, load_artifact, save_artifact
    from daar_ops.encoders import encode_sentences
    from daar_ops.models import (SENTENCE_MAX_TOKENS, daar_ops_home, model_fingerprint,
                                 resolve_model_path)
    from daar_ops.text import TextTemplate

    fingerprint = model_fingerprint(resolve_model_path(model))
    bench = daar_ops_home() / "bench"
    stem = f"qdit_{model}" if template == TEMPLATE else \
        f"qdit_{model}_" + "".join(c for c in template if c.isalnum())
    cache = bench / f"{stem}_{n}"
    # this cache, or else the smallest larger one (its first n rows are the same records)
    larger = sorted((int(p.name.rsplit("_", 1)[1]), p) for p in bench.glob(f"{stem}_*")
                    if p.name.rsplit("_", 1)[1].isdigit() and int(p.name.rsplit("_", 1)[1]) > n)
    for size, path in [(n, cache)] + larger:
        try:
            tensors, manifest = load_artifact(path, kind="qdit_bench_embeddings")
        except ArtifactError:
            continue
        if (manifest.get("model_fingerprint") == fingerprint and manifest.get("n") == size
                and manifest.get("template") == template and manifest.get("pool") == str(pool)
                and manifest.get("max_seq_length") == SENTENCE_MAX_TOKENS):
            return tensors["embeddings"][:n]
    render = TextTemplate(template)
    texts = []
    with gzip.open(pool, "rt", encoding="utf-8") as fh:
        for line in fh:
            if len(texts) >= n:
                break
            texts.append(render.render(json.loads(line)))
    if len(texts) < n:
        raise SystemExit(f"the pool {pool} has only {len(texts)} records, {n} requested")
    emb = encode_sentences(texts, model=model, progress=progress)
    save_artifact(cache, {"embeddings": emb},
                  {"model": model, "model_fingerprint": fingerprint, "n": n, "template": template,
                   "pool": str(pool), "max_seq_length": SENTENCE_MAX_TOKENS},
                  kind="qdit_bench_embeddings")
    return emb


def pool_outputs(n: int, pool: Path = DEFAULT_POOL) -> list[str]:
    """The ``output`` field of the first ``n`` pool records (for the length quality proxy)."""
    out = []
    with gzip.open(pool, "rt", encoding="utf-8") as fh:
        for line in fh:
            if len(out) >= n:
                break
            out.append(str(json.loads(line).get("output") or ""))
    return out


# --------------------------------------------------------------------------------------------
# --alpha-sweep: the quality-diversity trade-off (paper Fig. 2)
# --------------------------------------------------------------------------------------------

SWEEP_ALPHAS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
SWEEP_SCALES = ("budget", "running_max", "mean", "max_singleton", "none")
QUALITY_SOURCES = ("uniform", "length", "direction")


def sweep_quality(source: str, emb: np.ndarray, outputs: list[str], seed: int) -> np.ndarray:
    """A quality score per row, from one of three sources of different structure:

    * ``uniform``: seeded uniform noise (quality unrelated to the geometry; the issue's case);
    * ``length``: log(1 + characters of the output), a real record property that differs
      between domains (so quality is spread unevenly over the embedding space);
    * ``direction``: cosine to a seeded random direction plus 10% noise: high quality sits in
      one region, so quality and coverage conflict the most.
    """
    rng = np.random.default_rng(seed)
    if source == "uniform":
        return rng.random(len(emb))
    if source == "length":
        return np.log1p(np.array([len(o) for o in outputs], dtype=np.float64))
    if source == "direction":
        u = rng.standard_normal(emb.shape[1])
        x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        proj = x @ (u / np.linalg.norm(u))
        return proj + 0.1 * proj.std() * rng.standard_normal(len(emb))
    raise ValueError(f"quality source must be one of {QUALITY_SOURCES}, got {source!r}")


def alpha_sweep(emb: np.ndarray, quality: np.ndarray, k: int, scale: str | float,
                alphas=SWEEP_ALPHAS, random_draws: int = 5, seed: int = 0) -> dict:
    """Mean normalised quality and facility-location value of the selection per alpha, and of
    ``random_draws`` seeded random subsets of the same size (mean and std). ``scale``: the
    product's scalings or the research ones (tools/daar_research/qdit.py)."""
    from daar_ops.algorithms.qdit import normalize_quality
    from daar_research.qdit import qdit_select

    qn, _ = normalize_quality(quality)
    rows = []
    for alpha in alphas:
        t0 = time.perf_counter()
        r = qdit_select(emb, select_num=k, quality=quality, alpha=alpha, diversity_scale=scale,
                        progress=False)
        rows.append(dict(alpha=alpha, quality=float(qn[r.indices].mean()),
                         diversity=facility_location_value(emb, r.indices),
                         top_quality_picks=int(np.isin(r.indices, np.argsort(-qn,
                                                                              kind="stable")[:k]).sum()),
                         seconds=time.perf_counter() - t0))
    rng = np.random.default_rng(10_000 + seed)
    rq, rd = [], []
    for _ in range(random_draws):
        idx = rng.choice(len(emb), size=k, replace=False)
        rq.append(float(qn[idx].mean()))
        rd.append(facility_location_value(emb, idx))
    by = {r["alpha"]: r for r in rows}
    q0, q1, d0, d1 = by[0.0]["quality"], by[1.0]["quality"], by[0.0]["diversity"], \
        by[1.0]["diversity"]
    for r in rows:
        r["quality_frac"] = (r["quality"] - q0) / (q1 - q0) if q1 != q0 else float("nan")
        r["diversity_frac"] = (r["diversity"] - d1) / (d0 - d1) if d0 != d1 else float("nan")
    return dict(rows=rows, by_alpha=by, random_quality=(float(np.mean(rq)), float(np.std(rq))),
                random_diversity=(float(np.mean(rd)), float(np.std(rd))), n=len(emb), k=k,
                scale=scale)


def print_sweep(title: str, sweep: dict) -> None:
    print(f"\n{title}: N={sweep['n']} K={sweep['k']} diversity_scale={sweep['scale']}")
    print("  alpha | mean quality | facility location d(A) | quality frac | diversity frac | "
          "top-K quality picks | s")
    for r in sweep["rows"]:
        print(f"  {r['alpha']:5.1f} | {r['quality']:12.4f} | {r['diversity']:22.2f} | "
              f"{r['quality_frac']:12.3f} | {r['diversity_frac']:14.3f} | "
              f"{r['top_quality_picks']:5d}/{sweep['k']:<5d}       | {r['seconds']:.1f}")
    (rq, sq), (rd, sd) = sweep["random_quality"], sweep["random_diversity"]
    print(f"  random| {rq:12.4f} | {rd:22.2f} | (5 draws; std quality {sq:.4f}, d {sd:.2f})")


def plot_sweeps(sweeps: dict[str, dict], path: Path) -> None:
    """Paper Fig. 2 style: quality and diversity of the selection against alpha (left), and the
    quality-diversity path (right), one line per scaling, random as a dashed line / star."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    ax1b = ax1.twinx()
    first = next(iter(sweeps.values()))
    for name, sw in sweeps.items():
        a = [r["alpha"] for r in sw["rows"]]
        q = [r["quality"] for r in sw["rows"]]
        d = [r["diversity"] / sw["n"] for r in sw["rows"]]
        width = 2.5 if name == first["scale"] else 1.2
        line, = ax1.plot(a, q, "o-", lw=width, label=f"quality ({name})")
        ax1b.plot(a, d, "s--", lw=width, color=line.get_color(), label=f"d(A)/N ({name})")
        ax2.plot(d, q, "o-", lw=width, color=line.get_color(), label=name)
        for r, x_, y_ in zip(sw["rows"], d, q):
            ax2.annotate(f"{r['alpha']:g}", (x_, y_), fontsize=7, xytext=(3, 3),
                         textcoords="offset points")
    ax1.axhline(first["random_quality"][0], color="grey", ls=":", label="random quality")
    ax1b.axhline(first["random_diversity"][0] / first["n"], color="black", ls=":",
                 label="random d(A)/N")
    ax1.set_xlabel("alpha (weight of quality)")
    ax1.set_ylabel("mean normalised quality (circles)")
    ax1b.set_ylabel("facility location d(A) / N (squares)")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax1b.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, fontsize=5.5, loc="center right")
    ax1.set_title(f"QDIT alpha sweep (N={first['n']}, K={first['k']}; thick: default)")
    ax2.plot([first["random_diversity"][0] / first["n"]], [first["random_quality"][0]], "k*",
             markersize=12, label="random")
    ax2.set_xlabel("facility location d(A) / N")
    ax2.set_ylabel("mean normalised quality")
    ax2.legend(fontsize=7)
    ax2.set_title("quality vs diversity (labels: alpha)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_alpha_sweep(args) -> int:
    from daar_ops.algorithms.qdit import QditConfig

    DEFAULT_DIVERSITY_SCALE = QditConfig.diversity_scale
    n = args.n if args.n_given else 4000
    slices = (0, n)  # two disjoint slices of the pool
    total = max(slices) + n
    t_start = time.perf_counter()
    emb_all = pool_embeddings(total, args.pool)
    outputs_all = pool_outputs(total, args.pool)
    k = args.k or max(1, n // 10)
    print(f"QDIT alpha sweep: all-MiniLM-L6-v2 embeddings of pool records [0, {n}) "
          f"(robustness also [{n}, {2 * n})), K={k}, lazy greedy, float32; "
          f"torch threads={args.threads}; default diversity_scale={DEFAULT_DIVERSITY_SCALE}",
          flush=True)
    emb, outputs = emb_all[:n], outputs_all[:n]
    quality = sweep_quality("uniform", emb, outputs, seed=0)
    sweeps = {}
    for scale in SWEEP_SCALES:
        sweeps[scale] = alpha_sweep(emb, quality, k, scale, seed=0)
        print_sweep("uniform quality, seed 0", sweeps[scale])
    print("\nscaling comparison (uniform quality, slice 0, seed 0): fractions at alpha=0.7")
    for scale, sw in sweeps.items():
        r = sw["by_alpha"][0.7]
        print(f"  {scale:14s} quality_frac={r['quality_frac']:.3f} "
              f"diversity_frac={r['diversity_frac']:.3f} top-K picks {r['top_quality_picks']}/{k}")
    plot_path = Path(args.plot)
    # "none" equals "budget" at K = N / 10 and "max_singleton" ~ "mean": plotted only if different
    shown = {s_: sw for s_, sw in sweeps.items()
             if s_ in (DEFAULT_DIVERSITY_SCALE, "running_max", "mean") or k * 10 != n}
    plot_sweeps(shown, plot_path)
    print(f"plot: {plot_path}")

    if not args.quick:
        print(f"\nrobustness of diversity_scale={DEFAULT_DIVERSITY_SCALE}: fractions at "
              "alpha = 0.5 / 0.7 / 0.9 (quality_frac, diversity_frac)")
        cases = [(src, off, seed, k) for src in QUALITY_SOURCES for off in slices
                 for seed in ((0,) if src == "length" else (0, 1, 2))]
        cases += [("uniform", off, 0, kk) for off in slices for kk in (n // 20, n // 5)]
        fr7 = []
        for src, off, seed, kk in cases:
            e, o = emb_all[off:off + n], outputs_all[off:off + n]
            sw = alpha_sweep(e, sweep_quality(src, e, o, seed), kk, DEFAULT_DIVERSITY_SCALE,
                             alphas=(0.0, 0.5, 0.7, 0.9, 1.0), random_draws=1, seed=seed)
            b = sw["by_alpha"]
            fr7.append((b[0.7]["quality_frac"], b[0.7]["diversity_frac"]))
            print(f"  quality={src:9s} slice=[{off},{off + n}) seed={seed} K={kk:4d}: " + "  ".join(
                f"a={a}: {b[a]['quality_frac']:.2f}/{b[a]['diversity_frac']:.2f}"
                for a in (0.5, 0.7, 0.9)), flush=True)
        qf, df = np.array(fr7).T
        print(f"  alpha=0.7 over {len(fr7)} cases: quality_frac {qf.mean():.3f} +- {qf.std():.3f} "
              f"[{qf.min():.3f}, {qf.max():.3f}], diversity_frac {df.mean():.3f} +- "
              f"{df.std():.3f} [{df.min():.3f}, {df.max():.3f}]")
    main = sweeps[DEFAULT_DIVERSITY_SCALE]["by_alpha"][0.7]
    print(f"total {time.perf_counter() - t_start:.0f} s")
    print(f"RESULT alpha07_quality_frac={main['quality_frac']:.3f} "
          f"alpha07_diversity_frac={main['diversity_frac']:.3f}")
    return 0


def synthetic_embeddings(n: int, d: int = 384, centers: int = 1000, noise: float = 0.8,
                         seed: int = 0) -> np.ndarray:
    """Random clustered unit vectors: unit centres plus Gaussian noise of norm ~``noise``.

    The noise is drawn in chunks of rows (the same numbers as one draw), so no float64 copy of
    the whole matrix exists: at 1M x 384 it would be 3 GB.
    """
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, centers, n)]
    scale = np.float32(noise / np.sqrt(d))
    for start in range(0, n, 65536):
        stop = min(start + 65536, n)
        x[start:stop] += rng.standard_normal((stop - start, d)).astype(np.float32) * scale
    return x


def apricot_select(emb: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """apricot lazy facility location on the dense clipped cosine (float64, as apricot computes).

    Returns (ranking, seconds to build the matrix, seconds to fit)."""
    from apricot import FacilityLocationSelection

    from daar_ops.algorithms.knn import l2_normalize

    t0 = time.perf_counter()
    x = torch.from_numpy(l2_normalize(emb))
    sim = (x @ x.T).clamp_(min=0.0).numpy().astype(np.float64)
    t1 = time.perf_counter()
    ranking = FacilityLocationSelection(k, metric="precomputed", optimizer="lazy").fit(sim).ranking
    t2 = time.perf_counter()
    del sim
    return np.asarray(ranking, dtype=np.int64), t1 - t0, t2 - t1


def warm_up() -> None:
    """Compile/load both sides' numba kernels on a tiny problem so neither pays it when timed."""
    from daar_ops.algorithms.qdit import qdit_select

    x = np.random.default_rng(1).standard_normal((200, 8)).astype(np.float32)
    qdit_select(x, select_num=10, progress=False)
    qdit_select(x, select_num=10, method="stochastic", compute_dtype="bfloat16", progress=False)
    apricot_select(x, 10)


def gemm_gflops(d: int = 384, n: int = 20000, rows: int = 2048, repeats: int = 3) -> float:
    """float32 matmul rate of this process (torch threads as set): the best of ``repeats`` runs
    of a [rows, d] x [d, n] product, the shape of a similarity block."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, d, generator=g)
    b = torch.randn(n, d, generator=g)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _ = a @ b.T
        best = min(best, time.perf_counter() - t0)
    return 2.0 * rows * d * n / best / 1e9


def exact_floor_seconds(n: int, d: int, gflops: float) -> float:
    """The exact greedy's similarity work alone: every first gain needs every entry of the clipped
    X X^T once; with its symmetry that is N^2 / 2 * d multiply-adds = N^2 d FLOP."""
    return float(n) * n * d / (gflops * 1e9)


def run_synthetic(args, emb: np.ndarray, k: int, part: int | None) -> int:
    from daar_ops.algorithms.qdit import qdit_select
    from daar_research.qdit import first_round_select

    warm_up()
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    # parts: the first round alone (each part its share of K; GreeDi's union round would hold
    # every row at K >= the part size)
    select = qdit_select if part is None else first_round_select
    ours = select(emb, select_num=k, method=args.method, epsilon=args.epsilon,
                  compute_dtype=args.compute_dtype, max_memory_mb=args.max_memory_mb,
                  partition_size=part, progress=True)
    t_ours = time.perf_counter() - t0
    rss_ours = peak_rss_mb()
    print(f"ours ({args.method}, partition_size={part}): {t_ours:.2f} s, {ours.n_evaluations} gain "
          f"evaluations ({ours.meta['evaluations_per_step']:.1f} per step), objective "
          f"{facility_location_value(emb, ours.indices):.4f}, peak RSS {rss_ours:.0f} MB "
          f"(before: {rss_before:.0f} MB)", flush=True)
    gf = gemm_gflops(emb.shape[1], min(len(emb), 20000))
    print(f"float32 matmul rate here: {gf:.1f} GFLOP/s (torch threads={args.threads}); the exact "
          f"greedy's similarity work alone at N={len(emb)}: {len(emb) ** 2 * emb.shape[1] / 1e12:.1f}"
          f" TFLOP (symmetric) = {exact_floor_seconds(len(emb), emb.shape[1], gf):.0f} s at this "
          f"rate; its held matrix would need {len(emb) ** 2 * 4 / 2**30:.0f} GB", flush=True)
    if args.subsample and args.subsample < len(emb):
        sub = emb[np.random.default_rng(1).choice(len(emb), args.subsample, replace=False)]
        ks = max(1, args.subsample // 10) if args.k is None else max(1, args.k * args.subsample
                                                                      // len(emb))
        runs = {}
        sub_part = None if part is None else max(1, part * args.subsample // len(emb))
        cases = [("exact lazy", qdit_select, dict(method="lazy")),
                 ("stochastic eps=%g" % args.epsilon, qdit_select,
                  dict(method="stochastic", epsilon=args.epsilon))]
        if sub_part:
            cases.append((f"lazy, parts of {sub_part}, first round only (as the main run)",
                          first_round_select, dict(method="lazy", partition_size=sub_part)))
            greedi_part = max(sub_part, 4 * ks)  # GreeDi saves work only with parts above K
            cases.append((f"GreeDi (partition_size), parts of {greedi_part}", qdit_select,
                          dict(method="lazy", partition_size=greedi_part)))
        for name, select, kw in cases:
            t0 = time.perf_counter()
            r = select(sub, select_num=ks, compute_dtype="float32",
                       max_memory_mb=args.max_memory_mb, progress=False, **kw)
            runs[name] = (time.perf_counter() - t0, facility_location_value(sub, r.indices))
        t_ex, o_ex = runs["exact lazy"]
        for name, (t, o) in runs.items():
            print(f"subsample N={args.subsample} K={ks}: {name}: {t:.1f} s, objective {o:.4f}, "
                  f"ratio vs exact {o / o_ex:.6f}", flush=True)
    exact = part is None and args.method == "lazy"
    print(f"RESULT n{len(emb) // 1000}k_{'exact' if exact else 'partitioned'}_seconds={t_ours:.1f} "
          f"peak_rss_mb={peak_rss_mb():.0f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="rows (default 20000)")
    ap.add_argument("--k", type=int, default=None,
                    help="rows to select (default 1000 on the pool, 10%% with --synthetic)")
    ap.add_argument("--synthetic", action="store_true", help="random clustered vectors, d=384")
    ap.add_argument("--pool", type=Path, default=DEFAULT_POOL)
    ap.add_argument("--method", default="lazy", help="lazy (default) | stochastic")
    ap.add_argument("--compute-dtype", default="float32", help="float32 (default) | bfloat16")
    ap.add_argument("--partition-size", type=int, default=None,
                    help="GreeDi-style random parts of this size (default: none on the pool, "
                    "10000 with --synthetic; 0 = none)")
    ap.add_argument("--epsilon", type=float, default=0.01)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="stochastic greedy seeds (timing run)")
    ap.add_argument("--exact-repeats", type=int, default=2,
                    help="timing run: exact runs (first before, the rest after the stochastic "
                    "ones); ratios use their mean")
    ap.add_argument("--max-memory-mb", type=float, default=2048.0)
    ap.add_argument("--subsample", type=int, default=20000,
                    help="--synthetic: stochastic vs exact objective on this many rows")
    ap.add_argument("--n200k", choices=("floor", "run"), default="floor",
                    help="timing run: 'floor' (default) reports the exact greedy's measured "
                    "similarity-work floor at N=200k, K=20k; 'run' runs it in a child process "
                    "(hours on the shared 2-core CPU)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-apricot", action="store_true")
    ap.add_argument("--alpha-sweep", action="store_true",
                    help="quality-diversity sweep over alpha (paper Fig. 2) instead of timing; "
                    "N=4000 pool records unless --n is given, K=N/10")
    ap.add_argument("--plot", default="outputs/qdit_alpha_sweep.png",
                    help="--alpha-sweep: where the plot goes")
    ap.add_argument("--quick", action="store_true",
                    help="--alpha-sweep: skip the robustness cases")
    args = ap.parse_args(argv)
    args.n_given = any(a == "--n" or a.startswith("--n=") for a in (argv or sys.argv[1:]))
    torch.set_num_threads(args.threads)
    if args.alpha_sweep:
        return run_alpha_sweep(args)
    from daar_ops.algorithms.qdit import qdit_select

    method, dtype = args.method, args.compute_dtype
    part = args.partition_size if args.partition_size is not None else \
        (10000 if args.synthetic else None)
    part = part or None
    if args.synthetic:
        emb = synthetic_embeddings(args.n)
        k = args.k or max(1, args.n // 10)
        print(f"data: N={len(emb)} d={emb.shape[1]} (synthetic clustered vectors, 1000 centres); "
              f"select K={k}; alpha=0; ours: method={method} compute_dtype={dtype} "
              f"partition_size={part} max_memory_mb={args.max_memory_mb:g}; torch threads="
              f"{args.threads}", flush=True)
        return run_synthetic(args, emb, k, part)
    emb = pool_embeddings(args.n, args.pool)
    k = args.k or 1000
    print(f"data: N={len(emb)} d={emb.shape[1]} (all-MiniLM-L6-v2 embeddings of the first "
          f"{args.n} pool records); select K={k}; alpha=0; ours: method={method} "
          f"compute_dtype={dtype} partition_size={part} max_memory_mb={args.max_memory_mb:g}; "
          f"torch threads={args.threads} (the machine is shared)", flush=True)
    warm_up()
    rss_before = peak_rss_mb()

    t0 = time.perf_counter()
    ours = qdit_select(emb, select_num=k, method=method, epsilon=args.epsilon,
                       compute_dtype=dtype, max_memory_mb=args.max_memory_mb,
                       partition_size=part, progress=True)
    t_ours = time.perf_counter() - t0
    rss_ours = peak_rss_mb()
    obj_ours = facility_location_value(emb, ours.indices)
    print(f"ours ({method}): {t_ours:.2f} s, {ours.n_evaluations} gain evaluations "
          f"({ours.meta['evaluations_per_step']:.1f} per step), held matrix "
          f"{ours.meta.get('held_matrix')}, objective {obj_ours:.4f}, peak RSS {rss_ours:.0f} MB "
          f"(before: {rss_before:.0f} MB)", flush=True)

    # stochastic greedy beside it, several seeds; then the exact once more (a process's first
    # large allocation pays more page faults than later ones, so the exact runs first and last)
    st_times, st_objs, st = [], [], None
    for seed in args.seeds:
        t0 = time.perf_counter()
        st = qdit_select(emb, select_num=k, method="stochastic", epsilon=args.epsilon, seed=seed,
                         compute_dtype=dtype, max_memory_mb=args.max_memory_mb, progress=False)
        st_times.append(time.perf_counter() - t0)
        st_objs.append(facility_location_value(emb, st.indices) / obj_ours)
        print(f"stochastic eps={args.epsilon:g} seed={seed}: {st_times[-1]:.2f} s, "
              f"{st.meta['evaluations_per_step']:.1f} evaluations per step, objective ratio vs "
              f"exact {st_objs[-1]:.6f}", flush=True)
    ex_times = [t_ours]
    for _ in range(max(0, args.exact_repeats - 1)):
        t0 = time.perf_counter()
        again = qdit_select(emb, select_num=k, method=method, epsilon=args.epsilon,
                            compute_dtype=dtype, max_memory_mb=args.max_memory_mb,
                            partition_size=part, progress=False)
        ex_times.append(time.perf_counter() - t0)
        assert again.indices.tolist() == ours.indices.tolist(), "the exact greedy must repeat"
        del again
    t_ours = float(np.mean(ex_times))
    print(f"exact runs: {', '.join(f'{t:.2f}' for t in ex_times)} s (mean {t_ours:.2f} s; "
          f"same sequence each time)", flush=True)
    st_t = float(np.mean(st_times)) if st_times else float("nan")
    speedup = t_ours / st_t
    st_obj = float(np.mean(st_objs)) if st_objs else float("nan")
    if st_times:
        print(f"stochastic over {len(st_times)} seeds: {st_t:.2f} +- {np.std(st_times):.2f} s, "
              f"speedup vs exact {speedup:.3f}, objective ratio {st_obj:.6f} +- "
              f"{np.std(st_objs):.6f} [{min(st_objs):.6f}, {max(st_objs):.6f}]", flush=True)

    ratio_fit = float("nan")
    dense_gb = len(emb) ** 2 * 8 / 2**30
    if args.no_apricot or dense_gb > 8:
        print(f"apricot: skipped (its dense float64 matrix would need {dense_gb:.1f} GB)")
    else:
        st = None  # free the stochastic run's matrix before apricot builds its own
        ranking, t_build, t_fit = apricot_select(emb, k)
        t_apricot = t_build + t_fit
        obj_apricot = facility_location_value(emb, ranking)
        # apricot JIT-compiles its gain kernel in every fit (cache=False): time a tiny fit to
        # report its greedy without that compile too
        _, _, t_jit = apricot_select(emb[:200], 10)
        ratio_fit = t_ours / t_fit
        print(f"apricot fit includes its per-fit JIT compile (~{t_jit:.2f} s on a 200-row fit); "
              f"ours vs its fit minus that: {t_ours / max(t_fit - t_jit, 1e-9):.3f}", flush=True)
        same = int(np.sum(ranking[:k] == ours.indices[:k]))
        first_diff = next((i for i in range(k) if ranking[i] != ours.indices[i]), None)
        print(f"apricot lazy: {t_apricot:.2f} s (dense matrix {t_build:.2f} s + fit {t_fit:.2f} s), "
              f"objective {obj_apricot:.4f}", flush=True)
        print(f"ours vs apricot: time ratio vs its fit alone {ratio_fit:.3f}, end to end "
              f"{t_ours / t_apricot:.3f}; objective ratio {obj_ours / obj_apricot:.6f}, identical "
              f"positions {same}/{k}, first difference at {first_diff}", flush=True)

    # N = 200k, K = 20k: the measured floor, or a run in a child process (its own peak RSS)
    n_big, d = 200000, emb.shape[1]
    gf = gemm_gflops(d)
    floor = exact_floor_seconds(n_big, d, gf)
    print(f"float32 matmul rate here: {gf:.1f} GFLOP/s (torch threads={args.threads}); exact at "
          f"N={n_big}: the similarity work alone is {n_big ** 2 * d / 1e12:.1f} TFLOP (symmetric "
          f"N^2 d) = {floor:.0f} s at this rate, and its held matrix {n_big ** 2 * 4 / 2**30:.0f} GB "
          f"(so each lazy re-evaluation recomputes a row: {2 * n_big * d / 1e6:.0f} MFLOP)",
          flush=True)
    big_s = big_rss = float("nan")
    if args.n200k == "run":
        import subprocess

        cmd = [sys.executable, str(Path(__file__).resolve()), "--synthetic", "--n", str(n_big),
               "--partition-size", "0", "--subsample", "0", "--threads", str(args.threads),
               "--max-memory-mb", str(min(args.max_memory_mb, 4096.0))]
        print("running: " + " ".join(cmd), flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True).stdout
        for line in out.splitlines():
            print("  | " + line)
            if line.startswith("RESULT n200k_exact_seconds="):
                fields = dict(f.split("=") for f in line.split()[1:])
                big_s, big_rss = float(fields["n200k_exact_seconds"]), float(fields["peak_rss_mb"])
    else:
        print(f"n200k exact: not run (--n200k floor); >= {floor:.0f} s of matmul alone here")
    print(f"RESULT time_ratio_vs_apricot_fit={ratio_fit:.3f} stochastic_speedup={speedup:.3f} "
          f"stochastic_objective={st_obj:.6f} n200k_exact_seconds={big_s:.1f} "
          f"n200k_peak_rss_mb={big_rss:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
