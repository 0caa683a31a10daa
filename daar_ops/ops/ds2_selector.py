"""``ds2_selector`` (alias ``ds2_filter``): DS2 score curation and diversity-aware selection as a
Data-Juicer Selector."""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, Mapping, Optional

import numpy as np
from data_juicer.ops.base_op import OPERATORS
from data_juicer.utils.constant import Fields
from loguru import logger

from daar_ops.algorithms.ds2 import (MIN_SAMPLES, DS2Config, DS2Result, ds2_select,
                                     scores_to_classes)
from daar_ops.core import DS2_CONFIDENCE_KEY as CONFIDENCE_KEY
from daar_ops.core import DS2_CORRUPTED_KEY as CORRUPTED_KEY
from daar_ops.core import DS2_CURATED_KEY as CURATED_KEY
from daar_ops.core import DS2_LONG_TAIL_KEY as LONG_TAIL_KEY
from daar_ops.core import DS2_RAW_KEY as RAW_KEY
from daar_ops.core import DS2_SELECTED_KEY as SELECTED_KEY
from daar_ops.core import as_dict
from daar_ops.defaults import DS2
from daar_ops.model_keys import load, model_key
from daar_ops.models import MINILM
from daar_ops.ops._selector import StatsSelector, column_records
from daar_ops.ops._types import NonNegativeInt, OpenRatio, PositiveInt, Ratio
from daar_ops.text import TextTemplate, lookup

OP_NAME = "ds2_selector"
ALIAS = "ds2_filter"  # the design card's name; same op
STATS_KEYS = (RAW_KEY, CURATED_KEY, CORRUPTED_KEY, CONFIDENCE_KEY, LONG_TAIL_KEY, SELECTED_KEY)


@OPERATORS.register_module(OP_NAME)
class DS2Selector(StatsSelector):
    """DS2 (ICLR 2025): curate LLM quality scores with the geometry of the data, then keep the
    best-scored, most long-tail samples.

    Reads a score per sample from ``score_key`` (default ``__dj__stats__.ds2_score`` written by
    ``ds2_rating_filter``; any field works, e.g. ``__dj__stats__.llm_quality_score``), maps it to
    ``num_classes`` classes over [``score_low``, ``score_high``], embeds every sample with a
    sentence encoder (default all-MiniLM-L6-v2, the first ``models.SENTENCE_MAX_TOKENS`` tokens;
    or reads vectors from ``embedding_key``), and over the whole dataset
    (:func:`daar_ops.algorithms.ds2.ds2_select`): estimates the score transition matrix T and
    prior by HOC from 2-NN consensus, detects corrupted scores (SimiFeat-rank), replaces those
    whose confidence >= ``confidence_threshold`` by the suggested score, computes the long-tail
    score ``tanh(mean cosine distance to the k nearest neighbours / 2)``, and keeps
    ``select_ratio`` / ``select_num`` samples ordered by curated score, then long-tail score.
    Without a budget it keeps every sample and only writes stats.

    Stats written per sample (all float):

    * ``ds2_raw_score``: the input score as a class 0..K-1 (missing/NaN -> ``missing_score``).
    * ``ds2_curated_score``: the class after curation.
    * ``ds2_corrupted``: 1.0 if the raw score was replaced, else 0.0.
    * ``ds2_confidence``: confidence that the raw score is wrong (suggestion share * noisy rate).
    * ``ds2_long_tail``: the long-tail (rarity) score in [0, tanh(1)].
    * ``ds2_selected``: 1.0 if the sample is in the selection (always 1.0 without a budget).

    With ``report_dir`` it also writes ``transition.json`` (T, prior, noise rates, class counts
    before/after), ``transition.png`` (T heatmap) and ``score_distribution.png``.
    A Data-Juicer Selector (whole dataset); under ``executor_type: ray`` a Pipeline that gathers
    only :meth:`choose_fields` to the driver and curates there (the same rows). ``ds2_filter`` is
    the same op under the design card's name; the expensive per-sample rating
    (``ds2_rating_filter``) may run under Ray in a recipe before it.
    """

    _accelerator = "cuda"

    def __init__(
        self,
        score_key: str = "__dj__stats__.ds2_score",
        score_low: float = DS2.score_low,
        score_high: float = DS2.score_high,
        num_classes: PositiveInt = DS2.num_classes,
        missing_score: Optional[float] = None,
        select_ratio: Ratio = None,
        select_num: NonNegativeInt = None,
        text_template: Optional[str] = None,
        model: str = MINILM,
        embedding_key: Optional[str] = None,
        model_batch_size: PositiveInt = 64,
        k: PositiveInt = DS2.k,
        k_pool: Optional[int] = None,
        hoc_steps: PositiveInt = DS2.hoc_steps,
        hoc_lr: float = DS2.hoc_lr,
        detection_rounds: PositiveInt = DS2.detection_rounds,
        subset_fraction: OpenRatio = DS2.subset_fraction,
        confidence_threshold: Ratio = DS2.confidence_threshold,
        seed: NonNegativeInt = DS2.seed,
        knn_index: str = DS2.knn_index,
        knn_params: Optional[Dict[str, Any]] = None,
        report_dir: Optional[str] = None,
        *args,
        **kwargs,
    ):
        """
        Initialization method. The DS2 settings are checked once by
        :class:`daar_ops.algorithms.ds2.DS2Config` (``ValueError`` naming the field).

        :param score_key: field holding the score; dotted paths reach nested fields
            (``__dj__stats__.ds2_score``); a plain name is looked up at the top level first, then
            in ``__dj__stats__``.
        :param score_low: scores <= this are class 0 (DS2 on a raw 1-10 rating: 4).
        :param score_high: scores >= this are class K-1 (DS2 on a raw 1-10 rating: 9).
        :param num_classes: number of score classes K (DS2: 6), >= 2.
        :param missing_score: score used for missing, NaN/inf or non-numeric values (logged);
            default ``score_low`` (DS2 counts failed ratings as the lowest class).
        :param select_ratio: keep floor(select_ratio * N) samples, in [0, 1].
        :param select_num: keep this many samples (all if the dataset is smaller; logged).
        :param text_template: text embedded per sample, e.g. ``"{instruction} {input} {output}"``;
            default: the ``text_key`` field.
        :param model: sentence-transformers model (short name or local folder); it reads the
            first ``daar_ops.models.SENTENCE_MAX_TOKENS`` (128) tokens of a text.
        :param embedding_key: a field holding precomputed embedding vectors; skips the encoder.
        :param model_batch_size: texts per encoder batch.
        :param k: neighbours that vote in detection and enter the long-tail score (DS2: 10), >= 2.
        :param k_pool: neighbours computed once per sample (default 3 * k, at least k) and read
            by every detection round.
        :param hoc_steps: Adam steps of the HOC fit.
        :param hoc_lr: Adam learning rate of the HOC fit, > 0.
        :param detection_rounds: random subsets in SimiFeat-rank detection.
        :param subset_fraction: fraction of samples drawn per detection round, in (0, 1].
        :param confidence_threshold: replace a score when its confidence >= this (DS2: 0.5).
        :param seed: seed of the detection subsets and ties: same data + seed -> same output.
        :param knn_index: neighbour search: ``exact`` (faiss flat inner product, default),
            ``ivf`` or ``hnsw`` (approximate, for millions of samples; recall measured in
            ``tools/bench_knn.py``, e.g. ``knn_params: {nlist: 4096, nprobe: 64}`` at 1M).
        :param knn_params: options of the approximate index (``nlist``, ``nprobe``, ``hnsw_m``,
            ``ef_search``, ``ef_construction``, ``tie_margin``); see
            ``daar_ops.algorithms.knn.knn_cosine``.
        :param report_dir: directory for the T heatmap / JSON / score distribution report.
        :param args: extra args
        :param kwargs: extra args
        """
        super().__init__(*args, **kwargs)
        if not isinstance(score_key, str) or not score_key.strip():
            raise ValueError(f"{OP_NAME}: score_key must be a field name, got {score_key!r}")
        self.config = DS2Config(
            score_low=score_low, score_high=score_high, num_classes=num_classes,
            missing_score=missing_score, select_ratio=select_ratio, select_num=select_num, k=k,
            k_pool=k_pool, hoc_steps=hoc_steps, hoc_lr=hoc_lr, detection_rounds=detection_rounds,
            subset_fraction=subset_fraction, confidence_threshold=confidence_threshold,
            seed=seed, knn_index=knn_index, knn_params=knn_params)
        self.score_key = score_key
        self.template = TextTemplate(text_template or self.text_key)
        self.model, self.embedding_key = model, embedding_key
        self.model_batch_size = model_batch_size
        self.report_dir = report_dir

    # -- pieces ------------------------------------------------------------------------------------
    def _score(self, record: Mapping[str, Any]) -> Any:
        value = lookup(record, self.score_key)
        if value is None and "." not in self.score_key:
            value = lookup(as_dict(record.get(Fields.stats)), self.score_key)
        return value

    def _vectors(self, records: list[dict]) -> np.ndarray:
        vectors = [lookup(r, self.embedding_key) for r in records]
        dims = [len(v) for v in vectors if isinstance(v, (list, tuple, np.ndarray))]
        if not dims:
            raise ValueError(f"{OP_NAME}: no sample has a vector in '{self.embedding_key}'")
        dim = Counter(dims).most_common(1)[0][0]  # ties: the first length seen
        out = np.zeros((len(records), dim), dtype=np.float32)
        bad = 0
        for i, v in enumerate(vectors):
            try:
                arr = np.asarray(v, dtype=np.float32)
            except (TypeError, ValueError):
                arr = None
            if arr is None or arr.shape != (dim,) or not np.isfinite(arr).all():
                bad += 1
            else:
                out[i] = arr
        if bad:
            logger.warning(f"{OP_NAME}: {bad} samples have a missing or malformed vector in "
                           f"'{self.embedding_key}'; they get a zero vector")
        return out

    def _embeddings(self, records: list[dict]) -> np.ndarray:
        if self.embedding_key:
            return self._vectors(records)
        from daar_ops.encoders import encode_sentences

        texts = self.template.render_all(records, source=f"the dataset of {self._name}")
        n_empty = sum(1 for t in texts if not t)
        if n_empty:
            logger.warning(f"{OP_NAME}: {n_empty} samples render to empty text; they are embedded "
                           "as the empty string")
        key = model_key("sentence_encoder", model=self.model)
        return encode_sentences(texts, encoder=load(key, None, self.use_cuda()),
                                batch_size=self.model_batch_size, progress=True)

    def _curate(self, records: list[dict]) -> DS2Result:
        cfg = self.config
        raw, invalid = scores_to_classes([self._score(r) for r in records], cfg.score_low,
                                         cfg.score_high, cfg.num_classes, cfg.missing_score)
        n = len(records)
        if n and invalid.all():
            raise ValueError(f"{OP_NAME}: no sample has a numeric '{self.score_key}'; check "
                             "score_key (e.g. __dj__stats__.ds2_score after ds2_rating_filter)")
        if invalid.any():
            fill = cfg.score_low if cfg.missing_score is None else cfg.missing_score
            logger.warning(f"{OP_NAME}: {int(invalid.sum())}/{n} samples have a missing or "
                           f"non-numeric '{self.score_key}'; they are scored {fill}")
        # fewer than MIN_SAMPLES rows are not curated: no encoder is loaded for them
        embeddings = self._embeddings(records) if n >= MIN_SAMPLES else None
        result = ds2_select(embeddings, raw, cfg, device="cuda" if self.use_cuda() else "cpu",
                            progress=True)
        result.info["n_invalid_scores"] = int(invalid.sum())
        return result

    # -- Data-Juicer entry point -------------------------------------------------------------
    def choose_fields(self):
        # a bare score_key is also looked up in the stats (_score)
        stats = [f"{Fields.stats}.{self.score_key}"] if "." not in self.score_key else []
        return [self.score_key, *stats, *self.template.fields,
                *([self.embedding_key] if self.embedding_key else [])]

    def choose(self, dataset):
        n = len(dataset)
        fields = [self.score_key, Fields.stats, *self.template.fields]
        if self.embedding_key:
            fields.append(self.embedding_key)
        result = self._curate(column_records(dataset, fields))
        selected = np.zeros(n, dtype=bool)
        selected[result.selected] = True
        columns = {RAW_KEY: result.raw, CURATED_KEY: result.curated,
                   CORRUPTED_KEY: result.corrupted, CONFIDENCE_KEY: result.confidence,
                   LONG_TAIL_KEY: result.long_tail, SELECTED_KEY: selected}
        columns = {k: np.asarray(v, dtype=np.float64).tolist() for k, v in columns.items()}
        logger.info(f"{self._name}: {int(result.corrupted.sum())}/{n} scores curated; selecting "
                    f"{len(result.selected)}/{n}")
        if self.report_dir:
            from daar_ops.ds2_report import write_ds2_report

            paths = write_ds2_report(self.report_dir, result,
                                     extra=dict(score_key=self.score_key,
                                                embedding=self.embedding_key or self.model))
            logger.info(f"{self._name}: report written to {paths}")
        return columns, selected


@OPERATORS.register_module(ALIAS)
class DS2Filter(DS2Selector):
    """``ds2_filter``: the design card's name of :class:`DS2Selector` (same parameters, a
    Selector too)."""
