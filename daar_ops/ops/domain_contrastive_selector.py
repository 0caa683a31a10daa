"""``domain_contrastive_selector``: Section-3 contrastive pools of the DaaR paper as a DJ op."""

from __future__ import annotations

from typing import Optional

import numpy as np
from loguru import logger

from data_juicer.ops.base_op import OPERATORS

from daar_ops.algorithms.contrastive import (encode_labels, global_phi_inter, global_phi_intra,
                                             label_centroids, percentile_band, phi_scores)
from daar_ops.defaults import FEATURE_DTYPE
from daar_ops.core import PHI_INTER_KEY as STAT_INTER
from daar_ops.core import PHI_INTRA_KEY as STAT_INTRA
from daar_ops.model_keys import load, model_key
from daar_ops.models import SMOLLM2
from daar_ops.ops._selector import StatsSelector, column_records
from daar_ops.ops._types import Percentile, PositiveInt
from daar_ops.text import ALPACA_TEMPLATE, TextTemplate, lookup

OP_NAME = "domain_contrastive_selector"


@OPERATORS.register_module(OP_NAME)
class DomainContrastiveSelector(StatsSelector):
    """Keep a per-domain percentile band of inter- or intra-domain contrast (DaaR paper, Sec. 3).

    Every sample is embedded with the LLM's embedding layer (masked mean of token embeddings of
    ``text_template``). With one centroid per label (the label means of this dataset, or a
    ``daar_centroids`` artifact), the op writes two float stats per sample:

    - ``daar_phi_inter``: sum over the other domains j of cos(x, C_j) (Eq. 2); high = close to
      other domains (ambiguous), low = well separated.
    - ``daar_phi_intra``: cos(x, C_own) (Eq. 4); high = typical of its own domain.

    and keeps, within every domain, the samples whose ``metric`` lies in the percentile band
    [``lower_percentile``, ``upper_percentile``) (80-100 = the top 20%, the paper's Table 1 pools).
    Unlabeled samples (missing/empty label, or a label absent from the centroid file) get NaN stats
    and are kept only with ``keep_unlabeled``. The global Phi_inter (Eq. 3) and per-domain
    Phi_intra (Eq. 5) of the input are logged. A global op; under ``executor_type: ray`` the label and text fields are gathered to the driver
    and the same bands are chosen there.
    """

    def __init__(
        self,
        label_key: str = "__dj__meta__.daar_pseudo_domain",
        metric: str = "inter",
        lower_percentile: Percentile = 80.0,
        upper_percentile: Percentile = 100.0,
        model: str = SMOLLM2,
        text_template: str = ALPACA_TEMPLATE,
        centroids_path: Optional[str] = None,
        keep_unlabeled: bool = False,
        max_length: PositiveInt = 512,
        model_batch_size: PositiveInt = 64,
        dtype: str = FEATURE_DTYPE,
        device: str = "cpu",
        *args,
        **kwargs,
    ):
        """
        Initialization method.

        :param label_key: field holding the domain label, dotted for nested fields, e.g.
            ``__dj__meta__.daar_pseudo_domain`` (pseudo-labels) or ``domain`` (ground truth, for
            reproducing the paper's Section-3 analysis only).
        :param metric: ``inter`` (rank by phi_inter) or ``intra`` (rank by phi_intra).
        :param lower_percentile: lower end of the kept band, in [0, 100).
        :param upper_percentile: upper end of the kept band, in (lower, 100].
        :param model: short model name or local HF folder whose embedding layer gives features.
        :param text_template: record fields rendered into the text that is embedded.
        :param centroids_path: optional ``daar_centroids`` artifact directory (feature must be
            ``embedding`` and the model must match); default: centroids of this dataset's labels.
        :param keep_unlabeled: keep samples without a usable label (default drop them, logged).
        :param max_length: tokens kept per text.
        :param model_batch_size: texts per embedding batch.
        :param dtype: ``float32`` or ``bfloat16``/``float16``.
        :param device: ``cpu``, ``cuda`` or ``auto``.
        :param args: extra args
        :param kwargs: extra args
        """
        super().__init__(*args, **kwargs)
        if metric not in ("inter", "intra"):
            raise ValueError(f"metric must be 'inter' or 'intra', got {metric!r}")
        if not 0 <= float(lower_percentile) < float(upper_percentile) <= 100:
            raise ValueError("need 0 <= lower_percentile < upper_percentile <= 100, got "
                             f"{lower_percentile}, {upper_percentile}")
        if not isinstance(label_key, str) or not label_key.strip():
            raise ValueError("label_key must be a non-empty field name")
        if max_length < 1 or model_batch_size < 1:
            raise ValueError("max_length and model_batch_size must be >= 1")
        self.label_key = label_key
        self.metric = metric
        self.lower_percentile = float(lower_percentile)
        self.upper_percentile = float(upper_percentile)
        self.model = model
        self.template = TextTemplate(text_template)
        self.centroids_path = centroids_path
        self.keep_unlabeled = keep_unlabeled
        self.device = device
        self.centroid_manifest = None
        self.extractor_key = model_key("layer_features", model=model, layer=0,
                                       max_length=max_length, batch_size=model_batch_size,
                                       dtype=dtype)
        if centroids_path is not None:
            from daar_ops.centroid_file import load_centroids

            # load_centroids checks the file itself (one row per domain, finite values)
            centroids, manifest = load_centroids(centroids_path)
            if manifest.get("feature") != "embedding":
                raise ValueError(f"{centroids_path}: centroids are of feature "
                                 f"{manifest.get('feature')!r}; this op uses 'embedding'")
            self.centroids = centroids.astype(np.float32)
            self.centroid_domains = [str(d) for d in manifest["domains"]]
            self.centroid_manifest = manifest

    def choose_fields(self):
        return [self.label_key, *self.template.fields]

    def choose(self, dataset):
        n = len(dataset)
        rows = column_records(dataset, self.choose_fields())
        domains, label_idx = encode_labels(
            [lookup(r, self.label_key) for r in rows],
            self.centroid_domains if self.centroids_path else None)
        n_unlabeled = int((label_idx < 0).sum())
        if n_unlabeled:
            logger.warning(f"{OP_NAME}: {n_unlabeled}/{n} samples have no usable "
                           f"'{self.label_key}' label; they get NaN stats and are "
                           f"{'kept' if self.keep_unlabeled else 'dropped'}")
        if not domains or n_unlabeled == n:
            raise ValueError(f"{OP_NAME}: no sample has a label in '{self.label_key}'")

        extractor = load(self.extractor_key, None, self.use_cuda())
        if self.centroid_manifest is not None:
            from daar_ops.artifacts import check_compatible

            check_compatible(self.centroid_manifest, extractor.describe(),
                             keys=("model_fingerprint", "feature_dim"), source="centroid file")
        texts = self.template.render_all(rows, source=f"the dataset of {self._name}")
        feats = extractor.encode(texts, progress=True).embedding
        if self.centroids_path:
            centroids = self.centroids
        else:
            centroids = label_centroids(feats, label_idx, len(domains))
        inter, intra = phi_scores(feats, centroids, label_idx)
        per_domain = global_phi_intra(feats, centroids, label_idx)
        logger.info(f"{OP_NAME}: Phi_inter (Eq. 3) = {global_phi_inter(centroids):.4f}; "
                    "Phi_intra (Eq. 5) = "
                    + ", ".join(f"{d}: {v:.4f}" for d, v in zip(domains, per_domain)))
        keep = percentile_band(inter if self.metric == "inter" else intra, label_idx,
                               self.lower_percentile, self.upper_percentile)
        if self.keep_unlabeled:
            keep |= label_idx < 0

        logger.info(f"{OP_NAME}: keeping {int(keep.sum())}/{n} samples "
                    f"({self.metric} band {self.lower_percentile:g}-{self.upper_percentile:g} "
                    f"per domain over {len(domains)} domains)")
        return {STAT_INTER: [float(v) for v in inter], STAT_INTRA: [float(v) for v in intra]}, keep
