"""This package's train / evaluate hooks for Data-Juicer's sandbox (data-model co-development).

The sandbox (``datajuicer/data-juicer-sandbox``, not on PyPI; see docs/sandbox.md) builds its hooks
from a hard-coded dict, ``data_juicer_sandbox.hooks.HOOK_MAPPING``; its own ``TrainModelHook`` knows
only ModelScope / EasyAnimate / Trinity / InternVL trainers. :func:`register_hooks` adds:

- ``DaarPrepareHook`` (a probe job): held-out sets by text hash and one slice of the pool
  (:func:`daar_ops.evaluation.prepare_comparison`), plus DaaR's probe checkpoint when asked.
  Outputs: the slice path, the folder of per-domain evaluation files, the checkpoint path.
- ``DaarTrainModelHook``: LoRA fine-tuning on a processed dataset for each seed
  (:func:`daar_ops.evaluation.fine_tune`). Output: the adapter folders.
- ``DaarEvaluateModelHook``: held-out loss per domain of each adapter
  (:func:`daar_ops.evaluation.held_out_loss`); writes ``runs/METHOD/seed-S/result.json`` the way
  ``daar-ops evaluate`` does. Outputs: the average loss over seeds, the per-domain losses.
- ``DaarSummaryHook``: the table, JSON, bar chart and summary.md over every method's results
  (:func:`daar_ops.evaluation.write_outputs`). Outputs: the best method, the summary path.

Options come from each job's ``extra_configs``; the selection itself is Data-Juicer's own
``ProcessDataHook`` with a recipe of ``recipes/sandbox/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_juicer_sandbox import hooks as sandbox_hooks
from jsonargparse import Namespace, namespace_to_dict
from loguru import logger

from daar_ops import evaluation as ev
from daar_ops.core import default_pool, resolve_device
from daar_ops.models import SMOLLM2


def _options(extra: Any) -> dict[str, Any]:
    if extra is None:
        return {}
    if isinstance(extra, Namespace):
        return namespace_to_dict(extra)
    return dict(extra)


def _settings(opts: dict[str, Any]) -> ev.TrainSettings:
    return ev.TrainSettings(**(opts.get("settings") or {}))


class DaarPrepareHook(sandbox_hooks.BaseHook):
    """extra_configs: work_dir, pool, n, slice_seed, held_out_fraction, eval_per_domain,
    daar_probe (bool: also build DaaR's probe checkpoint), model, daar_probe_size."""

    def hook(self, **kwargs):
        opts = _options(self.extra_cfg)
        work_dir = Path(opts.get("work_dir", "outputs/sandbox"))
        comparison = ev.prepare_comparison(
            work_dir, pool=opts.get("pool") or default_pool(), n=int(opts.get("n", 250)),
            methods=[], slice_seed=int(opts.get("slice_seed", 0)),
            held_out_fraction=float(opts.get("held_out_fraction", 0.05)),
            eval_per_domain=int(opts.get("eval_per_domain", 12)),
            model=opts.get("model", SMOLLM2), progress=False)
        checkpoint = ""
        if opts.get("daar_probe"):
            checkpoint = str(ev.ensure_daar_checkpoint(
                work_dir / "selection_pool.jsonl", work_dir,
                opts.get("model", SMOLLM2),
                int(opts.get("daar_probe_size", 600)), progress=False))
        self.watcher.watch(comparison.context["eval_records"], self.meta_name)
        return comparison.context["slice_path"], str(work_dir / "eval_sets"), checkpoint


def _held_hashes(work_dir: Path) -> set[str]:
    """Texts never to train on: every evaluation record (the slice excludes the rest already)."""
    eval_dir = work_dir / "eval_sets"
    if not eval_dir.exists():
        return set()
    return {ev.text_hash(r) for recs in ev.read_eval_sets(eval_dir).values() for r in recs}


class DaarTrainModelHook(sandbox_hooks.BaseHook):
    """extra_configs: train_dataset (a processed JSONL), method, model, seeds, work_dir, device,
    settings (TrainSettings fields)."""

    def hook(self, **kwargs):
        opts = _options(self.extra_cfg)
        work_dir = Path(opts.get("work_dir", "outputs/sandbox"))
        method = opts["method"]
        model = opts.get("model", SMOLLM2)
        settings = _settings(opts)
        records = [{k: v for k, v in r.items() if not k.startswith("__dj__")}
                   for r in ev.read_records(opts["train_dataset"])]
        records, dropped = ev.drop_held_out(records, _held_hashes(work_dir))
        if dropped:
            logger.warning(f"{method}: dropped {dropped} evaluation records from the training data")
        adapters = []
        for seed in opts.get("seeds", [0]):
            run_dir = work_dir / "runs" / method / f"seed-{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            tuned = ev.fine_tune(model, ev.seeded_order(records, int(seed)), settings, int(seed),
                                 run_dir, opts.get("device", "cpu"), progress=False,
                                 adapter_dir=run_dir / "adapter")
            ev.write_json_atomic(run_dir / "train.json", {
                "method": method, "seed": int(seed), "n_selected": len(records),
                "train_loss": tuned.train_loss, "steps": tuned.steps,
                "train_tokens": tuned.train_tokens, "train_seconds": tuned.seconds,
                "settings": settings.to_dict()})
            adapters.append(str(run_dir / "adapter"))
        return [adapters]


class DaarEvaluateModelHook(sandbox_hooks.BaseHook):
    """extra_configs: adapters (from DaarTrainModelHook), method, model, work_dir, device,
    settings (max_length, eval_batch_size are used)."""

    def hook(self, **kwargs):
        opts = _options(self.extra_cfg)
        work_dir = Path(opts.get("work_dir", "outputs/sandbox"))
        method, model = opts["method"], opts.get("model", SMOLLM2)
        settings = _settings(opts)
        eval_sets = ev.read_eval_sets(work_dir / "eval_sets")
        device = resolve_device(opts.get("device", "cpu"))
        per_seed = []
        for adapter in opts["adapters"]:
            run_dir = Path(adapter).parent
            lm, tokenizer = ev.load_tuned(model, adapter, device)
            losses = ev.held_out_loss(lm, tokenizer, eval_sets, settings.max_length,
                                      settings.eval_batch_size, bf16=ev.use_bf16(settings, device))
            train = json.loads((run_dir / "train.json").read_text())
            result = {**train, "losses": losses,
                      "avg_loss": float(sum(v["loss"] for v in losses.values()) / len(losses))}
            ev.write_json_atomic(run_dir / "result.json", result)
            per_seed.append(result)
        avg = sum(r["avg_loss"] for r in per_seed) / len(per_seed)
        domains = {d: sum(r["losses"][d]["loss"] for r in per_seed) / len(per_seed)
                   for d in eval_sets}
        # the watcher's keys are not per pipeline: prefix the method
        self.watcher.watch({"avg_loss": avg, **domains}, f"{method}.{self.meta_name}")
        return avg, domains


class DaarSummaryHook(sandbox_hooks.BaseHook):
    """extra_configs: work_dir. Aggregates every runs/*/seed-*/result.json."""

    def hook(self, **kwargs):
        opts = _options(self.extra_cfg)
        work_dir = Path(opts.get("work_dir", "outputs/sandbox"))
        results = [json.loads(p.read_text())
                   for p in sorted(work_dir.glob("runs/*/seed-*/result.json"))]
        if not results:
            raise FileNotFoundError(f"no result.json under {work_dir}/runs")
        summary = ev.write_outputs(results, work_dir / "summary",
                                   {"source": "data-juicer sandbox", "work_dir": str(work_dir)})
        self.watcher.watch({r["method"]: r["avg_loss"] for r in summary["rows"]}, self.meta_name)
        return summary["best_method"], str(work_dir / "summary" / "summary.md")


HOOKS = {cls.__name__: cls for cls in (DaarPrepareHook, DaarTrainModelHook,
                                       DaarEvaluateModelHook, DaarSummaryHook)}


def register_hooks() -> dict[str, type]:
    """Add this package's hooks to the sandbox's HOOK_MAPPING (idempotent); returns them."""
    sandbox_hooks.HOOK_MAPPING.update(HOOKS)
    return HOOKS
