"""One comparison from a pool: held-out evaluation sets, one slice of the rest, and every method's
selection of it at one budget (random sampled here, the others through their Data-Juicer recipe
with ``dj-process``), plus the positive controls when asked."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from loguru import logger

from daar_ops.compare_methods import run_method, write_slice
from daar_ops.core import (EVAL_ONLY_FIELDS, GROUND_TRUTH_DOMAIN_FIELD, budget, default_pool,
                           write_jsonl)
from daar_ops.evaluation.controls import control_selections
from daar_ops.evaluation.runs import FULL, RANDOM, Selection, selection_for_seed, write_json_atomic
from daar_ops.evaluation.split import (held_out_eval_sets, read_records, records_digest,
                                       split_held_out, text_hash, write_eval_sets)
from daar_ops.models import SMOLLM2

MIX_FILE = "domains.json"  # under the selections cache: the ground-truth mix of each selection
ALL_SEEDS = "*"  # the mix key of a selection that is the same for every seed
# name -> recipe, relative to the recipes shipped in the package (daar_ops/recipes, package data);
# "random" is sampled here, seeded per seed.
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
RECIPE_METHODS = {
    "instruction_length": "baselines/instruction_length.yaml",
    "qdit": "baselines/qdit.yaml",
    "ds2": "baselines/ds2.yaml",
    "daar": "sandbox/process_daar.yaml",
    "daar_per_domain": "sandbox/process_daar_per_domain.yaml",
}
DEFAULT_METHODS = (RANDOM, *RECIPE_METHODS)


@dataclass
class Comparison:
    """What :func:`prepare_comparison` built: the inputs of
    :func:`~daar_ops.evaluation.runs.evaluate_selections`."""

    selections: dict[str, Selection]
    eval_sets: dict[str, list[dict[str, Any]]]
    held_hashes: set[str]
    context: dict[str, Any]


@dataclass
class _Slice:
    """The records every method selects from."""

    records: list[dict[str, Any]]  # without the evaluation-only fields
    path: Path  # their JSONL: the recipes' dataset_path
    k: int  # records each method keeps
    train_pool: Path  # the selection pool the slice was drawn from (DaaR's probe trains on it)

    def __post_init__(self) -> None:
        self.digest = records_digest(self.records)  # ties cached selections to this slice
        self.by_hash = {text_hash(r): r for r in self.records}


def ensure_daar_checkpoint(train_pool: Path, out_dir: Path, model: str, probe_size: int,
                           seed: int = 0, progress: bool = True) -> Path:
    """A DaaR probe checkpoint from ``daar-ops select --quick`` on the selection pool (reused)."""
    from daar_ops.pipeline import SelectConfig, run_select

    checkpoint = out_dir / "daar_probe" / "checkpoint"
    if (checkpoint / "manifest.json").exists():
        return checkpoint
    cfg = SelectConfig.quick(pool=str(train_pool), output_dir=str(out_dir / "daar_probe"),
                             model=model, probe_size=probe_size, pool_size=50, seed=seed,
                             progress=progress)
    run_select(cfg)
    return checkpoint


@dataclass(frozen=True)
class _Recipes:
    """How the recipe methods run on the slice (``dj-process`` through
    :func:`daar_ops.compare_methods.run_method`, reused when it already ran on this slice)."""

    out_dir: Path
    ratio: float
    model: str
    daar_checkpoint: str | Path | None
    daar_probe_size: int
    timeout: float | None
    progress: bool

    def select(self, name: str, sl: _Slice) -> tuple[str, list[dict[str, Any]] | None]:
        """(status, the selection without Data-Juicer's fields, or None when it failed)."""
        overrides = self._daar_overrides(sl) if name.startswith("daar") else {}
        res = run_method(name, RECIPES / RECIPE_METHODS[name], sl.path, self.out_dir / "select",
                         self.ratio, len(sl.records), self.timeout, overrides, reuse=True)
        if res["status"] != "ok":
            logger.warning(f"{name}: {res['status']}")
            return res["status"], None
        return res["status"], [{k: v for k, v in r.items() if not k.startswith("__dj__")}
                               for r in read_records(res["export"])]

    def _daar_overrides(self, sl: _Slice) -> dict[str, dict[str, Any]]:
        """The probe checkpoint of both DaaR recipes (their budget, global or per domain, is the
        recipe's ``select_ratio``, which :func:`~daar_ops.compare_methods.derive_recipe` sets)."""
        ckpt = Path(self.daar_checkpoint) if self.daar_checkpoint else ensure_daar_checkpoint(
            sl.train_pool, self.out_dir, self.model, self.daar_probe_size, progress=self.progress)
        return {"diversity_reward_filter": {"checkpoint": str(Path(ckpt).resolve())}}


def prepare_comparison(out_dir: str | Path, pool: str | Path | None = None, n: int = 5000,
                       ratio: float = 0.2, methods: Sequence[str] = DEFAULT_METHODS,
                       seeds: Sequence[int] = (0, 1, 2), slice_seed: int = 0,
                       held_out_fraction: float = 0.05, eval_per_domain: int = 50,
                       model: str = SMOLLM2,
                       daar_checkpoint: str | Path | None = None, daar_probe_size: int = 600,
                       selection_files: Mapping[str, str | Path] | None = None,
                       eval_files: Mapping[str, str | Path] | None = None,
                       timeout: float | None = None, progress: bool = True,
                       controls: bool = False, results_dir: str | Path | None = None,
                       control_seed: int = 0) -> Comparison:
    """Held-out sets, one slice of ``n`` records and each method's selection of it.

    1. held out: pool records with text hash below ``held_out_fraction`` (and every text of
       ``eval_files``); per domain the first ``eval_per_domain`` of them in hash order, unless
       ``eval_files`` ({domain: JSONL}) are given;
    2. the rest, without ``domain``/``source``, is the selection pool; the slice is ``n`` of it
       drawn with ``slice_seed`` (``daar_ops.compare_methods.write_slice``);
    3. each method in ``methods`` selects ``ratio`` of the slice: ``random`` is sampled with each
       seed; the others run their recipe through ``dj-process`` (:data:`RECIPE_METHODS`; DaaR's
       probe checkpoint comes from ``daar_checkpoint`` or ``daar-ops select --quick`` on the
       selection pool); ``full`` is the whole slice. ``selection_files`` add given JSONL files;
    4. with ``controls``, the positive controls' selections (:func:`control_selections`, which
       read the ground-truth ``domain``; no selection method ever does).

    With ``results_dir`` every recipe method's selection is kept there as text hashes
    (``selections/NAME.json``, tied to the slice's digest) and read back on the next call, on
    this machine or another, so no recipe (DS2's LLM ratings, DaaR's probe) runs twice.
    """
    out_dir = Path(out_dir).resolve()  # absolute: the recipes' paths must not depend on the cwd
    out_dir.mkdir(parents=True, exist_ok=True)
    pool = pool or default_pool()
    records = read_records(pool)
    keep, eval_sets, held_hashes = _held_out(records, held_out_fraction, eval_per_domain,
                                             eval_files)
    sl = _draw_slice(records, keep, held_hashes, out_dir, n, slice_seed, ratio)
    recipes = _Recipes(out_dir, ratio, model, daar_checkpoint, daar_probe_size, timeout, progress)
    cache_dir = Path(results_dir) / "selections" if results_dir is not None else None
    selections: dict[str, Selection] = {}
    statuses: dict[str, str] = {}
    for name in methods:
        statuses[name], chosen = _select(name, sl, seeds, recipes, cache_dir)
        if chosen is not None:
            selections[name] = chosen
    for name, path in (selection_files or {}).items():
        selections[name] = read_records(path)
        statuses[name] = f"file {path}"
    write_eval_sets(eval_sets, out_dir / "eval_sets")
    # evaluation only: the ground-truth domains of what each method chose (joined by text hash)
    truth = {text_hash(r): str(r.get(GROUND_TRUTH_DOMAIN_FIELD)) for r in records
             if GROUND_TRUTH_DOMAIN_FIELD in r}
    if controls:
        for name, chosen in control_selections(sl.records, truth, sl.k, control_seed).items():
            selections[name] = chosen
            statuses[name] = "ok (control)"
    mix = selection_mix(selections, truth, seeds)
    if cache_dir is not None:
        _write_mix(cache_dir / MIX_FILE, sl.digest, mix)
    context = {"pool": str(pool), "slice": f"{len(sl.records)} records (seed {slice_seed})",
               "slice_path": str(sl.path),
               "budget": f"{ratio:.0%} = {sl.k} records", "held_out_fraction": held_out_fraction,
               "eval_records": {d: len(r) for d, r in eval_sets.items()},
               "methods": statuses,
               "selection_domains": {name: by_draw.get(str(seeds[0]), by_draw.get(ALL_SEEDS))
                                     for name, by_draw in mix.items()}, "model": model}
    return Comparison(selections, eval_sets, held_hashes, context)


def _held_out(records: Sequence[Mapping[str, Any]], fraction: float, per_domain: int,
              eval_files: Mapping[str, str | Path] | None
              ) -> tuple[list[int], dict[str, list[dict[str, Any]]], set[str]]:
    """(pool indices kept for selection, the evaluation sets, every text never to train on)."""
    keep, held = split_held_out(records, fraction)
    if eval_files:
        eval_sets = {d: read_records(p) for d, p in eval_files.items()}
    else:
        eval_sets = held_out_eval_sets(records, held, per_domain)
    held_hashes = {text_hash(records[i]) for i in held}
    held_hashes |= {text_hash(r) for recs in eval_sets.values() for r in recs}
    return keep, eval_sets, held_hashes


def _draw_slice(records: Sequence[Mapping[str, Any]], keep: Sequence[int], held_hashes: set[str],
                out_dir: Path, n: int, seed: int, ratio: float) -> _Slice:
    """The selection pool (kept records without the evaluation-only fields) written to
    ``out_dir``, and the slice of ``n`` of them drawn with ``seed``."""
    train_pool = out_dir / "selection_pool.jsonl"
    write_jsonl(train_pool, ({k: v for k, v in records[i].items() if k not in EVAL_ONLY_FIELDS}
                             for i in keep if text_hash(records[i]) not in held_hashes))
    select_dir = out_dir / "select"
    select_dir.mkdir(exist_ok=True)
    input_path, _, size = write_slice(train_pool, n, seed, select_dir)
    k = budget(size, ratio=ratio)  # the count every selection method keeps for this ratio
    if k == 0:
        raise ValueError(f"ratio {ratio} of a {size}-record slice keeps no record; raise --n "
                         f"or the ratio")
    return _Slice(read_records(input_path), input_path, k, train_pool)


def _select(name: str, sl: _Slice, seeds: Sequence[int], recipes: _Recipes,
            cache_dir: Path | None) -> tuple[str, Selection | None]:
    """(status, method ``name``'s selection of the slice, or None when it failed)."""
    if name == RANDOM:
        size = len(sl.records)
        return "ok", {s: [sl.records[i] for i in np.sort(
            np.random.default_rng(s).choice(size, sl.k, replace=False))] for s in seeds}
    if name == FULL:
        return "ok", sl.records
    if name not in RECIPE_METHODS:
        raise ValueError(f"unknown method {name!r}; known: {[*DEFAULT_METHODS, FULL]} "
                         "(or pass a selection file)")
    cached = _read_cached_selection(cache_dir, name, sl)
    if cached is not None:
        return "ok (cached)", cached
    status, chosen = recipes.select(name, sl)
    if chosen is not None:
        _write_cached_selection(cache_dir, name, sl.digest, chosen)
    return status, chosen


def selection_mix(selections: Mapping[str, Selection], truth: Mapping[str, str],
                  seeds: Sequence[int]) -> dict[str, dict[str, dict[str, int]]]:
    """Evaluation only: per selection, how many records of each ground-truth domain it holds,
    keyed by seed for a per-seed draw (``random``) and by :data:`ALL_SEEDS` for a fixed one."""
    mix: dict[str, dict[str, dict[str, int]]] = {}
    for name, sel in selections.items():
        draws = ({str(s): sel[s] for s in seeds if s in sel} if isinstance(sel, Mapping)
                 else {ALL_SEEDS: sel})
        mix[name] = {}
        for key, records in draws.items():
            counts: dict[str, int] = {}
            for rec in records:
                domain = truth.get(text_hash(rec), "unknown")
                counts[domain] = counts.get(domain, 0) + 1
            mix[name][key] = dict(sorted(counts.items()))
    return mix


def _write_mix(path: Path, slice_digest: str,
               mix: Mapping[str, Mapping[str, Mapping[str, int]]]) -> None:
    """Merge ``mix`` into ``path`` (``selections/domains.json``, read by the report); a file of
    another slice is replaced."""
    payload: dict[str, Any] = {"slice": slice_digest, "mix": {}}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("slice") == slice_digest:
            payload["mix"] = old.get("mix", {})
    for name, by_draw in mix.items():
        payload["mix"][name] = {**payload["mix"].get(name, {}), **by_draw}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, payload)


def _read_cached_selection(cache_dir: Path | None, name: str,
                           sl: _Slice) -> list[dict[str, Any]] | None:
    if cache_dir is None or not (cache_dir / f"{name}.json").exists():
        return None
    payload = json.loads((cache_dir / f"{name}.json").read_text())
    if payload.get("slice") != sl.digest or not all(h in sl.by_hash for h in payload["hashes"]):
        logger.warning(f"{name}: the cached selection belongs to another slice; selecting again")
        return None
    return [dict(sl.by_hash[h]) for h in payload["hashes"]]


def _write_cached_selection(cache_dir: Path | None, name: str, slice_digest: str,
                            records: Sequence[Mapping[str, Any]]) -> None:
    if cache_dir is None:
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cache_dir / f"{name}.json", {
        "slice": slice_digest, "n": len(records), "hashes": [text_hash(r) for r in records]})
