"""How well do DaaR's synthetic centroids pseudo-label the real pool?

Synthesizes centroids with the model (seed + augmentation phases, novelty filter), pseudo-labels
``--n`` records of the shared pool by nearest centroid, and compares with the pool's hidden
``domain`` field (read here for evaluation only). ``oracle_agreement`` uses centroids averaged
from the TRUE labels of a disjoint slice of the pool: the ceiling of nearest-centroid labelling
with these features. Last line:

    RESULT agreement=<fraction> oracle_agreement=<fraction> n=<n> synth_seconds=<s>

Usage: ``.venv/bin/python tools/eval_pseudo_labels.py [--samples-per-domain 10] [--n 2000]``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from itertools import islice
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from daar_ops.algorithms.centroids import (  # noqa: E402
    DEFAULT_DOMAINS, assign_nearest, check_feature, compute_centroids, embed_texts, kmeans_refine,
    parse_domains, save_centroids, synthesize)
from daar_ops.features import LayerFeatureExtractor  # noqa: E402
from daar_ops.generation import load_generator  # noqa: E402
from daar_ops.text import ALPACA_TEMPLATE, TextTemplate  # noqa: E402

DEFAULT_POOL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "daar_pool" / \
    "daar_pool.jsonl.gz"


def read_pool(path: Path, start: int, n: int) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in islice(handle, start, start + n)]


def report(name: str, pred: np.ndarray, truth: np.ndarray, names: list[str]) -> float:
    acc = float((pred == truth).mean()) if len(truth) else 0.0
    print(f"\n{name}: agreement {acc:.4f}")
    print("  true \\ pred  " + " ".join(f"{n[:11]:>11s}" for n in names))
    for k, n in enumerate(names):
        row = [int(((truth == k) & (pred == j)).sum()) for j in range(len(names))]
        print(f"  {n[:12]:12s} " + " ".join(f"{v:11d}" for v in row))
    return acc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=Path, default=DEFAULT_POOL)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--domains", type=Path, default=None,
                    help="JSONL of {domain, description} rows (default: the paper's four "
                         "domains and descriptions); names must match the pool's labels")
    ap.add_argument("--n", type=int, default=2000, help="pool records to pseudo-label")
    ap.add_argument("--oracle-n", type=int, default=2000,
                    help="records of the disjoint slice (after the first n) for oracle centroids")
    ap.add_argument("--samples-per-domain", type=int, default=8)
    ap.add_argument("--max-attempts", type=int, default=24, help="generations per domain at most")
    ap.add_argument("--candidates-per-round", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--tau", type=float, default=0.95,
                    help="novelty threshold (paper 0.85; SmolLM2 embedding-layer features of "
                         "same-domain texts have median cosine 0.77-0.87, so 0.85 rejects most)")
    ap.add_argument("--feature", choices=["embedding", "layer"], default="embedding")
    ap.add_argument("--layer", type=int, default=3, help="decoder layer for --feature layer")
    ap.add_argument("--metric", choices=["cosine", "euclidean"], default="cosine")
    ap.add_argument("--refine-iters", type=int, default=0,
                    help="k-means iterations on the labelled records, initialised at the "
                         "synthetic centroids (the reference code's behaviour)")
    ap.add_argument("--batch-size", type=int, default=16, help="generation batch size")
    ap.add_argument("--gen-dtype", default="bfloat16",
                    help="generator dtype (bfloat16 is much faster on AMX CPUs)")
    ap.add_argument("--response-prefix", default="Instruction:",
                    help="assistant prefill the model continues ('' to disable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save-centroids", type=Path, default=None)
    ap.add_argument("--save-samples", type=Path, default=None, help="JSONL of accepted samples")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    layer = check_feature(args.feature, args.layer)
    if args.domains:
        with open(args.domains) as handle:
            domains = parse_domains([json.loads(line) for line in handle if line.strip()])
    else:
        domains = list(DEFAULT_DOMAINS)
    names = [d.name for d in domains]

    extractor = LayerFeatureExtractor(args.model, layer=layer, max_length=512)
    generator = load_generator("hf", args.model, batch_size=args.batch_size,
                               dtype=args.gen_dtype)
    t0 = time.perf_counter()
    result = synthesize(
        generator, domains, lambda texts: embed_texts(extractor, texts, args.feature),
        samples_per_domain=args.samples_per_domain, max_attempts=args.max_attempts,
        tau=args.tau, candidates_per_round=args.candidates_per_round, seed=args.seed,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        response_prefix=args.response_prefix or None)
    records = result.records()
    missing = [n for n in names if not result.samples[n]]
    if missing:
        print(f"no accepted sample for {missing}: cannot build centroids", file=sys.stderr)
        return 1
    synth_feats = embed_texts(extractor, [TextTemplate(ALPACA_TEMPLATE).render(r)
                                          for r in records], args.feature)
    centroids, counts = compute_centroids(synth_feats, [r["domain"] for r in records], names)
    synth_seconds = time.perf_counter() - t0
    print("\nsynthesis:")
    for d in domains:
        print(f"  {d.name:12s} {result.stats[d.name].as_dict()}")
    for d in domains:
        for p in result.samples[d.name][:2]:
            print(f"  [{d.name}] {p.text()[:150]!r}")
    if args.save_samples:
        args.save_samples.parent.mkdir(parents=True, exist_ok=True)
        with open(args.save_samples, "w") as handle:
            for r in records:
                handle.write(json.dumps(r, ensure_ascii=False) + "\n")
    if args.save_centroids:
        save_centroids(args.save_centroids, centroids, domains,
                       extractor.describe(), args.feature, ALPACA_TEMPLATE, counts,
                       extra={"synthesis": {n: s.as_dict() for n, s in result.stats.items()}})

    pool = read_pool(args.pool, 0, args.n + args.oracle_n)
    evaluate, oracle_slice = pool[:args.n], pool[args.n:]
    tpl = TextTemplate(ALPACA_TEMPLATE)
    feats = embed_texts(extractor, [tpl.render(r) for r in evaluate], args.feature, progress=True)
    truth = np.array([names.index(r["domain"]) for r in evaluate])  # evaluation only

    pred, _ = assign_nearest(feats, centroids, args.metric)
    acc_fixed = report("synthetic centroids (fixed prototypes)", pred, truth, names)
    refined = kmeans_refine(feats, centroids, 10, args.metric)
    acc_ref10 = report("synthetic centroids + 10 k-means iterations", assign_nearest(
        feats, refined, args.metric)[0], truth, names)
    if args.refine_iters:
        final = kmeans_refine(feats, centroids, args.refine_iters, args.metric)
        agreement = float((assign_nearest(feats, final, args.metric)[0] == truth).mean())
    else:
        agreement = acc_fixed

    oracle_feats = embed_texts(extractor, [tpl.render(r) for r in oracle_slice], args.feature,
                               progress=True)
    oracle_c, _ = compute_centroids(oracle_feats, [r["domain"] for r in oracle_slice], names)
    oracle = report("oracle centroids (true labels, disjoint slice)",
                    assign_nearest(feats, oracle_c, args.metric)[0], truth, names)
    cos = (centroids / np.linalg.norm(centroids, axis=1, keepdims=True)) @ \
        (oracle_c / np.linalg.norm(oracle_c, axis=1, keepdims=True)).T
    print("\ncosine(synthetic centroid, oracle centroid) per domain: "
          + ", ".join(f"{n}={cos[k, k]:.3f}" for k, n in enumerate(names)))
    print(f"ratio agreement/oracle = {agreement / max(oracle, 1e-9):.3f}; "
          f"fixed {acc_fixed:.4f}, refined(10) {acc_ref10:.4f}")
    print(f"RESULT agreement={agreement:.4f} oracle_agreement={oracle:.4f} n={len(evaluate)} "
          f"synth_seconds={synth_seconds:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
