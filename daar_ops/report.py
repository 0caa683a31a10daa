"""Selection reports: what a selection method picked, in numbers and pictures. No Data-Juicer import.

:func:`build_report` takes a pool and one or more selected subsets and writes a self-contained
directory: ``report.md`` (tables + embedded PNG links), ``metrics.json`` and the PNGs:

* subset sizes; per label field (``domain`` when present, ``__dj__meta__.daar_pseudo_domain`` ...)
  the distribution as bars, its entropy;
* coverage in ONE embedding space (sentence encoder, default all-MiniLM-L6-v2, L2-normalised):
  facility-location coverage of the pool, mean nearest-selected cosine of the pool rows left out,
  mean pairwise cosine inside the subset; the Section-3 metrics Phi_inter (Eq. 3) and mean
  Phi_intra (Eq. 5) of the subset under the first label field present;
* histograms of every numeric stats key (``__dj__stats__``) of a subset;
* a 2-D projection (PCA by default, t-SNE optional) of a capped pool sample, with the selection
  coloured by label.

Pool embeddings are cached (an artifact keyed by the texts, template and encoder), so several
reports over one pool encode it once. Subset rows are matched to pool rows by their rendered text;
rows not found in the pool are encoded on their own and count only for the subset metrics.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from loguru import logger

from daar_ops.algorithms.contrastive import (encode_labels, global_phi_inter, global_phi_intra,
                                             label_centroids)
from daar_ops.algorithms.coverage import (entropy_from_counts, facility_location_coverage,
                                          label_distribution, mean_nearest_selected_cosine,
                                          mean_pairwise_similarity)
from daar_ops.core import STATS_FIELD, read_json_records
from daar_ops.models import MINILM, SENTENCE_MAX_TOKENS
from daar_ops.text import ALPACA_TEMPLATE, TextTemplate, lookup, present_fields

DEFAULT_LABEL_KEYS = ("domain", "__dj__meta__.daar_pseudo_domain")
PROJECTIONS = ("pca", "tsne")


# ---------------------------------------------------------------------------------------------
# reading


def read_records(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """Records of a JSONL (optionally .gz, or a folder of shards) or JSON-list file, in order,
    through :func:`daar_ops.core.read_json_records` (a list item that is not an object becomes
    ``{"text": item}``).

    A Data-Juicer export ``x.jsonl`` whose stats were written to ``x_stats.jsonl`` gets them back
    under ``__dj__stats__`` (matched line by line). Blank lines are skipped; a malformed line is a
    ValueError naming the file and line.
    """
    path = Path(path)
    records = [r if isinstance(r, dict) else {"text": r} for r in read_json_records(path, limit)]
    stats_path = path.with_name(path.name.replace(".jsonl", "_stats.jsonl"))
    if (stats_path != path and stats_path.exists() and records
            and not any(STATS_FIELD in r for r in records)):
        stats = read_records(stats_path)
        if len(stats) == len(records):
            for rec, st in zip(records, stats):
                rec[STATS_FIELD] = st.get(STATS_FIELD, st)
        else:
            logger.warning(f"{stats_path}: {len(stats)} rows for {len(records)} records; ignored")
    return records


def numeric_stats(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Every scalar numeric ``__dj__stats__`` key -> float values (NaN/inf/missing dropped)."""
    values: dict[str, list[float]] = {}
    for rec in records:
        stats = rec.get(STATS_FIELD)
        if not isinstance(stats, Mapping):
            continue
        for key, val in stats.items():
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                continue
            if math.isfinite(val):
                values.setdefault(str(key), []).append(float(val))
    return {k: np.asarray(v) for k, v in sorted(values.items()) if v}


# ---------------------------------------------------------------------------------------------
# embeddings


def embed_texts(texts: Sequence[str], model: str = MINILM,
                cache_dir: str | os.PathLike | None = None, batch_size: int = 64,
                device: str = "cpu", progress: bool = True,
                max_seq_length: int | None = SENTENCE_MAX_TOKENS) -> np.ndarray:
    """L2-normalised sentence embeddings of texts, cached as an artifact under ``cache_dir``.

    ``max_seq_length`` caps the encoder's tokens per text (default: the package's one truncation,
    :data:`daar_ops.models.SENTENCE_MAX_TOKENS`, as stage 1, QDIT and DS2 embed); ``None`` keeps
    the model's setting.
    """
    from daar_ops.encoders import encode_sentences, load_sentence_encoder
    from daar_ops.models import model_fingerprint, resolve_model_path

    path = resolve_model_path(model)
    digest = hashlib.sha256()
    digest.update(model_fingerprint(path).encode())
    digest.update(f"max_seq_length={max_seq_length}".encode())
    for text in texts:
        digest.update(text.encode("utf-8", errors="replace"))
        digest.update(b"\x00")
    key = digest.hexdigest()[:24]
    if cache_dir is not None:
        from daar_ops.artifacts import ArtifactError, load_artifact

        entry = Path(cache_dir) / f"emb-{key}"
        if entry.exists():
            try:
                tensors, _ = load_artifact(entry, kind="daar_report_embeddings")
                if len(tensors["embeddings"]) == len(texts):
                    logger.info(f"report: reusing cached embeddings {entry}")
                    return tensors["embeddings"]
            except ArtifactError as err:
                logger.warning(f"report: ignoring bad embedding cache {entry}: {err}")
    encoder = load_sentence_encoder(model, device, max_seq_length)
    emb = encode_sentences(list(texts), encoder=encoder, batch_size=batch_size, normalize=True,
                           progress=progress)
    if cache_dir is not None:
        from daar_ops.artifacts import save_artifact

        save_artifact(Path(cache_dir) / f"emb-{key}", {"embeddings": emb},
                      {"model": model, "model_path": path, "n_texts": len(texts),
                       "max_seq_length": max_seq_length},
                      kind="daar_report_embeddings")
    return emb


# ---------------------------------------------------------------------------------------------
# metrics


@dataclass
class SubsetData:
    name: str
    records: list[dict[str, Any]]
    embeddings: np.ndarray  # [n, d] normalised
    pool_rows: np.ndarray  # [n] index into the pool, -1 when not found there


def _label_block(records: Sequence[Mapping[str, Any]], key: str, n_classes: int | None = None
                 ) -> dict[str, Any] | None:
    """Counts, entropy (nats) and entropy / ln(n_classes) (default: the labels present)."""
    labels = [lookup(r, key) for r in records]
    if all(lab is None for lab in labels):
        return None
    dist = label_distribution(labels)
    h = entropy_from_counts(dist)
    k = n_classes or sum(1 for name in dist if name != "<none>")
    return {"counts": dist, "entropy": h,
            "normalized_entropy": h / math.log(k) if k > 1 and h == h else float("nan")}


def _phi_block(emb: np.ndarray, records: Sequence[Mapping[str, Any]], key: str
               ) -> dict[str, Any] | None:
    domains, idx = encode_labels([lookup(r, key) for r in records])
    present = [k for k in range(len(domains)) if (idx == k).any()]
    if len(present) < 1:
        return None
    idx_map = {old: new for new, old in enumerate(present)}
    idx = np.array([idx_map.get(i, -1) for i in idx])
    names = [domains[k] for k in present]
    cents = label_centroids(emb, idx, len(names))
    intra = global_phi_intra(emb, cents, idx)
    return {"label_key": key, "Phi_inter": global_phi_inter(cents),
            "Phi_intra": dict(zip(names, intra.tolist())),
            "Phi_intra_mean": float(np.nanmean(intra)) if len(intra) else float("nan")}


def subset_metrics(pool_emb: np.ndarray, pool_records: Sequence[Mapping[str, Any]],
                   sub: SubsetData, label_keys: Sequence[str],
                   n_classes: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Size, coverage, label distributions and contrast metrics of one subset against the pool.

    ``n_classes`` (label key -> number of labels in the pool) normalises the entropies, so a
    subset that misses a domain is not called perfectly balanced."""
    n_classes = n_classes or {}
    selected_mask = np.zeros(len(pool_emb), dtype=bool)
    selected_mask[sub.pool_rows[sub.pool_rows >= 0]] = True
    out: dict[str, Any] = {
        "n": len(sub.records),
        "fraction_of_pool": len(sub.records) / max(len(pool_records), 1),
        "n_not_in_pool": int((sub.pool_rows < 0).sum()),
        "n_duplicate_rows": int(len(sub.pool_rows[sub.pool_rows >= 0])
                                - len(np.unique(sub.pool_rows[sub.pool_rows >= 0]))),
    }
    if len(sub.records):
        out["facility_location_coverage"] = facility_location_coverage(pool_emb, sub.embeddings)
        out["mean_nearest_selected_cosine"] = mean_nearest_selected_cosine(
            pool_emb, sub.embeddings, exclude=selected_mask)
    else:
        out["facility_location_coverage"] = float("nan")
        out["mean_nearest_selected_cosine"] = float("nan")
    out["mean_pairwise_similarity"] = mean_pairwise_similarity(sub.embeddings)
    out["labels"] = {}
    for key in label_keys:
        block = _label_block(sub.records, key, n_classes.get(key))
        if block is not None:
            out["labels"][key] = block
    out["contrast"] = None
    for key in label_keys:
        if key in out["labels"]:
            out["contrast"] = _phi_block(sub.embeddings, sub.records, key)
            break
    return out


# ---------------------------------------------------------------------------------------------
# figures


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "subset"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_label_bars(key: str, pool_block: Mapping[str, Any] | None,
                    subsets: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    plt = _plt()
    series = ({"pool": pool_block["counts"]} if pool_block else {})
    series.update({name: blk["counts"] for name, blk in subsets.items()})
    labels = sorted({lab for counts in series.values() for lab in counts})
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) + 2), 4))
    x = np.arange(len(labels))
    for i, (name, counts) in enumerate(series.items()):
        total = max(sum(counts.values()), 1)
        ax.bar(x + i * width, [counts.get(lab, 0) / total for lab in labels], width, label=name,
               color="lightgrey" if name == "pool" else None)
    ax.set_xticks(x + width * (len(series) - 1) / 2, labels, rotation=20, ha="right")
    ax.set_ylabel("fraction")
    ax.set_title(f"distribution of {key}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_histograms(name: str, stats: Mapping[str, np.ndarray], path: Path) -> None:
    plt = _plt()
    keys = list(stats)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        ax.hist(stats[key], bins=40, color="tab:blue")
        ax.set_title(key, fontsize=9)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"{name}: stats")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def project_2d(x: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """[n, 2] projection of rows; PCA (sklearn) or t-SNE (sklearn, PCA init)."""
    if method not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {method!r}")
    if len(x) < 3:
        return np.zeros((len(x), 2))
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, init="pca", random_state=seed,
                perplexity=min(30.0, max(2.0, (len(x) - 1) / 3))).fit_transform(x)


def plot_projection(pool_emb: np.ndarray, subsets: Sequence[SubsetData],
                    label_key: str | None, path: Path,
                    method: str = "pca", max_points: int = 5000, seed: int = 0) -> None:
    """Pool sample in grey, each subset's (capped) rows coloured by label, one panel per subset."""
    plt = _plt()
    rng = np.random.default_rng(seed)
    pool_idx = np.sort(rng.choice(len(pool_emb), min(max_points, len(pool_emb)), replace=False))
    parts = [pool_emb[pool_idx]]
    sub_idx = []
    for sub in subsets:
        cap = min(max(max_points // 2, 1), len(sub.records))
        idx = np.sort(rng.choice(len(sub.records), cap, replace=False)) if cap else np.zeros(0, int)
        sub_idx.append(idx)
        parts.append(sub.embeddings[idx])
    coords = project_2d(np.concatenate(parts), method, seed)
    pool_xy, offset = coords[:len(pool_idx)], len(pool_idx)
    names = sorted({str(lookup(r, label_key)) for s in subsets for r in s.records}) \
        if label_key else []
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colour = {n: cmap(i % cmap.N) for i, n in enumerate(names)}
    cols = min(3, max(len(subsets), 1))
    rows = math.ceil(max(len(subsets), 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4.5 * rows), squeeze=False)
    for ax, sub, idx in zip(axes.flat, subsets, sub_idx):
        xy = coords[offset:offset + len(idx)]
        offset += len(idx)
        ax.scatter(pool_xy[:, 0], pool_xy[:, 1], s=3, c="lightgrey", label="pool", linewidths=0)
        if label_key:
            labs = [str(lookup(sub.records[i], label_key)) for i in idx]
            for name in names:
                m = np.array([lab == name for lab in labs], dtype=bool)
                if m.any():
                    ax.scatter(xy[m, 0], xy[m, 1], s=5, color=colour[name], label=name,
                               linewidths=0)
        else:
            ax.scatter(xy[:, 0], xy[:, 1], s=5, c="tab:red", label="selected", linewidths=0)
        ax.set_title(f"{sub.name} (n={len(sub.records)})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, markerscale=3, loc="best")
    for ax in list(axes.flat)[len(subsets):]:
        ax.axis("off")
    fig.suptitle(f"{method.upper()} of pool (grey) vs selection"
                 + (f", coloured by {label_key}" if label_key else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the report


def _labels_from_pool(records: list[dict[str, Any]], rows: np.ndarray,
                      pool_records: Sequence[Mapping[str, Any]], label_keys: Sequence[str]
                      ) -> list[dict[str, Any]]:
    """Fill top-level label fields a subset row lacks from its matched pool row (the evaluation
    may read ``domain`` even when the selection method never saw it)."""
    keys = [k for k in label_keys if "." not in k]
    out = []
    for rec, row in zip(records, rows):
        missing = [k for k in keys if rec.get(k) is None]
        if missing and row >= 0:
            rec = dict(rec)
            for k in missing:
                if pool_records[row].get(k) is not None:
                    rec[k] = pool_records[row][k]
        out.append(rec)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.4f}"
    return str(v)


def build_report(pool: str | os.PathLike | Sequence[Mapping[str, Any]],
                 subsets: Mapping[str, str | os.PathLike | Sequence[Mapping[str, Any]]],
                 out_dir: str | os.PathLike,
                 label_keys: Sequence[str] = DEFAULT_LABEL_KEYS,
                 template: str = ALPACA_TEMPLATE,
                 model: str = MINILM,
                 projection: str = "pca",
                 max_points: int = 5000,
                 seed: int = 0,
                 cache_dir: str | os.PathLike | None = None,
                 pool_limit: int | None = None,
                 batch_size: int = 64,
                 device: str = "cpu",
                 progress: bool = True,
                 max_seq_length: int | None = SENTENCE_MAX_TOKENS,
                 require_labels: bool = False) -> dict[str, Any]:
    """Write ``report.md``, ``metrics.json`` and PNGs into ``out_dir``; return the metrics.

    Every input is read and checked before anything is embedded.

    :param pool: pool file (JSONL/JSONL.gz/JSON list) or records.
    :param subsets: name -> selected subset file (a Data-Juicer export works) or records.
    :param label_keys: label fields to tabulate (dotted for nested); absent ones are skipped,
        unless ``require_labels`` (keys the user named): then a key no record has is an error.
    :param template: fields rendered into the embedded text (same for pool and subsets).
    :param model: sentence encoder (short name or local folder) giving the embedding space.
    :param projection: ``pca`` (default) or ``tsne``.
    :param max_points: cap on pool points (and 1/2 of it per subset) in the projection.
    :param cache_dir: where pool embeddings are cached (default ``out_dir/cache``).
    :param pool_limit: use only the first ``pool_limit`` pool records.
    :param max_seq_length: encoder tokens per text (``None``: the encoder's own limit).
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if max_points < 10:
        raise ValueError(f"max_points must be >= 10, got {max_points}")
    if not subsets:
        raise ValueError("give at least one subset")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tpl = TextTemplate(template)
    pool_records, subset_records = _read_inputs(pool, subsets, pool_limit, label_keys,
                                                require_labels)
    space = _Space(tpl, model, Path(cache_dir) if cache_dir is not None else out / "cache",
                   batch_size, device, progress, max_seq_length)
    pool_emb = space.embed_pool(pool_records)
    subs = [space.subset(name, records, pool_records, pool_emb, label_keys)
            for name, records in subset_records.items()]
    metrics = _metrics(pool_records, pool_emb, subs, label_keys)
    metrics = {"embedding_model": model, "max_seq_length": max_seq_length, "template": template,
               "projection": projection, **metrics}
    metrics["figures"] = _figures(out, metrics, pool_emb, subs, projection, max_points, seed)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    (out / "report.md").write_text(render_markdown(metrics))
    logger.info(f"report written to {out / 'report.md'}")
    return metrics


def _read_inputs(pool: Any, subsets: Mapping[str, Any], pool_limit: int | None,
                 label_keys: Sequence[str], require_labels: bool
                 ) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """(pool records, {subset name: records}), read from files or taken as given; with
    ``require_labels`` a label key no record has is a ValueError naming the fields present."""
    pool_records = (read_records(pool, pool_limit) if isinstance(pool, (str, os.PathLike))
                    else list(pool)[:pool_limit])
    if not pool_records:
        raise ValueError("the pool is empty")
    subset_records = {name: read_records(src) if isinstance(src, (str, os.PathLike))
                      else list(src) for name, src in subsets.items()}
    if require_labels:
        absent = [k for k in label_keys
                  if not any(lookup(r, k) is not None for r in pool_records)
                  and not any(lookup(r, k) is not None for rs in subset_records.values()
                              for r in rs)]
        if absent:
            raise ValueError(f"label key(s) {', '.join(absent)} found in no pool or subset "
                             f"record; fields present: "
                             f"{', '.join(present_fields(pool_records)) or 'none'}")
    return pool_records, subset_records


@dataclass
class _Space:
    """The report's one embedding space: ``model`` over ``template``-rendered records."""

    tpl: TextTemplate
    model: str
    cache_dir: Path
    batch_size: int
    device: str
    progress: bool
    max_seq_length: int | None
    row_of: dict[str, int] = field(default_factory=dict)  # a pool text's first row

    def embed_pool(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """The pool's embeddings (cached under ``cache_dir``); notes each text's first row."""
        texts = self.tpl.render_all(records, source="the pool records")
        n_empty = sum(1 for t in texts if not t)
        if n_empty:
            logger.warning(f"report: {n_empty} pool records render to empty text under "
                           f"{self.tpl.template!r}")
        for i, t in enumerate(texts):
            self.row_of.setdefault(t, i)
        return embed_texts(texts, self.model, self.cache_dir, self.batch_size, self.device,
                           self.progress, self.max_seq_length)

    def subset(self, name: str, records: list[dict[str, Any]],
               pool_records: Sequence[Mapping[str, Any]], pool_emb: np.ndarray,
               label_keys: Sequence[str]) -> SubsetData:
        """A subset matched to the pool by rendered text; rows not in the pool are encoded on
        their own (they do not count as selected pool rows)."""
        texts = self.tpl.render_all(records, source=f"the records of subset {name}")
        rows = np.array([self.row_of.get(t, -1) for t in texts], dtype=np.int64)
        emb = np.zeros((len(records), pool_emb.shape[1]), dtype=np.float32)
        emb[rows >= 0] = pool_emb[rows[rows >= 0]]
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            logger.warning(f"report: {len(missing)} rows of '{name}' are not in the pool; "
                           "encoding them separately (they do not count as selected pool rows)")
            emb[missing] = embed_texts([texts[i] for i in missing], self.model, None,
                                       self.batch_size, self.device, progress=False,
                                       max_seq_length=self.max_seq_length)
        records = _labels_from_pool(records, rows, pool_records, label_keys)
        return SubsetData(name, records, emb, rows)


def _metrics(pool_records: Sequence[Mapping[str, Any]], pool_emb: np.ndarray,
             subs: Sequence[SubsetData], label_keys: Sequence[str]) -> dict[str, Any]:
    """``label_keys`` (those present), ``pool`` and ``subsets`` of ``metrics.json``."""
    present_keys = [k for k in label_keys
                    if any(lookup(r, k) is not None for r in pool_records)
                    or any(lookup(r, k) is not None for s in subs for r in s.records)]
    pool_metrics: dict[str, Any] = {
        "n": len(pool_records),
        "mean_pairwise_similarity": mean_pairwise_similarity(pool_emb),
        "labels": {k: b for k in present_keys
                   if (b := _label_block(pool_records, k)) is not None},
        "contrast": next((_phi_block(pool_emb, pool_records, k) for k in present_keys
                          if _label_block(pool_records, k) is not None), None),
    }
    n_classes = {k: sum(1 for lab in b["counts"] if lab != "<none>")
                 for k, b in pool_metrics["labels"].items()}
    return {"label_keys": present_keys, "pool": pool_metrics,
            "subsets": {s.name: subset_metrics(pool_emb, pool_records, s, present_keys,
                                               n_classes) for s in subs}}


def _figures(out: Path, metrics: dict[str, Any], pool_emb: np.ndarray,
             subs: Sequence[SubsetData], projection: str, max_points: int, seed: int
             ) -> dict[str, str]:
    """Write the PNGs (label bars, stats histograms, the projection) into ``out``; returns
    {figure key: file name}. Adds each subset's ``stats_keys`` to ``metrics``."""
    figures: dict[str, str] = {}
    present_keys = metrics["label_keys"]
    for key in present_keys:
        blocks = {s: m["labels"][key] for s, m in metrics["subsets"].items() if key in m["labels"]}
        fname = f"labels_{_slug(key)}.png"
        plot_label_bars(key, metrics["pool"]["labels"].get(key), blocks, out / fname)
        figures[f"labels:{key}"] = fname
    for sub in subs:
        stats = numeric_stats(sub.records)
        if stats:
            fname = f"stats_{_slug(sub.name)}.png"
            plot_histograms(sub.name, stats, out / fname)
            figures[f"stats:{sub.name}"] = fname
            metrics["subsets"][sub.name]["stats_keys"] = {
                k: {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()),
                    "n": int(len(v))} for k, v in stats.items()}
    colour_key = present_keys[0] if present_keys else None
    plot_projection(pool_emb, subs, colour_key, out / "projection.png", projection,
                    max_points, seed)
    figures["projection"] = "projection.png"
    return figures


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return str(v)


def render_markdown(metrics: Mapping[str, Any]) -> str:
    pool, subs, figs = metrics["pool"], metrics["subsets"], metrics["figures"]
    buf = io.StringIO()
    w = buf.write
    w("# Selection report\n\n")
    w(f"Pool: {pool['n']} records. Embedding space: `{metrics['embedding_model']}` over "
      f"`{metrics['template']}` (L2-normalised).\n\n")
    w("## Sizes and coverage\n\n")
    w("| subset | n | % of pool | FL coverage | mean nearest-selected cos (left out) | "
      "mean pairwise cos | Phi_inter | mean Phi_intra |\n|---|---|---|---|---|---|---|---|\n")
    for name, m in [("pool", None)] + list(subs.items()):
        if m is None:
            c = pool["contrast"] or {}
            w(f"| pool | {pool['n']} | 100 | - | - | {_fmt(pool['mean_pairwise_similarity'])} | "
              f"{_fmt(c.get('Phi_inter', float('nan')))} | "
              f"{_fmt(c.get('Phi_intra_mean', float('nan')))} |\n")
            continue
        c = m["contrast"] or {}
        w(f"| {name} | {m['n']} | {100 * m['fraction_of_pool']:.1f} | "
          f"{_fmt(m['facility_location_coverage'])} | {_fmt(m['mean_nearest_selected_cosine'])} | "
          f"{_fmt(m['mean_pairwise_similarity'])} | {_fmt(c.get('Phi_inter', float('nan')))} | "
          f"{_fmt(c.get('Phi_intra_mean', float('nan')))} |\n")
    w("\nFL coverage = mean over the pool of max(0, cosine to the nearest selected record) "
      "(higher = the pool is better represented). Phi_inter (Eq. 3) = mean distance between label "
      "centroids, Phi_intra (Eq. 5) = mean squared distance to the own centroid, both inside the "
      "subset under the first label field.\n\n")
    for key in metrics["label_keys"]:
        w(f"## Label `{key}`\n\n")
        rows = [("pool", pool["labels"].get(key))] + [(n, m["labels"].get(key))
                                                      for n, m in subs.items()]
        names = sorted({lab for _, b in rows if b for lab in b["counts"]})
        w("| subset | entropy (nats) | normalised | " + " | ".join(names) + " |\n")
        w("|---|---|---|" + "---|" * len(names) + "\n")
        for n, b in rows:
            if b is None:
                continue
            total = max(sum(b["counts"].values()), 1)
            w(f"| {n} | {_fmt(b['entropy'])} | {_fmt(b['normalized_entropy'])} | "
              + " | ".join(f"{100 * b['counts'].get(lab, 0) / total:.1f}%" for lab in names)
              + " |\n")
        if f"labels:{key}" in figs:
            w(f"\n![{key}]({figs['labels:' + key]})\n\n")
    w("## Projection\n\n")
    w(f"![projection]({figs['projection']})\n\n")
    stat_figs = [(k.split(":", 1)[1], v) for k, v in figs.items() if k.startswith("stats:")]
    if stat_figs:
        w("## Score histograms\n\n")
        for name, fname in stat_figs:
            keys = subs[name].get("stats_keys", {})
            w(f"### {name}\n\n| stat | n | mean | min | max |\n|---|---|---|---|---|\n")
            for k, s in keys.items():
                w(f"| {k} | {s['n']} | {_fmt(s['mean'])} | {_fmt(s['min'])} | "
                  f"{_fmt(s['max'])} |\n")
            w(f"\n![{name}]({fname})\n\n")
    return buf.getvalue()


def parse_subset_args(values: Iterable[str]) -> dict[str, str]:
    """``name=path`` or ``path`` (name = file stem, or the parent folder for ``selected.jsonl``)."""
    out: dict[str, str] = {}
    for value in values:
        if "=" in value and not Path(value).exists():
            name, path = value.split("=", 1)
        else:
            path = value
            p = Path(value)
            stem = p.name.split(".")[0]
            name = p.parent.name if stem in ("selected", "export", "result") and p.parent.name \
                else stem
        if name in out:
            raise ValueError(f"subset name '{name}' given twice; use name=path")
        out[name] = path
    return out
