"""``ds2_rating_filter``: DS2's LLM quality rating, compressed to 6 classes, as a DJ Filter."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
from data_juicer.ops.base_op import OPERATORS, Filter
from data_juicer.utils.constant import Fields
from loguru import logger

from daar_ops.algorithms.ds2 import scores_to_classes
from daar_ops.algorithms.rating import RATING_CLASSES, RatingConfig, rate_by_generation
from daar_ops.core import (DS2_RATING_FAILURES_KEY, DS2_RATING_KEY, DS2_RATING_MASS_KEY,
                           DS2_SCORE_KEY, as_dict, uniform_dicts)
from daar_ops.defaults import DS2_RATING
from daar_ops.model_keys import load, model_key
from daar_ops.models import SMOLLM2
from daar_ops.ops._columns import (check_template_columns, float_feature, render_rows,
                                   with_fields)
from daar_ops.ops._types import NonNegativeFloat, OpenRatio, PositiveInt
from daar_ops.text import TextTemplate

OP_NAME = "ds2_rating_filter"
RATING_KEY = DS2_RATING_KEY
SCORE_KEY = DS2_SCORE_KEY
FAILURES_KEY = DS2_RATING_FAILURES_KEY
MASS_KEY = DS2_RATING_MASS_KEY


@OPERATORS.register_module(OP_NAME)
class DS2RatingFilter(Filter):
    """Rate each sample's quality with an LLM as DS2 does, and compress it to classes 0..5.

    Two modes:

    * ``generate`` (DS2): the model answers a prompt rating Rarity, Complexity, Informativeness and
      "Overall rating" (1-10) in JSON; the overall rating of the last JSON object is parsed
      tolerantly; an unparsable answer is retried ``try_num`` times with another seed and counts as
      0 if all fail (as DS2). Class = ``clip(rating, 4, 9) - 4``. Backends: ``hf`` (local causal
      LM, default the prepared SmolLM2), ``api`` (Data-Juicer's OpenAI-compatible API model) and
      ``vllm``.
    * ``probability`` (default; deterministic, one forward per sample): the model reads a prompt
      asking for an overall rating 0-5 followed by ``{"Overall rating": ``; the expected score under
      the next-token probabilities of the tokens "0".."5" is the rating; class = its rounding.
      Local HF models only.

    Stats written per sample (all float; skipped when ``ds2_score`` is already present):

    * ``ds2_rating``: the raw rating (1-10 in ``generate`` mode, 0 on parse failure; the expected
      0-5 score in ``probability`` mode).
    * ``ds2_score``: the compressed class 0..5 that ``ds2_filter`` curates.
    * ``ds2_rating_failures``: unparsable answers for this sample (``generate``; 0 in
      ``probability``).
    * ``ds2_rating_mass`` (``probability`` only): probability mass the model put on the score
      tokens (low = the model did not follow the format).

    Keeps samples whose ``ds2_score`` is in [``min_score``, ``max_score``]; with the defaults
    (no bounds) it keeps everything and only rates.
    """

    _accelerator = "cuda"
    _batched_op = True

    def __init__(
        self,
        mode: str = DS2_RATING.mode,
        model: str = SMOLLM2,
        backend: str = DS2_RATING.backend,
        text_template: Optional[str] = None,
        min_score: Optional[float] = None,
        max_score: Optional[float] = None,
        try_num: PositiveInt = DS2_RATING.try_num,
        max_new_tokens: PositiveInt = DS2_RATING.max_new_tokens,
        temperature: NonNegativeFloat = DS2_RATING.temperature,
        top_p: OpenRatio = DS2_RATING.top_p,
        seed: int = DS2_RATING.seed,
        dtype: str = "float32",
        model_batch_size: PositiveInt = 8,
        max_length: PositiveInt = DS2_RATING.max_length,
        max_sample_chars: PositiveInt = DS2_RATING.max_sample_chars,
        api_endpoint: Optional[str] = None,
        api_params: Optional[Dict] = None,
        *args,
        **kwargs,
    ):
        """
        Initialization method. The rating settings are checked once by
        :class:`daar_ops.algorithms.rating.RatingConfig` (``ValueError`` naming the field).

        :param mode: ``probability`` (deterministic expected score from the score-token
            probabilities) or ``generate`` (DS2's JSON rating by generation, parsed tolerantly).
        :param model: short name (``smollm2-135m-instruct``), local folder or hub id; for the
            ``api`` backend the API model name.
        :param backend: ``hf``, ``api`` or ``vllm`` (``generate`` mode); ``probability`` needs
            ``hf``.
        :param text_template: how a sample is shown to the rater, e.g. ``SAMPLE_TEMPLATE`` of
            :mod:`daar_ops.algorithms.rating` (Alpaca fields under ``### Instruction:`` /
            ``### Input:`` / ``### Response:`` headers); default: the ``text_key`` field.
            Missing fields render empty.
        :param min_score: keep samples with ``ds2_score`` >= this (None: no lower bound).
        :param max_score: keep samples with ``ds2_score`` <= this (None: no upper bound).
        :param try_num: generation attempts per sample until a rating parses (>= 1).
        :param max_new_tokens: generation length of an answer.
        :param temperature: sampling temperature of ``generate`` (0 = greedy; retries then repeat
            the same answer).
        :param top_p: nucleus sampling of ``generate``.
        :param seed: base seed; attempt ``a`` uses ``seed + a``: same data + seed -> same ratings.
        :param dtype: ``float32``, ``bfloat16`` or ``float16`` (local models).
        :param model_batch_size: prompts per forward / generate call.
        :param max_length: prompt tokens kept in ``probability`` mode.
        :param max_sample_chars: a sample longer than this is cut before prompting (logged).
        :param api_endpoint: endpoint of the API model (``api`` backend).
        :param api_params: extra parameters of the API model (e.g. ``base_url``); the key comes
            from ``OPENAI_API_KEY`` in the environment (an ``api_key`` here is echoed in
            Data-Juicer's config table and recipe backup).
        :param args: extra args
        :param kwargs: extra args
        """
        super().__init__(*args, **kwargs)
        self.config = RatingConfig(
            mode=mode, backend=backend, min_score=min_score, max_score=max_score,
            try_num=try_num, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            seed=seed, max_length=max_length, max_sample_chars=max_sample_chars)
        self.template = TextTemplate(text_template or self.text_key)
        self.model, self.dtype, self.model_batch_size = str(model), dtype, model_batch_size
        self.api_endpoint, self.api_params = api_endpoint, dict(api_params or {})
        self.rater_key = None
        if mode == "probability":
            from daar_ops.models import resolve_model_path

            self.rater_key = model_key("score_rater", model=resolve_model_path(self.model),
                                       dtype=dtype, batch_size=model_batch_size,
                                       max_length=max_length)
        if backend == "api":
            self.accelerator = "cpu"

    # -- model access ------------------------------------------------------------------------------
    def _generator(self, rank=None):
        if self.config.backend == "api":
            kwargs = dict(self.api_params)
            if self.api_endpoint:
                kwargs["endpoint"] = self.api_endpoint
            return load(model_key("generator", backend="api", model=self.model,
                                  backend_kwargs=kwargs))
        key = model_key("generator", backend=self.config.backend, model=self.model,
                        dtype=self.dtype, batch_size=self.model_batch_size)
        return load(key, rank, self.use_cuda())

    def _rate_generate(self, texts: list[str], rank=None) -> tuple[np.ndarray, np.ndarray]:
        generator, cfg = self._generator(rank), self.config
        return rate_by_generation(
            lambda convs, seed: generator.generate(
                convs, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                top_p=cfg.top_p, do_sample=cfg.temperature > 0, seed=seed),
            texts, cfg)

    # -- stats -------------------------------------------------------------------------------------
    def compute_stats_batched(self, samples, rank=None, context=False):
        stats = [as_dict(s) for s in samples[Fields.stats]]
        samples[Fields.stats] = stats
        todo = [i for i in range(len(stats)) if stats[i].get(SCORE_KEY) is None]
        if not todo:
            return samples
        texts = render_rows(self.template, samples, todo, OP_NAME)
        n_empty = sum(1 for t in texts if not t.strip())
        if n_empty:
            logger.warning(f"{OP_NAME}: {n_empty} samples render to empty text; they are rated "
                           f"as shown (an empty sample)")
        max_chars = self.config.max_sample_chars
        n_long = sum(1 for t in texts if len(t) > max_chars)
        if n_long:
            logger.info(f"{OP_NAME}: {n_long} samples longer than {max_chars} chars are cut "
                        f"before rating")
        mass = None
        if self.config.mode == "probability":
            rater = load(self.rater_key, rank, self.use_cuda())
            ratings, mass = rater.rate(texts, max_chars=max_chars)
            failures = np.zeros(len(texts))
            bad = ~np.isfinite(ratings)
            if bad.any():
                logger.warning(f"{OP_NAME}: {int(bad.sum())} non-finite expected scores set to 0")
                ratings = np.where(bad, 0.0, ratings)
                failures = bad.astype(np.float64)
        else:
            ratings, failures = self._rate_generate(texts, rank)
        classes, _ = scores_to_classes(ratings, *self.config.compression,
                                       num_classes=RATING_CLASSES)
        for j, i in enumerate(todo):
            stats[i][RATING_KEY] = float(ratings[j])
            stats[i][SCORE_KEY] = float(classes[j])
            stats[i][FAILURES_KEY] = float(failures[j])
            if mass is not None:
                stats[i][MASS_KEY] = float(mass[j])
        samples[Fields.stats] = uniform_dicts(stats)
        return samples

    def run(self, dataset, *, exporter=None, tracer=None, reduce=True):
        check_template_columns(self.template, dataset.column_names, self._name)
        fields = {k: float_feature() for k in (RATING_KEY, SCORE_KEY, FAILURES_KEY)}
        if self.config.mode == "probability":
            fields[MASS_KEY] = float_feature()
        dataset = with_fields(dataset, Fields.stats, fields)
        return super().run(dataset, exporter=exporter, tracer=tracer, reduce=reduce)

    def process_single(self, sample):
        value = as_dict(sample[Fields.stats]).get(SCORE_KEY)
        if value is None:
            return True
        return self.get_keep_boolean(float(value), self.config.min_score,
                                     self.config.max_score)
