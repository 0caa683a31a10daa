"""The whole DaaR method in one call (``daar-ops select``), driven through the package's own
Data-Juicer operators: the same classes, defaults and feature cache as the recipes.

Stages, each timed:

1. ``synthesize``: :class:`CentroidSynthesisMapper` writes ``samples_per_domain`` instruction pairs
   per domain (``synthetic.jsonl``), or ``--synthetic`` reuses a file of them.
2. ``pseudo_label``: :class:`DomainPseudoLabelMapper` labels the probe pool from the synthetic
   samples (``probe_pool.jsonl``, ``centroids/``).
3. ``train_probes``: :func:`train_probe_checkpoint` (the ``daar-ops train-probe`` tool) trains
   psi_dom / psi_div on the probe pool (``checkpoint/``).
4. ``score``: :class:`DiversityRewardFilter` scores every record of the selection pool.
5. ``select``: :class:`DiversityRewardSelector` keeps the top ``select_ratio`` (or the same ratio
   inside each predicted domain) (``selected.jsonl``, ``scores.jsonl``, ``summary.*``).

The probe pool and the selection pool are disjoint **by text**: records are split by a seeded hash
of their rendered text, so identical records always land on the same side (duplicates are
counted in the summary). The ops see a view of each record (the template's fields, as text);
the records written out are the input records, unchanged, plus ``__dj__stats__``/``__dj__meta__``.

The pool is streamed from disk (:mod:`daar_ops.pool`): one pass keeps a 32-byte digest per record
for the split, the probe records are read back (``probe_size`` of them), the selection pool is
scored ``score_chunk_size`` records at a time keeping only its stats as arrays, and the selected
records are read back once more for ``selected.jsonl``. Memory holds one chunk of records and a
few dozen bytes per record, so the pool can be larger than memory (``tools/bench_stream.py``).

Outputs are all-or-nothing (:mod:`daar_ops.outdir`): everything is written into
``<output_dir>.partial-<pid>-<tag>`` and swapped into place at the end; a failed run leaves the
previous output folder as it was, and a folder holding files this package did not write is never
replaced.

The ground-truth ``domain`` field is never read here.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from loguru import logger
from tqdm.auto import tqdm

from daar_ops.core import (DOMAIN_SIMILARITY_KEY, default_pool, META_FIELD, PROBE_DOMAIN_KEY, PROBS_KEY,
                           PSEUDO_DOMAIN_KEY, REWARD_KEY, STATS_FIELD, JsonlReport, as_dict,
                           iter_jsonl, write_jsonl)
from daar_ops.models import DEFAULT_LAYER, SMOLLM2
from daar_ops.defaults import FEATURE_DTYPE, PSEUDO_LABEL_DEFAULTS, STAGE1, SYNTHESIS_DEFAULTS
from daar_ops.pool import PoolScan, iter_row_chunks, iter_rows, scan_pool, split_by_digest
from daar_ops.text import ALPACA_TEMPLATE, TextTemplate, to_text

ROW_KEY = "__daar_row__"  # the view's pointer back to the input record


@dataclass
class SelectConfig:
    """Settings of :func:`run_select`; defaults are the embedded full-size run. Synthesis and
    pseudo-labelling defaults are the operators' own (one place: ``SYNTHESIS_DEFAULTS``,
    ``PSEUDO_LABEL_DEFAULTS``), so ``daar-ops select`` and the recipes agree."""

    pool: str = field(default_factory=default_pool)
    output_dir: str = "outputs/daar_select"
    model: str = SMOLLM2
    domains: Any = None  # None: the paper's four domains; else names / dicts
    synthetic: str | None = None  # reuse synthetic samples (JSONL with `domain`): no generation
    template: str = ALPACA_TEMPLATE
    layer: int = DEFAULT_LAYER
    max_length: int = 512
    samples_per_domain: int = SYNTHESIS_DEFAULTS["samples_per_domain"]
    max_attempts: int = SYNTHESIS_DEFAULTS["max_attempts"]
    tau: float = SYNTHESIS_DEFAULTS["tau"]
    max_new_tokens: int = SYNTHESIS_DEFAULTS["max_new_tokens"]
    generation_batch_size: int = SYNTHESIS_DEFAULTS["model_batch_size"]
    generation_dtype: str = SYNTHESIS_DEFAULTS["dtype"]
    temperature: float = SYNTHESIS_DEFAULTS["temperature"]
    top_p: float = SYNTHESIS_DEFAULTS["top_p"]
    probe_size: int = 5000
    pool_size: int | None = None  # None: every record not in the probe pool
    # stage 1 (docs/daar_stage1.md): the space the probe pool is labelled in and the method;
    # the paper's procedure is pseudo_label_preset="paper" (Stage1Config.paper())
    pseudo_label_space: str = PSEUDO_LABEL_DEFAULTS["feature"]
    pseudo_label_method: str = PSEUDO_LABEL_DEFAULTS["method"]
    descriptions: bool = PSEUDO_LABEL_DEFAULTS["use_descriptions"]
    refine_iters: int | None = None  # method kmeans: Lloyd iterations (None: Stage1Config's)
    # "paper": stage 1 exactly as the DaaR paper (Stage1Config.paper()); sets the three above
    pseudo_label_preset: str | None = None
    select_ratio: float = 0.2
    # Keep the top select_ratio within each predicted pseudo-domain (the paper's "customized"
    # quota selection with equal ratios); False: over the whole pool (the paper's global top).
    # The default by the downstream measurement (docs/evaluation.md): on SmolLM2 the global top
    # 20% leans to one domain and tunes a detectably worse model than the per-domain quotas.
    per_domain: bool = True
    epochs: int | None = None  # None: the probe trainer's default
    seed: int = 0
    threads: int = 1
    # processes scoring the selection pool (Data-Juicer's num_proc), each with `threads` torch
    # threads; a text's features do not depend on the process that computes them, so the output
    # is the same for any number of workers (tests/test_pipeline.py)
    workers: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    # selection-pool records read and scored per pass: memory holds one chunk of records (and
    # a few numbers per record), so the pool may be larger than memory
    score_chunk_size: int = 20000
    device: str = "cpu"
    dtype: str = FEATURE_DTYPE  # feature precision; "auto": bf16 where native (defaults.py)
    cache_dir: str | None = None
    progress: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> "SelectConfig":
        """A preset that finishes in minutes on a 2-core CPU: few synthetic samples, a slice."""
        # 20 epochs on 800 probe samples give about the optimiser steps of the trainer's default 3
        # epochs on 5,000; with 3 epochs psi_dom stays near uniform and every entropy is ~ln K.
        base = cls(samples_per_domain=3, max_attempts=16, max_new_tokens=192, probe_size=800,
                   pool_size=2000, epochs=20, output_dir="outputs/daar_select_quick")
        return replace(base, **overrides)

    def validate(self) -> None:
        if not 0.0 < self.select_ratio <= 1.0:
            raise ValueError(f"select_ratio must be in (0, 1], got {self.select_ratio}")
        for name in ("probe_size", "samples_per_domain", "max_attempts", "threads", "workers",
                     "layer", "score_chunk_size",
                     "max_length", "max_new_tokens", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pseudo_label_preset not in (None, "paper"):
            raise ValueError(f"pseudo_label_preset must be 'paper' or unset, got "
                             f"{self.pseudo_label_preset!r}")
        if self.refine_iters is not None and self.pseudo_label_method != "kmeans":
            raise ValueError(f"refine_iters ({self.refine_iters}) are the iterations of "
                             f"--pseudo-label-method kmeans, but the method is "
                             f"{self.pseudo_label_method!r}: pass --pseudo-label-method kmeans")
        if self.refine_iters is not None and self.refine_iters < 0:
            raise ValueError(f"refine_iters must be >= 0, got {self.refine_iters}")
        if self.pool_size is not None and self.pool_size < 1:
            raise ValueError(f"pool_size must be >= 1 or None, got {self.pool_size}")
        if not Path(self.pool).exists():
            raise FileNotFoundError(f"pool file {self.pool} does not exist; pass --pool or set "
                                    f"DAAR_OPS_POOL")
        if self.synthetic and not Path(self.synthetic).exists():
            raise FileNotFoundError(f"--synthetic file {self.synthetic} does not exist")
        TextTemplate(self.template)  # a clear error for a malformed template


def _clean(value: Any) -> Any:
    """A view value Arrow can hold: text without lone surrogates, containers recursively."""
    if isinstance(value, str):
        return to_text(value)
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _view(rows: Sequence[tuple[int, Mapping[str, Any]]], template: TextTemplate):
    """A NestedDataset of what the ops need from each (row, record): the template's top-level
    fields (plain fields as text, nested ones cleaned) plus the row index."""
    from data_juicer.core.data import NestedDataset

    top = list(dict.fromkeys(f.split(".")[0] for f in template.fields))
    view = []
    for i, rec in rows:
        item = {ROW_KEY: int(i)}
        for name in top:
            value = rec.get(name)
            item[name] = to_text(value) if name in template.fields else _clean(value)
        view.append(item)
    return NestedDataset.from_list(view)


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str):
        timer = self

        class _Stage:
            def __enter__(self):
                logger.info(f"[daar select] stage '{stage}' ...")
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[stage] = round(time.perf_counter() - self.start, 2)
                if exc[0] is None:
                    logger.info(f"[daar select] stage '{stage}' done in {timer.seconds[stage]}s")

        return _Stage()


@dataclass
class SelectResult:
    output_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


def run_select(cfg: SelectConfig) -> SelectResult:
    """Run the method; outputs appear in ``cfg.output_dir`` as one consistent set or not at all
    (:mod:`daar_ops.outdir`: a folder holding files this package did not write is refused before
    any work, staging folders of killed runs are cleaned, the swap is atomic)."""
    import torch

    from daar_ops import outdir

    cfg.validate()
    final = outdir.resolve_target(cfg.output_dir)
    torch.set_num_threads(cfg.threads)
    summary = outdir.write_folder(final, "daar-ops select", lambda staging: _run(cfg, staging))
    logger.info(f"[daar select] {summary['selected']} of {summary['selection_pool']} selected; "
                f"outputs in {final}")
    return SelectResult(final, summary)


def _synthetic_records(cfg: SelectConfig, names: list[str], domains) -> tuple[list[dict], dict]:
    """The synthetic samples: reused from ``cfg.synthetic`` or generated by the op."""
    if cfg.synthetic:
        report = JsonlReport(cfg.synthetic)
        rows = []
        for number, rec in iter_jsonl(cfg.synthetic, report):
            if rec is None:
                continue
            if not to_text(rec.get("domain")).strip():
                raise ValueError(f"{cfg.synthetic}:{number}: a synthetic sample needs a "
                                 f"'domain' field naming its domain")
            rows.append(rec)
        if report.message():
            logger.warning(report.message())
        missing = [n for n in names if not any(r["domain"] == n for r in rows)]
        if missing:
            raise ValueError(f"{cfg.synthetic} has no sample of domains {missing} (it has "
                             f"{sorted({r['domain'] for r in rows})}); synthesize them or pass "
                             f"--domains with the file's domains")
        return [r for r in rows if r["domain"] in names], {"reused": cfg.synthetic}
    from data_juicer.core.data import NestedDataset

    from daar_ops.ops.centroid_synthesis_mapper import CentroidSynthesisMapper

    op = CentroidSynthesisMapper(
        domains=[{"name": d.name, "description": d.description} for d in domains],
        model=cfg.model, samples_per_domain=cfg.samples_per_domain,
        max_attempts=cfg.max_attempts, tau=cfg.tau, max_new_tokens=cfg.max_new_tokens,
        model_batch_size=cfg.generation_batch_size, dtype=cfg.generation_dtype,
        temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, max_length=cfg.max_length)
    out = op.run(NestedDataset.from_list([{"domain": n} for n in names])).to_list()
    stats = {}
    for rec in out:
        stats.setdefault(rec["domain"], as_dict(as_dict(rec.get(META_FIELD)).get(
            "daar_synthesis")))
    missing = [n for n in names if n not in stats]
    if missing:
        raise RuntimeError(
            f"no synthetic sample was accepted for domains {missing}; raise --max-attempts or "
            f"--max-new-tokens, raise --tau, or use a stronger --model")
    return out, stats


def _run(cfg: SelectConfig, out: Path) -> dict[str, Any]:
    """The stages, each timed, writing into ``out``; returns the summary."""
    from daar_ops.algorithms.synthesis import DEFAULT_DOMAINS, parse_domains

    timer = _Timer()
    tpl = TextTemplate(cfg.template)
    domains = parse_domains(cfg.domains) if cfg.domains is not None else list(DEFAULT_DOMAINS)
    names = [d.name for d in domains]
    with timer("load_pool"):
        split = _split_pool(cfg, tpl)
        probe_rows = list(iter_rows(split.scan, split.probe_idx))
    with timer("synthesize"):
        synthetic, synthesis_stats = _synthetic_records(cfg, names, domains)
        write_jsonl(out / "synthetic.jsonl", synthetic)
    with timer("pseudo_label"):
        labeller, probe_records, labels = _pseudo_label(cfg, out, tpl, domains, probe_rows,
                                                        synthetic, synthesis_stats)
        del probe_rows
        write_jsonl(out / "probe_pool.jsonl", probe_records)
    with timer("train_probes"):
        ckpt_dir, manifest = _train_probes(cfg, out, tpl, names, probe_records)
    with timer("score"):
        scorer, scores = _score(cfg, ckpt_dir, split, tpl, names)
    with timer("select"):
        keep = _select(cfg, out, split, scores, names)
    summary = _summary(cfg, split, keep, scores, names, synthesis_stats, labeller, labels,
                       manifest, scorer.dtype, timer.seconds)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    _write_summary_md(out, summary)
    _plot(out, scores.reward, keep, summary["selection_pool_pseudo_domain_counts"],
          summary["selected_pseudo_domain_counts"], names)
    return summary


@dataclass
class _Split:
    """The pool as read once (a digest per record) and split by text into probe / selection."""

    scan: PoolScan
    probe_idx: np.ndarray
    pool_idx: np.ndarray
    duplicated: int


def _split_pool(cfg: SelectConfig, tpl: TextTemplate) -> _Split:
    """One pass keeps a digest per record; the records are read again only where a stage needs
    them, so memory does not grow with the pool beyond a few arrays."""
    scan = scan_pool(cfg.pool, tpl, cfg.seed, source=f"the records of {cfg.pool}",
                     progress=cfg.progress)
    report = scan.report
    if report.message():
        logger.warning(f"{report.message()}; the lines are listed in summary.json")
    if not scan.n:
        raise ValueError(f"{cfg.pool} holds no JSON object record "
                         f"({len(report.skipped)} malformed lines)")
    probe_idx, pool_idx, duplicated = split_by_digest(scan.digests, cfg.probe_size,
                                                      cfg.pool_size)
    if duplicated:
        logger.info(f"{duplicated} texts occur more than once in the pool; every copy is on "
                    f"the same side of the probe/selection split")
    return _Split(scan, probe_idx, pool_idx, duplicated)


def _pseudo_label(cfg: SelectConfig, out: Path, tpl: TextTemplate, domains: Sequence[Any],
                  probe_rows: list[tuple[int, Mapping[str, Any]]], synthetic: list[dict],
                  synthesis_stats: Mapping[str, Any]) -> tuple[Any, list[dict], list[str]]:
    """Label the probe pool from the synthetic samples (``stage1/`` and ``centroids/`` written
    beside it):
    (the labeller op, the probe records with their label and similarities, the labels)."""
    from daar_ops.centroid_file import save_centroids
    from daar_ops.ops.domain_pseudo_label_mapper import DomainPseudoLabelMapper

    names = [d.name for d in domains]
    labeller = DomainPseudoLabelMapper(
        samples_path=str(out / "synthetic.jsonl"), save_stage1=str(out / "stage1"),
        model=cfg.model, text_template=cfg.template,
        feature=cfg.pseudo_label_space, method=cfg.pseudo_label_method,
        use_descriptions=cfg.descriptions, seed=cfg.seed,
        domains=[{"name": d.name, "description": d.description} for d in domains],
        refine_iters=STAGE1.refine_iters if cfg.refine_iters is None else cfg.refine_iters,
        max_length=cfg.max_length, num_proc=1,
        preset=cfg.pseudo_label_preset)
    order = [labeller.domains.index(n) for n in names]
    labelled = labeller.run(_view(probe_rows, tpl))
    metas = labelled[META_FIELD]
    sims = labelled[STATS_FIELD]
    save_centroids(out / "centroids", labeller.centroids[order], domains,
                   labeller.feature_description(), labeller.feature, tpl.template,
                   np.array([sum(1 for r in synthetic if r["domain"] == n) for n in names]),
                   extra={"synthesis": synthesis_stats, "stage1": labeller.stage1.to_dict()})
    probe_records, labels = [], []
    for row, (_, record) in enumerate(probe_rows):
        rec = dict(record)
        label = as_dict(metas[row])[PSEUDO_DOMAIN_KEY]
        labels.append(label)
        rec[META_FIELD] = {**as_dict(rec.get(META_FIELD)), PSEUDO_DOMAIN_KEY: label}
        rec[STATS_FIELD] = {**as_dict(rec.get(STATS_FIELD)), DOMAIN_SIMILARITY_KEY:
                            [as_dict(sims[row])[DOMAIN_SIMILARITY_KEY][k] for k in order]}
        probe_records.append(rec)
    return labeller, probe_records, labels


def _train_probes(cfg: SelectConfig, out: Path, tpl: TextTemplate, names: list[str],
                  probe_records: list[dict]) -> tuple[Path, dict[str, Any]]:
    """psi_dom / psi_div on the labelled probe pool (``checkpoint/``): (its folder, manifest)."""
    from daar_ops.algorithms.probes import TrainConfig
    from daar_ops.probe_checkpoint import train_probe_checkpoint

    train_cfg = TrainConfig(seed=cfg.seed) if cfg.epochs is None else \
        TrainConfig(seed=cfg.seed, epochs=cfg.epochs)
    return train_probe_checkpoint(
        probe_records, out / "checkpoint", model=cfg.model, layer=cfg.layer,
        max_length=cfg.max_length, template=tpl.template, domains=names, config=train_cfg,
        cache_dir=cfg.cache_dir, dtype=cfg.dtype, device=cfg.device, progress=cfg.progress)


def _score(cfg: SelectConfig, ckpt_dir: Path, split: _Split, tpl: TextTemplate,
           names: list[str]) -> tuple[Any, "_PoolScores"]:
    """The selection pool scored by the filter op: (the op, the scores as arrays)."""
    from daar_ops.ops.diversity_reward_filter import DiversityRewardFilter

    # one process per worker on CPU; on a GPU one process keeps the model on the device
    workers = cfg.workers if cfg.device == "cpu" else 1
    scorer = DiversityRewardFilter(checkpoint=str(ckpt_dir), model=cfg.model, dtype=cfg.dtype,
                                   cache_dir=cfg.cache_dir, num_proc=workers)
    return scorer, _score_stream(split.scan, split.pool_idx, tpl, scorer, names,
                                 cfg.score_chunk_size, cfg.progress)


def _select(cfg: SelectConfig, out: Path, split: _Split, scores: "_PoolScores",
            names: list[str]) -> np.ndarray:
    """The top ``select_ratio`` (overall, or per predicted domain) by the selector op; writes
    ``scores.jsonl`` and ``selected.jsonl``; returns the keep mask over the selection pool."""
    from daar_ops.ops.diversity_reward_filter import DiversityRewardSelector

    selector = DiversityRewardSelector(select_ratio=cfg.select_ratio, per_domain=cfg.per_domain)
    keep = selector.choose_scores(scores.for_selection, scores.domain_names(names))
    write_jsonl(out / "scores.jsonl", scores.rows(split.pool_idx, keep, names))
    write_jsonl(out / "selected.jsonl",
                _selected_records(split.scan, split.pool_idx, keep, scores, names))
    return keep


def _summary(cfg: SelectConfig, split: _Split, keep: np.ndarray, scores: "_PoolScores",
             names: list[str], synthesis_stats: Mapping[str, Any], labeller: Any,
             labels: list[str], manifest: Mapping[str, Any], feature_dtype: str,
             seconds: Mapping[str, float]) -> dict[str, Any]:
    """What ``summary.json`` holds."""
    report, label_arr = split.scan.report, np.array(labels, dtype=object)
    return {
        "config": asdict(cfg),
        "pool_records": split.scan.n, "malformed_lines": report.skipped,
        "invalid_utf8_lines": report.invalid_utf8,
        "duplicated_texts": split.duplicated,
        "probe_pool": int(len(split.probe_idx)), "selection_pool": int(len(split.pool_idx)),
        "selected": int(keep.sum()),
        "domains": names,
        "synthesis": synthesis_stats,
        "probe_pseudo_domain_counts": {n: int((label_arr == n).sum()) for n in names},
        "stage1": stage1_health(labeller.stage1_info, label_arr, names),
        "selection_pool_pseudo_domain_counts": scores.domain_counts(names),
        "selected_pseudo_domain_counts": scores.domain_counts(names, keep),
        "probe_metrics": manifest.get("metrics", {}),
        "reward": _describe(scores.reward), "selected_reward": _describe(scores.reward[keep]),
        "feature_dtype": feature_dtype,  # the precision the features were computed in
        "stage_seconds": dict(seconds),
        "total_seconds": round(sum(seconds.values()), 2),
    }


def stage1_health(info: Mapping[str, Any], labels: np.ndarray, names: Sequence[str]
                  ) -> dict[str, Any]:
    """Label-free signals of stage 1 for the summary, with a warning when they say the
    pseudo-labels are unreliable: the half-split agreement (two labelings from halves of the
    synthetic samples; below 0.8 it flags a broken stage 1, docs/daar_stage1.md) or one domain
    nearly absent from the probe pool."""
    counts = np.array([int((labels == n).sum()) for n in names])
    share = float(counts.min() / max(counts.sum(), 1))
    out = {k: info[k] for k in ("half_split_agreement", "prototype_agreement", "mean_margin",
                                "anchors_kept", "anchors_dropped") if k in info}
    out.update(min_domain_share=round(share, 4),
               reliable=bool(info.get("reliable", True)) and share >= 0.05)
    if share < 0.05:
        weak = names[int(counts.argmin())]
        logger.warning(f"stage 1 looks unreliable: pseudo-domain '{weak}' got {counts.min()} of "
                       f"{counts.sum()} probe records; its probe and the selection's balance "
                       f"will be poor (try more synthetic samples, domain descriptions that "
                       f"match the pool, or a stronger --model)")
    return out


@dataclass
class _PoolScores:
    """The score stage's outputs as arrays over the selection pool (no object per record)."""

    reward: np.ndarray  # the stored reward (INVALID_REWARD where no score could be computed)
    for_selection: np.ndarray  # the reward the selector ranks (NaN where invalid)
    probs: np.ndarray  # [n, K]
    domain: np.ndarray  # index into the domain names, -1 where no domain was predicted

    def domain_names(self, names: Sequence[str]) -> list[str]:
        table = list(names) + [""]
        return [table[d] for d in self.domain.tolist()]

    def domain_counts(self, names: Sequence[str], mask: np.ndarray | None = None
                      ) -> dict[str, int]:
        codes = self.domain if mask is None else self.domain[mask]
        counts = np.bincount(codes[codes >= 0], minlength=len(names))
        return {n: int(c) for n, c in zip(names, counts)}

    def stats(self, position: int, names: Sequence[str]) -> dict[str, Any]:
        code = int(self.domain[position])
        return {REWARD_KEY: float(self.reward[position]),
                PROBS_KEY: {n: float(p) for n, p in zip(names, self.probs[position])},
                PROBE_DOMAIN_KEY: names[code] if code >= 0 else ""}

    def rows(self, pool_idx: np.ndarray, keep: np.ndarray, names: Sequence[str]):
        for position, row in enumerate(pool_idx.tolist()):
            yield {"pool_index": int(row), "selected": bool(keep[position]),
                   **self.stats(position, names)}


def _score_stream(scan: PoolScan, pool_idx: np.ndarray, tpl: TextTemplate, scorer: Any,
                  names: Sequence[str], chunk_size: int, progress: bool) -> _PoolScores:
    """Score the selection pool ``chunk_size`` records at a time through the filter op, keeping
    only its stats as arrays: memory holds one chunk of records, whatever the pool's size."""
    from daar_ops.ops.diversity_reward_filter import reward_scores

    n, k = len(pool_idx), len(names)
    out = _PoolScores(np.empty(n), np.empty(n), np.empty((n, k)), np.empty(n, dtype=np.int64))
    code = {name: j for j, name in enumerate(names)}
    done = 0
    chunks = iter_row_chunks(scan, pool_idx, chunk_size)
    for chunk in tqdm(chunks, total=math.ceil(n / chunk_size), desc="scoring chunks",
                      unit="chunk", disable=not progress or n <= chunk_size):
        scored = scorer.run(_view(chunk, tpl))
        if scored[ROW_KEY] != [row for row, _ in chunk]:
            raise RuntimeError("the score stage lost or reordered records")  # a filter bug
        stats = [as_dict(x) for x in scored[STATS_FIELD]]
        span = slice(done, done + len(chunk))
        out.reward[span] = [x[REWARD_KEY] for x in stats]
        out.for_selection[span] = reward_scores(stats)
        out.probs[span] = [x[PROBS_KEY] for x in stats]
        out.domain[span] = [code.get(x[PROBE_DOMAIN_KEY], -1) for x in stats]
        done += len(chunk)
    if done != n:
        raise RuntimeError(f"scored {done} of {n} selection-pool records")
    return out


def _selected_records(scan: PoolScan, pool_idx: np.ndarray, keep: np.ndarray,
                      scores: _PoolScores, names: Sequence[str]):
    """The kept input records, unchanged but for their reward stats, read in one more pass."""
    positions = np.flatnonzero(keep)
    for position, (_, record) in zip(positions.tolist(), iter_rows(scan, pool_idx[positions])):
        rec = dict(record)
        rec[STATS_FIELD] = {**as_dict(rec.get(STATS_FIELD)), **scores.stats(position, names)}
        yield rec


def _describe(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"n": 0}
    v = np.asarray(values, dtype=np.float64)
    return {"n": int(len(v)), "min": float(v.min()), "mean": float(v.mean()),
            "median": float(np.median(v)), "max": float(v.max())}


def _write_summary_md(out: Path, s: Mapping[str, Any]) -> None:
    lines = ["# DaaR selection summary", "",
             f"- pool: {s['pool_records']} records ({len(s['malformed_lines'])} malformed lines "
             f"skipped, {s['duplicated_texts']} texts duplicated); probe pool {s['probe_pool']}, "
             f"selection pool {s['selection_pool']} (disjoint by text)",
             f"- selected: **{s['selected']}** (top {s['config']['select_ratio']:.0%} by "
             f"predicted entropy{' within each predicted domain' if s['config']['per_domain'] else ''})",
             *_probe_lines(s["probe_metrics"]), "",
             "| pseudo-domain | probe pool | selection pool | selected |", "|---|---|---|---|"]
    for n in s["domains"]:
        lines.append(f"| {n} | {s['probe_pseudo_domain_counts'][n]} | "
                     f"{s['selection_pool_pseudo_domain_counts'][n]} | "
                     f"{s['selected_pseudo_domain_counts'][n]} |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in s["stage_seconds"].items()]
    lines += ["", "![reward histogram](score_histogram.png)",
              "![pseudo-domains](pseudo_domains.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))


MIN_REWARD_R2 = 0.1  # below: psi_div explains little of the held-out entropy


def _probe_lines(m: Mapping[str, Any]) -> list[str]:
    """summary.md's lines on how far the probes can be trusted, with a warning when the
    diversity reward explains little on held-out probe records."""
    nan = float("nan")
    acc, base = m.get("dom_val_accuracy", nan), m.get("dom_val_majority_baseline", nan)
    r2 = m.get("div_val_r2", nan)
    r2 = nan if r2 is None else r2
    lines = [f"- psi_dom (domain probe) validation accuracy on pseudo-labels: {acc:.3f} "
             f"(majority baseline {base:.3f}, {m.get('n_val', '?')} validation records)",
             f"- psi_div (diversity reward) validation R^2: {r2:.3f} (1: the reward predicts the "
             f"entropy target exactly; 0: no better than its mean)"]
    if not r2 >= MIN_REWARD_R2:
        lines.append(f"- **warning**: the diversity reward explains little of the held-out "
                     f"entropy (R^2 {r2:.3f} < {MIN_REWARD_R2}), so the ranking is close to noise; "
                     f"train the probes on more records or epochs (a --quick run is a smoke test)")
        logger.warning(lines[-1][2:].replace("**", ""))
    return lines


def _plot(out: Path, reward: np.ndarray, keep: np.ndarray, predicted: Mapping[str, int],
          selected: Mapping[str, int], names: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(float(reward.min()), float(reward.max()) + 1e-9, 40) if len(reward) else 10
    ax.hist(reward, bins=bins, color="#bbbbbb", label="selection pool")
    ax.hist(reward[keep], bins=bins, color="#d62728", label="selected")
    ax.axvline(math.log(len(names)), color="k", ls="--", lw=1,
               label=f"ln K = {math.log(len(names)):.2f}")
    ax.set_xlabel("predicted entropy (diversity reward, nats)")
    ax.set_ylabel("records")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "score_histogram.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    pool = [predicted[n] for n in names]
    sel = [selected[n] for n in names]
    x = np.arange(len(names))
    ax.bar(x - 0.2, pool, 0.4, label="selection pool", color="#bbbbbb")
    ax.bar(x + 0.2, sel, 0.4, label="selected", color="#d62728")
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("records (predicted pseudo-domain)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pseudo_domains.png", dpi=120)
    plt.close(fig)
