"""``domain_pseudo_label_mapper``: DaaR step 2, domain pseudo-labels per sample."""

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

from daar_ops.algorithms.pseudo_labels import (Stage1Config, Stage1Model, agreement_between,
                                               build_prototypes, domain_anchor_texts,
                                               fit_stage1, half_split_health, label_fixed,
                                               label_stage1)
from daar_ops.algorithms.centroids import assign_nearest, check_feature
from daar_ops.algorithms.synthesis import DEFAULT_DOMAINS, DomainSpec, parse_domains
from daar_ops.centroid_file import compatibility_keys, feature_description, load_centroids
from daar_ops.encoders import embed_texts
from daar_ops.artifacts import artifact_digest, check_compatible, recorded_model, sha256_file
from daar_ops.defaults import FEATURE_DTYPE, PSEUDO_LABEL_DEFAULTS, STAGE1
from daar_ops.core import (CENTROIDS_SHA_KEY, DOMAIN_SIMILARITY_KEY, PSEUDO_DOMAIN_KEY, as_dict,
                           read_jsonl, uniform_dicts)
from daar_ops.model_keys import load, model_key
from daar_ops.ops._columns import (check_template_columns, float_list_feature, render_rows,
                                   string_feature, with_fields)
from daar_ops.models import DEFAULT_LAYER, SMOLLM2, describe_model, model_fingerprint, \
    resolve_model_path
from daar_ops.ops._types import NonNegativeInt, PositiveInt
from daar_ops.ops._whole import BuiltWhole, WholeDatasetOp
from daar_ops.stage1_artifact import load_stage1, save_stage1
from daar_ops.text import ALPACA_TEMPLATE, TextTemplate

OP_NAME = "domain_pseudo_label_mapper"
SENTENCE = "sentence"


def _static_description(model: str, layer: int) -> dict[str, Any]:
    """The describe() keys a centroid file is checked against, without loading any weights."""
    return {**describe_model(model), "layer": layer}


def _sentence_description(model: str, dim: int) -> dict[str, Any]:
    path = resolve_model_path(model)
    return {"model": model, "model_path": path, "feature": SENTENCE,
            "model_fingerprint": model_fingerprint(path), "feature_dim": int(dim)}


def _check_arguments(stage1_path, centroids_path, samples_path, save_stage1, method,
                     refine_iters, preset, label_key, similarity_key) -> None:
    """The op's own argument rules (the stage-1 settings are checked by Stage1Config)."""
    if sum(p is not None for p in (stage1_path, centroids_path, samples_path)) != 1:
        raise ValueError(f"{OP_NAME}: give exactly one of stage1_path (a fitted stage 1), "
                         f"centroids_path (a centroid file) and samples_path (synthesized "
                         f"samples with a 'domain' field)")
    if not label_key or not similarity_key:
        raise ValueError(f"{OP_NAME}: label_key and similarity_key must be non-empty")
    if preset not in (None, "paper"):
        raise ValueError(f"{OP_NAME}: preset must be 'paper' or unset, got {preset!r}")
    if save_stage1 is not None and samples_path is None:
        raise ValueError(f"{OP_NAME}: save_stage1 writes what samples_path fits; it needs "
                         f"samples_path")
    if save_stage1 is not None:  # refused before any work, not after the fit
        from daar_ops import outdir

        outdir.check_target(outdir.resolve_target(save_stage1), OP_NAME)
    if refine_iters != STAGE1.refine_iters and (samples_path is None or method != "kmeans"):
        raise ValueError(f"{OP_NAME}: refine_iters ({refine_iters}) are the iterations of method "
                         f"'kmeans', but method is {method!r}" if samples_path else
                         f"{OP_NAME}: refine_iters are the iterations of method 'kmeans' fitted "
                         f"from samples_path; a stage-1 or centroid file is not refitted")


def _fits_on_dataset(kwargs: Dict[str, Any]) -> bool:
    """Whether these arguments fit stage 1 on the op's own dataset (samples_path with method
    cluster or kmeans; preset: paper is fixed prototypes unless method: kmeans)."""
    method = kwargs.get("method", PSEUDO_LABEL_DEFAULTS["method"])
    if kwargs.get("preset") == "paper":
        method = "kmeans" if method == "kmeans" else "fixed"
    return kwargs.get("samples_path") is not None and method != "fixed"


@TAGGING_OPS.register_module(OP_NAME)
@OPERATORS.register_module(OP_NAME)
class DomainPseudoLabelMapper(BuiltWhole, Mapper):
    """Pseudo-label each sample with a DaaR domain, each sample on its own.

    The labels come from one of three sources (exactly one):

    - ``stage1_path``: a fitted stage 1 (``daar_stage1`` file, written by ``save_stage1`` or
      ``daar-ops fit-stage1``): every sample is labelled on its own by the fitted model (the
      consensus clusterings' nearest centres and their domains, or the nearest prototype). Runs
      under ``executor_type: ray`` and on any pool.
    - ``centroids_path``: a centroid file of ``centroid_synthesis_mapper``: the nearest centroid
      (the paper's fixed prototypes). Runs under Ray.
    - ``samples_path``: synthesized samples with a ``domain`` field: stage 1 is fitted on this
      op's dataset first (the probe pool; with ``method: cluster`` or ``kmeans`` the op is
      built as :class:`DomainStage1Fit`, a Pipeline op that sees every row first, under Ray
      too: :mod:`daar_ops.ops._whole`), then every sample is labelled by the fitted model, exactly as ``stage1_path`` would
      label it. ``save_stage1`` writes the fitted model for a later run.

    Each sample's text (``text_template`` over fields) is embedded in the labelling space
    (``sentence``: all-MiniLM-L6-v2; ``embedding``: masked mean of the LM's token embeddings, the
    paper; ``layer``: masked mean of decoder layer k's raw output).

    Writes, per sample:

    - meta ``daar_pseudo_domain`` (str): the domain's name;
    - stats ``daar_domain_similarity`` (list[float], one per domain in the stage 1's order):
      cosine similarity to each domain's prototype;
    - stats ``daar_centroids_sha256`` (str): what produced the label.

    Empty or missing text is embedded as a single EOS token (so it still gets a label) and
    counted in a log line. Samples that already carry a label from the same source are left as
    they are. Under Data-Juicer 1.6.1's Ray executor a Filter placed after this op drops its
    stats column (the meta label survives): put Filters first (docs/ray.md).
    """

    _accelerator = "cpu"
    _batched_op = True

    @staticmethod
    def needs_whole(kwargs: Dict[str, Any]) -> bool:
        """A stage 1 fitted on this op's dataset sees every row before it labels one."""
        return _fits_on_dataset(kwargs)

    def __init__(
        self,
        stage1_path: Optional[str] = None,
        centroids_path: Optional[str] = None,
        samples_path: Optional[str] = None,
        save_stage1: Optional[str] = None,
        model: Optional[str] = None,
        feature: Optional[str] = None,
        layer: int = DEFAULT_LAYER,
        text_template: Optional[str] = None,
        method: str = PSEUDO_LABEL_DEFAULTS["method"],
        use_descriptions: bool = PSEUDO_LABEL_DEFAULTS["use_descriptions"],
        domains: Optional[List[Dict[str, str]]] = None,
        sentence_model: str = STAGE1.sentence_model,
        seed: int = 0,
        refine_iters: NonNegativeInt = STAGE1.refine_iters,
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

        :param stage1_path: a fitted stage-1 file (``daar_stage1``): label per sample with it.
        :param centroids_path: a ``daar_centroids`` artifact directory (written by
            ``centroid_synthesis_mapper``): label by the nearest centroid.
        :param samples_path: a JSONL(.gz) of synthesized samples with a ``domain`` field: fit
            stage 1 on this dataset, then label it.
        :param save_stage1: with ``samples_path``: write the fitted stage 1 to this directory
            (a new or daar-ops-written folder) for ``stage1_path`` in later runs.
        :param model: the causal LM (short name or folder) of the ``embedding`` / ``layer``
            spaces and of the joint clustering space. Default: the file's model, or
            ``smollm2-135m-instruct`` with ``samples_path``. A model other than the file's is
            an error.
        :param feature: with ``samples_path``: the labelling space, ``sentence``
            (``sentence_model``, the default), ``embedding`` (the LM's embedding layer, the
            paper) or ``layer`` (LM decoder layer ``layer``). Files carry their own.
        :param layer: decoder layer k for ``feature: layer``.
        :param text_template: text template over fields. Default: the file's template or
            ``"{instruction} {input} {output}"``.
        :param method: with ``samples_path``: ``cluster`` (default: consensus k-means clusters
            of the dataset, each labelled by its nearest prototype), ``kmeans`` (spherical
            k-means from the prototypes, ``refine_iters`` iterations) or ``fixed`` (nearest
            prototype, the paper's fixed prototypes).
        :param use_descriptions: with ``samples_path``: the domains' descriptions (and a few
            paraphrases of the paper's four) join the synthetic samples as anchors.
        :param domains: ``[{"name", "description"}]`` for the descriptions; default: the paper's
            descriptions of the domains named in ``samples_path``.
        :param sentence_model: sentence encoder of ``feature: sentence``.
        :param seed: seed of the clustering.
        :param refine_iters: ``method: kmeans``: Lloyd iterations over the dataset.
        :param max_length: LM tokens kept per text (longer texts are truncated and counted).
        :param model_batch_size: texts per forward pass.
        :param dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16`` for the LM features.
        :param label_key: meta key of the pseudo-domain name.
        :param similarity_key: stats key of the per-domain similarities.
        :param feature_cache: read/write ``sentence`` embeddings through the on-disk feature
            cache (keyed by the sentence model's identity, its truncation and the text's
            SHA-256), so a rerun or another recipe over the same texts does not embed them again.
        :param cache_dir: feature cache directory (default ``$DAAR_OPS_HOME/feature_cache``).
        :param preset: with ``samples_path``: ``paper`` labels exactly as the DaaR paper
            (:meth:`Stage1Config.paper`: fixed nearest prototypes of the synthetic samples in the
            LM's embedding space, no descriptions, no purity filter, no hubness correction); it
            sets ``feature``, ``method`` and ``use_descriptions`` (``method: kmeans`` with it:
            the reference code's k-means refinement of the paper's prototypes).
        :param args: extra args
        :param kwargs: extra args

        Long because every recipe parameter is documented here (Data-Juicer's convention); the
        code is under 60 lines.
        """
        super().__init__(*args, **kwargs)
        _check_arguments(stage1_path, centroids_path, samples_path, save_stage1, method,
                         refine_iters, preset, label_key, similarity_key)
        self.max_length, self.model_batch_size = max_length, model_batch_size
        self.dtype, self.label_key, self.similarity_key = dtype, label_key, similarity_key
        self.sentence_model = sentence_model
        self.feature_cache = bool(feature_cache)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.save_stage1 = save_stage1
        self.stage1_info: Dict[str, Any] = {}
        self.stage1_model: Optional[Stage1Model] = None
        # text -> (label, similarities) of the texts the fit saw: computed by the fitted model
        self._memo: Dict[str, Tuple[int, List[float]]] = {}
        self._from_file = samples_path is None
        self._by_centroid = False
        if stage1_path is not None:
            self._open_stage1(stage1_path, model, text_template)
        elif centroids_path is not None:
            self._open_centroids(centroids_path, model, feature, layer, text_template)
        else:
            kmeans = {"method": "kmeans", "refine_iters": int(refine_iters)} \
                if method == "kmeans" else {}
            base = Stage1Config.paper(seed=int(seed), **kmeans) if preset == "paper" else replace(
                STAGE1, method=method, space=feature or STAGE1.space,
                use_descriptions=bool(use_descriptions), seed=int(seed),
                refine_iters=int(refine_iters), sentence_model=sentence_model)
            self.stage1 = replace(base, layer=layer)
            self._open_samples(samples_path, model, text_template, domains)

    # -- the three sources ------------------------------------------------------------------------
    def _set_space(self, feature: str, layer: int, model: str) -> None:
        self.feature, self.layer, self.model = feature, layer, model
        self._feature_layer = 0 if feature == SENTENCE else check_feature(feature, layer)

    def _open_stage1(self, path: str, model: Optional[str], template: Optional[str]) -> None:
        fitted, manifest = load_stage1(path)
        space = manifest.get("feature")
        lm = model or (recorded_model(manifest["joint_model"], f"stage-1 file {path}")
                       if manifest.get("joint_model") else SMOLLM2)
        if space == SENTENCE:
            # the file's sentence encoder; ``model`` is the LM of the joint clustering space
            self.sentence_model = recorded_model(manifest, f"stage-1 file {path}")
            live = _sentence_description(self.sentence_model, fitted.prototypes.shape[1])
            self._set_space(SENTENCE, DEFAULT_LAYER, lm)
        else:
            lm = model or recorded_model(manifest, f"stage-1 file {path}")
            self._set_space(space, int(manifest.get("layer") or DEFAULT_LAYER), lm)
            live = feature_description(_static_description(lm, self._feature_layer), space)
        check_compatible(manifest, live, keys=compatibility_keys(self.feature),
                         source=f"stage-1 file {path}")
        if manifest.get("joint_model"):
            live_joint = feature_description(_static_description(lm, 0), "embedding")
            check_compatible(manifest["joint_model"], live_joint,
                             keys=compatibility_keys("embedding"),
                             source=f"stage-1 file {path} (joint space)")
        self.stage1 = Stage1Config(**{k: (tuple(v) if isinstance(v, list) else v)
                                      for k, v in manifest["config"].items()})
        self.template = TextTemplate(template or manifest.get("template") or ALPACA_TEMPLATE)
        self.domains = [str(d) for d in manifest["domains"]]
        self.method, self.stage1_model = fitted.method, fitted
        self.centroids = fitted.prototypes.astype(np.float32)
        self.source_sha = artifact_digest(path)

    def _open_centroids(self, path: str, model: Optional[str], feature: Optional[str],
                        layer: int, template: Optional[str]) -> None:
        centroids, manifest = load_centroids(path)
        lm = model or recorded_model(manifest, f"centroid file {path}")
        self._set_space(feature or manifest.get("feature", "embedding"), layer, lm)
        live = feature_description(_static_description(lm, self._feature_layer), self.feature)
        check_compatible(manifest, live, keys=compatibility_keys(self.feature),
                         source=f"centroid file {path}")
        self.template = TextTemplate(template or manifest.get("template") or ALPACA_TEMPLATE)
        self.domains = [str(d) for d in manifest["domains"]]
        self.centroids = centroids
        self.method = "fixed"
        self.stage1 = Stage1Config.paper(space=self.feature, layer=layer)
        self.stage1_model = Stage1Model("fixed", centroids.astype(np.float64))
        self._by_centroid = True
        self.source_sha = artifact_digest(path)

    def _open_samples(self, path: str, model: Optional[str], template: Optional[str],
                      domains: Optional[List[Dict[str, str]]]) -> None:
        self._set_space(self.stage1.space, self.stage1.layer, model or SMOLLM2)
        self.template = TextTemplate(template or ALPACA_TEMPLATE)
        self.method = self.stage1.method
        self._load_anchors(path, domains)
        config = json.dumps(self.stage1.to_dict(), sort_keys=True)
        self.source_sha = hashlib.sha256((sha256_file(path) + config).encode()).hexdigest()
        if self.method == "fixed":  # nothing to fit on the dataset: the prototypes label
            self.stage1_model = Stage1Model("fixed", self.centroids.astype(np.float64))

    # -- features ---------------------------------------------------------------------------------
    def _extractor(self, layer: int, rank: Optional[int] = None) -> Any:
        key = model_key("layer_features", model=self.model, layer=layer,
                        max_length=self.max_length, batch_size=self.model_batch_size,
                        dtype=self.dtype)
        return load(key, rank, self.use_cuda())

    def feature_description(self) -> dict[str, Any]:
        """The labelling space's description as a centroid file records it (no weights loaded)."""
        if self.feature == SENTENCE:
            return _sentence_description(self.sentence_model, self.centroids.shape[1])
        return feature_description(_static_description(self.model, self._feature_layer),
                                   self.feature)

    def _embed(self, texts: List[str], rank: Optional[int] = None,
               progress: bool = False) -> np.ndarray:
        """Features of ``texts`` in the labelling space."""
        if self.feature == SENTENCE:
            from daar_ops.encoders import cached_sentence_embeddings

            key = model_key("sentence_encoder", model=self.sentence_model)
            return cached_sentence_embeddings(texts, load(key, rank, self.use_cuda()),
                                              self.sentence_model,
                                              batch_size=self.model_batch_size,
                                              cache=self.feature_cache, cache_dir=self.cache_dir,
                                              progress=progress)
        return embed_texts(self._extractor(self._feature_layer, rank), texts, self.feature,
                           progress=progress)

    def _joint_features(self, texts: List[str], rank: Optional[int] = None,
                        progress: bool = False) -> Optional[np.ndarray]:
        """The LM features of the joint clustering space (the embedding layer: no transformer
        forward), or None when the stage 1 does not cluster there."""
        cfg = self.stage1
        if cfg.method != "cluster" or cfg.cluster_space != "joint":
            return None
        layer = 0 if cfg.joint_feature == "embedding" else cfg.layer
        return embed_texts(self._extractor(layer, rank), texts, cfg.joint_feature,
                           progress=progress)

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

    # -- fit --------------------------------------------------------------------------------------
    def run(self, dataset, *, exporter=None, tracer=None):
        check_template_columns(self.template, dataset.column_names, self._name)
        if self.stage1_model is None or self.save_stage1 is not None:
            self._fit(dataset)
        dataset = with_fields(dataset, Fields.meta, {self.label_key: string_feature()})
        dataset = with_fields(dataset, Fields.stats, {self.similarity_key: float_list_feature(),
                                                      CENTROIDS_SHA_KEY: string_feature()})
        return super().run(dataset, exporter=exporter, tracer=tracer)

    def _dataset_texts(self, dataset) -> List[str]:
        texts = []
        for batch in tqdm(dataset.iter(batch_size=1000), desc=f"{OP_NAME}: texts",
                          disable=len(dataset) < 5000):
            rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
            texts.extend(render_rows(self.template, {k: [r.get(k) for r in rows] for k in batch},
                                     range(len(rows)), OP_NAME))
        return list(dict.fromkeys(texts))

    def _fit(self, dataset) -> None:
        self.fit_texts(self._dataset_texts(dataset))

    def fit_texts(self, texts: List[str]) -> None:
        """Fit stage 1 on the distinct ``texts`` (rendered records of the probe pool,
        :func:`fit_stage1`), write it to ``save_stage1`` if set, label the texts with the fitted
        model (the labels :meth:`process_batched` then uses) and check its health."""
        distinct = list(dict.fromkeys(texts))
        feats = self._embed(distinct, progress=True)
        joint = self._joint_features(distinct, progress=True)
        if self.stage1_model is None or self.method != "fixed":
            self.stage1_model, info = fit_stage1(
                feats, self.anchor_features, self.anchor_labels, len(self.domains),
                self.anchor_is_description, self.stage1, cluster_features=joint)
            self.stage1_info = {**self.stage1_info, **info}
        self._write_stage1(joint)
        labels, sims = self._label_features(feats, joint)
        self._memo = {t: (int(lab), row) for t, lab, row in zip(distinct, labels.tolist(),
                                                               sims.tolist())}
        if self.method != "fixed" and len(distinct):
            self._check_health(feats, joint, labels)

    def _write_stage1(self, joint: Optional[np.ndarray]) -> None:
        if self.save_stage1 is None:
            return
        from daar_ops.outdir import write_folder

        manifest = {**self.feature_description(), "template": self.template.template,
                    "config": self.stage1.to_dict(), "source_sha256": self.source_sha}
        if joint is not None and self.stage1_model.needs_cluster_features:
            manifest["joint_model"] = feature_description(_static_description(self.model, 0),
                                                          "embedding")
        write_folder(self.save_stage1, OP_NAME,
                     lambda d: save_stage1(d, self.stage1_model, self.domains, manifest))
        logger.info(f"{OP_NAME}: fitted stage 1 written to {self.save_stage1}")

    def _check_health(self, feats: np.ndarray, joint: Optional[np.ndarray],
                      labels: np.ndarray) -> None:
        """Label-free health: agreement of two labelings from halves of the synthetic samples."""
        check = half_split_health(feats, self.anchor_features, self.anchor_labels,
                                  len(self.domains), self.anchor_is_description, self.stage1,
                                  cluster_features=joint)
        counts = np.bincount(labels, minlength=len(self.domains)).tolist()
        nearest = label_fixed(feats, self.stage1_model.prototypes)[0]
        self.stage1_info = {**self.stage1_info, "label_counts": counts,
                            # label-free drift: records the fit moved off their nearest prototype
                            "prototype_agreement": round(agreement_between(labels, nearest), 4),
                            "half_split_agreement": round(check.cross_seed_agreement, 4),
                            "reliable": check.reliable}
        if not check.reliable:
            logger.warning(f"{OP_NAME}: stage 1 looks unreliable: labelings from two halves of "
                           f"the synthetic samples agree on {check.cross_seed_agreement:.2f} of "
                           f"the records (< {check.threshold}); expect poor pseudo-labels (more "
                           f"or better synthetic samples, descriptions that fit the data, or a "
                           f"stronger model help)")
        logger.info(f"{OP_NAME}: {self.method} labels of {len(labels)} distinct texts: "
                    f"{dict(zip(self.domains, counts))}; "
                    f"{self.stage1_info['prototype_agreement']:.3f} agree with the nearest "
                    f"prototype")

    # -- per sample -------------------------------------------------------------------------------
    def process_batched(self, samples: Dict[str, List[Any]], rank: Optional[int] = None
                        ) -> Dict[str, List[Any]]:
        keys = list(samples.keys())
        n = len(samples[keys[0]]) if keys else 0
        if n == 0:
            return samples
        metas = [as_dict(m) for m in (samples.get(Fields.meta) or [None] * n)]
        stats = [as_dict(s) for s in (samples.get(Fields.stats) or [None] * n)]
        sha, k = self._labels_sha(), len(self.domains)
        # Labels from the same source (same digest) are kept; anything else is (re)computed, so a
        # new stage 1 never leaves the old labels in place silently.
        todo = [i for i in range(n)
                if not (isinstance(metas[i].get(self.label_key), str)
                        and isinstance(stats[i].get(self.similarity_key), list)
                        and len(stats[i][self.similarity_key]) == k
                        and stats[i].get(CENTROIDS_SHA_KEY) == sha)]
        stale = sum(1 for i in todo if isinstance(metas[i].get(self.label_key), str))
        if stale:
            logger.info(f"{OP_NAME}: {stale} samples carried a {self.label_key} from another "
                        f"stage 1; relabelled")
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
                stats[i][CENTROIDS_SHA_KEY] = sha
        samples[Fields.meta] = uniform_dicts(metas)
        samples[Fields.stats] = uniform_dicts(stats)
        return samples

    def _label_texts(self, texts: List[str], rank: Optional[int] = None
                     ) -> Tuple[np.ndarray, np.ndarray]:
        """(labels [n], similarities to the prototypes [n, K]) by the fitted stage 1: the fit's
        own results for texts it saw, the model applied to the features of the others."""
        unseen = [j for j, t in enumerate(texts) if t not in self._memo]
        labels = np.zeros(len(texts), dtype=np.int64)
        sims = np.zeros((len(texts), len(self.domains)), dtype=np.float64)
        if unseen:
            new = [texts[j] for j in unseen]
            feats = self._embed(new, rank)
            joint = (self._joint_features(new, rank)
                     if self.stage1_model.needs_cluster_features else None)
            labels[unseen], sims[unseen] = self._label_features(feats, joint)
        for j, t in enumerate(texts):
            if t in self._memo:
                labels[j], sims[j] = self._memo[t]
        return labels, sims

    def _label_features(self, feats: np.ndarray, joint: Optional[np.ndarray]
                        ) -> Tuple[np.ndarray, np.ndarray]:
        """(labels, cosine similarities to the prototypes) of features: a centroid file labels by
        its nearest centroid, a stage 1 by its fitted model."""
        nearest, sims = assign_nearest(feats, self.centroids)
        if self._by_centroid:
            return nearest, sims
        joint = joint if self.stage1_model.needs_cluster_features else None
        return label_stage1(self.stage1_model, feats, joint)[0], sims

    def _labels_sha(self) -> str:
        """What produced the labels: the stage-1 file, the centroids, or the anchors and the
        stage-1 settings (a method fitted on this dataset depends on the dataset too: it
        relabels every sample)."""
        return self.source_sha if self.method == "fixed" or self._from_file \
            else f"{self.source_sha}+{self.method}"

    @property
    def domain_specs(self) -> list[DomainSpec]:
        return [DomainSpec(d) for d in self.domains]


class DomainStage1Fit(WholeDatasetOp):
    """``domain_pseudo_label_mapper`` with ``samples_path`` and ``method: cluster`` / ``kmeans``:
    fit stage 1 on the whole dataset, then label every sample with the fitted model (the same
    parameters, stats and labels as the Mapper; attributes are the labeller's).

    Default executor: the Mapper's own ``run`` (fit, then its per-sample pass). Under
    ``executor_type: ray``: the rendered texts (only the template's columns) are gathered to the
    driver, stage 1 is fitted there exactly as on the default executor, and the labelling runs
    per sample on the workers (``map_batches`` of the Mapper's ``process``, carrying the fitted
    model, not the fit's texts). What the driver holds: the texts of the dataset this op sees,
    so put it on the probe pool, and label the whole pool with ``stage1_path`` (docs/ray.md).
    """

    mapper_class = DomainPseudoLabelMapper

    def run_on_ray(self, dataset):
        labeller = self.inner
        check_template_columns(labeller.template, dataset.columns(), self._name)
        labeller.fit_texts(self._ray_texts(dataset))
        labeller._memo = {}  # the workers label from the model, not from the fit's texts
        return dataset.map_batches(labeller.process, batch_format="pyarrow",
                                   batch_size=labeller.batch_size)

    def _ray_texts(self, dataset) -> List[str]:
        """The rendered text of every row in the input order (as the default executor sees it:
        k-means' initialisation depends on the row order), gathered to the driver as the
        selectors gather their fields (:mod:`daar_ops.ops._ray`: row ids, only these columns)."""
        from daar_ops.ops._ray import gather, with_row_ids

        template = self.inner.template
        columns = [c for c in dict.fromkeys(f.split(".")[0] for f in template.fields)
                   if c in dataset.columns()]
        numbered = with_row_ids(dataset)
        if numbered is None:
            return []
        table = gather(numbered, columns)
        return render_rows(template, table.to_pydict(), range(table.num_rows), OP_NAME)

DomainPseudoLabelMapper.whole_dataset_op = DomainStage1Fit
