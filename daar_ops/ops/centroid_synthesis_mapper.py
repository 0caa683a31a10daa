"""``centroid_synthesis_mapper``: DaaR step 1, model-aware domain samples and centroids."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import numpy as np
from data_juicer.ops.base_op import OPERATORS, TAGGING_OPS, Mapper
from data_juicer.utils.constant import Fields
from loguru import logger

from daar_ops.algorithms.centroids import check_feature, compute_centroids
from daar_ops.algorithms.synthesis import DomainSpec, SynthesisConfig, parse_domains, synthesize
from daar_ops.centroid_file import save_centroids
from daar_ops.core import SYNTHESIS_META_KEY, as_dict
from daar_ops.defaults import FEATURE_DTYPE, SYNTHESIS_DEFAULTS
from daar_ops.encoders import embed_texts
from daar_ops.generation import BACKENDS
from daar_ops.model_keys import load, model_key
from daar_ops.models import DEFAULT_LAYER, SMOLLM2
from daar_ops.ops._whole import BuiltWhole, WholeDatasetOp
from daar_ops.ops._types import (NonNegativeFloat, NonNegativeInt, OpenRatio, PositiveInt,
                                 check_range, op_errors)
from daar_ops.text import ALPACA_TEMPLATE, TextTemplate, to_text

OP_NAME = "centroid_synthesis_mapper"
OUTPUT_FIELDS = ("instruction", "input", "output")
EXTRACTOR_BATCH_SIZE = 32  # texts per forward pass of the feature model


@TAGGING_OPS.register_module(OP_NAME)
@OPERATORS.register_module(OP_NAME)
class CentroidSynthesisMapper(BuiltWhole, Mapper):
    """Synthesize DaaR domain samples with the model itself and (optionally) write centroids.

    Input: one row per domain (``domain_key`` = name, ``description_key`` = description), or the
    ``domains`` parameter (then the input rows are ignored); with neither, the paper's four
    domains. The whole dataset is processed as ONE batch: it turns K domain rows into the
    accepted synthetic samples, each with ``instruction``, ``input``, ``output`` and ``domain``
    (other input columns are copied from the domain's row, or None).

    Seed phase: a zero-shot prompt asks for ``n_seed_pairs`` pairs; augmentation phase: one pair
    per call with 3 random accepted pairs shown as counterexamples. A candidate is accepted if its
    max cosine similarity (same features as the centroids) to the domain's accepted pairs is below
    ``tau``; a domain stops at ``samples_per_domain`` accepted pairs or ``max_attempts``
    generations, and a shortfall is logged.

    Meta written per output sample: ``daar_synthesis`` (dict: ``attempts``, ``accepted``,
    ``malformed``, ``rejected_similar``, ``acceptance_rate`` of its domain, ``seed``,
    ``backend``, ``model``). With ``centroids_path``, a ``daar_centroids`` artifact (tensor
    ``centroids`` [K, d], manifest with ``domains``, ``feature``, ``template``, ``counts``, the
    feature model's description and the synthesis provenance) is written after the run; a domain
    without any accepted sample then raises a clear error. Built as :class:`CentroidSynthesis`
    (a Pipeline op over the whole dataset), so it runs under ``executor_type: ray`` too: the few
    domain rows are gathered to the driver and synthesized there.
    """

    _accelerator = "cpu"
    _batched_op = True
    _supported_exec_modes = ("default",)  # the Mapper itself; CentroidSynthesis runs it on Ray

    def __init__(
        self,
        domains: Optional[Union[List[Dict[str, str]], List[str], Dict[str, str]]] = None,
        domain_key: str = "domain",
        description_key: str = "description",
        samples_per_domain: PositiveInt = SYNTHESIS_DEFAULTS["samples_per_domain"],
        max_attempts: PositiveInt = SYNTHESIS_DEFAULTS["max_attempts"],
        tau: Union[float, Dict[str, float]] = SYNTHESIS_DEFAULTS["tau"],
        n_seed_pairs: PositiveInt = SYNTHESIS_DEFAULTS["n_seed_pairs"],
        n_counterexamples: NonNegativeInt = SYNTHESIS_DEFAULTS["n_counterexamples"],
        candidates_per_round: PositiveInt = SYNTHESIS_DEFAULTS["candidates_per_round"],
        backend: str = "hf",
        model: str = SMOLLM2,
        backend_kwargs: Optional[Dict[str, Any]] = None,
        model_batch_size: PositiveInt = SYNTHESIS_DEFAULTS["model_batch_size"],
        max_new_tokens: PositiveInt = SYNTHESIS_DEFAULTS["max_new_tokens"],
        temperature: NonNegativeFloat = SYNTHESIS_DEFAULTS["temperature"],
        top_p: OpenRatio = SYNTHESIS_DEFAULTS["top_p"],
        response_prefix: Optional[str] = SYNTHESIS_DEFAULTS["response_prefix"],
        dtype: str = SYNTHESIS_DEFAULTS["dtype"],
        seed: NonNegativeInt = SYNTHESIS_DEFAULTS["seed"],
        feature_model: Optional[str] = None,
        feature: str = "embedding",
        layer: int = DEFAULT_LAYER,
        max_length: PositiveInt = 512,
        feature_dtype: str = FEATURE_DTYPE,
        centroids_path: Optional[str] = None,
        *args,
        **kwargs,
    ):
        """
        Initialization method: builds the :class:`SynthesisConfig` (which checks the synthesis
        settings once) and the two model keys.

        :param domains: domains as a list of ``{"name", "description"}`` dicts, a list of names,
            or a ``{name: description}`` mapping (K >= 2). None: read them from the input rows,
            or the paper's four domains when the rows have no ``domain_key``.
        :param domain_key: input field with the domain name.
        :param description_key: input field with the domain description.
        :param samples_per_domain: accepted pairs wanted per domain (paper: 30).
        :param max_attempts: generations per domain at most (seed + augmentation).
        :param tau: novelty threshold in (0, 1]: accept if max cosine to accepted pairs < tau. A
            float, or ``{domain: tau, "default": tau}`` for per-domain overrides.
        :param n_seed_pairs: pairs asked for by a seed prompt (paper: 5).
        :param n_counterexamples: accepted pairs shown in an augmentation prompt (paper: 3).
        :param candidates_per_round: generations per domain generated together per round.
        :param backend: ``hf`` (local causal LM), ``api`` (Data-Juicer's OpenAI-compatible API
            model) or ``vllm``.
        :param model: generator model (short name, folder, or API model name).
        :param backend_kwargs: extra backend arguments (e.g. ``base_url`` for ``api``).
        :param model_batch_size: conversations per generate call (hf backend).
        :param max_new_tokens: generation budget per call (paper: 2048).
        :param temperature: sampling temperature (paper: 0.9).
        :param top_p: nucleus sampling (paper: 0.95).
        :param response_prefix: start of the assistant's answer that the model continues (a
            prefill; small models keep the format far more often); "" or None disables it.
        :param dtype: generator dtype (hf/vllm); ``bfloat16`` is much faster on AMX CPUs/GPUs.
        :param seed: generation and counterexample seed.
        :param feature_model: model for novelty features and centroids; default ``model`` for
            the hf/vllm backends, ``smollm2-135m-instruct`` for ``api``.
        :param feature: ``embedding`` (paper) or ``layer`` (decoder layer ``layer``).
        :param layer: decoder layer k for ``feature: layer``.
        :param max_length: tokens per text for the features.
        :param feature_dtype: dtype of the feature model (``float32``: exact features).
        :param centroids_path: where to write the centroid artifact (None: no file).
        :param args: extra args
        :param kwargs: extra args

        Long because every recipe parameter is documented here (Data-Juicer's convention); the
        code is under 60 lines.
        """
        kwargs.setdefault("num_proc", 1)
        super().__init__(*args, **kwargs)
        with op_errors(OP_NAME):
            if backend not in BACKENDS:
                raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
            check_range("model_batch_size", model_batch_size, PositiveInt)
            check_range("max_length", max_length, PositiveInt)
            self.config = SynthesisConfig(
                samples_per_domain=samples_per_domain, max_attempts=max_attempts, tau=tau,
                n_seed_pairs=n_seed_pairs, n_counterexamples=n_counterexamples,
                candidates_per_round=candidates_per_round, seed=seed,
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                response_prefix=response_prefix)
            self.domains = parse_domains(domains) if domains is not None else None
            feature_layer = check_feature(feature, layer)
        self.domain_key, self.description_key = domain_key, description_key
        self.backend, self.model, self.feature = backend, model, feature
        self.centroids_path = centroids_path
        self.template = ALPACA_TEMPLATE
        self.extractor_key = model_key(
            "layer_features", model=feature_model or (model if backend != "api" else SMOLLM2),
            layer=feature_layer, max_length=max_length, batch_size=EXTRACTOR_BATCH_SIZE,
            dtype=feature_dtype)
        self.generator_key = model_key("generator", backend=backend, model=model, dtype=dtype,
                                       batch_size=model_batch_size,
                                       backend_kwargs=dict(backend_kwargs or {}))

    # -------------------------------------------------------------------------------- helpers
    def _features(self, texts: List[str], rank: Optional[int] = None) -> np.ndarray:
        extractor = load(self.extractor_key, rank, self.use_cuda())
        return embed_texts(extractor, texts, self.feature)

    def _domains_from_rows(self, samples: Dict[str, List[Any]], n: int
                           ) -> tuple[list[DomainSpec], list[int | None]]:
        """Domains and, per domain, the input row it came from (None for parameter domains)."""
        if self.domains is not None:
            return self.domains, [None] * len(self.domains)
        if self.domain_key not in samples:
            logger.info(f"{OP_NAME}: no '{self.domain_key}' field and no domains parameter: "
                        f"using the paper's four domains")
            specs = parse_domains(None)
            return specs, [None] * len(specs)
        specs, rows, seen = [], [], set()
        descs = samples[self.description_key] if self.description_key in samples else [None] * n
        for i in range(n):
            name = to_text(samples[self.domain_key][i]).strip()
            if not name:
                logger.warning(f"{OP_NAME}: input row {i} has no domain name; skipped")
                continue
            if name in seen:
                logger.warning(f"{OP_NAME}: domain '{name}' appears twice; first row kept")
                continue
            seen.add(name)
            specs.append(DomainSpec(name, to_text(descs[i]).strip()))
            rows.append(i)
        return parse_domains(specs), rows

    # ------------------------------------------------------------------------------ the op
    def process_batched(self, samples: Dict[str, List[Any]], rank: Optional[int] = None
                        ) -> Dict[str, List[Any]]:
        keys = list(samples.keys())
        n = len(samples[keys[0]]) if keys else 0
        domains, source_rows = self._domains_from_rows(samples, n)
        generator = load(self.generator_key, rank, self.use_cuda() and self.backend != "api")
        result = synthesize(generator, domains, lambda texts: self._features(texts, rank),
                            self.config)
        out_keys = list(dict.fromkeys(keys + list(OUTPUT_FIELDS) + [self.domain_key, Fields.meta]))
        out: Dict[str, List[Any]] = {k: [] for k in out_keys}
        described = generator.describe()
        for d, src in zip(domains, source_rows):
            prov = {**result.stats[d.name].as_dict(), "seed": self.config.seed,
                    "backend": self.backend, "model": str(described.get("model", self.model))}
            prov = {k: (float(v) if k == "acceptance_rate" else v) for k, v in prov.items()}
            for pair in result.samples[d.name]:
                rec = pair.record()
                for k in out_keys:
                    if k in rec:
                        out[k].append(rec[k])
                    elif k == self.domain_key:
                        out[k].append(d.name)
                    elif k == Fields.meta:
                        base = samples[k][src] if src is not None and k in samples else {}
                        out[k].append({**as_dict(base), SYNTHESIS_META_KEY: dict(prov)})
                    else:
                        out[k].append(samples[k][src] if src is not None else None)
        return out

    def runtime_np(self):
        # None, not 1: HF datasets >= 4 forks a worker pool even for num_proc=1, and loading the
        # generator (a dtype cast on transformers' loader threads) in a forked child of a process
        # whose OpenMP pool is live aborts with torch's "Invalid thread pool". The op handles K
        # rows in one batch, so it runs in this process.
        return None

    def run(self, dataset, *, exporter=None, tracer=None):
        # Everything in one batch: prompts name the other domains, centroids need all of them.
        self.batch_size = max(1, len(dataset))
        self.num_proc = 1
        if len(dataset) == 0 and self.domains is None and self.domain_key:
            logger.warning(f"{OP_NAME}: empty input dataset and no domains parameter: nothing "
                           f"to synthesize")
        # The domain list is read here (K small rows) rather than kept from process_batched,
        # which may run on a copy of this op or be skipped by a cache hit.
        # It also validates the rows (>= 2 unique names) before any generation starts.
        cols = dataset.column_names
        batch = {c: dataset[c] for c in cols} if len(dataset) else {}
        input_domains = self._domains_from_rows(batch, len(dataset))[0]
        result = super().run(dataset, exporter=exporter, tracer=tracer)
        if self.centroids_path:
            self._write_centroids(result, input_domains)
        return result

    def _write_centroids(self, dataset, input_domains: list[DomainSpec]) -> None:
        # Computed from the op's output (not from state set in process_batched) so that a cached
        # map result still gives the centroid file.
        cols = dataset.column_names if len(dataset) else []
        records = [dict(zip(cols, vals)) for vals in zip(*(dataset[c] for c in cols))] \
            if cols else []
        domains = input_domains
        counts = {d.name: sum(1 for r in records if r.get(self.domain_key) == d.name)
                  for d in domains}
        empty = [n for n, c in counts.items() if c == 0]
        if empty or len(domains) < 2:
            raise RuntimeError(
                f"{OP_NAME}: no accepted sample for domains {empty or domains}; cannot write "
                f"centroids to {self.centroids_path}. Raise max_attempts, lower tau, raise "
                f"max_new_tokens or use a stronger model (synthesis counts: {counts})")
        tpl = TextTemplate(self.template)
        feats = self._features([tpl.render(r) for r in records])
        names = [d.name for d in domains]
        centroids, n_per = compute_centroids(feats, [r[self.domain_key] for r in records], names)
        extractor = load(self.extractor_key, None, self.use_cuda())
        cfg = self.config
        synthesis = {}
        for r in records:
            meta = as_dict(r.get(Fields.meta))
            if SYNTHESIS_META_KEY in meta:
                synthesis.setdefault(r[self.domain_key], meta[SYNTHESIS_META_KEY])
        save_centroids(self.centroids_path, centroids, domains, extractor.describe(),
                       self.feature, self.template, n_per,
                       extra={"synthesis": synthesis, "generator": {
                           "backend": self.backend, "model": self.model, "seed": cfg.seed,
                           "temperature": cfg.temperature, "top_p": cfg.top_p,
                           "max_new_tokens": cfg.max_new_tokens, "tau": cfg.tau}})
        logger.info(f"{OP_NAME}: wrote centroids of {dict(zip(names, n_per.tolist()))} to "
                    f"{self.centroids_path}")


class CentroidSynthesis(WholeDatasetOp):
    """``centroid_synthesis_mapper`` as Data-Juicer runs it (:mod:`daar_ops.ops._whole`): the
    Mapper's own ``run`` on the default executor; under Ray the domain rows (one per domain: a
    few) are gathered to the driver, synthesized there by the same ``run``, and the samples
    become the Ray dataset."""

    mapper_class = CentroidSynthesisMapper

    def run_on_ray(self, dataset):
        import ray
        from data_juicer.core.data import NestedDataset

        rows = dataset.take_all()
        if len(rows) > 10_000:
            raise ValueError(f"{OP_NAME}: {len(rows)} input rows; it takes one row per domain")
        out = self.inner.run(NestedDataset.from_list([dict(r) for r in rows]))
        return ray.data.from_items(out.to_list())


CentroidSynthesisMapper.whole_dataset_op = CentroidSynthesis
