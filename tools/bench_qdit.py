"""Benchmark QDIT's facility-location greedy against apricot-select, side by side in one process.

Default: N = 20,000 all-MiniLM-L6-v2 embeddings of the shared pool ("{instruction} {input}"),
select 1,000, alpha = 0. Both selectors get the same clipped cosine similarity; ours computes it
in blocks on the fly, apricot gets it as a dense precomputed matrix. Embeddings are cached (as a
daar-ops artifact) under ``$DAAR_OPS_HOME/bench`` so repeated runs skip encoding.

``--synthetic --n 200000`` runs random clustered vectors (d = 384, select 10%) with the exact lazy
greedy on seeded random parts of 10,000 rows (``partition_size``, GreeDi's first round; apricot
skipped: a dense 200k x 200k float64 matrix would be 298 GB), then compares, on a 20k subsample,
the exact lazy greedy with the stochastic greedy and with the same partitioning.

Last line: ``RESULT time_ratio_vs_apricot=<ours/apricot> objective_ratio=<ours/apricot>
peak_rss_mb=<m>``.
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

REPO = Path(__file__).resolve().parents[1]
DEFAULT_POOL = REPO.parent / "shared" / "data" / "daar_pool" / "daar_pool.jsonl.gz"
TEMPLATE = "{instruction} {input}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def pool_embeddings(n: int, pool: Path = DEFAULT_POOL, model: str = "all-minilm-l6-v2",
                    progress: bool = True) -> np.ndarray:
    """MiniLM embeddings of the first ``n`` pool records, cached as a daar-ops artifact."""
    from daar_ops.artifacts import ArtifactError, load_artifact, save_artifact
    from daar_ops.encoders import encode_sentences
    from daar_ops.models import daar_ops_home, model_fingerprint, resolve_model_path
    from daar_ops.text import TextTemplate

    fingerprint = model_fingerprint(resolve_model_path(model))
    cache = daar_ops_home() / "bench" / f"qdit_{model}_{n}"
    try:
        tensors, manifest = load_artifact(cache, kind="qdit_bench_embeddings")
        if (manifest.get("model_fingerprint") == fingerprint and manifest.get("n") == n
                and manifest.get("template") == TEMPLATE and manifest.get("pool") == str(pool)):
            return tensors["embeddings"]
    except ArtifactError:
        pass
    template = TextTemplate(TEMPLATE)
    texts = []
    with gzip.open(pool, "rt", encoding="utf-8") as fh:
        for line in fh:
            if len(texts) >= n:
                break
            texts.append(template.render(json.loads(line)))
    if len(texts) < n:
        raise SystemExit(f"the pool {pool} has only {len(texts)} records, {n} requested")
    emb = encode_sentences(texts, model=model, progress=progress)
    save_artifact(cache, {"embeddings": emb},
                  {"model": model, "model_fingerprint": fingerprint, "n": n, "template": TEMPLATE,
                   "pool": str(pool)}, kind="qdit_bench_embeddings")
    return emb


def synthetic_embeddings(n: int, d: int = 384, centers: int = 1000, noise: float = 0.8,
                         seed: int = 0) -> np.ndarray:
    """Random clustered unit vectors: unit centres plus Gaussian noise of norm ~``noise``."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, centers, n)]
    x += rng.standard_normal((n, d)).astype(np.float32) * np.float32(noise / np.sqrt(d))
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
                    "10000 with --synthetic)")
    ap.add_argument("--epsilon", type=float, default=0.01)
    ap.add_argument("--max-memory-mb", type=float, default=2048.0)
    ap.add_argument("--subsample", type=int, default=20000,
                    help="--synthetic: stochastic vs exact objective on this many rows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-apricot", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from daar_ops.algorithms.qdit import facility_location_value, qdit_select

    method, dtype = args.method, args.compute_dtype
    part = args.partition_size or (10000 if args.synthetic else None)
    if args.synthetic:
        emb = synthetic_embeddings(args.n)
        k = args.k or max(1, args.n // 10)
        source = f"synthetic clustered vectors (d=384, 1000 centres)"
    else:
        emb = pool_embeddings(args.n, args.pool)
        k = args.k or 1000
        source = f"all-MiniLM-L6-v2 embeddings of the first {args.n} pool records"
    print(f"data: N={len(emb)} d={emb.shape[1]} ({source}); select K={k}; alpha=0; "
          f"ours: method={method} similarity=blocked compute_dtype={dtype} partition_size={part} "
          f"max_memory_mb={args.max_memory_mb:g}; torch threads={args.threads}", flush=True)
    warm_up()
    rss_before = peak_rss_mb()

    t0 = time.perf_counter()
    ours = qdit_select(emb, select_num=k, method=method, epsilon=args.epsilon,
                       compute_dtype=dtype, max_memory_mb=args.max_memory_mb,
                       partition_size=part, progress=True)
    t_ours = time.perf_counter() - t0
    rss_ours = peak_rss_mb()
    obj_ours = facility_location_value(emb, ours.indices)
    print(f"ours: {t_ours:.2f} s, {ours.n_evaluations} gain evaluations "
          f"({ours.meta['evaluations_per_step']:.1f} per step), objective {obj_ours:.4f}, "
          f"peak RSS {rss_ours:.0f} MB (before: {rss_before:.0f} MB)", flush=True)

    time_ratio = obj_ratio = float("nan")
    dense_gb = len(emb) ** 2 * 8 / 2**30
    if args.synthetic or args.no_apricot or dense_gb > 8:
        print(f"apricot: skipped (its dense float64 matrix would need {dense_gb:.1f} GB)")
    else:
        ranking, t_build, t_fit = apricot_select(emb, k)
        t_apricot = t_build + t_fit
        obj_apricot = facility_location_value(emb, ranking)
        time_ratio, obj_ratio = t_ours / t_apricot, obj_ours / obj_apricot
        same = int(np.sum(ranking[:k] == ours.indices[:k]))
        first_diff = next((i for i in range(k) if ranking[i] != ours.indices[i]), None)
        print(f"apricot lazy: {t_apricot:.2f} s (dense matrix {t_build:.2f} s + fit {t_fit:.2f} s), "
              f"objective {obj_apricot:.4f}", flush=True)
        print(f"ours vs apricot: time ratio {time_ratio:.3f} (vs fit alone "
              f"{t_ours / t_fit:.3f}), objective ratio {obj_ratio:.6f}, identical positions "
              f"{same}/{k}, first difference at {first_diff}")

    if args.synthetic and args.subsample and args.subsample < len(emb):
        sub = emb[np.random.default_rng(1).choice(len(emb), args.subsample, replace=False)]
        ks = max(1, args.subsample // 10) if args.k is None else max(1, args.k * args.subsample
                                                                      // len(emb))
        runs = {}
        sub_part = None if part is None else max(1, part * args.subsample // len(emb))
        for name, kw in [("exact lazy", dict(method="lazy")),
                         ("stochastic eps=%g" % args.epsilon,
                          dict(method="stochastic", epsilon=args.epsilon)),
                         (f"lazy, parts of {sub_part} (as the main run)",
                          dict(method=method, partition_size=sub_part))]:
            t0 = time.perf_counter()
            r = qdit_select(sub, select_num=ks, compute_dtype="float32",
                            max_memory_mb=args.max_memory_mb, progress=False, **kw)
            runs[name] = (time.perf_counter() - t0, facility_location_value(sub, r.indices))
        t_ex, o_ex = runs["exact lazy"]
        for name, (t, o) in runs.items():
            print(f"subsample N={args.subsample} K={ks}: {name}: {t:.1f} s, objective {o:.4f}, "
                  f"ratio vs exact {o / o_ex:.6f}", flush=True)
    if time_ratio != time_ratio:  # no apricot: the whole process's peak (ours + subsample)
        rss_ours = peak_rss_mb()
    print(f"RESULT time_ratio_vs_apricot={time_ratio:.3f} objective_ratio={obj_ratio:.6f} "
          f"peak_rss_mb={rss_ours:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
