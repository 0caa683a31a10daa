"""DaaR's diversity reward (predicted domain entropy): per-sample scoring as a Filter
(``diversity_reward_filter``) and the global budget / per-domain quotas as a Selector
(``diversity_reward_selector``)."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Dict, List, Optional

import numpy as np
from data_juicer.ops.base_op import OPERATORS, Filter
from data_juicer.utils.constant import Fields
from loguru import logger

from daar_ops.algorithms.selection import SelectionRule
from daar_ops.artifacts import ArtifactError, artifact_digest
from daar_ops.core import (CHECKPOINT_SHA_KEY, PROBE_DOMAIN_KEY, PROBS_KEY, REWARD_KEY, as_dict,
                           resolve_dtype, uniform_dicts)
from daar_ops.defaults import FEATURE_DTYPE
from daar_ops.model_keys import load, model_key
from daar_ops.models import describe_model
from daar_ops.ops._columns import (check_template_columns, float_feature, float_list_feature,
                                   render_rows, string_feature, with_fields)
from daar_ops.ops._selector import StatsSelector, stats_values
from daar_ops.ops._types import (NonNegativeInt, PositiveInt, Ratio, alias, check_range,
                                 op_errors)
from daar_ops.probe_checkpoint import (check_checkpoint_compatible, checkpoint_model,
                                       load_probe_checkpoint)
from daar_ops.text import TextTemplate

OP_NAME = "diversity_reward_filter"
SELECTOR_NAME = "diversity_reward_selector"
DOMAIN_KEY = PROBE_DOMAIN_KEY
# Samples per compute_stats call (Data-Juicer's batch_size). Data-Juicer gives a "cuda" op 10; the
# scorer makes its own forward batches (model_batch_size), so a larger call only spreads the
# per-call costs (a feature-cache lookup, one cache chunk file per call): at 10 they cost a tiny
# model ~5x.
SCORE_BATCH_SIZE = 256
INVALID_REWARD = -1.0  # entropies are >= 0: marks a sample whose score could not be computed
# top_ratio / top_k: the DaaR design card's names, documented aliases of select_ratio / select_num
GLOBAL_PARAMS = ("select_ratio", "select_num", "domain_ratios", "top_ratio", "top_k")
PER_DOMAIN = "per_domain"  # a global choice too, when true
RANGE_MODIFIERS = ("reversed_range", "min_closed_interval", "max_closed_interval")


def selection_rule(op_name: str, select_ratio: Optional[float], select_num: Optional[int],
                   top_ratio: Optional[float], top_k: Optional[int],
                   domain_ratios: Optional[Dict[str, float]], min_score: Optional[float],
                   max_score: Optional[float], per_domain: bool = False) -> SelectionRule:
    """The op's :class:`SelectionRule` (aliases resolved); a ValueError names the op."""
    with op_errors(op_name):
        return SelectionRule(
            select_ratio=alias("select_ratio", select_ratio, "top_ratio", top_ratio),
            select_num=alias("select_num", select_num, "top_k", top_k),
            domain_ratios=domain_ratios, min_score=min_score, max_score=max_score,
            per_domain=per_domain)


@OPERATORS.register_module(OP_NAME)
class DiversityRewardFilter(Filter):
    """Score every sample with DaaR's diversity reward: the entropy of the domain distribution
    predicted by a trained probe (psi_div), from the frozen LM's layer-k features; keep a score
    range.

    Stats written per sample:

    * ``daar_diversity_reward`` (float): psi_div's predicted entropy in nats (higher = more
      cross-domain = more "diverse"); ``-1.0`` if the probe outputs were not finite (logged);
      such a sample ranks last and passes no threshold.
    * ``daar_domain_probs`` (list[float]): psi_dom's softmax, in the checkpoint's domain order.
    * ``daar_probe_domain`` (str): the most probable pseudo-domain.
    * ``daar_checkpoint_sha256`` (str): digest of the checkpoint that scored the sample (with
      features in another precision than float32: of the checkpoint's digest and the precision).
      Stats from another checkpoint or precision (or without a digest) are recomputed, never
      reused silently.

    Keeps samples with ``min_score <= reward <= max_score`` through Data-Juicer's
    ``get_keep_boolean``, so ``reversed_range`` / ``min_closed_interval`` /
    ``max_closed_interval`` work as for every native Filter; without bounds it keeps every sample
    (stats only). Runs under every executor, Ray included.

    The global choices (``select_ratio``, ``select_num``, ``domain_ratios``, or the aliases
    ``top_ratio`` / ``top_k``) are whole-dataset decisions: given here, the op is built as
    :class:`DiversityRewardSelector` (a Data-Juicer Selector that scores, then keeps the best), so
    recipes written with this name keep working and the op still behaves as a Selector under
    ``dj-analyze``, ``op_fusion``, the tracer and Ray (as a Pipeline).
    """

    _accelerator = "cuda"
    _batched_op = True

    def __new__(cls, *args, **kwargs):
        if cls is DiversityRewardFilter and (any(kwargs.get(k) is not None for k in GLOBAL_PARAMS)
                                             or kwargs.get(PER_DOMAIN)):
            modifiers = [k for k in RANGE_MODIFIERS if k in kwargs]
            if modifiers:
                raise ValueError(f"{OP_NAME}: {modifiers} apply to the per-sample score range; "
                                 f"they cannot be combined with a global choice "
                                 f"({', '.join(GLOBAL_PARAMS + (PER_DOMAIN,))}). Use {OP_NAME} "
                                 f"for the range and "
                                 f"{SELECTOR_NAME} after it for the global choice")
            selector = DiversityRewardSelector(*args, **kwargs)
            selector._name = OP_NAME  # traced, logged and checkpointed under the recipe's name
            return selector
        return super().__new__(cls)

    def __init__(
        self,
        checkpoint: str = "",
        model: Optional[str] = None,
        min_score: Optional[float] = None,
        max_score: Optional[float] = None,
        select_ratio: Ratio = None,
        select_num: NonNegativeInt = None,
        domain_ratios: Optional[Dict[str, float]] = None,
        per_domain: bool = False,
        dtype: str = FEATURE_DTYPE,
        model_batch_size: PositiveInt = 32,
        max_batch_tokens: PositiveInt = 2048,
        feature_cache: bool = True,
        cache_dir: Optional[str] = None,
        top_ratio: Ratio = None,
        top_k: NonNegativeInt = None,
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
        :param select_ratio: global: keep the best ``floor(select_ratio * N)`` samples (the op is
            then a :class:`DiversityRewardSelector`); with ``domain_ratios``, the ratio of the
            domains not listed there.
        :param select_num: global: keep the best select_num samples (all if N is smaller).
        :param domain_ratios: global: {pseudo-domain: fraction in [0, 1]}, the best fraction of
            the samples predicted as each domain (DaaR's customized quotas).
        :param per_domain: global: with ``select_ratio``, keep that ratio inside each predicted
            domain (equal quotas, whatever the checkpoint's domains are called) instead of over
            the whole dataset; ``daar-ops select``'s default, measured better downstream than the
            paper's global top (docs/evaluation.md).
        :param dtype: feature precision: ``float32``, ``bfloat16`` or ``auto`` (bfloat16 where the
            device has it natively, else float32; the default is ``FEATURE_DTYPE``).
        :param model_batch_size: texts per forward pass of the extractor.
        :param max_batch_tokens: padded tokens per forward pass of the extractor.
        :param feature_cache: read/write layer features through the on-disk feature cache shared
            with ``daar-ops select`` and ``train-probe``.
        :param cache_dir: feature cache directory (default ``$DAAR_OPS_HOME/feature_cache``).
        :param top_ratio: alias of ``select_ratio`` (the DaaR design card's name); not both.
        :param top_k: alias of ``select_num`` (the DaaR design card's name); not both.
        :param args: extra args
        :param kwargs: extra args (``batch_size``: samples per scoring call, default 256)
        """
        kwargs.setdefault("batch_size", SCORE_BATCH_SIZE)
        super().__init__(*args, **kwargs)
        rule = selection_rule(OP_NAME, select_ratio, select_num, top_ratio, top_k, domain_ratios,
                              min_score, max_score, per_domain)
        if rule.mode is not None:
            raise ValueError(f"{OP_NAME}: global rules belong to {SELECTOR_NAME}")
        self.min_score, self.max_score = rule.min_score, rule.max_score
        setup_scorer(self, checkpoint, model, dtype, model_batch_size, max_batch_tokens,
                     feature_cache, cache_dir)

    # -- stats -------------------------------------------------------------------------------------
    def compute_stats_batched(self, samples, rank=None, context=False):
        return score_samples(self, samples, rank)

    def run(self, dataset, *, exporter=None, tracer=None, reduce=True):
        check_template_columns(self.template, dataset.column_names, self._name)
        dataset = with_fields(dataset, Fields.stats, reward_fields())
        return super().run(dataset, exporter=exporter, tracer=tracer, reduce=reduce)

    # -- per-sample decision ---------------------------------------------------------------------
    def process_batched(self, samples, rank=None):
        if self.min_score is None and self.max_score is None:
            return [True] * len(samples[Fields.stats])
        return [bool(math.isfinite(r)) and self.get_keep_boolean(r, self.min_score, self.max_score)
                for r in reward_scores(samples[Fields.stats])]


def setup_scorer(op: Any, checkpoint: str, model: Optional[str], dtype: str,
                 model_batch_size: int, max_batch_tokens: int, feature_cache: bool,
                 cache_dir: Optional[str]) -> None:
    """Load and check a probe checkpoint for ``op``: sets ``domains``, ``checkpoint``,
    ``checkpoint_sha``, ``model``, ``template`` and the ``get_model`` key ``model_key``."""
    if not checkpoint:
        raise ValueError(f"{OP_NAME}: 'checkpoint' (a probe checkpoint directory written by "
                         "`daar-ops train-probe`) is required")
    with op_errors(OP_NAME):
        check_range("model_batch_size", model_batch_size, PositiveInt)
        check_range("max_batch_tokens", max_batch_tokens, PositiveInt)
    try:
        probes, manifest = load_probe_checkpoint(checkpoint)
    except ArtifactError as err:
        raise ValueError(f"{OP_NAME}: cannot use checkpoint {checkpoint!r}: {err}") from err
    op.domains = probes.domains
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
    op.checkpoint = str(checkpoint)
    # the precision the features are computed in, on the device this op will use
    op.dtype = resolve_dtype(dtype, "cuda" if op.use_cuda() else "cpu")
    op.checkpoint_sha = scoring_provenance(artifact_digest(checkpoint), op.dtype)
    op.model = model
    op.template = TextTemplate(manifest["template"])
    op.model_key = model_key("probe_scorer", checkpoint=op.checkpoint,
                             model=str(live["model_path"]), dtype=op.dtype,
                             batch_size=int(model_batch_size),
                             max_batch_tokens=int(max_batch_tokens),
                             feature_cache=bool(feature_cache),
                             cache_dir=None if cache_dir is None else str(cache_dir))


def scoring_provenance(checkpoint_digest: str, dtype: str) -> str:
    """What ``daar_checkpoint_sha256`` records: the checkpoint's digest for float32 features,
    else the digest of (checkpoint digest, precision), so stats scored in another precision are
    recomputed, never mixed."""
    if dtype == "float32":
        return checkpoint_digest
    return hashlib.sha256(f"{checkpoint_digest}:{dtype}".encode()).hexdigest()


def reward_fields() -> Dict[str, Any]:
    return {REWARD_KEY: float_feature(), PROBS_KEY: float_list_feature(),
            DOMAIN_KEY: string_feature(), CHECKPOINT_SHA_KEY: string_feature()}


def score_samples(op: Any, samples: Dict[str, List[Any]], rank: Optional[int] = None
                  ) -> Dict[str, List[Any]]:
    """Write the reward stats of every sample that lacks them or carries another checkpoint's
    (``op`` gives ``model_key``, ``template``, ``domains``, ``checkpoint_sha``)."""
    stats = [as_dict(s) for s in samples[Fields.stats]]
    samples[Fields.stats] = stats
    todo = [i for i, s in enumerate(stats)
            if s.get(REWARD_KEY) is None or s.get(CHECKPOINT_SHA_KEY) != op.checkpoint_sha]
    if not todo:
        return samples
    stale = sum(1 for i in todo if stats[i].get(REWARD_KEY) is not None)
    if stale:
        logger.info(f"{op._name}: {stale} samples carried {REWARD_KEY} from another (or an "
                    f"unrecorded) checkpoint; recomputed with {op.checkpoint}")
    texts = render_rows(op.template, samples, todo, op._name)
    scorer = load(op.model_key, rank, op.use_cuda())
    reward, probs, _ = scorer.score_texts(texts)
    bad = ~np.isfinite(reward) | ~np.isfinite(probs).all(axis=1)
    if bad.any():
        logger.warning(f"{op._name}: {int(bad.sum())} samples got non-finite probe outputs; "
                       f"their {REWARD_KEY} is set to {INVALID_REWARD}")
    k = len(op.domains)
    for j, i in enumerate(todo):
        if bad[j]:
            stats[i].update({REWARD_KEY: INVALID_REWARD, PROBS_KEY: [1.0 / k] * k,
                             DOMAIN_KEY: ""})
        else:
            stats[i].update({REWARD_KEY: float(reward[j]),
                             PROBS_KEY: [float(p) for p in probs[j]],
                             DOMAIN_KEY: op.domains[int(probs[j].argmax())]})
        stats[i][CHECKPOINT_SHA_KEY] = op.checkpoint_sha
    samples[Fields.stats] = uniform_dicts(stats)
    return samples


def reward_scores(stats: List[Any]) -> np.ndarray:
    """Rewards for selection; a sample without a valid score (no prediction) becomes NaN, which
    the selection rules rank last and never pass through a threshold."""
    cells = [as_dict(s) for s in stats]
    return reward_values([c.get(REWARD_KEY) for c in cells], [c.get(DOMAIN_KEY) for c in cells])


def reward_values(rewards: List[Any], domains: List[Any]) -> np.ndarray:
    """:func:`reward_scores` from the two stats values of each sample."""
    return np.array([float(r) if isinstance(r, (int, float)) and d
                     else math.nan for r, d in zip(rewards, domains)], dtype=np.float64)


@OPERATORS.register_module(SELECTOR_NAME)
class DiversityRewardSelector(StatsSelector):
    """DaaR's selection over the whole dataset by ``daar_diversity_reward``: the global budget
    (the paper keeps the top 20%: ``select_ratio: 0.2``), a number of samples, or
    per-pseudo-domain quotas (``per_domain: true`` with ``select_ratio``, or ``domain_ratios``).
    On SmolLM2 the global top 20% leaned to one pseudo-domain and tuned a detectably worse model
    than the per-domain quotas (docs/evaluation.md), so ``daar-ops select`` and the recipes in
    ``recipes/daar`` and ``recipes/ray`` use ``per_domain: true`` (the sandbox keeps the paper's
    rule as ``process_daar.yaml`` beside it).

    With ``checkpoint`` it first scores the samples that lack (or carry stale) reward stats,
    exactly as ``diversity_reward_filter`` does (same stats, same feature cache); without it, it
    reads the stats a ``diversity_reward_filter`` wrote before it, e.g. under Ray, in another
    recipe. Ties go to the earlier sample; a sample without a valid score ranks last and passes
    no threshold. Counts follow :func:`daar_ops.core.budget` (``floor(ratio * N)``).

    Stats: those of ``diversity_reward_filter`` (when it scores). Under ``executor_type: ray``
    the scoring runs on the workers as ``diversity_reward_filter``'s stats pass (actors on GPU
    when asked), and only each sample's reward, predicted domain and a row id are gathered to
    the driver to choose (the same rows as the default executor).
    """

    _accelerator = "cuda"

    def __init__(
        self,
        checkpoint: Optional[str] = None,
        model: Optional[str] = None,
        select_ratio: Ratio = None,
        select_num: NonNegativeInt = None,
        domain_ratios: Optional[Dict[str, float]] = None,
        per_domain: bool = False,
        min_score: Optional[float] = None,
        max_score: Optional[float] = None,
        dtype: str = FEATURE_DTYPE,
        model_batch_size: PositiveInt = 32,
        max_batch_tokens: PositiveInt = 2048,
        feature_cache: bool = True,
        cache_dir: Optional[str] = None,
        top_ratio: Ratio = None,
        top_k: NonNegativeInt = None,
        *args,
        **kwargs,
    ):
        """
        Initialization method.

        :param checkpoint: probe checkpoint to score with (None: read the stats written by a
            ``diversity_reward_filter`` earlier in the recipe).
        :param model: LM for the features; default: the checkpoint's model.
        :param select_ratio: keep the best ``floor(select_ratio * N)`` samples, in [0, 1]; with
            ``domain_ratios``, the ratio of the domains not listed there.
        :param select_num: keep the best select_num samples (all if N is smaller).
        :param domain_ratios: {pseudo-domain: fraction in [0, 1]}: keep the best fraction of the
            samples predicted as each domain (DaaR's customized quotas).
        :param per_domain: with ``select_ratio``, keep that ratio inside each predicted domain
            (equal quotas, whatever the domains are called; the domains in ``domain_ratios`` keep
            theirs) instead of over the whole dataset; ``daar-ops select``'s default, measured
            better downstream than the paper's global top (docs/evaluation.md).
        :param min_score: also require reward >= min_score (closed interval).
        :param max_score: also require reward <= max_score (closed interval).
        :param dtype: feature extractor dtype when scoring.
        :param model_batch_size: texts per forward pass when scoring.
        :param max_batch_tokens: padded tokens per forward pass when scoring.
        :param feature_cache: use the on-disk feature cache when scoring.
        :param cache_dir: feature cache directory (default ``$DAAR_OPS_HOME/feature_cache``).
        :param top_ratio: alias of ``select_ratio`` (the DaaR design card's name); not both.
        :param top_k: alias of ``select_num`` (the DaaR design card's name); not both.
        :param args: extra args
        :param kwargs: extra args (``batch_size``: samples per scoring call, default 256)
        """
        kwargs.setdefault("batch_size", SCORE_BATCH_SIZE)
        super().__init__(*args, **kwargs)
        name = self._name or SELECTOR_NAME
        self.rule = selection_rule(name, select_ratio, select_num, top_ratio, top_k,
                                   domain_ratios, min_score, max_score, per_domain)
        if self.rule.mode is None:
            raise ValueError(f"{name}: give select_ratio, select_num or domain_ratios (or the "
                             f"aliases top_ratio / top_k); for a score range alone use {OP_NAME}")
        self.scores_itself = bool(checkpoint)
        self.domains: Optional[List[str]] = None
        # under Ray the scoring is the Filter's own stats pass, built from these arguments
        self.scorer_kwargs = dict(kwargs, checkpoint=checkpoint, model=model, dtype=dtype,
                                  model_batch_size=model_batch_size,
                                  max_batch_tokens=max_batch_tokens,
                                  feature_cache=feature_cache, cache_dir=cache_dir)
        if checkpoint:
            setup_scorer(self, checkpoint, model, dtype, model_batch_size, max_batch_tokens,
                         feature_cache, cache_dir)
            self._check_domains(self.domains, from_checkpoint=True)

    def _check_domains(self, domains: List[str], from_checkpoint: bool) -> None:
        """Every domain needs a ratio (or ``select_ratio`` for the rest); a ratio for a domain
        the checkpoint lacks is an error, one for a domain no sample was predicted as a
        warning."""
        name = self._name or SELECTOR_NAME
        unknown = self.rule.unknown_groups(domains)
        if unknown and from_checkpoint:
            raise ValueError(f"{name}: domain_ratios names {unknown}, not domains of the "
                             f"checkpoint {domains}")
        if unknown:
            logger.warning(f"{name}: domain_ratios names {unknown}, predicted for no sample")
        missing = self.rule.uncovered_groups(domains)
        if missing:
            raise ValueError(f"{name}: domain_ratios lacks {missing}; list every domain or set "
                             "select_ratio as the ratio of the unlisted ones")

    def prepare(self, dataset):
        if not self.scores_itself:
            if Fields.stats not in dataset.column_names:
                raise ValueError(f"{self._name}: no {Fields.stats} column; put "
                                 f"{OP_NAME} (checkpoint: ...) before this op or give it a "
                                 f"checkpoint")
            return dataset
        if Fields.stats not in dataset.column_names:
            dataset = dataset.add_column(Fields.stats, [{} for _ in range(len(dataset))])
        dataset = with_fields(dataset, Fields.stats, reward_fields())
        return dataset.map(lambda batch: score_samples(self, batch), batched=True,
                           batch_size=self.batch_size or 1000, desc=f"{self._name}_scores")

    def ray_prepare(self, dataset):
        if not self.scores_itself:
            columns = dataset.columns()  # None: no rows (an earlier op dropped them all)
            if columns is not None and Fields.stats not in columns:
                raise ValueError(f"{self._name}: no {Fields.stats} column; put "
                                 f"{OP_NAME} (checkpoint: ...) before this op or give it a "
                                 f"checkpoint")
            return dataset
        from data_juicer.core.data.ray_dataset import RayDataset
        from data_juicer.utils.process_utils import calculate_ray_np

        # exactly what Data-Juicer runs for a diversity_reward_filter under Ray, stats only
        scorer = DiversityRewardFilter(**self.scorer_kwargs)
        calculate_ray_np([scorer])  # its concurrency, as RayDataset.process sets it for a Filter
        runner = RayDataset(dataset)
        runner._run_single_op(scorer, set(dataset.columns() or []), stats_only=True)
        return runner.data

    def choose_fields(self):
        return [f"{Fields.stats}.{REWARD_KEY}", f"{Fields.stats}.{DOMAIN_KEY}"]

    def choose(self, dataset):
        values = stats_values(dataset, (REWARD_KEY, DOMAIN_KEY))
        return {}, self.choose_scores(reward_values(values[REWARD_KEY], values[DOMAIN_KEY]),
                                      [d or "" for d in values[DOMAIN_KEY]])

    def choose_scores(self, scores: np.ndarray, domains: List[str]) -> np.ndarray:
        """:meth:`choose` on arrays already read from the stats (``reward_scores``' scores and
        the predicted domains, "" for none): ``daar-ops select`` streams its pool and keeps only
        these."""
        if not self.scores_itself:  # the domains are known only now, from the stats
            self._check_domains(sorted({d for d in domains if d}), from_checkpoint=False)
        n_invalid = int(np.isnan(scores).sum())
        if n_invalid:
            logger.warning(f"{self._name}: {n_invalid} samples have no valid "
                           f"{REWARD_KEY}; they rank last")
        if self.rule.mode == "num" and self.rule.select_num > len(scores):
            logger.info(f"{self._name}: select_num={self.rule.select_num} >= dataset size "
                        f"{len(scores)}; keeping every sample")
        return self.rule.mask(scores, domains)
