"""Data-Juicer adapter of QDIT quality-diversity selection (math in daar_ops.algorithms.qdit)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import numpy as np
from loguru import logger

from data_juicer.ops.base_op import OPERATORS

from daar_ops.algorithms.centroids import FEATURES, check_feature
# the config only: the greedy (torch, numba) is imported when selecting
from daar_ops.algorithms.qdit import QditConfig
from daar_ops.core import QDIT_GAIN_KEY as GAIN_KEY
from daar_ops.core import QDIT_RANK_KEY as RANK_KEY
from daar_ops.model_keys import load, model_key
from daar_ops.models import DEFAULT_LAYER, MINILM, SMOLLM2
from daar_ops.ops._selector import StatsSelector, column_records
from daar_ops.ops._types import NonNegativeFloat, NonNegativeInt, PositiveInt, Ratio
from daar_ops.text import TextTemplate, lookup

OP_NAME = "qdit_selector"
ALIAS = "qdit_filter"  # the design card's name; same op
EMBEDDERS = ("sentence_transformers", "daar_features")


@OPERATORS.register_module(OP_NAME)
class QditSelector(StatsSelector):
    """QDIT quality-diversity selection (Bukharin et al. 2023): keep the samples picked by the greedy
    ``argmax (1 - alpha) * d(a | A) / diversity_scale + alpha * q(a)`` where d is the
    facility-location gain over clipped cosine similarity of sentence embeddings and q a
    normalised quality score read from any numeric field or stats key.

    A Data-Juicer Selector (whole dataset): it embeds the whole dataset, runs the greedy once
    (exact lazy greedy, or stochastic greedy for very large N; the similarity held in memory or
    computed in memory-bounded blocks, or kNN-sparse; GreeDi partitions with ``partition_size``)
    and keeps the selected samples in their original order. Under ``executor_type: ray`` it
    gathers only the embedded fields and the quality to the driver and runs the same greedy
    there (the same rows as the default executor) while the embeddings fit
    ``driver_memory_mb``; else, or with ``partition_size``, the partitions run on the workers and
    the driver picks from the union of their picks (docs/ray.md). ``qdit_filter`` is the same op
    under the design card's name.

    Stats keys written for every sample:

    * ``qdit_rank`` (int): 0-based selection order; -1 for samples not selected.
    * ``qdit_gain`` (float): the objective's marginal gain when the sample was selected (the
      combined score, in the units set by ``diversity_scale``); 0.0 for samples not selected.
    """

    def __init__(self,
                 select_ratio: Ratio = None, select_num: NonNegativeInt = None,
                 text_template: Optional[str] = None, quality_key: Optional[str] = None,
                 alpha: Ratio = QditConfig.alpha,
                 diversity_scale: Union[str, float] = QditConfig.diversity_scale,
                 quality_higher_is_better: bool = True,
                 quality_norm: str = QditConfig.quality_norm,
                 quality_fill: Union[str, float] = QditConfig.quality_fill,
                 method: str = QditConfig.method, epsilon: float = QditConfig.epsilon,
                 seed: int = QditConfig.seed,
                 similarity: str = QditConfig.similarity, knn_k: PositiveInt = QditConfig.knn_k,
                 max_memory_mb: NonNegativeFloat = QditConfig.max_memory_mb,
                 compute_dtype: str = QditConfig.compute_dtype,
                 partition_size: Optional[int] = QditConfig.partition_size,
                 driver_memory_mb: NonNegativeFloat = None,
                 embedder: str = "sentence_transformers", model: Optional[str] = None,
                 feature: str = "layer", layer: int = DEFAULT_LAYER,
                 max_length: PositiveInt = 512, model_batch_size: PositiveInt = 64,
                 *args, **kwargs):
        """
        Initialization method (each parameter in docs/qdit.md).

        :param select_ratio: fraction to keep, in [0, 1] (``floor(ratio * N)``, the package's one
            budget rule); or give ``select_num``, the number to keep (all when N is smaller).
        :param select_num: see ``select_ratio``.
        :param text_template: what is embedded: a ``str.format`` template over fields, e.g.
            ``"{instruction} {input}"``, or a field name. Default: the ``text_key`` field.
        :param quality_key: numeric field or dotted stats key of the quality score (e.g.
            ``__dj__stats__.llm_quality_score``). Required when ``alpha > 0``.
        :param alpha: quality weight in [0, 1]; 0 = pure diversity, the paper uses ~0.7.
        :param diversity_scale: d(a|A) divided by ``budget`` (``0.1 * N / K``, default: alpha
            keeps its meaning for any N and K), ``running_max`` (the step's best gain) or a
            positive number (1.0: the paper's unscaled objective).
        :param quality_higher_is_better: False for a lower-is-better score (e.g. Data-Juicer's
            IFD ``ifd_score``): it is negated before normalisation.
        :param quality_norm: ``minmax`` (to [0, 1], default), ``rank`` (percentile) or ``none``.
        :param quality_fill: value for missing/non-numeric/NaN/inf quality: ``min`` (default),
            ``median``, ``max`` of the valid scores, or a number (counted in a log line).
        :param method: ``lazy`` (exact greedy) or ``stochastic`` (for very large datasets).
        :param epsilon: stochastic greedy's epsilon in (0, 1).
        :param seed: seed of the stochastic greedy's sampling and of the partitions.
        :param similarity: ``blocked`` (clipped cosine) or ``knn`` (``knn_k`` neighbours).
        :param knn_k: neighbours per sample with ``similarity: knn``.
        :param max_memory_mb: memory for the similarity: the whole matrix when it fits (N up to
            ~22k at the default), else matmul blocks and a row cache.
        :param compute_dtype: similarity precision: ``float32``, ``bfloat16`` or ``float64``.
        :param partition_size: GreeDi for very large data: K picked in parts of about this many
            samples, then K of the union of their picks (docs/qdit.md); None = no parts.
        :param driver_memory_mb: Ray, no ``partition_size``: exact on the driver if the float32
            embeddings fit it, else in Ray's blocks (None: half the driver's free memory).
        :param embedder: ``sentence_transformers`` (default; at most ``SENTENCE_MAX_TOKENS``
            tokens per text) or ``daar_features`` (a causal LM's features, as DaaR uses).
        :param model: the embedding model, a short name or local folder (default
            ``all-minilm-l6-v2``; ``smollm2-135m-instruct`` for daar_features).
        :param feature: daar_features: ``layer`` (decoder layer ``layer``) or ``embedding``.
        :param layer: decoder layer k >= 1 for ``feature: layer``.
        :param max_length: tokens kept per text with daar_features.
        :param model_batch_size: texts per encoder batch (``batch_size`` stays Data-Juicer's).
        :param args: extra args
        :param kwargs: extra args
        """
        super().__init__(*args, **kwargs)
        try:
            self.config = QditConfig(
                select_ratio=select_ratio, select_num=select_num, alpha=alpha,
                diversity_scale=diversity_scale, quality_norm=quality_norm,
                quality_fill=quality_fill, method=method, epsilon=epsilon, seed=seed,
                similarity=similarity, knn_k=knn_k, max_memory_mb=max_memory_mb,
                compute_dtype=compute_dtype, partition_size=partition_size)
            self.layer = _check_op_params(self.config, quality_key, embedder, feature, layer,
                                          driver_memory_mb)
        except ValueError as err:
            raise ValueError(f"{OP_NAME}: {err}") from None
        self.driver_memory_mb = driver_memory_mb
        self.template = TextTemplate(text_template or self.text_key)
        self.quality_key = quality_key
        self.quality_sign = 1.0 if quality_higher_is_better else -1.0
        self.embedder, self.feature = embedder, feature
        self.model = model or (MINILM if embedder == "sentence_transformers" else SMOLLM2)
        self.max_length, self.model_batch_size = int(max_length), int(model_batch_size)

    # -- pieces ------------------------------------------------------------------------------------
    def selection_device(self) -> str:
        return "cuda" if self.use_cuda() else "cpu"

    def embed(self, texts: list[str]) -> np.ndarray:
        """[N, d] embeddings of ``texts`` by the op's embedder (its model through get_model)."""
        empty = sum(1 for t in texts if not t.strip())
        if empty:
            logger.warning(f"{OP_NAME}: {empty} of {len(texts)} samples have empty text; they are "
                           f"embedded as the empty string (near-duplicates of each other)")
        if self.embedder == "sentence_transformers":
            from daar_ops.encoders import encode_sentences

            key = model_key("sentence_encoder", model=self.model)
            return encode_sentences(texts, encoder=load(key, None, self.use_cuda()),
                                    batch_size=self.model_batch_size)
        key = model_key("layer_features", model=self.model, layer=self.layer,
                        max_length=self.max_length, batch_size=self.model_batch_size)
        feats = load(key, None, self.use_cuda()).encode(texts)
        if feats.n_truncated:
            logger.info(f"{OP_NAME}: {feats.n_truncated} texts truncated to {self.max_length} tokens")
        return feats.layer if self.feature == "layer" else feats.embedding

    def select(self, records: list[Mapping[str, Any]]):
        """Run the selection on plain records; returns a :class:`QditResult`."""
        texts = self.template.render_all(records, source=f"the dataset of {self._name}")
        quality = self.quality_values(records) if self.config.alpha > 0 else None
        emb = self.embed(texts)
        from daar_ops.algorithms.qdit import qdit_select

        return qdit_select(emb, self.config, quality, device=self.selection_device(),
                           progress=True)

    def quality_values(self, records: list[Mapping[str, Any]]) -> list[Any]:
        """The quality of each record, oriented higher-is-better (non-numbers as they are)."""
        return [_signed(lookup(r, self.quality_key), self.quality_sign) for r in records]

    # -- Data-Juicer entry point -------------------------------------------------------------------
    def ray_choose(self, dataset):
        """Under Ray: partitioned (GreeDi, the partitions on the workers) when ``partition_size``
        is set or the embeddings exceed ``driver_memory_mb``, else the exact greedy on the
        driver (``daar_ops.ops._qdit_ray``)."""
        from daar_ops.ops._qdit_ray import qdit_ray_choose

        chosen = qdit_ray_choose(self, dataset)
        return chosen if chosen is not None else super().ray_choose(dataset)

    def choose_fields(self):
        return list(self.template.fields) + ([self.quality_key] if self.quality_key else [])

    def choose(self, dataset):
        n = len(dataset)
        k = self.config.budget(n)
        if self.config.select_num is not None and self.config.select_num > n:
            logger.warning(f"{self._name}: select_num={self.config.select_num} but the dataset has "
                           f"only {n} samples; all are selected (ranked)")
        fields = self.choose_fields()
        missing = sorted({f.split(".")[0] for f in fields} - set(dataset.column_names))
        if missing:
            logger.warning(f"{self._name}: fields {missing} are absent from the dataset; they "
                           f"render as empty text / missing quality")
        result = self.select(column_records(dataset, fields))
        ranks = np.full(n, -1, dtype=np.int64)
        gains = np.zeros(n, dtype=np.float64)
        ranks[result.indices] = np.arange(len(result.indices))
        gains[result.indices] = result.gains
        logger.info(f"{self._name}: selected {len(result.indices)}/{n} (budget {k}); "
                    f"facility-location objective {result.objective:.4f}; "
                    f"{result.n_evaluations} gain evaluations")
        return {RANK_KEY: ranks.tolist(), GAIN_KEY: [float(g) for g in gains]}, ranks >= 0


def _check_op_params(config: QditConfig, quality_key: Optional[str], embedder: str, feature: str,
                     layer: int, driver_memory_mb: Optional[float]) -> int:
    """Check the op's own parameters (what its config does not hold); return the LM layer to
    load (0: the embedding layer, or no LM at all)."""
    if config.alpha > 0 and not quality_key:
        raise ValueError("alpha > 0 needs quality_key (a numeric field or stats key such as "
                         "__dj__stats__.llm_quality_score)")
    if driver_memory_mb is not None and not float(driver_memory_mb) >= 0:
        raise ValueError(f"driver_memory_mb must be >= 0 or null, got {driver_memory_mb!r}")
    if embedder not in EMBEDDERS or feature not in FEATURES:
        raise ValueError(f"embedder must be one of {EMBEDDERS} and feature one of {FEATURES}, "
                         f"got {embedder!r}, {feature!r}")
    return check_feature(feature, layer) if embedder == "daar_features" else 0


def _signed(value: Any, sign: float) -> Any:
    """A quality value oriented higher-is-better; non-numbers stay as they are (filled later)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return sign * float(value)


@OPERATORS.register_module(ALIAS)
class QditFilter(QditSelector):
    """``qdit_filter``: the design card's name of :class:`QditSelector` (same parameters, a
    Selector too)."""
