"""DaaR stage 1, robust form: pseudo-label a pool from a few anchors per domain.

Plain numpy / scikit-learn over arrays: no Data-Juicer import, no model loading, no file I/O.

Inputs are features of the pool ([N, d]) and of *anchors* ([M, d]) with a domain index each:
the model's synthetic samples and, optionally, the embedded domain descriptions. Methods
(:data:`METHODS`):

* ``fixed``: nearest prototype (a prototype = mean of a domain's unit-length anchors). With
  synthetic anchors only and the LM's embedding layer this is the paper's "constrained k-means with
  fixed prototypes" (:meth:`Stage1Config.paper`).
* ``kmeans``: Lloyd iterations over the pool initialised at the prototypes (the reference code's
  refinement). Clusters can drift away from their domain: a default chosen on one pool.
* ``cluster``: "cluster then label": k-means with many clusters (``clusters_per_domain`` x K) on
  the pool, then each cluster takes the domain of the prototype nearest to its mean, after a
  hubness correction (each domain's similarity column is centred over the clusters, so one
  prototype that is close to everything cannot take every cluster). Clusters of a k-means with
  many centres are nearly pure, and a cluster's mean is far less noisy than one record, so labels
  do not flip between basins the way 4-cluster k-means does (seed std 0.01-0.03 against up to
  0.16 on the evaluation pools). The default. Two options of it (defaults since issue 11):
  a **consensus** over several clusterings (``consensus_clusters_per_domain`` sizes x
  ``consensus_seeds`` k-means seeds, each labelled as above, a record takes its majority label),
  and a **joint clustering space** (``cluster_space="joint"``): the clusters come from the
  labelling features concatenated with the PCA-whitened features the caller passes as
  ``cluster_features`` (the LM's embedding layer), while clusters are still *labelled* in the
  labelling space. The LM space separates the domains well but its synthetic prototypes are bad;
  the sentence space has good prototypes: clustering in both and labelling in one uses each for
  what it does well.
* ``spread``: label spreading over a kNN graph of pool + anchor rows (not adopted: unbalanced).

Every method returns labels, a margin per record (best minus second-best score: a label-free
confidence) and an info dict. :func:`purity_filter` removes anchors nearer another domain's
prototype than their own (leave-one-out) before prototypes are built. :func:`health` gives a
label-free signal of how reliable the labels are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np

from daar_ops.models import DEFAULT_LAYER

METHODS = ("fixed", "kmeans", "cluster", "spread")

# Anchor texts for the paper's four default domains: the domain's name and description plus a few
# plain paraphrases of what its records look like (question style, answer style). Generic on
# purpose: they name kinds of content, not any source of the evaluation pools. Custom domains get
# "{name}: {description}" only.
DEFAULT_ANCHOR_TEXTS: dict[str, tuple[str, ...]] = {
    "common_sense": (
        "general knowledge question about everyday facts, history, geography, science or people, "
        "with a short factual answer",
        "give advice, explain a concept, describe or list things in plain everyday language",
    ),
    "reasoning": (
        "a question with answer options solved by logical step-by-step reasoning, ending with "
        "'So the answer is'",
        "logic puzzle or deduction: infer the conclusion from the premises and explain why; "
        "true or false, yes or no",
    ),
    "mathematics": (
        "arithmetic, algebra or geometry problem with numbers and equations, solved by "
        "calculation",
        "math word problem: compute how many or how much, solve for x, find the probability; "
        "the answer is a number",
    ),
    "coding": (
        "programming task in Python, JavaScript, Java, C++ or SQL: write a function, class or "
        "query; the Output is code",
        "explain, debug or complete source code with loops, variables and algorithms",
    ),
}


def domain_anchor_texts(domains: Sequence[Any], extra: bool = True
                        ) -> tuple[list[str], list[int]]:
    """(texts, domain index per text) describing each domain: "{name}: {description}" and, with
    ``extra``, the :data:`DEFAULT_ANCHOR_TEXTS` paraphrases of a default domain's name.
    ``domains``: objects with ``name`` / ``description`` (``DomainSpec``)."""
    texts, labels = [], []
    for k, d in enumerate(domains):
        name = str(d.name).replace("_", " ")
        texts.append(f"{name}: {d.description}" if getattr(d, "description", "") else name)
        labels.append(k)
        if extra:
            for t in DEFAULT_ANCHOR_TEXTS.get(str(d.name), ()):
                texts.append(f"{name}: {t}")
                labels.append(k)
    return texts, labels
SPACES = ("sentence", "embedding", "layer")
CLUSTER_SPACES = ("label", "joint")


@dataclass(frozen=True)
class Stage1Config:
    """Settings of stage 1. Defaults: chosen on the worst of the evaluation pools
    (``tools/eval_pseudo_labels.py``, docs/daar_stage1.md).

    :param space: where the pool is labelled: ``sentence`` (all-MiniLM-L6-v2 sentence
        embeddings of the rendered record), ``embedding`` (the LM's embedding layer, the paper) or
        ``layer`` (raw output of LM decoder layer ``layer``).
    :param use_descriptions: embedded domain descriptions ("{name}: {description}") join the
        synthetic samples as anchors.
    :param description_weight: share of a prototype that comes from its descriptions (the rest
        from its synthetic samples), in [0, 1].
    :param purity: drop synthetic anchors nearer another domain's prototype (leave-one-out).
    :param clusters_per_domain: ``cluster`` method: k-means clusters per domain.
    :param refine_iters: ``kmeans`` method: Lloyd iterations.
    :param cluster_restarts: ``cluster`` method: k-means restarts (n_init); 1 gave seed std
        0.054 on one pool, 4 gave 0.029.
    :param anchor_strength: ``kmeans`` method: ties each centre to its prototype (0 = plain).
    :param hubness_correction: ``cluster`` method: centre each domain's score column.
    :param self_train_rounds: after labelling, this many rounds of: fit a linear probe
        (logistic regression) on the ``confident_fraction`` highest-margin records of each
        predicted domain, relabel every record with it.
    :param spread_neighbors, spread_alpha: ``spread`` method: kNN graph size, propagation weight.
    :param sentence_model, sentence_max_tokens: the encoder of the ``sentence`` space (read by the
        caller that embeds the texts; this module never loads a model).
    :param consensus_clusters_per_domain: ``cluster`` method: clusters per domain of each
        clustering of the consensus (e.g. (4, 8, 16) = 16, 32 and 64 clusters for 4 domains); a
        record takes the label most of the clusterings give it (ties: the lower domain index).
        Empty: one clustering with ``clusters_per_domain`` (the default before issue 11).
    :param consensus_seeds: ``cluster`` method with a consensus: k-means seeds per size
        (``seed``, then ``seed * 1000 + r``).
    :param cluster_space: ``cluster`` method: ``label`` clusters the labelling features;
        ``joint`` clusters [sqrt(1 - w) * unit(labelling features), sqrt(w) *
        unit(whitened cluster_features)] (w = ``joint_weight``; the whitening is a PCA to
        ``joint_whiten_dim`` dimensions fitted on the pool, label-free). Needs the caller to pass
        ``cluster_features`` (the pool's ``joint_feature`` LM features); without them it clusters
        the labelling features and says so in ``info["cluster_space"]``.
    :param joint_weight, joint_whiten_dim: the whitened LM part's share of the joint space and
        its dimensions (0.6 and 64: the best worst pool with seed std <= 0.03 among weights
        0.5-0.7 on the evaluation pools; differences within one seed std, docs/daar_stage1.md).
    :param joint_feature: which LM features the caller passes as ``cluster_features``
        (``embedding``: masked mean of the token embeddings, no transformer forward; or
        ``layer``). Read by the caller only.
    :param seed: seed of the clustering (pass the synthesis seed).
    """

    method: str = "cluster"
    space: str = "sentence"
    layer: int = DEFAULT_LAYER
    use_descriptions: bool = True
    description_weight: float = 0.75
    purity: bool = True
    clusters_per_domain: int = 8
    cluster_restarts: int = 4
    refine_iters: int = 3
    anchor_strength: float = 0.0
    hubness_correction: bool = True
    self_train_rounds: int = 0
    spread_neighbors: int = 10
    spread_alpha: float = 0.9
    confident_fraction: float = 0.5
    sentence_model: str = "all-minilm-l6-v2"
    sentence_max_tokens: int = 128
    consensus_clusters_per_domain: tuple[int, ...] = (4, 8, 16)
    consensus_seeds: int = 3
    cluster_space: str = "joint"
    joint_feature: str = "embedding"
    joint_weight: float = 0.6
    joint_whiten_dim: int = 64
    seed: int = 0

    @classmethod
    def paper(cls, **overrides: Any) -> "Stage1Config":
        """The paper's procedure: fixed prototypes from the synthetic samples, embedding layer."""
        base = cls(method="fixed", space="embedding", use_descriptions=False, purity=False,
                   hubness_correction=False)
        return replace(base, **overrides)

    @classmethod
    def single_cluster(cls, **overrides: Any) -> "Stage1Config":
        """The default before issue 11: one k-means clustering (``clusters_per_domain`` x K) of
        the sentence features, no consensus, no joint space."""
        return replace(cls(consensus_clusters_per_domain=(), consensus_seeds=1,
                           cluster_space="label"), **overrides)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {self.space!r}")
        if not 0.0 <= self.description_weight <= 1.0:
            raise ValueError(f"description_weight must be in [0, 1], got "
                             f"{self.description_weight}")
        if self.clusters_per_domain < 1 or self.refine_iters < 0:
            raise ValueError("clusters_per_domain must be >= 1 and refine_iters >= 0")
        if any(int(c) < 1 for c in self.consensus_clusters_per_domain) or \
                self.consensus_seeds < 1:
            raise ValueError("consensus_clusters_per_domain entries and consensus_seeds must "
                             "be >= 1")
        if self.cluster_space not in CLUSTER_SPACES:
            raise ValueError(f"cluster_space must be one of {CLUSTER_SPACES}, got "
                             f"{self.cluster_space!r}")
        if not 0.0 <= self.joint_weight <= 1.0 or self.joint_whiten_dim < 1:
            raise ValueError("joint_weight must be in [0, 1] and joint_whiten_dim >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = np.where(np.isfinite(x), x, 0.0)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def prototypes(anchor_features: np.ndarray, anchor_labels: np.ndarray, n_domains: int,
               anchor_weights: np.ndarray | None = None) -> np.ndarray:
    """[K, d] unit-length prototypes: the weighted mean of each domain's unit anchors.

    Raises ValueError when a domain has no anchor (a prototype cannot be made up).
    """
    a = unit_rows(anchor_features)
    labels = np.asarray(anchor_labels, dtype=np.int64)
    w = np.ones(len(a)) if anchor_weights is None else np.asarray(anchor_weights, np.float64)
    if a.ndim != 2 or len(a) != len(labels) or len(w) != len(a):
        raise ValueError(f"anchor features {a.shape}, labels {labels.shape} and weights "
                         f"{w.shape} do not match")
    out = np.zeros((n_domains, a.shape[1]))
    for k in range(n_domains):
        rows = labels == k
        if not rows.any() or w[rows].sum() <= 0:
            raise ValueError(f"domain {k} has no anchor: cannot build its prototype")
        out[k] = (w[rows, None] * a[rows]).sum(0) / w[rows].sum()
    return unit_rows(out)


def anchor_weights(anchor_labels: np.ndarray, is_description: np.ndarray,
                   description_weight: float) -> np.ndarray:
    """Weights that give each domain's descriptions together ``description_weight`` of its
    prototype and its synthetic samples the rest (a domain with only one kind gets all of it)."""
    labels = np.asarray(anchor_labels, dtype=np.int64)
    desc = np.asarray(is_description, dtype=bool)
    w = np.zeros(len(labels))
    for k in np.unique(labels):
        rows = labels == k
        n_desc, n_syn = int((rows & desc).sum()), int((rows & ~desc).sum())
        share = description_weight if n_syn else 1.0
        share = share if n_desc else 0.0
        if n_desc:
            w[rows & desc] = share / n_desc
        if n_syn:
            w[rows & ~desc] = (1.0 - share) / n_syn
    return w


def purity_filter(anchor_features: np.ndarray, anchor_labels: np.ndarray, n_domains: int,
                  protected: np.ndarray | None = None) -> np.ndarray:
    """[M] bool keep-mask: an anchor is dropped when, with itself left out of its own domain's
    mean, another domain's mean is more similar (cosine). Anchors in ``protected`` (e.g. the
    descriptions) are kept and never left out; a domain never loses its last anchor."""
    a = unit_rows(anchor_features)
    labels = np.asarray(anchor_labels, dtype=np.int64)
    prot = np.zeros(len(a), bool) if protected is None else np.asarray(protected, bool)
    sums = np.zeros((n_domains, a.shape[1]))
    counts = np.zeros(n_domains)
    np.add.at(sums, labels, a)
    np.add.at(counts, labels, 1)
    keep = np.ones(len(a), dtype=bool)
    for i in np.flatnonzero(~prot):
        k = labels[i]
        if counts[k] <= 1:
            continue
        means = sums.copy()
        means[k] -= a[i]
        means = unit_rows(means / np.maximum(counts - (np.arange(n_domains) == k), 1)[:, None])
        sims = means @ a[i]
        keep[i] = int(np.argmax(sims)) == k
    for k in range(n_domains):  # a domain keeps at least its best anchor
        rows = labels == k
        if rows.any() and not (keep & rows).any():
            keep[np.flatnonzero(rows)[0]] = True
    return keep


def _margins(scores: np.ndarray) -> np.ndarray:
    if scores.shape[1] < 2:
        return np.zeros(len(scores))
    top2 = np.sort(scores, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def label_fixed(pool: np.ndarray, protos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = unit_rows(pool) @ protos.T
    return np.argmax(scores, 1).astype(np.int64), scores


def label_kmeans(pool: np.ndarray, protos: np.ndarray, iters: int, anchor_strength: float = 0.0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Spherical Lloyd iterations from the prototypes. ``anchor_strength`` s in [0, 1] keeps
    each centre tied to its prototype: centre = unit((1 - s) * members' mean + s * prototype)
    (0: plain k-means, 1: fixed prototypes)."""
    x = unit_rows(pool)
    c = protos.copy()
    for _ in range(iters):
        labels = np.argmax(x @ c.T, 1)
        for k in range(len(c)):
            members = x[labels == k]
            if len(members):
                c[k] = (1 - anchor_strength) * unit_rows(members.mean(0)) + \
                    anchor_strength * protos[k]
        c = unit_rows(c)
    scores = x @ c.T
    return np.argmax(scores, 1).astype(np.int64), scores


def label_spreading(pool: np.ndarray, anchors: np.ndarray, anchor_labels: np.ndarray,
                    weights: np.ndarray, n_domains: int, n_neighbors: int, alpha: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Label spreading (Zhou et al. 2004) over a symmetric kNN graph of pool + anchor rows, the
    anchors clamped softly to their domain (initial mass = their prototype weight): labels flow
    along the pool's own neighbourhoods instead of towards off-manifold prototypes."""
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


def label_clusters(pool: np.ndarray, protos: np.ndarray, n_clusters: int, seed: int,
                   hubness_correction: bool = True, restarts: int = 4,
                   cluster_x: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Cluster the pool (k-means via sklearn on unit rows of ``cluster_x``, default the pool
    itself), label each cluster by the prototype nearest to the mean of its members' pool
    features; a record's scores are its cluster's scores."""
    from sklearn.cluster import KMeans

    x = unit_rows(pool)
    xc = x if cluster_x is None else np.asarray(cluster_x, dtype=np.float64)
    if len(xc) != len(x):
        raise ValueError(f"cluster features have {len(xc)} rows, the pool {len(x)}")
    n_clusters = int(min(n_clusters, len(x)))
    km = KMeans(n_clusters=n_clusters, n_init=restarts, random_state=seed, max_iter=100).fit(xc)
    assign = km.labels_
    # an empty cluster (possible only in degenerate data) gets the nearest record's features
    means = unit_rows(np.stack([x[assign == c].mean(0) if (assign == c).any()
                                else x[int(np.argmin(((xc - km.cluster_centers_[c]) ** 2)
                                                     .sum(1)))]
                                for c in range(n_clusters)]))
    cluster_scores = means @ protos.T
    if hubness_correction:
        # Centre each domain's column over the clusters: a prototype close to everything (a hub)
        # loses its advantage, what remains is which clusters it is *relatively* close to.
        cluster_scores = cluster_scores - cluster_scores.mean(0, keepdims=True)
    cluster_label = np.argmax(cluster_scores, 1)
    sizes = np.bincount(assign, minlength=n_clusters)
    return (cluster_label[assign].astype(np.int64), cluster_scores[assign],
            {"n_clusters": n_clusters, "cluster_sizes": sizes.tolist(),
             "cluster_labels": cluster_label.tolist()})


def label_cluster_consensus(pool: np.ndarray, protos: np.ndarray, cluster_counts: Sequence[int],
                            seeds: Sequence[int], hubness_correction: bool = True,
                            restarts: int = 4, cluster_x: np.ndarray | None = None
                            ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """:func:`label_clusters` for every (cluster count, seed) pair; a record takes the label most
    clusterings give it (ties: the lower domain index). Scores = the share of votes per domain.
    Why: one clustering puts a few mixed clusters on the wrong side of a domain boundary, and
    which ones depends on the count and seed; the majority over clusterings averages that out."""
    n_domains = protos.shape[0]
    votes = np.zeros((len(pool), n_domains))
    rows = np.arange(len(pool))
    runs = []
    for count in cluster_counts:
        for seed in seeds:
            pred, _, extra = label_clusters(pool, protos, int(count), int(seed),
                                            hubness_correction, restarts, cluster_x)
            votes[rows, pred] += 1
            runs.append({"n_clusters": extra["n_clusters"], "seed": int(seed)})
    votes /= max(len(runs), 1)
    return np.argmax(votes, 1).astype(np.int64), votes, {"consensus": runs}


def joint_space(label_features: np.ndarray, other_features: np.ndarray, weight: float,
                whiten_dim: int) -> np.ndarray:
    """[N, d1 + min(whiten_dim, ...)] rows: sqrt(1 - weight) * unit(label_features) beside
    sqrt(weight) * unit(PCA-whitened other_features), so each part's share of a squared distance
    is its weight. Whitening (label-free, fitted on these rows) because the LM's raw features
    share one large common direction that hides the domain structure (true-label centroids:
    0.71-0.87 agreement raw, 0.89-0.97 whitened to 64 dimensions, on the evaluation pools)."""
    from sklearn.decomposition import PCA

    a = unit_rows(label_features)
    b = np.asarray(other_features, dtype=np.float64)
    if b.ndim != 2 or len(b) != len(a):
        raise ValueError(f"cluster features {b.shape} need one row per pool record ({len(a)})")
    b = np.where(np.isfinite(b), b, 0.0)
    dim = int(min(whiten_dim, b.shape[1], max(len(b) - 1, 1)))
    if dim >= 1 and len(b) > 2:
        b = PCA(n_components=dim, whiten=True, svd_solver="full").fit_transform(b)
    return np.hstack([np.sqrt(1.0 - weight) * a, np.sqrt(weight) * unit_rows(b)])


def build_prototypes(anchor_features: np.ndarray, anchor_labels: Sequence[int] | np.ndarray,
                     n_domains: int, is_description: Sequence[bool] | np.ndarray | None = None,
                     config: Stage1Config | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """The anchors a stage-1 config keeps and the [K, d] unit prototypes they give:
    (prototypes, kept anchors, their labels, their weights, info)."""
    cfg = config or Stage1Config()
    anchors = np.asarray(anchor_features, dtype=np.float64)
    labels = np.asarray(anchor_labels, dtype=np.int64)
    desc = (np.zeros(len(anchors), bool) if is_description is None
            else np.asarray(is_description, dtype=bool))
    if anchors.ndim != 2:
        raise ValueError(f"anchors must be [M, d], got {anchors.shape}")
    if len(labels) != len(anchors) or len(desc) != len(anchors):
        raise ValueError("anchor_labels and is_description need one entry per anchor row")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_domains):
        raise ValueError(f"anchor labels must be in [0, {n_domains})")
    use = np.ones(len(anchors), bool) if cfg.use_descriptions else ~desc
    anchors, labels, desc = anchors[use], labels[use], desc[use]
    keep = (purity_filter(anchors, labels, n_domains, protected=desc) if cfg.purity
            else np.ones(len(anchors), bool))
    anchors, labels, desc = anchors[keep], labels[keep], desc[keep]
    weights = anchor_weights(labels, desc, cfg.description_weight)
    protos = prototypes(anchors, labels, n_domains, weights)
    info: dict[str, Any] = {
        "config": cfg.to_dict(),
        "anchors_kept": np.bincount(labels, minlength=n_domains).tolist(),
        "anchors_dropped": int((~keep).sum()),
        "prototype_cosine": np.round(protos @ protos.T, 4).tolist(),
    }
    return protos, anchors, labels, weights, info


def pseudo_label(pool_features: np.ndarray, anchor_features: np.ndarray,
                 anchor_labels: Sequence[int] | np.ndarray, n_domains: int,
                 is_description: Sequence[bool] | np.ndarray | None = None,
                 config: Stage1Config | None = None,
                 cluster_features: np.ndarray | None = None, **overrides: Any
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Pseudo-label ``pool_features`` [N, d] from anchors [M, d] (domain index each).

    :param is_description: [M] bool, True for rows that embed a domain description rather than a
        synthetic sample (they get ``description_weight`` of the prototype and are never filtered).
        Ignored rows: with ``use_descriptions=False`` description rows are dropped.
    :param config: :class:`Stage1Config` (default: its defaults); ``overrides`` replace fields.
    :param cluster_features: [N, d2] second features of the same pool records (the LM's
        ``config.joint_feature`` features) for ``cluster_space="joint"``; ignored otherwise.
        Without them a joint config clusters the labelling features (``info["cluster_space"]``
        then says ``label``).
    :returns: (labels [N] int64, margins [N] float64 (best minus second-best score),
        info: kept anchors per domain, the prototypes' pairwise cosine, method details).
    """
    cfg = replace(config or Stage1Config(), **overrides)
    cfg.validate()
    pool = np.asarray(pool_features, dtype=np.float64)
    anchors = np.asarray(anchor_features, dtype=np.float64)
    if pool.ndim != 2 or anchors.ndim != 2 or pool.shape[1] != anchors.shape[1]:
        raise ValueError(f"pool {pool.shape} and anchors {anchors.shape} must be [*, d] alike")
    protos, anchors, labels, weights, info = build_prototypes(anchors, anchor_labels, n_domains,
                                                              is_description, cfg)
    if len(pool) == 0:
        return np.zeros(0, np.int64), np.zeros(0), info
    if cfg.method == "fixed":
        pred, scores = label_fixed(pool, protos)
    elif cfg.method == "kmeans":
        pred, scores = label_kmeans(pool, protos, cfg.refine_iters, cfg.anchor_strength)
    elif cfg.method == "spread":
        pred, scores = label_spreading(pool, anchors, labels, weights, n_domains,
                                       cfg.spread_neighbors, cfg.spread_alpha)
    else:
        joint = cfg.cluster_space == "joint" and cluster_features is not None
        cluster_x = (joint_space(pool, cluster_features, cfg.joint_weight, cfg.joint_whiten_dim)
                     if joint else None)
        info["cluster_space"] = "joint" if joint else "label"
        if cfg.consensus_clusters_per_domain:
            seeds = [cfg.seed] + [cfg.seed * 1000 + r for r in range(1, cfg.consensus_seeds)]
            pred, scores, extra = label_cluster_consensus(
                pool, protos, [c * n_domains for c in cfg.consensus_clusters_per_domain], seeds,
                cfg.hubness_correction, cfg.cluster_restarts, cluster_x)
        else:
            pred, scores, extra = label_clusters(pool, protos,
                                                 cfg.clusters_per_domain * n_domains, cfg.seed,
                                                 cfg.hubness_correction, cfg.cluster_restarts,
                                                 cluster_x)
        info.update(extra)
    margins = _margins(scores)
    for _ in range(cfg.self_train_rounds):
        pred, scores = self_train(pool, pred, margins, n_domains, cfg.confident_fraction,
                                  cfg.seed)
        margins = _margins(scores)
    info["label_counts"] = np.bincount(pred, minlength=n_domains).tolist()
    # Label-free drift: how many records the refinement moved away from their nearest prototype.
    info["prototype_agreement"] = agreement_between(pred, label_fixed(pool, protos)[0])
    info["mean_margin"] = float(margins.mean())
    return pred, margins, info


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


# ------------------------------------------------------------------------- label-free health

def agreement_between(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of records on which two labelings agree (same domain index)."""
    a, b = np.asarray(a), np.asarray(b)
    return float((a == b).mean()) if len(a) else float("nan")


@dataclass(frozen=True)
class Stage1Health:
    """Label-free signals of stage-1 reliability (no ground truth needed).

    ``cross_seed_agreement``: mean pairwise agreement of labelings from different synthesis seeds
    (NaN with one seed); ``min_domain_share``: the smallest predicted domain's share of the pool;
    ``reliable``: cross_seed_agreement >= ``threshold`` (and every domain predicted at all).
    """

    cross_seed_agreement: float
    min_domain_share: float
    threshold: float
    reliable: bool
    signal: str = "cross_seed"  # or "half_split": the labelings came from two anchor halves

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Agreement between two labelings (two synthesis seeds, or two halves of the anchors) below this
# flags stage 1 as unreliable: on the evaluation pools every cell below it had true agreement
# <= 0.71-0.75 (docs/daar_stage1.md).
HEALTH_THRESHOLD = 0.8


def health(labelings: Sequence[np.ndarray], n_domains: int,
           threshold: float = HEALTH_THRESHOLD, signal: str = "cross_seed") -> Stage1Health:
    """Stage-1 health from >= 1 labelings of the same records (one per synthesis seed)."""
    labelings = [np.asarray(x) for x in labelings]
    if not labelings:
        raise ValueError("need at least one labeling")
    pairs = [agreement_between(labelings[i], labelings[j]) for i in range(len(labelings))
             for j in range(i + 1, len(labelings))]
    cross = float(np.mean(pairs)) if pairs else float("nan")
    counts = np.bincount(labelings[0], minlength=n_domains)
    share = float(counts.min() / max(counts.sum(), 1))
    reliable = bool(np.isfinite(cross) and cross >= threshold and share > 0)
    return Stage1Health(cross, share, threshold, reliable, signal)


def half_split_health(pool_features: np.ndarray, anchor_features: np.ndarray,
                      anchor_labels: Sequence[int] | np.ndarray, n_domains: int,
                      is_description: Sequence[bool] | np.ndarray | None = None,
                      config: Stage1Config | None = None,
                      threshold: float = HEALTH_THRESHOLD,
                      cluster_features: np.ndarray | None = None,
                      **overrides: Any) -> Stage1Health:
    """Health without a second synthesis run: label the pool twice, once from the even- and once
    from the odd-numbered synthetic samples of each domain (descriptions in both; a domain with
    one sample keeps it in both halves), and report how often the two labelings agree.

    On the evaluation pools (docs/daar_stage1.md) this half-split agreement correlated with the
    true agreement at r = 0.85 over 48 pool x method x seed cells; every cell below 0.8 had true
    agreement <= 0.71. It flags a broken stage 1, not a mediocre one.
    """
    anchors = np.asarray(anchor_features)
    labels = np.asarray(anchor_labels, dtype=np.int64)
    desc = (np.zeros(len(labels), bool) if is_description is None
            else np.asarray(is_description, dtype=bool))
    halves = [np.zeros(len(labels), bool), np.zeros(len(labels), bool)]
    for k in range(n_domains):
        rows = np.flatnonzero((labels == k) & ~desc)
        for h in (0, 1):
            pick = rows[h::2] if len(rows) > 1 else rows
            halves[h][pick] = True
    labelings = []
    for mask in halves:
        keep = mask | desc
        pred, _, _ = pseudo_label(pool_features, anchors[keep], labels[keep], n_domains,
                                  desc[keep], config, cluster_features, **overrides)
        labelings.append(pred)
    return health(labelings, n_domains, threshold, signal="half_split")
