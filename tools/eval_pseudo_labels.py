"""How well does DaaR stage 1 pseudo-label pools nobody tuned it for? (evaluation only)

For each synthesis seed (default 0 1 2) the model's synthetic samples are generated once and cached
(``tools/stage1_synthetic.py``, ``~/.cache/daar_ops/synthetic/``) and reused for every pool. Each
stage-1 method (:mod:`daar_ops.algorithms.pseudo_labels`) labels each pool
(``tools/build_pools.py``: the shared pool, two leave-source-out slices of it, a BIG-bench +
HumanEval + CHAMP pool), and the labels are compared with the pool's hidden ``domain`` field
(read here only). Printed per pool x method: agreement (mean +- std over seeds), per-domain recall,
predicted-label counts, the oracle ceiling (nearest centroid with centroids from the TRUE labels
of the same records, in the method's space) and the label-free health signal (cross-seed
agreement). Last line, for ``--default-method``:

    RESULT min_agreement=<worst pool, mean over seeds> mean_agreement=<> seed_std=<> pools=<n>

``seed_std``: the largest over pools of the std over seeds. Pool features are cached
(``daar_ops.feature_cache`` for SmolLM2, ``~/.cache/daar_ops/sentence_features`` for MiniLM).

Usage: ``.venv/bin/python tools/eval_pseudo_labels.py [--seeds 0 1 2] [--methods default paper]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from daar_ops.algorithms.synthesis import DEFAULT_DOMAINS  # noqa: E402
from daar_ops.algorithms.pseudo_labels import (Stage1Config,  # noqa: E402
                                               domain_anchor_texts, health,
                                               unit_rows)
from daar_ops.text import ALPACA_TEMPLATE, TextTemplate  # noqa: E402
from daar_research.stage1 import ResearchConfig, research_pseudo_label  # noqa: E402
from stage1_synthetic import SynthSettings, synthetic_samples  # noqa: E402

HOME = Path(os.environ.get("DAAR_OPS_HOME", Path.home() / ".cache" / "daar_ops"))
POOL_DIR = HOME / "eval_pools"
POOLS = ("shared", "shared_lso", "shared_lso2", "bigbench")

# Named stage-1 methods compared by the harness ("default" = Stage1Config()).
METHODS: dict[str, Stage1Config] = {
    "default": Stage1Config(),
    # the default before issue 11: one 32-cluster k-means of the MiniLM features
    "single_cluster": ResearchConfig.single_cluster(),
    # issue 11 research: consensus alone (sentence space), joint space alone, variants
    "consensus_sentence": Stage1Config(cluster_space="label"),
    "joint_single": ResearchConfig.single_cluster(cluster_space="joint", joint_weight=0.7),
    "joint_w70": Stage1Config(joint_weight=0.7),
    "joint_w65": Stage1Config(joint_weight=0.65),
    "joint_w50": Stage1Config(joint_weight=0.5),
    "joint_dim32": Stage1Config(joint_weight=0.7, joint_whiten_dim=32),
    "joint_seeds5": Stage1Config(joint_weight=0.7, consensus_seeds=5),
    "paper": Stage1Config.paper(),
    "paper+kmeans3": Stage1Config.paper(method="kmeans", refine_iters=3),
    "sent_fixed_syn": Stage1Config(method="fixed", use_descriptions=False, purity=False),
    "sent_kmeans10_syn": Stage1Config(method="kmeans", refine_iters=10, use_descriptions=False),
    "sent_kmeans10_desc": Stage1Config(method="kmeans", refine_iters=10, description_weight=1.0),
    "sent_kmeans10_both": Stage1Config(method="kmeans", refine_iters=10),
    "sent_kmeans10_both75": Stage1Config(method="kmeans", refine_iters=10,
                                         description_weight=0.75),
    "sent_kmeans10_both25": Stage1Config(method="kmeans", refine_iters=10,
                                         description_weight=0.25),
    "sent_kmeans10_both_nopurity": Stage1Config(method="kmeans", refine_iters=10, purity=False),
    "sent_cluster_both": ResearchConfig.single_cluster(method="cluster"),
    "sent_fixed_both": Stage1Config(method="fixed"),
    "emb_kmeans10_both": Stage1Config(method="kmeans", refine_iters=10, space="embedding"),
    "sent_kmeans10s3_desc": ResearchConfig(method="kmeans", refine_iters=10, anchor_strength=0.3,
                                         description_weight=1.0),
    "sent_kmeans10s3_both75": ResearchConfig(method="kmeans", refine_iters=10,
                                           anchor_strength=0.3, description_weight=0.75),
    "sent_cluster_desc": ResearchConfig.single_cluster(method="cluster", description_weight=1.0),
    "sent_cluster16_desc": ResearchConfig.single_cluster(method="cluster", description_weight=1.0,
                                        clusters_per_domain=16),
    "sent_cluster16_both75": ResearchConfig.single_cluster(method="cluster", clusters_per_domain=16),
    "sent_cluster4_both75": ResearchConfig.single_cluster(method="cluster", clusters_per_domain=4),
    "sent_cluster_both90": ResearchConfig.single_cluster(method="cluster", description_weight=0.9),
    "sent_cluster_both75": ResearchConfig.single_cluster(method="cluster", description_weight=0.75),
    "sent_kmeans10_both75_st": ResearchConfig(method="kmeans", refine_iters=10,
                                            description_weight=0.75, self_train_rounds=1),
}


def anchor_set(synthetic: list[dict], domains, tpl) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(texts, domain index, is_description) of the anchors: synthetic samples + descriptions."""
    names = [d.name for d in domains]
    desc_texts, desc_labels = domain_anchor_texts(domains)
    texts = [tpl.render(r) for r in synthetic] + desc_texts
    labels = np.array([names.index(r["domain"]) for r in synthetic] + desc_labels)
    is_desc = np.array([False] * len(synthetic) + [True] * len(desc_texts))
    return texts, labels, is_desc


class Spaces:
    """Features of texts in the three spaces, cached on disk."""

    def __init__(self, model: str, layer: int, threads: int, sentence_max_tokens: int = 128):
        self.model, self.layer = model, layer
        self.sentence_max_tokens = sentence_max_tokens
        self._caches: dict[int, object] = {}
        torch.set_num_threads(threads)

    def _lm(self, texts: list[str], layer: int):
        # layer 0 loads the embedding matrix only (no transformer forward): the paper's space
        # costs nothing; layer k runs k decoder layers.
        if layer not in self._caches:
            from daar_ops.feature_cache import FeatureCache
            from daar_ops.features import LayerFeatureExtractor

            extractor = LayerFeatureExtractor(self.model, layer=layer, max_length=512)
            self._caches[layer] = FeatureCache(extractor, None, template=None)
        return self._caches[layer].encode(texts, progress=len(texts) > 200)

    def sentence(self, texts: list[str]) -> np.ndarray:
        """MiniLM embeddings, cached per text (content-addressed rows under
        ``~/.cache/daar_ops/sentence_features``), so any subset of seen texts costs nothing."""
        from daar_ops.encoders import encode_sentences, load_sentence_encoder

        root = HOME / "sentence_features" / f"all-minilm-l6-v2-{self.sentence_max_tokens}"
        if not hasattr(self, "_rows"):
            self._rows: dict[str, np.ndarray] = {}
            for path in sorted(root.glob("rows-*.npz")) if root.exists() else []:
                with np.load(path) as data:
                    self._rows.update(zip(data["keys"].tolist(), data["emb"]))
        keys = [hashlib.sha256(t.encode("utf-8", "replace")).hexdigest()[:32] for t in texts]
        missing = sorted({k: i for k, i in zip(keys, range(len(texts)))
                          if k not in self._rows}.items(), key=lambda kv: kv[1])
        if missing:
            # The first 128 tokens (mostly the instruction) carry the domain; the encoder's own
            # cap of 256 doubles the cost on a shared CPU.
            load_sentence_encoder().max_seq_length = self.sentence_max_tokens
            emb = encode_sentences([texts[i] for _, i in missing], progress=len(missing) > 200)
            new_keys = [k for k, _ in missing]
            root.mkdir(parents=True, exist_ok=True)
            name = hashlib.sha256("".join(new_keys).encode()).hexdigest()[:24]
            tmp = root / f".rows-{name}.{os.getpid()}.npz"
            np.savez(tmp, keys=np.array(new_keys), emb=emb)
            os.replace(tmp, root / f"rows-{name}.npz")
            self._rows.update(zip(new_keys, emb))
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return np.stack([self._rows[k] for k in keys]).astype(np.float32)

    def get(self, space: str, texts: list[str]) -> np.ndarray:
        if space == "sentence":
            return self.sentence(texts)
        if space == "embedding":
            return self._lm(texts, 0).embedding
        return self._lm(texts, self.layer).layer


def load_pool(name: str, n: int) -> list[dict]:
    path = POOL_DIR / f"{name}.jsonl"
    if not path.exists():
        import build_pools

        build_pools.build(POOL_DIR, POOL_DIR / "downloads", 2000, 0, build_pools.SHARED_POOL)
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return rows[:n]


def oracle_agreement(feats: np.ndarray, truth: np.ndarray, k: int) -> float:
    x = unit_rows(feats)
    cents = unit_rows(np.stack([x[truth == j].mean(0) for j in range(k)]))
    return float((np.argmax(x @ cents.T, 1) == truth).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pools", nargs="+", default=list(POOLS))
    ap.add_argument("--n", type=int, default=1000, help="records per pool (its first n)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+",
                    default=["default", "single_cluster", "paper", "paper+kmeans3"],
                    help=f"names of {sorted(METHODS)}, or 'all'")
    ap.add_argument("--default-method", default="default", help="method of the RESULT line")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sentence-max-tokens", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None, help="write all numbers here")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    methods = sorted(METHODS) if args.methods == ["all"] else args.methods
    if args.default_method not in methods:
        methods.append(args.default_method)
    domains = list(DEFAULT_DOMAINS)
    names = [d.name for d in domains]
    k = len(names)
    tpl = TextTemplate(ALPACA_TEMPLATE)
    spaces = Spaces(args.model, args.layer, args.threads, args.sentence_max_tokens)
    settings = replace(SynthSettings(), model=args.model)

    synth = {}
    for seed in args.seeds:
        t0 = time.perf_counter()
        records, info = synthetic_samples(seed, settings, domains, threads=args.threads)
        synth[seed] = records
        counts = {n: sum(r["domain"] == n for r in records) for n in names}
        print(f"synthetic seed {seed}: {counts} ({time.perf_counter() - t0:.1f}s here; "
              f"generated in {info.get('seconds')}s, key {info.get('key')})", flush=True)

    results: dict[str, dict[str, dict]] = {}
    for pool_name in args.pools:
        pool = load_pool(pool_name, args.n)
        truth = np.array([names.index(r["domain"]) for r in pool])  # evaluation only
        texts = [tpl.render(r) for r in pool]
        results[pool_name] = {}
        oracle: dict[str, float] = {}
        for method in methods:
            cfg = METHODS[method]
            feats = spaces.get(cfg.space, texts)
            if cfg.space not in oracle:
                oracle[cfg.space] = oracle_agreement(feats, truth, k)
            # the joint clustering space needs the pool's LM features too (embedding layer: no
            # transformer forward)
            joint_feats = (spaces.get(cfg.joint_feature, texts)
                           if cfg.method == "cluster" and cfg.cluster_space == "joint" else None)
            per_seed, labelings = [], []
            for seed in args.seeds:
                anchor_texts, labels, is_desc = anchor_set(synth[seed], domains, tpl)
                anchors = spaces.get(cfg.space, anchor_texts)
                pred, margins, info = research_pseudo_label(feats, anchors, labels, k, is_desc,
                                                   replace(cfg, seed=seed),
                                                   cluster_features=joint_feats)
                labelings.append(pred)
                recall = [float((pred[truth == j] == j).mean()) for j in range(k)]
                per_seed.append({"agreement": float((pred == truth).mean()), "recall": recall,
                                 "counts": np.bincount(pred, minlength=k).tolist(),
                                 "mean_margin": float(margins.mean()),
                                 "prototype_agreement": info["prototype_agreement"]})
            acc = np.array([s["agreement"] for s in per_seed])
            h = health(labelings, k)
            results[pool_name][method] = {
                "agreement_mean": float(acc.mean()), "agreement_std": float(acc.std()),
                "per_seed": per_seed, "oracle": oracle[cfg.space], "health": h.as_dict()}
        print(f"\n== pool {pool_name}: {len(pool)} records, true counts "
              f"{np.bincount(truth, minlength=k).tolist()} ({', '.join(names)})")
        print(f"  {'method':22s} {'agree':>6s} {'std':>6s} {'oracle':>6s} {'xseed':>6s}  "
              f"recall per domain (mean over seeds)   predicted counts (seed {args.seeds[0]})")
        for method in methods:
            r = results[pool_name][method]
            rec = np.mean([s["recall"] for s in r["per_seed"]], axis=0)
            print(f"  {method:22s} {r['agreement_mean']:6.3f} {r['agreement_std']:6.3f} "
                  f"{r['oracle']:6.3f} {r['health']['cross_seed_agreement']:6.3f}  "
                  + " ".join(f"{v:4.2f}" for v in rec)
                  + f"   {r['per_seed'][0]['counts']}", flush=True)

    print("\nmethod summary (worst pool / mean over pools of the mean over seeds; max seed std):")
    summary = {}
    for method in methods:
        means = [results[p][method]["agreement_mean"] for p in args.pools]
        stds = [results[p][method]["agreement_std"] for p in args.pools]
        summary[method] = (min(means), float(np.mean(means)), max(stds))
        print(f"  {method:22s} min {min(means):.3f}  mean {np.mean(means):.3f}  "
              f"seed_std {max(stds):.3f}")
    signals = {
        "cross_seed_agreement": lambda r: r["health"]["cross_seed_agreement"],
        "prototype_agreement": lambda r: np.mean([s["prototype_agreement"]
                                                  for s in r["per_seed"]]),
        "mean_margin": lambda r: np.mean([s["mean_margin"] for s in r["per_seed"]]),
    }
    print("\nlabel-free health signals vs true agreement (Pearson r over pool x method cells; "
          "within the default method over pools):")
    for sig, fn in signals.items():
        vals = np.array([(fn(results[p][m]), results[p][m]["agreement_mean"])
                         for p in args.pools for m in methods], dtype=float)
        ok = np.isfinite(vals).all(1)
        x, y = vals[ok].T if ok.any() else (np.array([]), np.array([]))
        corr = float(np.corrcoef(x, y)[0, 1]) if len(x) > 2 and x.std() > 0 and y.std() > 0 \
            else float("nan")
        dflt = ", ".join(f"{p}={fn(results[p][args.default_method]):.3f}" for p in args.pools)
        print(f"  {sig:22s} r={corr:6.3f}   default: {dflt}")
    xs = [(results[p][m]["health"]["cross_seed_agreement"], results[p][m]["agreement_mean"])
          for p in args.pools for m in methods]
    if len(args.seeds) > 1 and len(xs) > 2:
        for thr in (0.7, 0.8, 0.9):
            flagged = [(a, t) for a, t in xs if a < thr]
            print(f"  cross-seed < {thr}: {len(flagged)} cells flagged, their true agreement "
                  f"max {max([t for _, t in flagged], default=float('nan')):.3f}; unflagged "
                  f"min {min([t for a, t in xs if a >= thr], default=float('nan')):.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "seeds": args.seeds}, indent=1))
    print(f"\ntotal {time.perf_counter() - t_start:.1f}s")
    lo, mean, std = summary[args.default_method]
    print(f"RESULT min_agreement={lo:.4f} mean_agreement={mean:.4f} seed_std={std:.4f} "
          f"pools={len(args.pools)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
