"""``domain_pseudo_label_mapper``: DaaR step 2, nearest-centroid domain pseudo-labels."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
from data_juicer.ops.base_op import OPERATORS, TAGGING_OPS, Mapper
from data_juicer.utils.constant import Fields
from loguru import logger
from tqdm.auto import tqdm

from daar_ops.algorithms.centroids import (METRICS, DomainSpec, assign_nearest, check_feature,
                                           compatibility_keys, compute_centroids, embed_texts,
                                           feature_description, kmeans_refine, load_centroids)
from daar_ops.artifacts import artifact_digest, check_compatible, sha256_file
from daar_ops.core import (CENTROIDS_SHA_KEY, DOMAIN_SIMILARITY_KEY, PSEUDO_DOMAIN_KEY, as_dict,
                           read_jsonl, uniform_dicts)
from daar_ops.model_keys import load, model_key
from daar_ops.ops._columns import (float_list_feature, render_rows, string_feature,
                                   with_fields)
from daar_ops.models import describe_model
from daar_ops.text import ALPACA_TEMPLATE, TextTemplate

OP_NAME = "domain_pseudo_label_mapper"

# The one set of pseudo-labelling defaults: this op's, `daar-ops select`'s and the recipes'.
PSEUDO_LABEL_DEFAULTS: Dict[str, Any] = dict(
    feature="embedding",  # the paper's embedding-layer features
    metric="cosine",
    # Fixed prototypes (the paper's "constrained k-means"): k-means refinement helped on the
    # shared pool (0.34 -> 0.60) but hurt on a held-out pool (0.50 -> 0.37); docs/daar_stage1.md.
    refine_iters=0,
)


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
        layer: int = 3,
        template: Optional[str] = None,
        metric: str = PSEUDO_LABEL_DEFAULTS["metric"],
        refine_iters: int = PSEUDO_LABEL_DEFAULTS["refine_iters"],
        max_length: int = 512,
        model_batch_size: int = 64,
        dtype: str = "float32",
        label_key: str = PSEUDO_DOMAIN_KEY,
        similarity_key: str = DOMAIN_SIMILARITY_KEY,
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
        :param feature: ``embedding`` or ``layer``. Default: the centroid file's feature, or
            ``embedding`` with ``samples_path``.
        :param layer: decoder layer k for ``feature: layer``.
        :param template: text template over fields. Default: the centroid file's template or
            ``"{instruction} {input} {output}"``.
        :param metric: ``cosine`` (default) or ``euclidean``.
        :param refine_iters: k-means iterations over this dataset, initialised at the centroids
            (0 = fixed prototypes, the paper's "constrained k-means").
        :param max_length: tokens kept per text (longer texts are truncated and counted).
        :param model_batch_size: texts per forward pass.
        :param dtype: ``float32``, ``bfloat16`` or ``float16`` for the feature model.
        :param label_key: meta key of the pseudo-domain name.
        :param similarity_key: stats key of the per-domain similarities.
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
        self.metric = metric
        self.refine_iters = refine_iters
        self.max_length = max_length
        self.model_batch_size = model_batch_size
        self.dtype = dtype
        self.label_key = label_key
        self.similarity_key = similarity_key
        self.layer = layer

        if centroids_path is not None:
            centroids, manifest = load_centroids(centroids_path)
            self.feature = feature or manifest.get("feature", "embedding")
            self.model = model or manifest.get("model") or "smollm2-135m-instruct"
            self.template = TextTemplate(template or manifest.get("template") or ALPACA_TEMPLATE)
            self._feature_layer = check_feature(self.feature, layer)
            live = feature_description(_static_description(self.model, self._feature_layer),
                                       self.feature)
            check_compatible(manifest, live, keys=compatibility_keys(self.feature),
                             source=f"centroid file {centroids_path}")
            self.domains = [str(d) for d in manifest["domains"]]
            self.centroids = centroids
            self.source_sha = artifact_digest(centroids_path)
        else:
            self.feature = feature or PSEUDO_LABEL_DEFAULTS["feature"]
            self.model = model or "smollm2-135m-instruct"
            self.template = TextTemplate(template or ALPACA_TEMPLATE)
            self._feature_layer = check_feature(self.feature, layer)
            self.source_sha = sha256_file(samples_path)
            self.domains, self.centroids = self._centroids_from_samples(samples_path)
        if refine_iters > 0:
            # k-means needs the whole dataset before labelling: only the default executor's run()
            # can do that (Ray would silently skip the refinement).
            self._supported_exec_modes = ("default",)
            logger.info(f"{OP_NAME}: refine_iters={refine_iters} runs k-means over the whole "
                        f"dataset: default executor only (under executor_type: ray use "
                        f"refine_iters: 0, or refine here and label there)")
        self._refined = refine_iters == 0

    def _extractor(self, rank: Optional[int] = None) -> Any:
        key = model_key("layer_features", model=self.model, layer=self._feature_layer,
                        max_length=self.max_length, batch_size=self.model_batch_size,
                        dtype=self.dtype)
        return load(key, rank, self.use_cuda())

    def feature_description(self) -> dict[str, Any]:
        """The feature model's description as a centroid file records it (no weights loaded)."""
        return feature_description(_static_description(self.model, self._feature_layer),
                                   self.feature)

    def _centroids_from_samples(self, path: str) -> tuple[list[str], np.ndarray]:
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
        feats = embed_texts(self._extractor(), [self.template.render(r) for r in rows],
                            self.feature)
        centroids, counts = compute_centroids(feats, [r["domain"] for r in rows], names)
        logger.info(f"{OP_NAME}: centroids of {dict(zip(names, counts.tolist()))} from {path}")
        return names, centroids

    def run(self, dataset, *, exporter=None, tracer=None):
        if self.refine_iters > 0 and not self._refined and len(dataset) > 0:
            texts = []
            for batch in tqdm(dataset.iter(batch_size=1000), desc=f"{OP_NAME}: refine texts",
                              disable=len(dataset) < 5000):
                rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
                texts.extend(self.template.render(r) for r in rows)
            feats = embed_texts(self._extractor(), texts, self.feature, progress=True)
            before = self.centroids
            self.centroids = kmeans_refine(feats, self.centroids, self.refine_iters, self.metric)
            moved = np.linalg.norm(self.centroids - before, axis=1)
            logger.info(f"{OP_NAME}: {self.refine_iters} k-means iterations moved the centroids "
                        f"by {np.round(moved, 4).tolist()}")
            self._refined = True
        dataset = with_fields(dataset, Fields.meta, {self.label_key: string_feature()})
        dataset = with_fields(dataset, Fields.stats, {self.similarity_key: float_list_feature(),
                                                      CENTROIDS_SHA_KEY: string_feature()})
        return super().run(dataset, exporter=exporter, tracer=tracer)

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
        todo = [i for i in range(n)
                if not (isinstance(metas[i].get(self.label_key), str)
                        and isinstance(stats[i].get(self.similarity_key), list)
                        and len(stats[i][self.similarity_key]) == k
                        and stats[i].get(CENTROIDS_SHA_KEY) == self._labels_sha())]
        stale = sum(1 for i in todo if isinstance(metas[i].get(self.label_key), str))
        if stale:
            logger.info(f"{OP_NAME}: {stale} samples carried a {self.label_key} from other "
                        f"centroids; relabelled")
        if todo:
            texts = render_rows(self.template, samples, todo, OP_NAME)
            empty = sum(1 for t in texts if not t.strip())
            if empty:
                logger.warning(f"{OP_NAME}: {empty}/{len(texts)} samples have empty text; they "
                               f"are embedded as one EOS token and still labelled")
            feats = embed_texts(self._extractor(rank), texts, self.feature)
            labels, sims = assign_nearest(feats, self.centroids, self.metric)
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

    def _labels_sha(self) -> str:
        """What produced the labels: the centroid source, plus the refinement when there is one
        (refined centroids depend on the dataset too)."""
        if self.refine_iters == 0:
            return self.source_sha
        return f"{self.source_sha}+kmeans{self.refine_iters}"

    @property
    def domain_specs(self) -> list[DomainSpec]:
        return [DomainSpec(d) for d in self.domains]
