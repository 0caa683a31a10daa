"""k-nearest neighbours through faiss against the torch blocked matmul, side by side in one process;
IVF / HNSW recall; DS2 curation of a million synthetic records.

1. **Exact.** On ``--n`` (20,000) DS2 synthetic records (``make_synthetic_ds2``, d = 32, k = 30 =
   DS2's ``k_pool``) and on ``--n`` clustered vectors of d = 384 (sentence-embedding width, 1,000
   centres as ``tools/bench_qdit.py --synthetic``; k = 50 = QDIT's ``knn_k``): ``knn_cosine`` (faiss flat search, the default) beside the former
   torch code of this package (main 2f3c720: one float64 matmul block + ``topk``, copied below as
   :func:`former_torch_knn`) and beside the new torch path (:func:`knn_cosine_torch`, the CUDA
   path). Reported: seconds, the speed ratio, and whether the neighbours are the same (share of
   identical index lists and of identical sets, largest similarity difference).
2. **Approximate.** IVF (``IndexIVFFlat``, nlist / nprobe) and HNSW (``IndexHNSWFlat``) on the same
   data: recall@k against exact (|approx ∩ exact| / k, averaged over rows) and seconds (build +
   search).
3. **DS2 at 1M** (``--ds2-n``, in a fresh subprocess so its peak RSS is its own): ``curate_scores``
   of ``make_synthetic_ds2(n=1M)`` with ``--ds2-index`` (default ``ivf``, nlist 4096, nprobe 64),
   seconds (wall; and the process's CPU seconds, which on a loaded machine are the better measure
   of what an idle one takes) and peak RSS (VmHWM). Beside it, on the same 1M rows, the exact flat search timed on
   ``--exact-sample`` query rows against all 1M and extrapolated linearly to 1M queries (the work
   per query is fixed), and the IVF recall on those rows.

Threads: torch's (default 1, ``--threads``); faiss follows torch. Last line, exactly:
``RESULT knn_speedup_vs_torch=<former torch s / faiss s, DS2 data> ivf_recall=<> hnsw_recall=<>
ds2_1m_seconds=<> ds2_1m_peak_rss_mb=<>``

Usage: ``.venv/bin/python tools/bench_knn.py [--n 20000] [--ds2-n 1000000] [--skip-ds2]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from daar_ops.algorithms.ds2 import DS2Config, curate_scores
from daar_ops.algorithms.knn import knn_cosine, knn_cosine_torch, l2_normalize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daar_research.ds2 import make_synthetic_ds2  # noqa: E402


def former_torch_knn(embeddings: np.ndarray, k: int, block_size: int = 4096
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The package's kNN before faiss (main 2f3c720), verbatim but for the device argument."""
    x = torch.from_numpy(l2_normalize(embeddings))
    n = x.shape[0]
    k_eff = min(k, n - 1)
    indices = np.empty((n, k_eff), dtype=np.int64)
    sims = np.empty((n, k_eff), dtype=np.float32)
    tiebreak = torch.arange(n, dtype=torch.float64) * 1e-12
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        block = (x[start:stop] @ x.T).to(torch.float64) - tiebreak
        rows = torch.arange(stop - start)
        block[rows, rows + start] = -torch.inf
        top_vals, top_idx = torch.topk(block, k_eff, dim=1, largest=True, sorted=True)
        indices[start:stop] = top_idx.numpy()
        sims[start:stop] = (top_vals + tiebreak[top_idx]).to(torch.float32).numpy()
    return indices, sims


def clustered(n: int, d: int = 384, centers: int = 1000, noise: float = 0.8, seed: int = 0
              ) -> np.ndarray:
    """Clustered unit centres plus noise, the vectors of ``tools/bench_qdit.py --synthetic``: a
    stand-in for sentence embeddings, which an ANN index can exploit (pure noise it cannot)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_qdit import synthetic_embeddings

    return synthetic_embeddings(n, d, centers, noise, seed)


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx.tolist(),
                                                                      exact.tolist())]))


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def same(a, b) -> dict:
    return dict(identical_rows=float((a[0] == b[0]).all(1).mean()),
                same_sets=recall(a[0], b[0]),
                max_sim_diff=float(np.abs(a[1].astype(np.float64) - b[1]).max()))


def exact_vs_torch(name: str, x: np.ndarray, k: int) -> dict:
    faiss_out, t_faiss = timed(knn_cosine, x, k)
    former_out, t_former = timed(former_torch_knn, x, k)
    torch_out, t_torch = timed(knn_cosine_torch, x, k)
    row = dict(data=name, n=len(x), d=x.shape[1], k=k, faiss_s=round(t_faiss, 2),
               former_torch_s=round(t_former, 2), torch_path_s=round(t_torch, 2),
               speedup_vs_former_torch=round(t_former / t_faiss, 2),
               speedup_vs_torch_path=round(t_torch / t_faiss, 2),
               vs_former=same(faiss_out, former_out), vs_torch_path=same(faiss_out, torch_out))
    print(json.dumps(row), flush=True)
    return dict(row, exact=faiss_out)


def approximate(name: str, x: np.ndarray, k: int, exact: np.ndarray, t_exact: float) -> dict:
    out = {}
    settings = [("ivf", dict(nprobe=p)) for p in (8, 32, 64)] + \
               [("hnsw", dict(hnsw_m=32, ef_search=e)) for e in (64, 128)]
    for index, params in settings:
        (idx, _), t = timed(knn_cosine, x, k, index=index, **params)
        r = dict(data=name, index=index, **params, recall=round(recall(idx, exact), 4),
                 seconds=round(t, 2), speed_vs_exact=round(t_exact / t, 2))
        print(json.dumps(r), flush=True)
        out[(index, tuple(params.items()))] = r
    return out


def ds2_child(args) -> None:
    """One process: DS2 curation of ``--ds2-n`` synthetic records; prints a JSON line."""
    import faiss

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = make_synthetic_ds2(n=args.ds2_n, seed=args.seed)
    t_data = time.perf_counter() - t0
    params = dict(nlist=args.nlist, nprobe=args.nprobe) if args.ds2_index == "ivf" else {}
    # where the time goes: time DS2's own calls by wrapping them in its namespace (bench only)
    import daar_ops.algorithms.ds2 as ds2_module

    parts: dict[str, float] = {}
    for name in ("knn_cosine", "fit_transition_matrix", "detect_corrupted", "consensus_vectors"):
        def timed_call(*a, _fn=getattr(ds2_module, name), _name=name, **kw):
            t_part = time.process_time()
            try:
                return _fn(*a, **kw)
            finally:
                parts[_name] = round(parts.get(_name, 0.0) + time.process_time() - t_part, 1)
        setattr(ds2_module, name, timed_call)
    t, c0 = time.perf_counter(), time.process_time()
    result = curate_scores(data["embeddings"], data["observed"],
                           DS2Config(seed=args.seed, knn_index=args.ds2_index, knn_params=params))
    seconds = time.perf_counter() - t
    cpu_s = time.process_time() - c0  # all threads: what an idle machine would take (1 thread)
    peak = peak_rss_mb()
    acc = dict(raw_acc=float((data["observed"] == data["true"]).mean()),
               curated_acc=float((result.curated == data["true"]).mean()),
               t_max_abs_err=float(np.abs(result.transition - data["transition"]).max()))
    if args.exact_sample == 0:  # no side measurements
        print("DS2CHILD " + json.dumps(dict(
            n=args.ds2_n, index=args.ds2_index, params=params, curate_s=round(seconds, 1),
            curate_cpu_s=round(cpu_s, 1), peak_rss_mb=round(peak), loadavg_1m=os.getloadavg()[0],
            cpu_s_by_part=parts, n_corrupted=int(result.corrupted.sum()), **acc)), flush=True)
        return
    # beside it: exact flat search on a sample of query rows against all rows, extrapolated
    x = l2_normalize(data["embeddings"])
    rows = np.sort(np.random.default_rng(args.seed).choice(len(x), args.exact_sample, replace=False))
    t = time.perf_counter()
    d, i = faiss.knn(x[rows], x, 31 + 8, metric=faiss.METRIC_INNER_PRODUCT)
    t_sample = time.perf_counter() - t
    exact = np.array([[j for j in r if j != row][:30] for r, row in zip(i.tolist(), rows)])
    # the IVF neighbours of those rows: rerun only the search part on the sample
    from daar_ops.algorithms.knn import _build_index
    t = time.perf_counter()
    if args.ds2_index == "ivf":
        index = _build_index(x, "ivf", args.nlist, 32, None, args.seed)
        index.nprobe = args.nprobe
        t_build = time.perf_counter() - t
        _, ia = index.search(x[rows], 31 + 8)
        approx = np.array([[j for j in r if j != row][:30] for r, row in zip(ia.tolist(), rows)])
        ivf_recall = recall(approx, exact)
    else:
        t_build, ivf_recall = 0.0, float("nan")
    print("DS2CHILD " + json.dumps(dict(
        n=args.ds2_n, index=args.ds2_index, params=params, data_s=round(t_data, 1),
        curate_s=round(seconds, 1), curate_cpu_s=round(cpu_s, 1), peak_rss_mb=round(peak),
        loadavg_1m=os.getloadavg()[0], cpu_s_by_part=parts, n_corrupted=int(result.corrupted.sum()),
        **acc, exact_sample=args.exact_sample, exact_sample_s=round(t_sample, 2),
        exact_knn_1m_extrapolated_s=round(t_sample * args.ds2_n / args.exact_sample, 1),
        ivf_build_s=round(t_build, 1), ivf_recall_at_30=round(ivf_recall, 4))), flush=True)


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--ds2-n", type=int, default=1_000_000)
    ap.add_argument("--ds2-index", default="ivf", choices=("exact", "ivf", "hnsw"))
    ap.add_argument("--nlist", type=int, default=4096)
    ap.add_argument("--nprobe", type=int, default=64)
    ap.add_argument("--exact-sample", type=int, default=4096,
                    help="DS2 child: rows for the exact-search extrapolation and IVF recall "
                    "(0: skip them)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-ds2", action="store_true")
    ap.add_argument("--ds2-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.ds2_child:
        return ds2_child(args)
    t_all = time.perf_counter()
    ds2 = make_synthetic_ds2(n=args.n, seed=args.seed)["embeddings"]
    wide = clustered(args.n, seed=args.seed)
    print(f"# exact: faiss vs torch, N={args.n}, {args.threads} thread(s)", flush=True)
    r32 = exact_vs_torch("ds2_synthetic_d32", ds2, 30)
    r384 = exact_vs_torch("clustered_d384", wide, 50)
    print("# approximate: recall@k against exact", flush=True)
    a32 = approximate("ds2_synthetic_d32", ds2, 30, r32["exact"][0], r32["faiss_s"])
    a384 = approximate("clustered_d384", wide, 50, r384["exact"][0], r384["faiss_s"])
    ivf_recall = a32[("ivf", (("nprobe", 64),))]["recall"]
    hnsw_recall = a32[("hnsw", (("hnsw_m", 32), ("ef_search", 128)))]["recall"]
    ds2_s = ds2_rss = float("nan")
    if not args.skip_ds2:
        print(f"# DS2 curation of {args.ds2_n} synthetic records ({args.ds2_index}), fresh process",
              flush=True)
        cmd = [sys.executable, __file__, "--ds2-child", "--ds2-n", str(args.ds2_n),
               "--ds2-index", args.ds2_index, "--nlist", str(args.nlist), "--nprobe",
               str(args.nprobe), "--exact-sample", str(args.exact_sample), "--threads",
               str(args.threads), "--seed", str(args.seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("DS2CHILD ")]
        if proc.returncode or not line:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"DS2 child failed ({proc.returncode})")
        child = json.loads(line[0].removeprefix("DS2CHILD "))
        print(json.dumps(child), flush=True)
        ds2_s, ds2_rss = child["curate_s"], child["peak_rss_mb"]
    print(f"# total {time.perf_counter() - t_all:.0f} s", flush=True)
    print(f"RESULT knn_speedup_vs_torch={r32['speedup_vs_former_torch']} ivf_recall={ivf_recall} "
          f"hnsw_recall={hnsw_recall} ds2_1m_seconds={ds2_s} ds2_1m_peak_rss_mb={ds2_rss}")


if __name__ == "__main__":
    main()
