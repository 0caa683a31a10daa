"""The whole DaaR method in one call (``daar-ops select``). No Data-Juicer import.

Stages, each timed and written to ``output_dir``:

1. ``synthesize``: the model writes ``samples_per_domain`` instruction pairs per domain (seed +
   augmentation with a novelty threshold); their embedding-layer features averaged per domain are
   the model-aware centroids (``centroids/``, ``synthetic.jsonl``).
2. ``pseudo_label``: a probe pool (``probe_size`` records, disjoint from the selection pool) gets
   the nearest centroid as pseudo-domain (``probe_pool.jsonl``).
3. ``train_probes``: psi_dom on layer-k features and pseudo-labels, then psi_div on psi_dom's
   entropy (``checkpoint/``).
4. ``score``: psi_div's predicted entropy for every record of the selection pool.
5. ``select``: the top ``select_ratio`` by that reward (``selected.jsonl``, ``scores.jsonl``,
   ``summary.json``/``summary.md``, histogram PNGs).

The ground-truth ``domain`` field of the shared pool is never read here: records are carried
through untouched and written back as they came.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from loguru import logger

from daar_ops.models import SMOLLM2
from daar_ops.text import ALPACA_TEMPLATE, TextTemplate

# The shared example pool beside a source checkout; $DAAR_OPS_POOL points elsewhere.
DEFAULT_POOL = Path(os.environ.get(
    "DAAR_OPS_POOL",
    Path(__file__).resolve().parents[2] / "shared" / "data" / "daar_pool" / "daar_pool.jsonl.gz"))


@dataclass
class SelectConfig:
    """Settings of :func:`run_select`; defaults are the embedded full-size run."""

    pool: str = str(DEFAULT_POOL)
    output_dir: str = "outputs/daar_select"
    model: str = SMOLLM2
    domains: Any = None  # None: the paper's four domains; else names / dicts / a JSON(L) path
    synthetic: str | None = None  # reuse synthetic samples (JSONL with `domain`): no generation
    template: str = ALPACA_TEMPLATE
    layer: int = 3
    max_length: int = 512
    samples_per_domain: int = 10
    max_attempts: int = 40
    # Pool texts of one domain already have median cosine 0.77-0.87 on SmolLM2 embedding features,
    # so the paper's 0.85 rejects many on-topic samples (docs/daar_stage1.md).
    tau: float = 0.95
    max_new_tokens: int = 256
    generation_batch_size: int = 8
    temperature: float = 0.9
    top_p: float = 0.95
    probe_size: int = 5000
    pool_size: int | None = None  # None: every record not in the probe pool
    # k-means iterations from the synthetic centroids (the reference code refines with k-means);
    # on SmolLM2 they lift pseudo-label agreement from 0.34 to 0.60 (3 iterations).
    refine_iters: int = 3
    select_ratio: float = 0.2
    # Keep the top select_ratio within each predicted pseudo-domain (the paper's "customized"
    # quota selection with equal ratios) instead of over the whole pool.
    per_domain: bool = False
    epochs: int | None = None  # None: the probe trainer's default
    seed: int = 0
    threads: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    cache_dir: str | None = None
    progress: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> "SelectConfig":
        """A preset that finishes in minutes on a 2-core CPU: few synthetic samples, a slice."""
        # 20 epochs on 800 probe samples give about the optimiser steps of the trainer's default 3
        # epochs on 5,000; with 3 epochs psi_dom stays near uniform and every entropy is ~ln K.
        base = cls(samples_per_domain=3, max_attempts=16, max_new_tokens=192, probe_size=800,
                   pool_size=2000, epochs=20, output_dir="outputs/daar_select_quick")
        return replace(base, **overrides)

    def validate(self) -> None:
        if not 0.0 < self.select_ratio <= 1.0:
            raise ValueError(f"select_ratio must be in (0, 1], got {self.select_ratio}")
        for name in ("probe_size", "samples_per_domain", "max_attempts", "threads", "layer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pool_size is not None and self.pool_size < 1:
            raise ValueError(f"pool_size must be >= 1 or None, got {self.pool_size}")
        if not Path(self.pool).exists():
            raise FileNotFoundError(f"pool file {self.pool} does not exist; pass --pool or set "
                                    f"DAAR_OPS_POOL")


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, record) per non-blank line; a malformed line yields (line, None)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                yield number, None
                continue
            yield number, record if isinstance(record, dict) else None


def write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
    os.replace(tmp, path)


def split_pool(n: int, probe_size: int, pool_size: int | None, seed: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (probe indices, selection-pool indices) from one seeded permutation."""
    if probe_size >= n:
        raise ValueError(f"probe_size {probe_size} leaves no record of the {n} for selection")
    order = np.random.default_rng(seed).permutation(n)
    probe = np.sort(order[:probe_size])
    rest = order[probe_size:]
    if pool_size is not None:
        rest = rest[:pool_size]
    return probe, np.sort(rest)


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str):
        timer = self

        class _Stage:
            def __enter__(self):
                logger.info(f"[daar select] stage '{stage}' ...")
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[stage] = round(time.perf_counter() - self.start, 2)
                if exc[0] is None:
                    logger.info(f"[daar select] stage '{stage}' done in {timer.seconds[stage]}s")

        return _Stage()


@dataclass
class SelectResult:
    output_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


def run_select(cfg: SelectConfig) -> SelectResult:
    from daar_ops.algorithms.centroids import (DEFAULT_DOMAINS, assign_nearest, compute_centroids,
                                               kmeans_refine, parse_domains, save_centroids,
                                               synthesize)
    from daar_ops.algorithms.probes import TrainConfig
    from daar_ops.algorithms.selection import quota_mask, top_mask
    from daar_ops.feature_cache import FeatureCache
    from daar_ops.features import LayerFeatureExtractor
    from daar_ops.generation import load_generator
    from daar_ops.probe_checkpoint import DaarScorer, train_probe_checkpoint

    cfg.validate()
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    tpl = TextTemplate(cfg.template)
    domains = parse_domains(cfg.domains) if cfg.domains is not None else list(DEFAULT_DOMAINS)
    names = [d.name for d in domains]

    with timer("load_pool"):
        records, malformed = [], []
        for number, record in read_jsonl(cfg.pool):
            (records.append(record) if record is not None else malformed.append(number))
        if malformed:
            logger.warning(f"{len(malformed)} malformed lines in {cfg.pool} skipped (first: "
                           f"line {malformed[0]}); they are listed in summary.json")
        probe_idx, pool_idx = split_pool(len(records), cfg.probe_size, cfg.pool_size, cfg.seed)
        texts = [tpl.render(r) for r in records]

    extractor = LayerFeatureExtractor(cfg.model, layer=cfg.layer, max_length=cfg.max_length,
                                      dtype=cfg.dtype, device=cfg.device)
    cache = FeatureCache(extractor, cfg.cache_dir, template=tpl.template)

    def embed(batch: list[str]) -> np.ndarray:
        return extractor.encode(batch, progress=False).embedding

    with timer("synthesize"):
        if cfg.synthetic:
            synthetic = [r for _, r in read_jsonl(cfg.synthetic) if r is not None]
            synthesis_stats = {"reused": cfg.synthetic}
            shortfall = {}
        else:
            generator = load_generator("hf", cfg.model, device=cfg.device,
                                       batch_size=cfg.generation_batch_size)
            synthesis = synthesize(
                generator, domains, embed, samples_per_domain=cfg.samples_per_domain,
                max_attempts=cfg.max_attempts, tau=cfg.tau, seed=cfg.seed,
                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                progress=cfg.progress)
            del generator
            synthetic = synthesis.records()
            synthesis_stats = {n: st.as_dict() for n, st in synthesis.stats.items()}
            shortfall = synthesis.shortfall(cfg.samples_per_domain)
            if shortfall:
                logger.warning(f"synthesis shortfall (domain: missing samples): {shortfall}")
        write_jsonl(out / "synthetic.jsonl", synthetic)
        missing = [n for n in names if not any(r.get("domain") == n for r in synthetic)]
        if missing:
            raise RuntimeError(
                f"no synthetic sample for domains {missing}; raise max_attempts/max_new_tokens "
                f"or lower tau (synthesis: {synthesis_stats})")
        syn_emb = embed([tpl.render(r) for r in synthetic])
        centroids, counts = compute_centroids(syn_emb, [r["domain"] for r in synthetic], names)

    with timer("pseudo_label"):
        probe_feats = cache.encode([texts[i] for i in probe_idx], progress=cfg.progress)
        if cfg.refine_iters:
            centroids = kmeans_refine(probe_feats.embedding, centroids, cfg.refine_iters)
        save_centroids(out / "centroids", centroids, domains, extractor.describe(), "embedding",
                       tpl.template, counts,
                       extra={"synthesis": synthesis_stats, "refine_iters": cfg.refine_iters})
        labels, sims = assign_nearest(probe_feats.embedding, centroids)
        probe_records = []
        for row, i in enumerate(probe_idx):
            rec = dict(records[i])
            rec["__dj__meta__"] = {**(rec.get("__dj__meta__") or {}),
                                   "daar_pseudo_domain": names[labels[row]]}
            rec["__dj__stats__"] = {**(rec.get("__dj__stats__") or {}),
                                    "daar_domain_similarity": [float(x) for x in sims[row]]}
            probe_records.append(rec)
        write_jsonl(out / "probe_pool.jsonl", probe_records)

    with timer("train_probes"):
        train_cfg = TrainConfig(seed=cfg.seed) if cfg.epochs is None else \
            TrainConfig(seed=cfg.seed, epochs=cfg.epochs)
        ckpt_dir, manifest = train_probe_checkpoint(
            probe_records, out / "checkpoint", model=cfg.model, layer=cfg.layer,
            max_length=cfg.max_length, template=tpl.template, domains=names, config=train_cfg,
            cache_dir=cfg.cache_dir, dtype=cfg.dtype, device=cfg.device, progress=cfg.progress)

    with timer("score"):
        scorer = DaarScorer(ckpt_dir, model=cfg.model, device=cfg.device, dtype=cfg.dtype)
        pool_feats = FeatureCache(scorer.extractor, cfg.cache_dir, template=tpl.template).encode(
            [texts[i] for i in pool_idx], progress=cfg.progress)
        reward, probs = scorer.probes.score(pool_feats.layer)

    with timer("select"):
        predicted = [names[k] for k in np.argmax(probs, axis=1)] if len(probs) else []
        keep = (quota_mask(reward, predicted, {}, default_ratio=cfg.select_ratio)
                if cfg.per_domain else top_mask(reward, top_ratio=cfg.select_ratio))
        scores, selected = [], []
        for row, i in enumerate(pool_idx):
            stats = {"daar_diversity_reward": float(reward[row]),
                     "daar_domain_probs": [float(p) for p in probs[row]],
                     "daar_probe_domain": predicted[row]}
            scores.append({"pool_index": int(i), "selected": bool(keep[row]), **stats})
            if keep[row]:
                rec = dict(records[i])
                rec["__dj__stats__"] = {**(rec.get("__dj__stats__") or {}), **stats}
                selected.append(rec)
        write_jsonl(out / "scores.jsonl", scores)
        write_jsonl(out / "selected.jsonl", selected)

    summary = {
        "config": asdict(cfg),
        "pool_records": len(records), "malformed_lines": malformed,
        "probe_pool": int(len(probe_idx)), "selection_pool": int(len(pool_idx)),
        "selected": int(keep.sum()),
        "domains": names,
        "synthesis": synthesis_stats,
        "synthesis_shortfall": shortfall,
        "probe_pseudo_domain_counts": {n: int((labels == k).sum()) for k, n in enumerate(names)},
        "selection_pool_pseudo_domain_counts": _counts(predicted, names),
        "selected_pseudo_domain_counts": _counts([p for p, k in zip(predicted, keep) if k], names),
        "probe_metrics": manifest.get("metrics", {}),
        "reward": _describe(reward), "selected_reward": _describe(reward[keep]),
        "n_truncated": int(pool_feats.truncated.sum()), "n_empty": int(pool_feats.empty.sum()),
        "stage_seconds": timer.seconds,
        "total_seconds": round(sum(timer.seconds.values()), 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    _write_summary_md(out, summary)
    _plot(out, reward, keep, predicted, names)
    logger.info(f"[daar select] {summary['selected']} of {summary['selection_pool']} selected; "
                f"outputs in {out}")
    return SelectResult(out, summary)


def _counts(labels: Sequence[str], names: Sequence[str]) -> dict[str, int]:
    return {n: sum(1 for x in labels if x == n) for n in names}


def _describe(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"n": 0}
    v = np.asarray(values, dtype=np.float64)
    return {"n": int(len(v)), "min": float(v.min()), "mean": float(v.mean()),
            "median": float(np.median(v)), "max": float(v.max())}


def _write_summary_md(out: Path, s: Mapping[str, Any]) -> None:
    lines = ["# DaaR selection summary", "",
             f"- pool: {s['pool_records']} records ({len(s['malformed_lines'])} malformed lines "
             f"skipped); probe pool {s['probe_pool']}, selection pool {s['selection_pool']}",
             f"- selected: **{s['selected']}** (top {s['config']['select_ratio']:.0%} by "
             f"predicted entropy{' within each predicted domain' if s['config']['per_domain'] else ''})",
             f"- probe validation accuracy on pseudo-labels: "
             f"{s['probe_metrics'].get('dom_val_accuracy', float('nan')):.3f}", "",
             "| pseudo-domain | probe pool | selection pool | selected |", "|---|---|---|---|"]
    for n in s["domains"]:
        lines.append(f"| {n} | {s['probe_pseudo_domain_counts'][n]} | "
                     f"{s['selection_pool_pseudo_domain_counts'][n]} | "
                     f"{s['selected_pseudo_domain_counts'][n]} |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in s["stage_seconds"].items()]
    lines += ["", "![reward histogram](score_histogram.png)",
              "![pseudo-domains](pseudo_domains.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))


def _plot(out: Path, reward: np.ndarray, keep: np.ndarray, predicted: Sequence[str],
          names: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(float(reward.min()), float(reward.max()) + 1e-9, 40) if len(reward) else 10
    ax.hist(reward, bins=bins, color="#bbbbbb", label="selection pool")
    ax.hist(reward[keep], bins=bins, color="#d62728", label="selected")
    ax.axvline(math.log(len(names)), color="k", ls="--", lw=1, label=f"ln K = {math.log(len(names)):.2f}")
    ax.set_xlabel("predicted entropy (diversity reward, nats)")
    ax.set_ylabel("records")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "score_histogram.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    pool = [sum(1 for p in predicted if p == n) for n in names]
    sel = [sum(1 for p, k in zip(predicted, keep) if k and p == n) for n in names]
    x = np.arange(len(names))
    ax.bar(x - 0.2, pool, 0.4, label="selection pool", color="#bbbbbb")
    ax.bar(x + 0.2, sel, 0.4, label="selected", color="#d62728")
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("records (predicted pseudo-domain)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pseudo_domains.png", dpi=120)
    plt.close(fig)
