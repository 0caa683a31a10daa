"""DaaR stage 1, robust form: pseudo-label a pool from a few anchors per domain.

Plain numpy / scikit-learn over arrays: no Data-Juicer import, no model loading, no file I/O.

Inputs are features of the pool ([N, d]) and of *anchors* ([M, d]) with a domain index each:
the model's synthetic samples and, optionally, the embedded domain descriptions. Methods
(:data:`METHODS`):

* ``fixed``: nearest prototype (a prototype = mean of a domain's unit-length anchors). With
  synthetic anchors only and the LM's embedding layer this is the paper's "constrained k-means with
  fixed prototypes" (:meth:`Stage1Config.paper`).
* ``kmeans``: Lloyd iterations over the pool initialised at the prototypes (the reference code's
  refinement). Clusters can drift away from their domain.
* ``cluster``: "cluster then label": k-means with many clusters (e.g. 8 x K) on the pool, then each cluster takes the domain of the prototype nearest to its mean, after a
  hubness correction (each domain's similarity column is centred over the clusters, so one
  prototype that is close to everything cannot take every cluster). Clusters of a k-means with
  many centres are nearly pure, and a cluster's mean is far less noisy than one record, so labels
  do not flip between basins the way 4-cluster k-means does (seed std 0.01-0.03 against up to
  0.16 on the evaluation pools). The default, with
  a **consensus** over several clusterings (``consensus_clusters_per_domain`` sizes x
  ``consensus_seeds`` k-means seeds, each labelled as above, a record takes its majority label),
  and a **joint clustering space** (``cluster_space="joint"``): the clusters come from the
  labelling features concatenated with the PCA-whitened features the caller passes as
  ``cluster_features`` (the LM's embedding layer), while clusters are still *labelled* in the
  labelling space. The LM space separates the domains well but its synthetic prototypes are bad;
  the sentence space has good prototypes: clustering in both and labelling in one uses each for
  what it does well.

Fitting and labelling are apart: :func:`fit_stage1` fits a :class:`Stage1Model` on a pool (the
probe pool), :func:`label_stage1` labels any record on its own with it (per sample: under Ray, on
records the fit never saw); :func:`pseudo_label` is the two on one pool, giving labels, a margin
per record (best minus second-best score: a label-free confidence) and an info dict. Research
variants (label spreading, self-training, anchored k-means, one clustering) live in
``tools/daar_research/stage1.py``. :func:`purity_filter` removes anchors nearer another domain's
prototype than their own (leave-one-out) before prototypes are built. :func:`health` gives a
label-free signal of how reliable the labels are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from daar_ops.algorithms.centroids import unit_rows
from daar_ops.models import DEFAULT_LAYER, MINILM

METHODS = ("fixed", "kmeans", "cluster")

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
    """Settings of stage 1, validated once when built. Defaults: chosen on the worst of the
    evaluation pools (``tools/eval_pseudo_labels.py``, docs/daar_stage1.md); the research
    variants that lost to them live in ``tools/daar_research/stage1.py``.

    :param method: ``cluster`` (default), ``kmeans`` or ``fixed`` (:data:`METHODS`).
    :param space: where the pool is labelled: ``sentence`` (all-MiniLM-L6-v2 sentence
        embeddings of the rendered record), ``embedding`` (the LM's embedding layer, the paper) or
        ``layer`` (raw output of LM decoder layer ``layer``).
    :param use_descriptions: embedded domain descriptions ("{name}: {description}") join the
        synthetic samples as anchors.
    :param description_weight: share of a prototype that comes from its descriptions (the rest
        from its synthetic samples), in [0, 1].
    :param purity: drop synthetic anchors nearer another domain's prototype (leave-one-out).
    :param refine_iters: ``kmeans`` method: Lloyd iterations.
    :param cluster_restarts: ``cluster`` method: k-means restarts (n_init); 1 gave seed std
        0.054 on one pool, 4 gave 0.029.
    :param hubness_correction: ``cluster`` method: centre each domain's score column.
    :param sentence_model: the encoder of the ``sentence`` space (read by the caller that embeds
        the texts, at :data:`daar_ops.models.SENTENCE_MAX_TOKENS`; this module loads no model).
    :param consensus_clusters_per_domain: ``cluster`` method: clusters per domain of each
        clustering of the consensus (e.g. (4, 8, 16) = 16, 32 and 64 clusters for 4 domains); a
        record takes the label most of the clusterings give it (ties: the lower domain index).
    :param consensus_seeds: ``cluster`` method: k-means seeds per size (``seed``, then
        ``seed * 1000 + r``).
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
    refine_iters: int = 3
    cluster_restarts: int = 4
    hubness_correction: bool = True
    sentence_model: str = MINILM
    consensus_clusters_per_domain: tuple[int, ...] = (4, 8, 16)
    consensus_seeds: int = 3
    cluster_space: str = "joint"
    joint_feature: str = "embedding"
    joint_weight: float = 0.6
    joint_whiten_dim: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "consensus_clusters_per_domain",
                           tuple(int(c) for c in self.consensus_clusters_per_domain))
        self.validate()

    @classmethod
    def paper(cls, **overrides: Any) -> "Stage1Config":
        """The paper's procedure: fixed prototypes from the synthetic samples, embedding layer."""
        base = cls(method="fixed", space="embedding", use_descriptions=False, purity=False,
                   hubness_correction=False)
        return replace(base, **overrides)

    def validate(self) -> None:
        """Raise ValueError naming the first field out of its range."""
        choices = {"method": METHODS, "space": SPACES, "cluster_space": CLUSTER_SPACES,
                   "joint_feature": ("embedding", "layer")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("description_weight", "joint_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name, low in (("refine_iters", 0), ("cluster_restarts", 1), ("consensus_seeds", 1),
                          ("joint_whiten_dim", 1)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        if not self.consensus_clusters_per_domain or \
                any(c < 1 for c in self.consensus_clusters_per_domain):
            raise ValueError("consensus_clusters_per_domain needs at least one entry, each >= 1, "
                             f"got {self.consensus_clusters_per_domain}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def kmeans_centres(pool: np.ndarray, protos: np.ndarray, iters: int,
                   move: Callable[[np.ndarray, int], np.ndarray] | None = None) -> np.ndarray:
    """[K, d] centres after ``iters`` spherical Lloyd iterations over the pool from the
    prototypes (a centre with no member keeps its place). ``move(members_mean, k)``: the new
    centre k before normalisation (default: the unit mean of its members)."""
    x = unit_rows(pool)
    c = protos.copy()
    for _ in range(iters):
        labels = np.argmax(x @ c.T, 1)
        for k in range(len(c)):
            members = x[labels == k]
            if len(members):
                mean = unit_rows(members.mean(0))
                c[k] = mean if move is None else move(mean, k)
        c = unit_rows(c)
    return c


@dataclass(frozen=True)
class JointTransform:
    """The label-free map of a record's (labelling features, LM features) into the joint
    clustering space, fitted on the pool: a PCA whitening of the LM part (``components`` None:
    no PCA, the pool was too small) weighted against the unit labelling part."""

    weight: float
    mean: np.ndarray
    components: np.ndarray | None
    scale: np.ndarray | None

    @classmethod
    def fit(cls, other_features: np.ndarray, weight: float, whiten_dim: int) -> "JointTransform":
        """Whitening (label-free) because the LM's raw features share one large common direction
        that hides the domain structure (true-label centroids: 0.71-0.87 agreement raw,
        0.89-0.97 whitened to 64 dimensions, on the evaluation pools)."""
        from sklearn.decomposition import PCA

        b = _finite(other_features)
        dim = int(min(whiten_dim, b.shape[1], max(len(b) - 1, 1)))
        if dim < 1 or len(b) <= 2:
            return cls(float(weight), np.zeros(b.shape[1]), None, None)
        pca = PCA(n_components=dim, whiten=True, svd_solver="full").fit(b)
        return cls(float(weight), pca.mean_, pca.components_,
                   np.sqrt(np.maximum(pca.explained_variance_, 1e-12)))

    def apply(self, label_features: np.ndarray, other_features: np.ndarray) -> np.ndarray:
        """[N, d1 + p] rows sqrt(1 - w) * unit(label) beside sqrt(w) * unit(whitened other), so
        each part's share of a squared distance is its weight."""
        a = unit_rows(label_features)
        b = _finite(other_features)
        if len(b) != len(a):
            raise ValueError(f"cluster features {b.shape} need one row per record ({len(a)})")
        if self.components is not None:
            if b.shape[1] != self.components.shape[1]:
                raise ValueError(f"cluster features have {b.shape[1]} columns, the fitted "
                                 f"whitening {self.components.shape[1]}")
            b = (b - self.mean) @ self.components.T / self.scale
        return np.hstack([np.sqrt(1.0 - self.weight) * a, np.sqrt(self.weight) * unit_rows(b)])


def _finite(x: np.ndarray) -> np.ndarray:
    b = np.asarray(x, dtype=np.float64)
    if b.ndim != 2:
        raise ValueError(f"cluster features must be [N, d], got {b.shape}")
    return np.where(np.isfinite(b), b, 0.0)


@dataclass(frozen=True)
class Stage1Model:
    """A fitted stage 1: everything needed to label any record on its own (per sample, so it runs
    under Ray and on records the fit never saw).

    ``fixed``: nearest prototype. ``kmeans``: nearest of the ``centres[0]`` Lloyd centres.
    ``cluster``: in each clustering, the nearest centre (squared euclidean in the clustering
    space, as k-means assigns) gives its cluster's domain; a record takes the majority
    (ties: the lower domain index), scores are the vote shares.
    """

    method: str
    prototypes: np.ndarray
    centres: tuple[np.ndarray, ...] = ()
    centre_labels: tuple[np.ndarray, ...] = ()
    joint: JointTransform | None = None

    @property
    def n_domains(self) -> int:
        return int(self.prototypes.shape[0])

    @property
    def needs_cluster_features(self) -> bool:
        return self.joint is not None


def _nearest_centre(x: np.ndarray, centres: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Index of the nearest centre (squared euclidean) per row, in chunks of rows."""
    c2 = (centres ** 2).sum(1)
    out = np.empty(len(x), dtype=np.int64)
    for s in range(0, len(x), chunk):
        out[s:s + chunk] = np.argmin(c2[None, :] - 2.0 * x[s:s + chunk] @ centres.T, 1)
    return out


def fit_clusterings(pool: np.ndarray, protos: np.ndarray, cfg: Stage1Config,
                    cluster_x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], list]:
    """The consensus clusterings of ``cluster_x``: per (cluster count, seed) the k-means centres
    and each cluster's domain (the prototype nearest to its members' mean labelling features,
    after the hubness correction: each domain's column is centred over the clusters, so a
    prototype close to everything cannot take every cluster)."""
    from sklearn.cluster import KMeans

    x = unit_rows(pool)
    n_domains = protos.shape[0]
    seeds = [cfg.seed] + [cfg.seed * 1000 + r for r in range(1, cfg.consensus_seeds)]
    centres, labels, runs = [], [], []
    for per_domain in cfg.consensus_clusters_per_domain:
        n_clusters = int(min(per_domain * n_domains, len(x)))
        for seed in seeds:
            km = KMeans(n_clusters=n_clusters, n_init=cfg.cluster_restarts, random_state=seed,
                        max_iter=100).fit(cluster_x)
            assign = km.labels_
            # an empty cluster (degenerate data only) gets the nearest record's features
            means = unit_rows(np.stack([
                x[assign == c].mean(0) if (assign == c).any()
                else x[int(np.argmin(((cluster_x - km.cluster_centers_[c]) ** 2).sum(1)))]
                for c in range(n_clusters)]))
            scores = means @ protos.T
            if cfg.hubness_correction:
                scores = scores - scores.mean(0, keepdims=True)
            centres.append(np.asarray(km.cluster_centers_, dtype=np.float64))
            labels.append(np.argmax(scores, 1).astype(np.int64))
            runs.append({"n_clusters": n_clusters, "seed": int(seed)})
    return centres, labels, runs


def fit_stage1(pool_features: np.ndarray, anchor_features: np.ndarray,
               anchor_labels: Sequence[int] | np.ndarray, n_domains: int,
               is_description: Sequence[bool] | np.ndarray | None = None,
               config: Stage1Config | None = None,
               cluster_features: np.ndarray | None = None) -> tuple[Stage1Model, dict[str, Any]]:
    """Fit stage 1 on a pool: prototypes from the anchors, then the method's centres over the
    pool. Arguments as :func:`pseudo_label`. Returns (model, info)."""
    cfg = config or Stage1Config()
    pool = np.asarray(pool_features, dtype=np.float64)
    anchors = np.asarray(anchor_features, dtype=np.float64)
    if pool.ndim != 2 or anchors.ndim != 2 or pool.shape[1] != anchors.shape[1]:
        raise ValueError(f"pool {pool.shape} and anchors {anchors.shape} must be [*, d] alike")
    protos, _, _, _, info = build_prototypes(anchors, anchor_labels, n_domains, is_description,
                                             cfg)
    if cfg.method == "fixed" or len(pool) == 0:
        return Stage1Model(cfg.method, protos), info
    if cfg.method == "kmeans":
        return Stage1Model("kmeans", protos, (kmeans_centres(pool, protos, cfg.refine_iters),)), \
            info
    joint = None
    if cfg.cluster_space == "joint" and cluster_features is not None:
        joint = JointTransform.fit(cluster_features, cfg.joint_weight, cfg.joint_whiten_dim)
    cluster_x = unit_rows(pool) if joint is None else joint.apply(pool, cluster_features)
    centres, labels, runs = fit_clusterings(pool, protos, cfg, cluster_x)
    info.update(cluster_space="label" if joint is None else "joint", consensus=runs)
    return Stage1Model("cluster", protos, tuple(centres), tuple(labels), joint), info


def label_stage1(model: Stage1Model, features: np.ndarray,
                 cluster_features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N] int64, scores [N, K]) of records by a fitted stage 1, each record on its own.
    ``cluster_features``: the records' LM features, required when the model clusters in the
    joint space (:attr:`Stage1Model.needs_cluster_features`)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != model.prototypes.shape[1]:
        raise ValueError(f"features {x.shape} do not match the fitted stage 1 "
                         f"(d = {model.prototypes.shape[1]})")
    if model.method == "fixed":
        return label_fixed(x, model.prototypes)
    if model.method == "kmeans":
        return label_fixed(x, model.centres[0])
    if model.joint is not None and cluster_features is None:
        raise ValueError("this stage 1 clusters in the joint space: pass the records' LM "
                         "features as cluster_features")
    cluster_x = unit_rows(x) if model.joint is None else model.joint.apply(x, cluster_features)
    votes = np.zeros((len(x), model.n_domains))
    rows = np.arange(len(x))
    for centres, labels in zip(model.centres, model.centre_labels):
        votes[rows, labels[_nearest_centre(cluster_x, centres)]] += 1
    votes /= max(len(model.centres), 1)
    return np.argmax(votes, 1).astype(np.int64), votes


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
                 cluster_features: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Pseudo-label ``pool_features`` [N, d] from anchors [M, d] (domain index each): fit stage
    1 on the pool (:func:`fit_stage1`), then label every record of it with the fitted model
    (:func:`label_stage1`), exactly as a per-sample labeller with that model would.

    :param is_description: [M] bool, True for rows that embed a domain description rather than a
        synthetic sample (they get ``description_weight`` of the prototype and are never filtered).
        With ``use_descriptions=False`` description rows are dropped.
    :param config: :class:`Stage1Config` (default: its defaults).
    :param cluster_features: [N, d2] second features of the same pool records (the LM's
        ``config.joint_feature`` features) for ``cluster_space="joint"``; ignored otherwise.
        Without them a joint config clusters the labelling features (``info["cluster_space"]``
        then says ``label``).
    :returns: (labels [N] int64, margins [N] float64 (best minus second-best score),
        info: kept anchors per domain, the prototypes' pairwise cosine, method details).
    """
    model, info = fit_stage1(pool_features, anchor_features, anchor_labels, n_domains,
                             is_description, config, cluster_features)
    pool = np.asarray(pool_features, dtype=np.float64)
    if len(pool) == 0:
        return np.zeros(0, np.int64), np.zeros(0), info
    pred, scores = label_stage1(model, pool, cluster_features if model.joint else None)
    margins = _margins(scores)
    info["label_counts"] = np.bincount(pred, minlength=n_domains).tolist()
    # Label-free drift: how many records the method moved away from their nearest prototype.
    info["prototype_agreement"] = agreement_between(pred, label_fixed(pool, model.prototypes)[0])
    info["mean_margin"] = float(margins.mean())
    return pred, margins, info


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
                      cluster_features: np.ndarray | None = None) -> Stage1Health:
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
                                  desc[keep], config, cluster_features)
        labelings.append(pred)
    return health(labelings, n_domains, threshold, signal="half_split")
