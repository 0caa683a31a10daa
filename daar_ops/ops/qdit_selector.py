"""Data-Juicer adapter of QDIT quality-diversity selection (math in daar_ops.algorithms.qdit)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Union

import numpy as np
from loguru import logger

from data_juicer.ops.base_op import OPERATORS

# the option names only: daar_ops.algorithms.qdit (torch, numba) is imported when selecting
from daar_ops.algorithms.qdit_params import (COMPUTE_DTYPE_NAMES, DEFAULT_DIVERSITY_SCALE,
                                             DIVERSITY_SCALES, METHODS, QUALITY_FILLS,
                                             QUALITY_NORMS, SIMILARITIES)
from daar_ops.core import QDIT_GAIN_KEY as GAIN_KEY
from daar_ops.core import QDIT_RANK_KEY as RANK_KEY
from daar_ops.core import budget
from daar_ops.model_keys import load, model_key
from daar_ops.models import DEFAULT_LAYER, SMOLLM2
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
    (exact lazy greedy, or stochastic greedy for very large N; similarity in memory-bounded
    blocks, dense, or kNN-sparse) and keeps the selected samples in their original order. Under
    ``executor_type: ray`` it gathers only the embedded fields and the quality to the driver and
    runs the same greedy there (the same rows as the default executor). ``qdit_filter`` is the same op
    under the design card's name.

    Stats keys written for every sample:

    * ``qdit_rank`` (int): 0-based selection order; -1 for samples not selected.
    * ``qdit_gain`` (float): the objective's marginal gain when the sample was selected (the
      combined score, in the units set by ``diversity_scale``); 0.0 for samples not selected.
    """

    def __init__(self,
                 select_ratio: Ratio = None,
                 select_num: NonNegativeInt = None,
                 text_template: Optional[str] = None,
                 quality_key: Optional[str] = None,
                 alpha: float = 0.0,
                 diversity_scale: Union[str, float] = DEFAULT_DIVERSITY_SCALE,
                 quality_higher_is_better: bool = True,
                 quality_norm: str = "minmax",
                 quality_fill: Union[str, float] = "min",
                 method: str = "lazy",
                 epsilon: float = 0.01,
                 seed: int = 0,
                 similarity: str = "blocked",
                 knn_k: PositiveInt = 50,
                 max_memory_mb: NonNegativeFloat = 2048.0,
                 compute_dtype: str = "float32",
                 partition_size: Optional[int] = None,
                 embedder: str = "sentence_transformers",
                 embedding_model: Optional[str] = None,
                 feature: str = "layer",
                 feature_layer: int = DEFAULT_LAYER,
                 max_length: PositiveInt = 512,
                 embed_batch_size: PositiveInt = 64,
                 *args, **kwargs):
        """
        Initialization method.

        :param select_ratio: fraction of the dataset to keep, in [0, 1]: ``floor(ratio * N)``
            samples (the package's one budget rule). Give this or ``select_num``.
        :param select_num: number of samples to keep (all are kept when the dataset is smaller).
        :param text_template: what is embedded: a ``str.format`` template over fields, e.g.
            ``"{instruction} {input}"``, or a single field name. Default: the ``text_key`` field.
        :param quality_key: numeric field or stats key holding the quality score, nested keys
            with dots (e.g. ``__dj__stats__.llm_quality_score``). Required when ``alpha > 0``.
        :param alpha: quality weight in [0, 1]; 0 = pure diversity, the paper uses ~0.7.
        :param diversity_scale: how d(a|A) is scaled against q (docs/qdit.md): ``budget``
            (default: the raw gain at a 10% budget, ``0.1 * N / K``, so alpha keeps its meaning
            for any N and K), ``running_max`` (the step's best gain), ``mean`` (divide by N),
            ``max_singleton`` (the best first gain), ``none`` (raw sum) or a positive number.
        :param quality_higher_is_better: False for a score where lower means better (e.g.
            Data-Juicer's IFD ``ifd_score``, whose relevance is ``1 - IFD``): it is negated
            before normalisation.
        :param quality_norm: ``minmax`` (to [0, 1], default), ``rank`` (percentile) or ``none``.
        :param quality_fill: value for missing/non-numeric/NaN/inf quality: ``min`` (default),
            ``median``, ``max`` of the valid scores, or a number. Counted in a log line.
        :param method: ``lazy`` (exact greedy) or ``stochastic`` (for very large datasets).
        :param epsilon: stochastic greedy's epsilon in (0, 1); each step samples
            ``N / K * ln(1 / epsilon)`` candidates.
        :param seed: seed of the stochastic greedy's sampling.
        :param similarity: ``blocked`` (on the fly, memory bounded), ``dense`` (N x N matrix)
            or ``knn`` (sparse: each sample covers its ``knn_k`` nearest neighbours).
        :param knn_k: neighbours per sample with ``similarity: knn``.
        :param max_memory_mb: memory for the similarity (``blocked``): the whole matrix when it
            fits (held; the fast path, N up to ~22k at the default), else matmul blocks and a
            row cache.
        :param compute_dtype: similarity matmul precision: ``float32``, ``bfloat16`` (faster on
            AMX CPUs and GPUs, ~1e-3 error) or ``float64``.
        :param partition_size: for very large datasets: select in seeded random parts of about
            this many samples (GreeDi's first round; N^2/P similarity work); None = no parts.
        :param embedder: ``sentence_transformers`` (default, all-MiniLM-L6-v2 or any
            sentence-transformers folder) or ``daar_features`` (masked-mean features of a causal
            LM's embedding layer or decoder layer ``feature_layer``, as DaaR uses).
        :param embedding_model: short name or local folder of the model; default
            ``all-minilm-l6-v2`` for sentence_transformers, ``smollm2-135m-instruct`` for
            daar_features.
        :param feature: with daar_features: ``layer`` (decoder layer ``feature_layer``) or
            ``embedding`` (the token-embedding layer).
        :param feature_layer: decoder layer k >= 1 for ``feature: layer``.
        :param max_length: tokens kept per text with daar_features.
        :param embed_batch_size: texts per encoder batch.
        :param args: extra args
        :param kwargs: extra args
        """
        super().__init__(*args, **kwargs)
        if (select_ratio is None) == (select_num is None):
            raise ValueError(f"{OP_NAME}: give exactly one of select_ratio and select_num")
        budget(10, ratio=select_ratio, num=select_num)  # validates the values
        if not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"{OP_NAME}: alpha must be in [0, 1], got {alpha!r}")
        if float(alpha) > 0 and not quality_key:
            raise ValueError(f"{OP_NAME}: alpha > 0 needs quality_key (a numeric field or stats "
                             f"key such as __dj__stats__.llm_quality_score)")
        if quality_norm not in QUALITY_NORMS:
            raise ValueError(f"{OP_NAME}: quality_norm must be one of {QUALITY_NORMS}")
        if isinstance(quality_fill, str) and quality_fill not in QUALITY_FILLS:
            raise ValueError(f"{OP_NAME}: quality_fill must be one of {QUALITY_FILLS} or a number")
        if not isinstance(quality_fill, str) and not math.isfinite(float(quality_fill)):
            raise ValueError(f"{OP_NAME}: quality_fill must be finite")
        if isinstance(diversity_scale, str):
            if diversity_scale not in DIVERSITY_SCALES:
                raise ValueError(f"{OP_NAME}: diversity_scale must be one of {DIVERSITY_SCALES} "
                                 f"or a positive number, got {diversity_scale!r}")
        elif not (math.isfinite(float(diversity_scale)) and float(diversity_scale) > 0):
            raise ValueError(f"{OP_NAME}: diversity_scale must be positive, got {diversity_scale}")
        if method not in METHODS:
            raise ValueError(f"{OP_NAME}: method must be one of {METHODS}, got {method!r}")
        if not 0.0 < float(epsilon) < 1.0:
            raise ValueError(f"{OP_NAME}: epsilon must be in (0, 1), got {epsilon!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"{OP_NAME}: similarity must be one of {SIMILARITIES}")
        if int(knn_k) < 1 or float(max_memory_mb) <= 0 or int(embed_batch_size) < 1:
            raise ValueError(f"{OP_NAME}: knn_k, max_memory_mb and embed_batch_size must be > 0")
        if partition_size is not None and int(partition_size) < 1:
            raise ValueError(f"{OP_NAME}: partition_size must be >= 1")
        if compute_dtype not in COMPUTE_DTYPE_NAMES:
            raise ValueError(f"{OP_NAME}: compute_dtype must be one of {COMPUTE_DTYPE_NAMES}")
        if embedder not in EMBEDDERS:
            raise ValueError(f"{OP_NAME}: embedder must be one of {EMBEDDERS}, got {embedder!r}")
        if feature not in ("layer", "embedding"):
            raise ValueError(f"{OP_NAME}: feature must be 'layer' or 'embedding'")
        if embedder == "daar_features" and feature == "layer" and int(feature_layer) < 1:
            raise ValueError(f"{OP_NAME}: feature_layer must be >= 1 for feature: layer")
        if int(max_length) < 1:
            raise ValueError(f"{OP_NAME}: max_length must be >= 1")
        self.select_ratio = None if select_ratio is None else float(select_ratio)
        self.select_num = None if select_num is None else int(select_num)
        self.template = TextTemplate(text_template or self.text_key)
        self.quality_key = quality_key
        self.quality_sign = 1.0 if quality_higher_is_better else -1.0
        self.embedder = embedder
        self.embedding_model = embedding_model or (
            "all-minilm-l6-v2" if embedder == "sentence_transformers" else SMOLLM2)
        self.feature = feature
        self.feature_layer = int(feature_layer) if feature == "layer" else 0
        self.max_length = int(max_length)
        self.embed_batch_size = int(embed_batch_size)
        self.select_kwargs = dict(
            alpha=float(alpha), diversity_scale=diversity_scale, quality_norm=quality_norm,
            quality_fill=quality_fill, method=method, epsilon=float(epsilon), seed=int(seed),
            similarity=similarity, knn_k=int(knn_k), max_memory_mb=float(max_memory_mb),
            compute_dtype=compute_dtype,
            partition_size=None if partition_size is None else int(partition_size))

    # -- pieces ------------------------------------------------------------------------------------
    def _device(self) -> str:
        return "cuda" if self.use_cuda() else "cpu"

    def _embed(self, texts: list[str]) -> np.ndarray:
        empty = sum(1 for t in texts if not t.strip())
        if empty:
            logger.warning(f"{OP_NAME}: {empty} of {len(texts)} samples have empty text; they are "
                           f"embedded as the empty string (near-duplicates of each other)")
        if self.embedder == "sentence_transformers":
            from daar_ops.encoders import encode_sentences

            key = model_key("sentence_encoder", model=self.embedding_model)
            return encode_sentences(texts, encoder=load(key, None, self.use_cuda()),
                                    batch_size=self.embed_batch_size)
        key = model_key("layer_features", model=self.embedding_model, layer=self.feature_layer,
                        max_length=self.max_length, batch_size=self.embed_batch_size)
        feats = load(key, None, self.use_cuda()).encode(texts)
        if feats.n_truncated:
            logger.info(f"{OP_NAME}: {feats.n_truncated} texts truncated to {self.max_length} tokens")
        return feats.layer if self.feature == "layer" else feats.embedding

    def select(self, records: list[Mapping[str, Any]]):
        """Run the selection on plain records; returns a :class:`QditResult`."""
        texts = self.template.render_all(records, source=f"the dataset of {self._name}")
        quality = None
        if self.quality_key and self.select_kwargs["alpha"] > 0:
            quality = [_signed(lookup(r, self.quality_key), self.quality_sign) for r in records]
        emb = self._embed(texts)
        from daar_ops.algorithms.qdit import qdit_select

        return qdit_select(emb, select_num=self.select_num, select_ratio=self.select_ratio,
                           quality=quality, device=self._device(), batch=16, progress=True,
                           **self.select_kwargs)

    # -- Data-Juicer entry point -------------------------------------------------------------------
    def choose_fields(self):
        return list(self.template.fields) + ([self.quality_key] if self.quality_key else [])

    def choose(self, dataset):
        n = len(dataset)
        k = budget(n, ratio=self.select_ratio, num=self.select_num)
        if self.select_num is not None and self.select_num > n:
            logger.warning(f"{self._name}: select_num={self.select_num} but the dataset has only "
                           f"{n} samples; all are selected (ranked)")
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


def _signed(value: Any, sign: float) -> Any:
    """A quality value oriented higher-is-better; non-numbers stay as they are (filled later)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return sign * float(value)


@OPERATORS.register_module(ALIAS)
class QditFilter(QditSelector):
    """``qdit_filter``: the design card's name of :class:`QditSelector` (same parameters, a
    Selector too)."""
