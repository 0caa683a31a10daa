"""Stage-1 research variants: the methods and switches that lost to the default on the evaluation
pools (docs/daar_stage1.md), kept so that ``tools/eval_pseudo_labels.py`` can reproduce them.

* ``method="spread"``: label spreading over a kNN graph of pool + anchor rows (Zhou et al. 2004;
  not adopted: unbalanced);
* ``anchor_strength``: k-means whose centres stay tied to their prototypes;
* ``self_train_rounds`` / ``confident_fraction``: relabel with a logistic regression fitted on
  each predicted domain's most confident records;
* :meth:`ResearchConfig.single_cluster`: one k-means clustering instead of the consensus (the
  default before issue 11).

Built from the product's kernels in :mod:`daar_ops.algorithms.pseudo_labels`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import numpy as np

from daar_ops.algorithms.pseudo_labels import (Stage1Config, _margins, agreement_between,
                                               build_prototypes, health, kmeans_centres,
                                               label_fixed, pseudo_label, unit_rows)

RESEARCH_METHODS = ("fixed", "kmeans", "cluster", "spread")


@dataclass(frozen=True)
class ResearchConfig(Stage1Config):
    """:class:`Stage1Config` plus the research switches (defaults: off)."""

    anchor_strength: float = 0.0
    self_train_rounds: int = 0
    confident_fraction: float = 0.5
    spread_neighbors: int = 10
    spread_alpha: float = 0.9

    def validate(self) -> None:
        base = replace(self, method="fixed") if self.method == "spread" else self
        Stage1Config.validate(Stage1Config(**{f.name: getattr(base, f.name)
                                              for f in fields(Stage1Config)}))
        if self.method not in RESEARCH_METHODS:
            raise ValueError(f"method must be one of {RESEARCH_METHODS}, got {self.method!r}")
        if not 0.0 <= self.anchor_strength <= 1.0 or not 0.0 < self.confident_fraction <= 1.0:
            raise ValueError("anchor_strength must be in [0, 1], confident_fraction in (0, 1]")

    @classmethod
    def single_cluster(cls, clusters_per_domain: int = 8, **overrides: Any) -> "ResearchConfig":
        """The default before issue 11: one k-means clustering (``clusters_per_domain`` x K) of
        the sentence features, no consensus, no joint space."""
        return cls(**{"consensus_clusters_per_domain": (clusters_per_domain,),
                      "consensus_seeds": 1, "cluster_space": "label", **overrides})

    @property
    def is_product(self) -> bool:
        return self.method != "spread" and self.anchor_strength == 0.0 and \
            self.self_train_rounds == 0


def as_product(cfg: Stage1Config) -> Stage1Config:
    return Stage1Config(**{f.name: getattr(cfg, f.name) for f in fields(Stage1Config)})


def anchored_kmeans(pool: np.ndarray, protos: np.ndarray, iters: int, anchor_strength: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Spherical Lloyd iterations from the prototypes; centre = unit((1 - s) * members' mean +
    s * prototype) (s = 0: plain k-means, 1: fixed prototypes)."""
    s = anchor_strength
    centres = kmeans_centres(pool, protos, iters,
                             move=lambda mean, k: (1 - s) * mean + s * protos[k])
    return label_fixed(pool, centres)


def label_spreading(pool: np.ndarray, anchors: np.ndarray, anchor_labels: np.ndarray,
                    weights: np.ndarray, n_domains: int, n_neighbors: int, alpha: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Label spreading over a symmetric kNN graph of pool + anchor rows, the anchors clamped
    softly to their domain (initial mass = their prototype weight)."""
    from scipy.sparse import csr_matrix, diags
    from sklearn.neighbors import NearestNeighbors

    x = np.concatenate([unit_rows(pool), unit_rows(anchors)])
    n, m = len(pool), len(anchors)
    nn = NearestNeighbors(n_neighbors=min(n_neighbors + 1, len(x)), metric="cosine").fit(x)
    dist, idx = nn.kneighbors(x)
    rows = np.repeat(np.arange(len(x)), idx.shape[1] - 1)
    sim = np.clip(1.0 - dist[:, 1:].ravel(), 0.0, None)
    w = csr_matrix((sim, (rows, idx[:, 1:].ravel())), shape=(len(x), len(x)))
    w = w.maximum(w.T)
    deg = np.asarray(w.sum(1)).ravel()
    d_inv = diags(1.0 / np.sqrt(np.maximum(deg, 1e-12)))
    s = d_inv @ w @ d_inv
    y0 = np.zeros((len(x), n_domains))
    y0[n + np.arange(m), anchor_labels] = weights / max(weights.max(), 1e-12)
    f = y0.copy()
    for _ in range(50):
        f = alpha * (s @ f) + (1 - alpha) * y0
    f = f[:n]
    f = f / np.maximum(f.sum(1, keepdims=True), 1e-12)
    return np.argmax(f, 1).astype(np.int64), f


def self_train(pool: np.ndarray, labels: np.ndarray, margins: np.ndarray, n_domains: int,
               confident_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Relabel with a logistic regression fitted on each predicted domain's most confident
    records (a domain with no record keeps none: it cannot come back)."""
    from sklearn.linear_model import LogisticRegression

    x = unit_rows(pool)
    train = []
    for k in range(n_domains):
        rows = np.flatnonzero(labels == k)
        if len(rows):
            top = rows[np.argsort(-margins[rows], kind="stable")]
            train.extend(top[:max(1, int(round(confident_fraction * len(rows))))])
    train = np.sort(np.asarray(train))
    if len(np.unique(labels[train])) < 2:
        return labels, np.eye(n_domains)[labels]
    clf = LogisticRegression(C=1.0, max_iter=300, random_state=seed).fit(x[train], labels[train])
    proba = np.zeros((len(x), n_domains))
    proba[:, clf.classes_] = clf.predict_proba(x)
    return np.argmax(proba, 1).astype(np.int64), proba


def research_pseudo_label(pool_features: np.ndarray, anchor_features: np.ndarray,
                          anchor_labels: Sequence[int] | np.ndarray, n_domains: int,
                          is_description: Sequence[bool] | np.ndarray | None = None,
                          config: Stage1Config | None = None,
                          cluster_features: np.ndarray | None = None
                          ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """:func:`daar_ops.algorithms.pseudo_labels.pseudo_label` for any config, research switches
    included (same returns)."""
    cfg = config or ResearchConfig()
    if not isinstance(cfg, ResearchConfig) or cfg.is_product:
        return pseudo_label(pool_features, anchor_features, anchor_labels, n_domains,
                            is_description, as_product(cfg), cluster_features)
    pool = np.asarray(pool_features, dtype=np.float64)
    if cfg.method == "spread" or cfg.anchor_strength:
        protos, anchors, labels, weights, info = build_prototypes(
            anchor_features, anchor_labels, n_domains, is_description, as_product(
                replace(cfg, method="fixed") if cfg.method == "spread" else cfg))
        if cfg.method == "spread":
            pred, scores = label_spreading(pool, anchors, labels, weights, n_domains,
                                           cfg.spread_neighbors, cfg.spread_alpha)
        else:
            pred, scores = anchored_kmeans(pool, protos, cfg.refine_iters, cfg.anchor_strength)
        margins = _margins(scores)
    else:
        pred, margins, info = pseudo_label(pool, anchor_features, anchor_labels, n_domains,
                                           is_description, as_product(cfg), cluster_features)
        protos = build_prototypes(anchor_features, anchor_labels, n_domains, is_description,
                                  as_product(cfg))[0]
    for _ in range(cfg.self_train_rounds):
        pred, scores = self_train(pool, pred, margins, n_domains, cfg.confident_fraction,
                                  cfg.seed)
        margins = _margins(scores)
    info["label_counts"] = np.bincount(pred, minlength=n_domains).tolist()
    info["prototype_agreement"] = agreement_between(pred, label_fixed(pool, protos)[0])
    info["mean_margin"] = float(margins.mean()) if len(margins) else float("nan")
    return pred, margins, info


__all__ = ["ResearchConfig", "research_pseudo_label", "label_spreading", "self_train",
           "anchored_kmeans", "health"]
