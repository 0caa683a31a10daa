"""``diversity_reward_filter``: DaaR's diversity reward (predicted domain entropy) as a Filter."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
from data_juicer.ops.base_op import OPERATORS, Filter
from data_juicer.utils.constant import Fields
from data_juicer.utils.model_utils import get_model
from data_juicer.utils.ray_utils import is_ray_mode
from loguru import logger

from daar_ops.algorithms.selection import quota_mask, range_mask, top_mask
from daar_ops.artifacts import ArtifactError
from daar_ops.features import limit_worker_threads
from daar_ops.models import describe_model
from daar_ops.probe_checkpoint import (DaarScorer, check_checkpoint_compatible, checkpoint_model,
                                       load_probe_checkpoint)
from daar_ops.text import TextTemplate

OP_NAME = "diversity_reward_filter"
REWARD_KEY = "daar_diversity_reward"
PROBS_KEY = "daar_domain_probs"
DOMAIN_KEY = "daar_probe_domain"
INVALID_REWARD = -1.0  # entropies are >= 0: marks a sample whose score could not be computed


@dataclass(frozen=True)
class _ScorerKey:
    """A value-hashable model key for Data-Juicer's ``get_model``: one scorer per worker process,
    also after the op is pickled into a worker (a ``functools.partial`` key compares by identity).
    """

    checkpoint: str
    model: str
    dtype: str
    batch_size: int
    max_batch_tokens: int

    def __call__(self, device: str = "cpu") -> DaarScorer:
        limit_worker_threads()
        return DaarScorer(self.checkpoint, self.model, device=device, dtype=self.dtype,
                          batch_size=self.batch_size, max_batch_tokens=self.max_batch_tokens)


@OPERATORS.register_module(OP_NAME)
class DiversityRewardFilter(Filter):
    """Keep samples by DaaR's diversity reward: the entropy of the domain distribution predicted by
    a trained probe (psi_div), from the frozen LM's layer-k features.

    Stats written per sample (skipped when already present):

    * ``daar_diversity_reward`` (float): psi_div's predicted entropy in nats (higher = more
      cross-domain = more "diverse"); ``-1.0`` if the probe outputs were not finite (logged);
      such a sample ranks last and passes no threshold.
    * ``daar_domain_probs`` (list[float]): psi_dom's softmax, in the checkpoint's domain order.
    * ``daar_probe_domain`` (str): the most probable pseudo-domain.

    Selection, one rule at a time plus optional thresholds:

    * ``min_score`` / ``max_score``: per sample, closed interval; works under every executor.
    * ``top_ratio`` / ``top_k``: the best samples over the whole dataset (DaaR keeps the top 20%),
      ties broken by the earlier sample. Default executor only: under Ray the op refuses to start.
    * ``domain_ratios`` (+ ``top_ratio`` for unlisted domains): DaaR's per-pseudo-domain quotas, the
      best fraction of the samples predicted as each domain. Default executor only.

    Global rules combine with thresholds by intersection. Nothing else is dropped.
    """

    _accelerator = "cuda"
    _batched_op = True

    def __init__(
        self,
        checkpoint: str = "",
        model: Optional[str] = None,
        min_score: Optional[float] = None,
        max_score: Optional[float] = None,
        top_ratio: Optional[float] = None,
        top_k: Optional[int] = None,
        domain_ratios: Optional[Dict[str, float]] = None,
        dtype: str = "float32",
        feature_batch_size: int = 32,
        max_batch_tokens: int = 2048,
        *args,
        **kwargs,
    ):
        """
        Initialization method.

        :param checkpoint: directory of a probe checkpoint written by ``daar-ops train-probe``
            (kind ``daar_probe``). Required.
        :param model: LM for the features; default: the checkpoint's model. A model whose config
            hash or hidden size differs from the checkpoint's is refused.
        :param min_score: keep samples with reward >= min_score (None: no lower bound).
        :param max_score: keep samples with reward <= max_score (None: no upper bound).
        :param top_ratio: keep the best floor(top_ratio * N) samples of the whole dataset, in
            [0, 1]; with ``domain_ratios``, the ratio for domains not listed there.
        :param top_k: keep the best top_k samples of the whole dataset (all if N < top_k).
        :param domain_ratios: {pseudo-domain: fraction in [0, 1]}: keep the best fraction of the
            samples predicted as each domain (DaaR's customized quotas).
        :param dtype: feature extractor dtype, ``float32`` (matches training) or ``bfloat16``.
        :param feature_batch_size: texts per forward pass of the extractor.
        :param max_batch_tokens: padded tokens per forward pass of the extractor.
        :param args: extra args
        :param kwargs: extra args
        """
        super().__init__(*args, **kwargs)
        if not checkpoint:
            raise ValueError(f"{OP_NAME}: 'checkpoint' (a probe checkpoint directory written by "
                             "`daar-ops train-probe`) is required")
        for name, value in (("min_score", min_score), ("max_score", max_score)):
            if value is not None and not math.isfinite(float(value)):
                raise ValueError(f"{OP_NAME}: {name} must be a finite number, got {value}")
        if min_score is not None and max_score is not None and min_score > max_score:
            raise ValueError(f"{OP_NAME}: min_score {min_score} > max_score {max_score}")
        if top_ratio is not None and not 0.0 <= float(top_ratio) <= 1.0:
            raise ValueError(f"{OP_NAME}: top_ratio must be in [0, 1], got {top_ratio}")
        if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0):
            raise ValueError(f"{OP_NAME}: top_k must be an integer >= 0, got {top_k}")
        if top_k is not None and (top_ratio is not None or domain_ratios):
            raise ValueError(f"{OP_NAME}: top_k cannot be combined with top_ratio or "
                             "domain_ratios; pick one global rule")
        if feature_batch_size < 1 or max_batch_tokens < 1:
            raise ValueError(f"{OP_NAME}: feature_batch_size and max_batch_tokens must be >= 1")

        try:
            probes, manifest = load_probe_checkpoint(checkpoint)
        except ArtifactError as err:
            raise ValueError(f"{OP_NAME}: cannot use checkpoint {checkpoint!r}: {err}") from err
        self.domains = probes.domains
        model = model or checkpoint_model(manifest)
        try:
            live = describe_model(model)
            if int(manifest["layer"]) > live["num_layers"]:
                raise ArtifactError(f"checkpoint layer {manifest['layer']} > the model's "
                                    f"{live['num_layers']} layers")
            check_checkpoint_compatible(manifest, dict(live, layer=manifest["layer"]))
        except (ArtifactError, OSError) as err:
            raise ValueError(f"{OP_NAME}: checkpoint {checkpoint!r} does not fit model "
                             f"{model!r}: {err}") from err
        if domain_ratios:
            unknown = sorted(set(domain_ratios) - set(self.domains))
            if unknown:
                raise ValueError(f"{OP_NAME}: domain_ratios names {unknown}, not domains of the "
                                 f"checkpoint {self.domains}")
            bad = {k: v for k, v in domain_ratios.items() if not 0.0 <= float(v) <= 1.0}
            if bad:
                raise ValueError(f"{OP_NAME}: domain_ratios values must be in [0, 1], got {bad}")
            missing = [d for d in self.domains if d not in domain_ratios]
            if missing and top_ratio is None:
                raise ValueError(f"{OP_NAME}: domain_ratios lacks {missing}; list every domain "
                                 "or set top_ratio as the ratio of the unlisted ones")

        self.global_mode = ("quota" if domain_ratios else "top_ratio" if top_ratio is not None
                            else "top_k" if top_k is not None else None)
        if self.global_mode and is_ray_mode():
            raise ValueError(
                f"{OP_NAME}: {self.global_mode} selection ranks the whole dataset and is not "
                "supported with executor_type: ray. Use per-sample min_score/max_score under Ray "
                "(e.g. the score quantile measured on a sample), or compute the stats under Ray "
                "and select with topk_specified_field_selector "
                "(field_key: __dj__stats__.daar_diversity_reward) under the default executor.")
        self.checkpoint = str(checkpoint)
        self.model = model
        self.template = manifest["template"]
        self.min_score, self.max_score = min_score, max_score
        self.top_ratio, self.top_k = top_ratio, top_k
        self.domain_ratios = dict(domain_ratios) if domain_ratios else None
        self.model_key = _ScorerKey(self.checkpoint, str(live["model_path"]), dtype,
                                    int(feature_batch_size), int(max_batch_tokens))

    # -- stats -------------------------------------------------------------------------------------
    def compute_stats_batched(self, samples, rank=None, context=False):
        stats = samples[Fields.stats]
        n = len(stats)
        todo = [i for i in range(n) if REWARD_KEY not in stats[i]]
        if not todo:
            return samples
        template = TextTemplate(self.template)
        fields = [f for f in samples.keys() if f not in (Fields.stats,)]
        texts = [template.render({f: samples[f][i] for f in fields}) for i in todo]
        scorer = get_model(self.model_key, rank=rank, use_cuda=self.use_cuda())
        reward, probs, _ = scorer.score_texts(texts)
        bad = ~np.isfinite(reward) | ~np.isfinite(probs).all(axis=1)
        if bad.any():
            logger.warning(f"{OP_NAME}: {int(bad.sum())} samples got non-finite probe outputs; "
                           f"their {REWARD_KEY} is set to {INVALID_REWARD}")
        k = len(self.domains)
        for j, i in enumerate(todo):
            if bad[j]:
                stats[i][REWARD_KEY] = INVALID_REWARD
                stats[i][PROBS_KEY] = [1.0 / k] * k
                stats[i][DOMAIN_KEY] = ""
            else:
                stats[i][REWARD_KEY] = float(reward[j])
                stats[i][PROBS_KEY] = [float(p) for p in probs[j]]
                stats[i][DOMAIN_KEY] = self.domains[int(probs[j].argmax())]
        return samples

    # -- per-sample decision ---------------------------------------------------------------------
    def process_batched(self, samples, rank=None):
        return list(range_mask(_scores(samples[Fields.stats]), self.min_score, self.max_score))

    # -- global selection (default executor) -------------------------------------------------------
    def run(self, dataset, *, exporter=None, tracer=None, reduce=True):
        if not self.global_mode or not reduce:
            return super().run(dataset, exporter=exporter, tracer=tracer, reduce=reduce)
        with_stats = super().run(dataset, exporter=exporter, tracer=tracer, reduce=False)
        if len(with_stats) == 0:
            logger.info(f"{OP_NAME}: empty dataset, nothing to select")
            return with_stats
        stats = with_stats[Fields.stats]
        keep = self.select(_scores(stats), [s.get(DOMAIN_KEY, "") for s in stats])
        logger.info(f"{OP_NAME}: {self.global_mode} selection keeps {int(keep.sum())} of "
                    f"{len(keep)} samples")
        return with_stats.select(np.flatnonzero(keep).tolist())

    def select(self, scores: np.ndarray, domains: List[str]) -> np.ndarray:
        """The global rule (and thresholds) as a boolean mask over the dataset order.

        NaN scores (samples without a valid score) rank last and fail every threshold."""
        keep = range_mask(scores, self.min_score, self.max_score)
        if self.global_mode == "quota":
            # Every checkpoint domain has a ratio (checked in __init__) unless top_ratio covers the
            # rest; only samples without a prediction (domain "") can still fall to 0.0.
            default = self.top_ratio if self.top_ratio is not None else 0.0
            keep &= quota_mask(scores, domains, self.domain_ratios, default_ratio=default)
        elif self.global_mode == "top_ratio":
            keep &= top_mask(scores, top_ratio=self.top_ratio)
        elif self.global_mode == "top_k":
            if self.top_k > len(scores):
                logger.info(f"{OP_NAME}: top_k={self.top_k} >= dataset size {len(scores)}; "
                            "keeping every sample")
            keep &= top_mask(scores, top_k=self.top_k)
        return keep


def _scores(stats: List[dict]) -> np.ndarray:
    """Rewards for selection; a sample without a valid score (no prediction) becomes NaN, which
    the selection rules rank last and never pass through a threshold."""
    return np.array([s.get(REWARD_KEY, math.nan) if s.get(DOMAIN_KEY, "") else math.nan
                     for s in stats], dtype=np.float64)
