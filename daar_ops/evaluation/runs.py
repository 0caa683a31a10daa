"""Every selection x seed, resumable: one fine-tune and one held-out scoring per run, each written
to a small ``runs/METHOD/seed-S/result.json`` keyed by the run's fingerprint.

A run's identity is :func:`run_fingerprint` (model content hash, settings and what "auto" resolved
to here, seed, selection and evaluation-set digests); a finished run whose fingerprint matches is
read back, never trained again, so an interrupted measurement, or another machine with the
committed files, continues. :func:`comparison_key` groups the runs that may be compared.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from loguru import logger

from daar_ops.causal_lm import load_causal_lm
from daar_ops.core import resolve_device
from daar_ops.evaluation.finetune import (RESPONSE_ONLY, TrainSettings, fine_tune,
                                          resolve_finetune, resolved_settings, use_bf16,
                                          weights_dtype)
from daar_ops.evaluation.scoring import held_out_loss
from daar_ops.evaluation.split import (drop_held_out, eval_sets_digest, records_digest,
                                       text_hash)
from daar_ops.models import SMOLLM2

RANDOM = "random"
BASE = "base"  # the base model before fine-tuning, for reference
FULL = "full"  # the whole slice: the upper reference (budget 100%)

# A selection is either one list of records (a deterministic method: the same for every seed) or
# {seed: records} (a method whose selection itself depends on the seed, e.g. random).
Selection = Sequence[Mapping[str, Any]] | Mapping[int, Sequence[Mapping[str, Any]]]


def selection_for_seed(selection: Selection, seed: int) -> Sequence[Mapping[str, Any]]:
    """The records ``selection`` trains on with ``seed``."""
    if isinstance(selection, Mapping):
        if seed not in selection:
            raise KeyError(f"selection has no records for seed {seed}")
        return selection[seed]
    return selection


def seeded_order(records: Sequence[Mapping[str, Any]], seed: int) -> list[Mapping[str, Any]]:
    """The records in an order fixed by (seed, text): the same data order for every method."""
    key = lambda r: hashlib.sha256(f"{seed}\x1f{text_hash(r)}".encode()).hexdigest()  # noqa: E731
    return sorted(records, key=key)


def run_fingerprint(model_id: str, settings: TrainSettings, resolved: Mapping[str, Any],
                    seed: int | None, records: Sequence[Mapping[str, Any]],
                    eval_digest: str) -> str:
    """The identity of one run: a finished run is reused only when this matches."""
    return hashlib.sha256(json.dumps(
        {"model": model_id, "settings": settings.to_dict(), "resolved": resolved,
         "seed": seed, "selection": records_digest(records), "eval": eval_digest},
        sort_keys=True).encode()).hexdigest()


def comparison_key(model_id: str, settings: TrainSettings, resolved: Mapping[str, Any],
                   eval_digest: str) -> str:
    """Runs are compared only with runs of the same key: same model, settings, resolved
    precision / fine-tuning mode and evaluation set."""
    return hashlib.sha256(json.dumps(
        {"model": model_id, "settings": settings.to_dict(), "resolved": dict(resolved),
         "eval": eval_digest}, sort_keys=True).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, payload: Any) -> None:
    """``payload`` as indented JSON, written to a temporary file and renamed into place."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def evaluate_selections(selections: Mapping[str, Selection],
                        eval_sets: Mapping[str, Sequence[Mapping[str, Any]]],
                        out_dir: str | Path, model: str = SMOLLM2,
                        seeds: Sequence[int] = (0, 1, 2), settings: TrainSettings | None = None,
                        device: str = "cpu", held_hashes: set[str] | None = None,
                        include_base: bool = True, resume: bool = True, progress: bool = True,
                        keep_adapters: bool = False, results_dir: str | Path | None = None,
                        on_result: Callable[[Path, dict], Any] | None = None
                        ) -> list[dict[str, Any]]:
    """Fine-tune ``model`` on every selection with every seed and measure the held-out loss.

    Each (method, seed) writes ``RESULTS/runs/METHOD/seed-S/result.json`` (``RESULTS`` =
    ``results_dir``, default ``out_dir``: small files meant to be committed; adapters and trainer
    logs stay under ``out_dir``); with ``resume`` a result whose :func:`run_fingerprint` matches
    is read back instead of training again, so a killed run - or a new machine with the committed
    files - keeps its finished runs. Records whose text is in ``held_hashes`` are removed from
    every selection first. ``on_result(path, result)`` is called after each new result file.
    Returns the results.
    """
    from tqdm.auto import tqdm

    from daar_ops.models import model_fingerprint, resolve_model_path

    settings = settings or TrainSettings()
    device = resolve_device(device)
    out_dir = Path(out_dir)
    results_dir = Path(results_dir) if results_dir is not None else out_dir
    eval_digest = eval_sets_digest(eval_sets)
    model_id = model_fingerprint(resolve_model_path(model))
    resolved = resolved_settings(settings, model, device)
    identity = dict(model_id=model_id, eval_digest=eval_digest, settings=settings.to_dict(),
                    resolved=resolved,
                    config_key=comparison_key(model_id, settings, resolved, eval_digest))
    jobs = [(BASE, None)] if include_base else []
    jobs += [(name, seed) for name in selections for seed in seeds]
    results = []
    bar = tqdm(jobs, desc="fine-tune + evaluate", disable=not progress)
    for name, seed in bar:
        bar.set_postfix_str(f"{name} seed {seed}")
        records = _training_records(selections, name, seed, held_hashes)
        fingerprint = run_fingerprint(model_id, settings, resolved, seed, records, eval_digest)
        run_name = "base" if seed is None else f"seed-{seed}"
        result_file = results_dir / "runs" / name / run_name / "result.json"
        previous = _finished(result_file, fingerprint) if resume else None
        if previous is not None:
            results.append(previous)
            continue
        run_dir = out_dir / "runs" / name / run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        result = _run_one(name, seed, records, eval_sets, model, settings, device, run_dir,
                          progress, keep_adapters)
        result.update(fingerprint=fingerprint, **identity)
        result_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(result_file, result)
        if on_result is not None:
            on_result(result_file, result)
        results.append(result)
    return results


def _training_records(selections: Mapping[str, Selection], name: str, seed: int | None,
                      held_hashes: set[str] | None) -> Sequence[Mapping[str, Any]]:
    """What run (``name``, ``seed``) trains on: nothing for the untuned model, else the
    selection for the seed without held-out texts."""
    if name == BASE:
        return []
    records = selection_for_seed(selections[name], seed)
    if held_hashes:
        records, dropped = drop_held_out(records, held_hashes)
        if dropped:
            logger.warning(f"{name}: dropped {dropped} held-out records from the selection")
    return records


def _finished(result_file: Path, fingerprint: str) -> dict[str, Any] | None:
    """The finished run in ``result_file`` when its fingerprint is ``fingerprint``."""
    if not result_file.exists():
        return None
    previous = json.loads(result_file.read_text())
    return previous if previous.get("fingerprint") == fingerprint else None


def _run_one(name, seed, records, eval_sets, model, settings, device, run_dir, progress,
             keep_adapters) -> dict[str, Any]:
    bf16 = use_bf16(settings, device)
    result: dict[str, Any] = {"method": name, "seed": seed, "n_selected": len(records)}
    if name == BASE:
        lora = resolve_finetune(settings, model, device) == "lora"
        lm, tokenizer = load_causal_lm(
            model, device, weights_dtype(device) if bf16 and lora else "float32",
            chat_template_for=RESPONSE_ONLY)
    else:
        tuned = fine_tune(model, seeded_order(records, seed), settings, seed, run_dir, device,
                          progress, adapter_dir=run_dir / "adapter" if keep_adapters else None)
        lm, tokenizer = tuned.model, tuned.tokenizer
        result.update(train_loss=tuned.train_loss, steps=tuned.steps,
                      train_examples=tuned.train_examples, train_tokens=tuned.train_tokens,
                      train_answer_tokens=tuned.answer_tokens, train_seconds=tuned.seconds,
                      train_tokens_per_second=tuned.tokens_per_second,
                      finetune=tuned.finetune)
    start = time.perf_counter()
    losses = held_out_loss(lm, tokenizer, eval_sets, settings.eval_length,
                           settings.eval_batch_size, bf16=bf16, progress=progress,
                           per_record=True)
    result.update(eval_seconds=time.perf_counter() - start, losses=losses,
                  avg_loss=float(np.mean([v["loss"] for v in losses.values()])),
                  avg_final_loss=float(np.mean([v["final_loss"] for v in losses.values()])),
                  bf16=bf16)
    logger.info(f"{name} seed {seed}: avg held-out loss {result['avg_loss']:.4f} "
                "(" + ", ".join(f"{d} {v['loss']:.3f}" for d, v in losses.items()) + ")")
    return result
