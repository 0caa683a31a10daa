"""``domain_pseudo_label_mapper``: DaaR step 2, nearest-centroid domain pseudo-labels."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from data_juicer.ops.base_op import OPERATORS, TAGGING_OPS, Mapper
from data_juicer.utils.constant import Fields
from loguru import logger
from tqdm.auto import tqdm

from daar_ops.algorithms.pseudo_labels import (Stage1Config, build_prototypes,
                                               domain_anchor_texts, half_split_health,
                                               pseudo_label)
from daar_ops.algorithms.centroids import (DEFAULT_DOMAINS, METRICS, DomainSpec, assign_nearest,
                                           check_feature, parse_domains,
                                           compatibility_keys, embed_texts, feature_description,
                                           load_centroids)
from daar_ops.artifacts import artifact_digest, check_compatible, recorded_model, sha256_file
from daar_ops.defaults import FEATURE_DTYPE, PSEUDO_LABEL_DEFAULTS, STAGE1
from daar_ops.core import (CENTROIDS_SHA_KEY, DOMAIN_SIMILARITY_KEY, PSEUDO_DOMAIN_KEY, as_dict,
                           read_jsonl, uniform_dicts)
from daar_ops.model_keys import load, model_key
from daar_ops.ops._columns import (check_template_columns, float_list_feature, render_rows,
                                   string_feature, with_fields)
from daar_ops.models import DEFAULT_LAYER, SMOLLM2, describe_model
from daar_ops.ops._types import NonNegativeInt, PositiveInt
from daar_ops.text import ALPACA_TEMPLATE, TextTemplate

OP_NAME = "domain_pseudo_label_mapper"
SENTENCE = "sentence"


def _static_description(model: str, layer: int) -> dict[str, Any]:
    """The describe() keys a centroid file is checked against, without loading any weights."""
    return {**describe_model(model), "layer": layer}


@TAGGING_OPS.register_module(OP_NAME)
@OPERATORS.register_module(OP_NAME)
class DomainPseudoLabelMapper(Mapper):
    """Pseudo-label each sample with its nearest DaaR domain centroid.

    Each sample's text (a template over fields, default ``"{instruction} {input} {output}"``) is
    embedded with the same model and feature definition as the centroids (``embedding``: masked
    mean of the token embeddings, the paper's choice; or ``layer``: masked mean of decoder layer
    k's raw output) and assigned to the most similar centroid.

    Writes, per sample:

    - meta ``daar_pseudo_domain`` (str): the nearest domain's name;
    - stats ``daar_domain_similarity`` (list[float], one per domain in the centroid file's order):
      cosine similarity, or the negative euclidean distance with ``metric: euclidean``.

    Empty or missing text is embedded as a single EOS token (so it still gets a label) and
    counted in a log line. Samples that already carry both keys are left as they are.
    With ``refine_iters > 0`` the centroids first move by k-means (initialised at the synthetic
    centroids) over the whole dataset, as in the reference code; that needs the default
    executor (under Ray, use ``refine_iters: 0``). Under Data-Juicer 1.6.1's Ray executor a
    Filter placed after this op drops its stats column (the meta label survives): put Filters
    first (docs/ray.md).
    """

    _accelerator = "cpu"
    _batched_op = True

    def __init__(
        self,
        centroids_path: Optional[str] = None,
        samples_path: Optional[str] = None,
        model: Optional[str] = None,
        feature: Optional[str] = None,
        layer: int = DEFAULT_LAYER,
        template: Optional[str] = None,
        method: str = PSEUDO_LABEL_DEFAULTS["method"],
        use_descriptions: bool = PSEUDO_LABEL_DEFAULTS["use_descriptions"],
        purity: bool = STAGE1.purity,
        domains: Optional[List[Dict[str, str]]] = None,
        sentence_model: str = STAGE1.sentence_model,
        seed: int = 0,
        metric: str = PSEUDO_LABEL_DEFAULTS["metric"],
        refine_iters: NonNegativeInt = PSEUDO_LABEL_DEFAULTS["refine_iters"],
        max_length: PositiveInt = 512,
        model_batch_size: PositiveInt = 64,
        dtype: str = FEATURE_DTYPE,
        label_key: str = PSEUDO_DOMAIN_KEY,
        similarity_key: str = DOMAIN_SIMILARITY_KEY,
        feature_cache: bool = True,
        cache_dir: Optional[str] = None,
        preset: Optional[str] = None,
        *args,
        **kwargs,
    ):
        """
        Initialization method.

        :param centroids_path: a ``daar_centroids`` artifact directory (written by
            ``centroid_synthesis_mapper``). Exactly one of this and ``samples_path``.
        :param samples_path: a JSONL(.gz) of synthesized samples with a ``domain`` field;
            centroids are their mean features per domain (domains in first-seen order).
        :param model: the causal LM (short name or folder). Default: the centroid file's model,
            or ``smollm2-135m-instruct`` with ``samples_path``. A model other than the file's
            is an error.
        :param feature: the space samples are labelled in: ``sentence`` (``sentence_model``
            embeddings; the default with ``samples_path``), ``embedding`` (the LM's embedding
            layer, the paper) or ``layer`` (LM decoder layer ``layer``). Default with
            ``centroids_path``: the file's feature.
        :param layer: decoder layer k for ``feature: layer``.
        :param template: text template over fields. Default: the centroid file's template or
            ``"{instruction} {input} {output}"``.
        :param method: with ``samples_path``: ``cluster`` (default: k-means clusters of the whole
            dataset, each labelled by its nearest prototype; default executor only), ``kmeans``
            (spherical k-means from the prototypes) or ``fixed`` (nearest prototype, the paper's
            fixed prototypes; per sample, runs under Ray). With ``centroids_path``: ``fixed``.
        :param use_descriptions: with ``samples_path``: the domains' descriptions (and a few
            paraphrases of the paper's four) join the synthetic samples as anchors.
        :param purity: with ``samples_path``: drop synthetic samples nearer another domain's
            prototype (leave-one-out) before building the prototypes.
        :param domains: ``[{"name", "description"}]`` for the descriptions; default: the paper's
            descriptions of the domains named in ``samples_path``.
        :param sentence_model: sentence encoder of ``feature: sentence``.
        :param seed: seed of the clustering.
        :param metric: ``cosine`` (default) or ``euclidean``.
        :param refine_iters: k-means iterations over this dataset, initialised at the centroids
            (0 = fixed prototypes, the paper's "constrained k-means"). With ``samples_path`` they
            need ``method: kmeans`` (anything else is an error, not a silent switch).
        :param max_length: tokens kept per text (longer texts are truncated and counted).
        :param model_batch_size: texts per forward pass.
        :param dtype: ``float32``, ``bfloat16`` or ``float16`` for the feature model.
        :param label_key: meta key of the pseudo-domain name.
        :param similarity_key: stats key of the per-domain similarities.
        :param feature_cache: read/write ``feature: sentence`` embeddings through the on-disk
            feature cache (keyed by the sentence model's identity, its truncation and the text's
            SHA-256), so a rerun or another recipe over the same texts does not embed them again.
        :param cache_dir: feature cache directory (default ``$DAAR_OPS_HOME/feature_cache``).
        :param preset: with ``samples_path``: ``paper`` labels exactly as the DaaR paper
            (:meth:`Stage1Config.paper`: fixed nearest prototypes of the synthetic samples in the
            LM's embedding space, no descriptions, no purity filter, no hubness correction); it
            sets ``feature``, ``method``, ``use_descriptions`` and ``purity``.
        :param args: extra args
        :param kwargs: extra args
        """
        super().__init__(*args, **kwargs)
        if (centroids_path is None) == (samples_path is None):
            raise ValueError("give exactly one of centroids_path (a centroid file) and "
                             "samples_path (synthesized samples with a 'domain' field)")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if not isinstance(refine_iters, int) or refine_iters < 0:
            raise ValueError(f"refine_iters must be an int >= 0, got {refine_iters!r}")
        if max_length < 1 or model_batch_size < 1:
            raise ValueError("max_length and model_batch_size must be >= 1")
        if not label_key or not similarity_key:
            raise ValueError("label_key and similarity_key must be non-empty")
        if method not in ("fixed", "kmeans", "cluster"):
            raise ValueError(f"method must be 'fixed', 'kmeans' or 'cluster', got {method!r}")
        if preset not in (None, "paper"):
            raise ValueError(f"preset must be 'paper' or unset, got {preset!r}")
        if preset == "paper":
            paper = Stage1Config.paper()
            feature, method = paper.space, paper.method
            use_descriptions, purity = paper.use_descriptions, paper.purity
        self.metric = metric
        self.refine_iters = refine_iters
        self.max_length = max_length
        self.model_batch_size = model_batch_size
        self.dtype = dtype
        self.label_key = label_key
        self.similarity_key = similarity_key
        self.layer = layer
        self.sentence_model = sentence_model
        self.feature_cache = bool(feature_cache)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        # whole-dataset methods: text -> (label, similarities to the prototypes), from _fit
        self._fitted: Optional[Dict[str, Tuple[int, List[float]]]] = None
        self.stage1_info: Dict[str, Any] = {}

        if centroids_path is not None:
            centroids, manifest = load_centroids(centroids_path)
            self.feature = feature or manifest.get("feature", "embedding")
            self.model = model or recorded_model(manifest, f"centroid file {centroids_path}")
            self.template = TextTemplate(template or manifest.get("template") or ALPACA_TEMPLATE)
            self._feature_layer = check_feature(self.feature, layer)
            live = feature_description(_static_description(self.model, self._feature_layer),
                                       self.feature)
            check_compatible(manifest, live, keys=compatibility_keys(self.feature),
                             source=f"centroid file {centroids_path}")
            self.domains = [str(d) for d in manifest["domains"]]
            self.centroids = centroids
            self.source_sha = artifact_digest(centroids_path)
            # the file's centroids are the anchors; refine_iters > 0: spherical k-means from them
            self.method = "kmeans" if refine_iters > 0 else "fixed"
            self.stage1 = Stage1Config(method=self.method, space=self.feature, layer=layer,
                                       use_descriptions=False, purity=False,
                                       refine_iters=max(refine_iters, 1))
            self.anchor_features = centroids.astype(np.float64)
            self.anchor_labels = np.arange(len(self.domains), dtype=np.int64)
            self.anchor_is_description = np.zeros(len(self.domains), dtype=bool)
        else:
            self.feature = feature or PSEUDO_LABEL_DEFAULTS["feature"]
            self.model = model or SMOLLM2
            self.template = TextTemplate(template or ALPACA_TEMPLATE)
            self._feature_layer = (0 if self.feature == SENTENCE
                                   else check_feature(self.feature, layer))
            if refine_iters > 0 and method != "kmeans":
                raise ValueError(f"{OP_NAME}: refine_iters ({refine_iters}) are the iterations of "
                                 f"method 'kmeans', but method is {method!r}: pass method: kmeans "
                                 f"(refine_iters no longer switches the method silently)")
            self.method = method
            base = Stage1Config.paper() if preset == "paper" else STAGE1
            self.stage1 = replace(base, method=self.method, space=self.feature, layer=layer,
                                  use_descriptions=bool(use_descriptions),
                                  purity=bool(purity), seed=int(seed),
                                  sentence_model=sentence_model,
                                  refine_iters=refine_iters or base.refine_iters)
            self._load_anchors(samples_path, domains)
            config = json.dumps(self.stage1.to_dict(), sort_keys=True)
            self.source_sha = hashlib.sha256(
                (sha256_file(samples_path) + config).encode()).hexdigest()
        if self.method != "fixed":
            # Clusters / k-means need the whole dataset before labelling: only the default
            # executor's run() can do that (Ray would silently skip it).
            self._supported_exec_modes = ("default",)
            logger.info(f"{OP_NAME}: method {self.method} labels the whole dataset at once: "
                        f"default executor only (under executor_type: ray use method: fixed)")

    def _extractor(self, rank: Optional[int] = None) -> Any:
        key = model_key("layer_features", model=self.model, layer=self._feature_layer,
                        max_length=self.max_length, batch_size=self.model_batch_size,
                        dtype=self.dtype)
        return load(key, rank, self.use_cuda())

    def feature_description(self) -> dict[str, Any]:
        """The feature model's description as a centroid file records it (no weights loaded)."""
        if self.feature == SENTENCE:
            from daar_ops.models import model_fingerprint, resolve_model_path

            path = resolve_model_path(self.sentence_model)
            return {"model": self.sentence_model, "model_path": path, "feature": SENTENCE,
                    "model_fingerprint": model_fingerprint(path),
                    "feature_dim": int(self.centroids.shape[1])}
        return feature_description(_static_description(self.model, self._feature_layer),
                                   self.feature)

    def _embed(self, texts: List[str], rank: Optional[int] = None,
               progress: bool = False) -> np.ndarray:
        """Features of ``texts`` in this op's space."""
        if self.feature == SENTENCE:
            from daar_ops.encoders import cached_sentence_embeddings

            key = model_key("sentence_encoder", model=self.sentence_model,
                            max_seq_length=STAGE1.sentence_max_tokens)
            return cached_sentence_embeddings(texts, load(key, rank, self.use_cuda()),
                                              self.sentence_model,
                                              batch_size=self.model_batch_size,
                                              cache=self.feature_cache, cache_dir=self.cache_dir,
                                              progress=progress)
        return embed_texts(self._extractor(rank), texts, self.feature, progress=progress)

    def _load_anchors(self, path: str, domains: Optional[List[Dict[str, str]]]) -> None:
        """Anchors = the synthetic samples (+ the domain descriptions) in this op's space;
        prototypes from them (``self.centroids``)."""
        try:
            rows, report = read_jsonl(path)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read synthesized samples from {path}: {err}") from err
        if report.message():
            logger.warning(f"{OP_NAME}: {report.message()}")
        rows = [r for r in rows if str(r.get("domain") or "").strip()]
        names = list(dict.fromkeys(str(r["domain"]) for r in rows))
        if len(names) < 2:
            raise ValueError(f"{path}: need samples of at least 2 domains, found {names}")
        known = {d.name: d for d in (parse_domains(domains) if domains else DEFAULT_DOMAINS)}
        specs = [known.get(n, DomainSpec(n)) for n in names]
        texts = [self.template.render(r) for r in rows]
        labels = [names.index(str(r["domain"])) for r in rows]
        is_desc = [False] * len(rows)
        if self.stage1.use_descriptions:
            desc_texts, desc_labels = domain_anchor_texts(specs)
            texts, labels = texts + desc_texts, labels + desc_labels
            is_desc += [True] * len(desc_texts)
        self.domains = names
        self.anchor_features = self._embed(texts)
        self.anchor_labels = np.asarray(labels, dtype=np.int64)
        self.anchor_is_description = np.asarray(is_desc, dtype=bool)
        protos, _, kept, _, info = build_prototypes(self.anchor_features, self.anchor_labels,
                                                    len(names), self.anchor_is_description,
                                                    self.stage1)
        self.centroids = protos.astype(np.float32)
        self.stage1_info = info
        logger.info(f"{OP_NAME}: {self.method} labelling in the {self.feature} space from "
                    f"{dict(zip(names, np.bincount(kept, minlength=len(names)).tolist()))} "
                    f"anchors of {path}")

    def run(self, dataset, *, exporter=None, tracer=None):
        check_template_columns(self.template, dataset.column_names, self._name)
        if self.method != "fixed" and len(dataset) > 0:
            self._fit(dataset)
        dataset = with_fields(dataset, Fields.meta, {self.label_key: string_feature()})
        dataset = with_fields(dataset, Fields.stats, {self.similarity_key: float_list_feature(),
                                                      CENTROIDS_SHA_KEY: string_feature()})
        return super().run(dataset, exporter=exporter, tracer=tracer)

    def _fit(self, dataset) -> None:
        """Label every distinct text of the dataset with the whole-dataset method; the labels
        are looked up per sample in :meth:`process_batched`."""
        texts = []
        for batch in tqdm(dataset.iter(batch_size=1000), desc=f"{OP_NAME}: texts",
                          disable=len(dataset) < 5000):
            rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
            texts.extend(render_rows(self.template, {k: [r.get(k) for r in rows] for k in batch},
                                     range(len(rows)), OP_NAME))
        distinct = list(dict.fromkeys(texts))
        feats = self._embed(distinct, progress=True)
        joint = None
        if self.stage1.method == "cluster" and self.stage1.cluster_space == "joint":
            # the joint clustering space puts the LM's own features beside the labelling space
            # (docs/daar_stage1.md); the embedding layer needs no transformer forward
            layer = 0 if self.stage1.joint_feature == "embedding" else self.stage1.layer
            key = model_key("layer_features", model=self.model, layer=layer,
                            max_length=self.max_length, batch_size=self.model_batch_size,
                            dtype=self.dtype)
            joint = embed_texts(load(key, None, self.use_cuda()), distinct,
                                self.stage1.joint_feature, progress=True)
        labels, _, info = pseudo_label(feats, self.anchor_features, self.anchor_labels,
                                       len(self.domains), self.anchor_is_description,
                                       self.stage1, cluster_features=joint)
        _, sims = assign_nearest(feats, self.centroids, self.metric)
        # labels and similarities kept per text, so process_batched need not embed them again
        self._fitted = {t: (int(lab), row) for t, lab, row in zip(distinct, labels.tolist(),
                                                                 sims.tolist())}
        # label-free health: agreement of two labelings from halves of the synthetic samples
        check = half_split_health(feats, self.anchor_features, self.anchor_labels,
                                  len(self.domains), self.anchor_is_description, self.stage1,
                                  cluster_features=joint)
        self.stage1_info = {**self.stage1_info, **{k: v for k, v in info.items()
                                                   if k not in ("cluster_labels",)},
                            "half_split_agreement": round(check.cross_seed_agreement, 4),
                            "reliable": check.reliable}
        if not check.reliable:
            logger.warning(f"{OP_NAME}: stage 1 looks unreliable: labelings from two halves of "
                           f"the synthetic samples agree on {check.cross_seed_agreement:.2f} of "
                           f"the records (< {check.threshold}); expect poor pseudo-labels (more "
                           f"or better synthetic samples, descriptions that fit the data, or a "
                           f"stronger model help)")
        logger.info(f"{OP_NAME}: {self.method} labels of {len(distinct)} distinct texts: "
                    f"{dict(zip(self.domains, info.get('label_counts', [])))}; "
                    f"{info.get('prototype_agreement', float('nan')):.3f} agree with the nearest "
                    f"prototype")

    def process_batched(self, samples: Dict[str, List[Any]], rank: Optional[int] = None
                        ) -> Dict[str, List[Any]]:
        keys = list(samples.keys())
        n = len(samples[keys[0]]) if keys else 0
        if n == 0:
            return samples
        metas = [as_dict(m) for m in (samples.get(Fields.meta) or [None] * n)]
        stats = [as_dict(s) for s in (samples.get(Fields.stats) or [None] * n)]
        k = len(self.domains)
        # Labels from these centroids (same digest) are kept; anything else is (re)computed, so a
        # new centroid file never leaves the old labels in place silently.
        todo = list(range(n)) if self._fitted is not None else [i for i in range(n)
                if not (isinstance(metas[i].get(self.label_key), str)
                        and isinstance(stats[i].get(self.similarity_key), list)
                        and len(stats[i][self.similarity_key]) == k
                        and stats[i].get(CENTROIDS_SHA_KEY) == self._labels_sha())]
        stale = 0 if self._fitted is not None else sum(
            1 for i in todo if isinstance(metas[i].get(self.label_key), str))
        if stale:
            logger.info(f"{OP_NAME}: {stale} samples carried a {self.label_key} from other "
                        f"centroids; relabelled")
        if todo:
            texts = render_rows(self.template, samples, todo, OP_NAME)
            empty = sum(1 for t in texts if not t.strip())
            if empty:
                logger.warning(f"{OP_NAME}: {empty}/{len(texts)} samples have empty text; they "
                               f"are embedded as one EOS token and still labelled")
            labels, sims = self._label_texts(texts, rank)
            for j, i in enumerate(todo):
                row_sims = sims[j]
                if not np.isfinite(row_sims).all():
                    logger.warning(f"{OP_NAME}: non-finite features; similarities set to 0.0")
                    row_sims = np.where(np.isfinite(row_sims), row_sims, 0.0)
                metas[i][self.label_key] = self.domains[int(labels[j])]
                stats[i][self.similarity_key] = [float(v) for v in row_sims]
                stats[i][CENTROIDS_SHA_KEY] = self._labels_sha()
        samples[Fields.meta] = uniform_dicts(metas)
        samples[Fields.stats] = uniform_dicts(stats)
        return samples

    def _label_texts(self, texts: List[str], rank: Optional[int] = None
                     ) -> Tuple[np.ndarray, np.ndarray]:
        """(labels [n], similarities to the prototypes [n, K]): the fitted whole-dataset labels
        for texts seen by :meth:`_fit`, the nearest prototype for the others."""
        fitted = self._fitted or {}
        unseen = [j for j, t in enumerate(texts) if t not in fitted]
        labels = np.zeros(len(texts), dtype=np.int64)
        sims = np.zeros((len(texts), len(self.domains)), dtype=np.float64)
        if unseen:
            new_labels, new_sims = assign_nearest(self._embed([texts[j] for j in unseen], rank),
                                                  self.centroids, self.metric)
            labels[unseen], sims[unseen] = new_labels, new_sims
        for j, t in enumerate(texts):
            if t in fitted:
                labels[j], sims[j] = fitted[t][0], fitted[t][1]
        return labels, sims

    def _labels_sha(self) -> str:
        """What produced the labels: the anchors/centroids and the stage-1 settings. (A
        whole-dataset method's labels depend on the dataset too: it relabels every sample.)"""
        return self.source_sha if self.method == "fixed" else f"{self.source_sha}+{self.method}"

    @property
    def domain_specs(self) -> list[DomainSpec]:
        return [DomainSpec(d) for d in self.domains]
