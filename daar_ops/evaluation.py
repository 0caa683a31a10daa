"""Judge a selection by the model fine-tuned on it: LoRA fine-tuning + per-domain held-out loss.

The loop behind ``daar-ops evaluate``, ``tools/eval_downstream.py`` and the sandbox hooks:

1. :func:`split_held_out`: pool records whose text hash falls below ``fraction`` are held out. The
   hash depends on the text only, so the split is the same for every method, every slice and every
   order of the pool, and :func:`drop_held_out` can strip held-out texts from any selection.
2. :func:`fine_tune`: the same base model, LoRA (``peft``) and ``transformers.Trainer`` settings and
   seed for every selection; the model's chat template renders (user: instruction + input,
   assistant: output) and only the assistant tokens carry loss.
3. :func:`held_out_loss`: mean negative log-likelihood per answer token on each domain's held-out
   records (the evaluation may read the ground-truth ``domain``; selection never does).
4. :func:`evaluate_selections`: every method x seed, resumable (a finished run's ``result.json`` is
   reused), then :func:`summarize` (method x domain table, delta vs random with a 95% t-interval
   over seeds, paired by seed), :func:`write_outputs` (JSON, CSV, Markdown, bar chart).
5. :func:`run_lm_eval`: optional benchmark accuracy through ``lm-eval`` (``pip install
   'daar-ops[lm-eval]'``), meant for GPU users.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from loguru import logger

from daar_ops.text import to_text

TEXT_FIELDS = ("instruction", "input", "output")


def text_hash(record: Mapping[str, Any], fields: Sequence[str] = TEXT_FIELDS) -> str:
    """sha256 of the record's text fields (unit-separator joined): the identity used by the split."""
    joined = "\x1f".join(to_text(record.get(f)).strip() for f in fields)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()


def is_held_out(digest: str, fraction: float) -> bool:
    """A text is held out when the first 64 bits of its hash, read as a fraction, are < fraction."""
    return int(digest[:16], 16) / 2.0 ** 64 < fraction


def split_held_out(records: Sequence[Mapping[str, Any]], fraction: float,
                   fields: Sequence[str] = TEXT_FIELDS) -> tuple[list[int], list[int]]:
    """(indices kept for selection, held-out indices), both in pool order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    keep, held = [], []
    for i, rec in enumerate(records):
        (held if is_held_out(text_hash(rec, fields), fraction) else keep).append(i)
    return keep, held


def drop_held_out(selection: Iterable[Mapping[str, Any]], held_hashes: set[str],
                  fields: Sequence[str] = TEXT_FIELDS) -> tuple[list[Mapping[str, Any]], int]:
    """(the selection without any record whose text is held out, how many were dropped)."""
    kept, dropped = [], 0
    for rec in selection:
        if text_hash(rec, fields) in held_hashes:
            dropped += 1
        else:
            kept.append(rec)
    return kept, dropped


# --------------------------------------------------------------------------------------------
# Chat-template examples with the loss on the answer only


def chat_messages(record: Mapping[str, Any]) -> tuple[list[dict[str, str]], str]:
    """(the user turn: instruction, then input if any; the assistant answer: output)."""
    instruction = to_text(record.get("instruction")).strip()
    extra = to_text(record.get("input")).strip()
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": user}], to_text(record.get("output")).strip()


def encode_example(tokenizer, record: Mapping[str, Any], max_length: int) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (-100 on every prompt token) of one record.

    The prompt is the chat template up to and including the assistant header (generation prompt);
    the answer is what the full conversation adds after it. Long examples keep the end of the
    prompt (the assistant header and the end of the question) and the start of the answer, with
    the prompt never cut below half of ``max_length`` when the answer is long.
    """
    messages, answer = chat_messages(record)
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template does not render the conversation as prompt + answer; "
                         "response-only loss needs a template whose generation prompt is a prefix")
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    if len(prompt) + len(response) > max_length:
        keep_prompt = min(len(prompt), max(max_length - len(response), max_length // 2))
        prompt = prompt[len(prompt) - keep_prompt:]
        response = response[:max_length - keep_prompt]
    return {"input_ids": prompt + response, "labels": [-100] * len(prompt) + response}


def encode_records(tokenizer, records: Iterable[Mapping[str, Any]],
                   max_length: int) -> list[dict[str, list[int]]]:
    """Encoded examples; records whose answer is empty after truncation are left out."""
    out = []
    for rec in records:
        ex = encode_example(tokenizer, rec, max_length)
        if any(t != -100 for t in ex["labels"]):
            out.append(ex)
    return out


def _pad_batch(examples: Sequence[Mapping[str, list[int]]], pad_id: int):
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# --------------------------------------------------------------------------------------------
# Fine-tuning (LoRA via peft, transformers.Trainer) and the held-out loss


@dataclass(frozen=True)
class TrainSettings:
    """Identical for every selection of one comparison; part of each run's fingerprint.

    Defaults are sized for SmolLM2-135M on a CPU; ``gpu_paper()`` is the 7B LoRA setting.
    """

    max_length: int = 256  # tokens per example (prompt + answer)
    epochs: float = 1.0
    max_steps: int = -1  # > 0 caps the optimizer steps (overrides epochs)
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_fraction: float = 0.05
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"  # peft's shorthand: every linear layer but the LM head
    # > 0: adapters only on the top N decoder layers. Autograd then stops N layers down, which
    # saves most of the backward pass (the CPU preset); 0: every layer (the usual LoRA).
    lora_top_layers: int = 0
    bf16: str = "auto"  # "auto": where the device has native bf16; "yes" / "no"
    eval_batch_size: int = 8

    @classmethod
    def gpu_paper(cls, **overrides: Any) -> "TrainSettings":
        """DaaR's fine-tuning scale on a GPU: 3 epochs, lr 1e-4, LoRA r 64, 1,024 tokens."""
        base = dict(max_length=1024, epochs=3.0, batch_size=16, lr=1e-4, lora_r=64,
                    lora_alpha=128, eval_batch_size=16)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bf16_supported(device: str) -> bool:
    """Native bf16 (:func:`daar_ops.core.native_bf16`)."""
    from daar_ops.core import native_bf16

    return native_bf16(device)


def use_bf16(settings: TrainSettings, device: str) -> bool:
    if settings.bf16 not in ("auto", "yes", "no"):
        raise ValueError(f"bf16 must be auto, yes or no, got {settings.bf16!r}")
    return settings.bf16 == "yes" or (settings.bf16 == "auto" and bf16_supported(device))


def resolve_eval_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_base_model(model: str, device: str = "cpu", dtype: Any = None):
    """(model on ``device``, fp32 unless ``dtype``; tokenizer with a pad token).

    ``model``: a short name, local folder or hub id (nothing is downloaded when offline).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from daar_ops.models import resolve_model_path

    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model} has no chat template; response-only training needs one")
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).to(device)
    return lm, tokenizer


@dataclass
class FineTuneResult:
    model: Any  # the peft model (base + trained adapter)
    train_loss: float
    steps: int
    train_examples: int
    train_tokens: int
    answer_tokens: int
    seconds: float
    tokens_per_second: float


def fine_tune(model: str, records: Sequence[Mapping[str, Any]], settings: TrainSettings,
              seed: int, work_dir: str | Path, device: str = "cpu", progress: bool = True,
              adapter_dir: str | Path | None = None) -> FineTuneResult:
    """LoRA fine-tuning of ``model`` on ``records`` with ``transformers.Trainer``.

    The seed fixes the LoRA initialisation, dropout and data order. With ``adapter_dir`` the
    adapter is saved there (for lm-eval or reuse); otherwise nothing is written but logs.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    device = resolve_eval_device(device)
    set_seed(seed)
    # On a GPU with bf16 the frozen base weights are stored in bf16 (a 7B model in fp32 would
    # need 28 GB); the LoRA weights peft adds stay fp32. CPUs keep fp32 weights (autocast only).
    bf16 = use_bf16(settings, device)
    base, tokenizer = load_base_model(
        model, device, torch.bfloat16 if bf16 and device.startswith("cuda") else None)
    examples = encode_records(tokenizer, records, settings.max_length)
    if not examples:
        raise ValueError("no training example has answer tokens")
    set_seed(seed)
    n_layers = int(base.config.num_hidden_layers)
    layers = (list(range(max(0, n_layers - settings.lora_top_layers), n_layers))
              if settings.lora_top_layers > 0 else None)
    targets: Any = settings.lora_targets
    if layers is not None and targets == "all-linear":
        # peft takes layers_to_transform only with a list of module names: the linear layers'.
        targets = sorted({name.rsplit(".", 1)[-1] for name, module in base.named_modules()
                          if isinstance(module, torch.nn.Linear) and ".layers." in name})
    lm = get_peft_model(base, LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=targets, layers_to_transform=layers, task_type="CAUSAL_LM"))
    per_step = settings.batch_size * settings.grad_accum
    steps = (settings.max_steps if settings.max_steps > 0
             else max(1, math.ceil(len(examples) / per_step * settings.epochs)))
    pad_id = tokenizer.pad_token_id
    args = TrainingArguments(
        output_dir=str(Path(work_dir) / "trainer"), per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum, max_steps=steps,
        learning_rate=settings.lr, lr_scheduler_type=settings.scheduler,
        warmup_steps=int(round(settings.warmup_fraction * steps)),
        weight_decay=settings.weight_decay, logging_steps=max(1, steps // 10),
        save_strategy="no", report_to="none", seed=seed, data_seed=seed,
        bf16=bf16, use_cpu=device == "cpu", dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=not progress, optim="adamw_torch")
    trainer = Trainer(model=lm, args=args, train_dataset=examples,
                      data_collator=lambda batch: _pad_batch(batch, pad_id))
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    seen = min(len(examples), steps * per_step)  # examples the first pass covered
    tokens_per_epoch = sum(len(e["input_ids"]) for e in examples)
    trained_tokens = tokens_per_epoch * (steps * per_step) / len(examples)
    if adapter_dir is not None:
        lm.save_pretrained(str(adapter_dir))
    lm.eval()
    del trainer
    torch.set_grad_enabled(True)
    return FineTuneResult(
        model=lm, train_loss=float(output.training_loss), steps=steps, train_examples=seen,
        train_tokens=int(trained_tokens),
        answer_tokens=sum(sum(t != -100 for t in e["labels"]) for e in examples),
        seconds=seconds, tokens_per_second=trained_tokens / max(seconds, 1e-9))


def _weights_dtype(device: str):
    import torch

    return torch.bfloat16 if device.startswith("cuda") and bf16_supported(device) else None


def load_tuned(model: str, adapter_dir: str | Path | None, device: str = "cpu"):
    """(base model + the saved LoRA adapter, tokenizer); no adapter: the base model."""
    device = resolve_eval_device(device)
    lm, tokenizer = load_base_model(model, device, _weights_dtype(device))
    if adapter_dir is not None:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(adapter_dir))
    lm.eval()
    return lm, tokenizer


def held_out_loss(lm, tokenizer, eval_sets: Mapping[str, Sequence[Mapping[str, Any]]],
                  max_length: int, batch_size: int = 8, bf16: bool = False,
                  progress: bool = False) -> dict[str, dict[str, float]]:
    """Per domain: mean negative log-likelihood (nats) per answer token, records and tokens."""
    import torch
    from tqdm.auto import tqdm

    device = next(lm.parameters()).device
    out = {}
    lm.eval()
    for domain, records in eval_sets.items():
        examples = sorted(encode_records(tokenizer, records, max_length),
                          key=lambda e: len(e["input_ids"]))
        total, count = 0.0, 0
        batches = range(0, len(examples), batch_size)
        for start in tqdm(batches, desc=f"eval {domain}", disable=not progress, leave=False):
            batch = _pad_batch(examples[start:start + batch_size], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                 enabled=bf16):
                logits = lm(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits
            shifted = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                ignore_index=-100, reduction="sum")
            total += float(nll)
            count += int((shifted != -100).sum())
        out[domain] = {"loss": total / max(count, 1), "n_records": len(examples),
                       "n_tokens": count}
    return out


# --------------------------------------------------------------------------------------------
# Every method x seed, resumable; the summary table


RANDOM = "random"
BASE = "base"  # the base model before fine-tuning, for reference

# A selection is either one list of records (a deterministic method: the same for every seed) or
# {seed: records} (a method whose selection itself depends on the seed, e.g. random).
Selection = Sequence[Mapping[str, Any]] | Mapping[int, Sequence[Mapping[str, Any]]]


def records_digest(records: Iterable[Mapping[str, Any]]) -> str:
    """Order-independent digest of a set of records' texts (for run fingerprints)."""
    digests = sorted(text_hash(r) for r in records)
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def selection_for_seed(selection: Selection, seed: int) -> Sequence[Mapping[str, Any]]:
    if isinstance(selection, Mapping):
        if seed not in selection:
            raise KeyError(f"selection has no records for seed {seed}")
        return selection[seed]
    return selection


def seeded_order(records: Sequence[Mapping[str, Any]], seed: int) -> list[Mapping[str, Any]]:
    """The records in an order fixed by (seed, text): the same data order for every method."""
    key = lambda r: hashlib.sha256(f"{seed}\x1f{text_hash(r)}".encode()).hexdigest()  # noqa: E731
    return sorted(records, key=key)


def evaluate_selections(selections: Mapping[str, Selection],
                        eval_sets: Mapping[str, Sequence[Mapping[str, Any]]],
                        out_dir: str | Path, model: str = "smollm2-135m-instruct",
                        seeds: Sequence[int] = (0, 1, 2), settings: TrainSettings | None = None,
                        device: str = "cpu", held_hashes: set[str] | None = None,
                        include_base: bool = True, resume: bool = True, progress: bool = True,
                        keep_adapters: bool = False) -> list[dict[str, Any]]:
    """Fine-tune ``model`` on every selection with every seed and measure the held-out loss.

    Each (method, seed) writes ``out_dir/runs/METHOD/seed-S/result.json``; with ``resume`` a
    result whose fingerprint (model, settings, selection, eval sets, seed) matches is read back
    instead of training again, so a killed run keeps its finished methods. Records whose text is
    in ``held_hashes`` are removed from every selection first. Returns the run results.
    """
    from tqdm.auto import tqdm

    settings = settings or TrainSettings()
    device = resolve_eval_device(device)
    out_dir = Path(out_dir)
    eval_digest = hashlib.sha256("".join(
        f"{d}:{records_digest(r)}" for d, r in sorted(eval_sets.items())).encode()).hexdigest()
    from daar_ops.models import model_fingerprint, resolve_model_path

    model_id = model_fingerprint(resolve_model_path(model))
    jobs = [(BASE, None)] if include_base else []
    jobs += [(name, seed) for name in selections for seed in seeds]
    results = []
    bar = tqdm(jobs, desc="fine-tune + evaluate", disable=not progress)
    for name, seed in bar:
        bar.set_postfix_str(f"{name} seed {seed}")
        if name == BASE:
            records: Sequence[Mapping[str, Any]] = []
        else:
            records = selection_for_seed(selections[name], seed)
            if held_hashes:
                records, dropped = drop_held_out(records, held_hashes)
                if dropped:
                    logger.warning(f"{name}: dropped {dropped} held-out records from the selection")
        fingerprint = hashlib.sha256(json.dumps(
            {"model": model_id, "settings": settings.to_dict(), "seed": seed,
             "selection": records_digest(records), "eval": eval_digest},
            sort_keys=True).encode()).hexdigest()
        run_dir = out_dir / "runs" / name / ("base" if seed is None else f"seed-{seed}")
        result_file = run_dir / "result.json"
        if resume and result_file.exists():
            previous = json.loads(result_file.read_text())
            if previous.get("fingerprint") == fingerprint:
                results.append(previous)
                continue
        run_dir.mkdir(parents=True, exist_ok=True)
        result = _run_one(name, seed, records, eval_sets, model, settings, device, run_dir,
                          progress, keep_adapters)
        result["fingerprint"] = fingerprint
        write_json_atomic(result_file, result)
        results.append(result)
    return results


def _run_one(name, seed, records, eval_sets, model, settings, device, run_dir, progress,
             keep_adapters) -> dict[str, Any]:
    bf16 = use_bf16(settings, device)
    result: dict[str, Any] = {"method": name, "seed": seed, "n_selected": len(records)}
    if name == BASE:
        lm, tokenizer = load_base_model(model, device, _weights_dtype(device) if bf16 else None)
    else:
        tuned = fine_tune(model, seeded_order(records, seed), settings, seed, run_dir, device,
                          progress, adapter_dir=run_dir / "adapter" if keep_adapters else None)
        lm = tuned.model
        from transformers import AutoTokenizer

        from daar_ops.models import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        result.update(train_loss=tuned.train_loss, steps=tuned.steps,
                      train_examples=tuned.train_examples, train_tokens=tuned.train_tokens,
                      train_answer_tokens=tuned.answer_tokens, train_seconds=tuned.seconds,
                      train_tokens_per_second=tuned.tokens_per_second)
    start = time.perf_counter()
    losses = held_out_loss(lm, tokenizer, eval_sets, settings.max_length,
                           settings.eval_batch_size, bf16=bf16, progress=progress)
    result.update(eval_seconds=time.perf_counter() - start, losses=losses,
                  avg_loss=float(np.mean([v["loss"] for v in losses.values()])), bf16=bf16)
    logger.info(f"{name} seed {seed}: avg held-out loss {result['avg_loss']:.4f} "
                "(" + ", ".join(f"{d} {v['loss']:.3f}" for d, v in losses.items()) + ")")
    return result


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t interval); half-width nan for fewer than 2 values."""
    from scipy import stats

    arr = np.asarray(values, dtype=float)
    if arr.size < 2:
        return float(arr.mean()) if arr.size else float("nan"), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, arr.size - 1) * arr.std(ddof=1) / np.sqrt(arr.size)
    return float(arr.mean()), float(half)


def summarize(results: Sequence[Mapping[str, Any]], reference: str = RANDOM) -> dict[str, Any]:
    """Per method: per-domain and average loss (mean, std over seeds), delta vs ``reference``.

    The delta is paired by seed (method seed s minus reference seed s, the same data order and
    LoRA initialisation) and carries a 95% t-interval over seeds; ``outside_spread`` is true when
    that interval excludes 0.
    """
    by_method: dict[str, dict[Any, Mapping[str, Any]]] = {}
    for r in results:
        by_method.setdefault(r["method"], {})[r["seed"]] = r
    domains = sorted({d for r in results for d in r["losses"]})
    ref = by_method.get(reference, {})
    rows = []
    for method, runs in by_method.items():
        seeds = sorted(runs, key=lambda s: -1 if s is None else s)
        row: dict[str, Any] = {"method": method, "seeds": [s for s in seeds if s is not None],
                               "n_selected": runs[seeds[0]]["n_selected"]}
        for d in domains:
            vals = [runs[s]["losses"][d]["loss"] for s in seeds if d in runs[s]["losses"]]
            row[d] = float(np.mean(vals))
            row[f"{d}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        avg = [runs[s]["avg_loss"] for s in seeds]
        row["avg_loss"] = float(np.mean(avg))
        row["avg_loss_std"] = float(np.std(avg, ddof=1)) if len(avg) > 1 else 0.0
        if method != reference:
            for d in domains:  # per-domain paired deltas, for the chart
                diffs = [runs[s]["losses"][d]["loss"] - ref[s]["losses"][d]["loss"]
                         for s in seeds if s in ref and d in runs[s]["losses"]
                         and d in ref[s]["losses"]]
                if diffs:
                    row[f"{d}_delta"], row[f"{d}_delta_ci95"] = t_interval(diffs)
        paired = [runs[s]["avg_loss"] - ref[s]["avg_loss"] for s in seeds if s in ref]
        if method != reference and paired:
            mean, half = t_interval(paired)
            row.update(delta_vs_random=mean, delta_ci95=half, delta_n=len(paired),
                       outside_spread=bool(half == half and abs(mean) > half))
        row["train_seconds"] = float(np.mean([runs[s].get("train_seconds", 0.0) for s in seeds]))
        for task in sorted({t for s in seeds for t in runs[s].get("benchmarks", {})}):
            scores = [_main_metric(runs[s]["benchmarks"][task]) for s in seeds
                      if task in runs[s].get("benchmarks", {})]
            row[f"bench:{task}"] = float(np.mean(scores))
        rows.append(row)
    # the best selection at the budget: neither the untuned model nor the whole-slice reference
    tuned = [r for r in rows if r["method"] not in (BASE, FULL)]
    best = min(tuned, key=lambda r: r["avg_loss"]) if tuned else None
    return {"domains": domains, "reference": reference, "rows": rows,
            "best_method": best["method"] if best else None}


def _main_metric(metrics: Mapping[str, float]) -> float:
    """The first accuracy-like metric lm-eval reported for a task (acc, exact_match, pass@1)."""
    for prefix in ("acc_norm", "acc", "exact_match", "pass@1", "pass_at_1"):
        for key, value in metrics.items():
            if key.split(",")[0] == prefix:
                return float(value)
    return float(next(iter(metrics.values()), float("nan")))


def format_table(summary: Mapping[str, Any]) -> str:
    """Markdown: method x domain loss (mean +- std over seeds), average, delta vs random (CI95)."""
    domains = summary["domains"]
    head = (["method", "n", "seeds"] + domains
            + ["avg loss", f"delta vs {summary['reference']} (95% CI)", "outside spread"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        cells = [r["method"], str(r["n_selected"]), str(len(r["seeds"]) or "-")]
        cells += [f"{r[d]:.4f} ± {r[f'{d}_std']:.4f}" for d in domains]
        cells.append(f"{r['avg_loss']:.4f} ± {r['avg_loss_std']:.4f}")
        if "delta_vs_random" in r:
            cells += [f"{r['delta_vs_random']:+.4f} ± {r['delta_ci95']:.4f}",
                      "yes" if r["outside_spread"] else "no"]
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    bench = sorted({k for r in summary["rows"] for k in r if k.startswith("bench:")})
    if bench:
        lines += ["", "| method | " + " | ".join(b[6:] for b in bench) + " |",
                  "|" + "---|" * (len(bench) + 1)]
        lines += ["| " + r["method"] + " | " + " | ".join(
            f"{r[b]:.4f}" if b in r else "-" for b in bench) + " |" for r in summary["rows"]]
    return "\n".join(lines) + "\n"


def plot_losses(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Grouped bar chart: held-out loss per domain (and the average) for each method, std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(summary["domains"]) + ["avg_loss"]
    rows = summary["rows"]
    width = 0.8 / max(len(rows), 1)
    compared = [r for r in rows if "delta_vs_random" in r]
    fig, axes = plt.subplots(2 if compared else 1, 1, squeeze=False, figsize=(
        max(6.0, 1.6 * len(groups) + 0.25 * len(rows)), 7.6 if compared else 4.2))
    ax = axes[0][0]
    x = np.arange(len(groups))
    for i, r in enumerate(rows):
        means = [r[g] for g in groups]
        stds = [r[f"{g}_std"] for g in groups]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, means, width, yerr=stds, capsize=2,
               label=r["method"])
    ax.set_xticks(x, [g.replace("avg_loss", "average") for g in groups])
    ax.set_ylabel("held-out loss per answer token (nats)")
    lows = [r[g] - r[f"{g}_std"] for r in rows for g in groups]
    highs = [r[g] + r[f"{g}_std"] for r in rows for g in groups]
    if lows:
        pad = 0.1 * (max(highs) - min(lows) + 1e-6)
        ax.set_ylim(max(0.0, min(lows) - pad), max(highs) + pad)
    ax.legend(fontsize=7, ncol=min(4, len(rows)))
    ax.set_title("Fine-tuned on each selection: held-out loss by domain (lower is better)")
    if compared:
        # Domains differ in loss far more than methods do: the paired difference shows the effect.
        dx = axes[1][0]
        w = 0.8 / len(compared)
        keys = [f"{d}_delta" for d in summary["domains"]] + ["delta_vs_random"]
        for i, r in enumerate(compared):
            means = [r.get(k, np.nan) for k in keys]
            cis = [r.get(f"{k}_ci95" if k != "delta_vs_random" else "delta_ci95", np.nan)
                   for k in keys]
            dx.bar(x + (i - (len(compared) - 1) / 2) * w, means, w,
                   yerr=np.nan_to_num(cis), capsize=2, label=r["method"],
                   color=f"C{rows.index(r)}")
        dx.axhline(0.0, color="black", linewidth=0.8)
        dx.set_xticks(x, [g.replace("avg_loss", "average") for g in groups])
        dx.set_ylabel(f"loss - {summary['reference']} (paired, 95% CI)")
        dx.legend(fontsize=7, ncol=min(4, len(compared)))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(results: Sequence[Mapping[str, Any]], out_dir: str | Path,
                  context: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """results.json, table.csv, table.md, losses.png and summary.md under ``out_dir``."""
    import csv

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    payload = {"context": dict(context or {}), "summary": summary, "runs": list(results)}
    write_json_atomic(out_dir / "results.json", payload)
    table = format_table(summary)
    (out_dir / "table.md").write_text(table)
    cols = sorted({k for r in summary["rows"] for k in r if k != "seeds"},
                  key=lambda k: (k != "method", k))
    with open(out_dir / "table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=cols)
        writer.writeheader()
        for r in summary["rows"]:
            writer.writerow({c: r.get(c, "") for c in cols})
    plot_losses(summary, out_dir / "losses.png")
    ctx = "\n".join(f"- {k}: {v}" for k, v in (context or {}).items())
    (out_dir / "summary.md").write_text(
        "# Fine-tuned on each selection: held-out loss per domain\n\n"
        "Mean negative log-likelihood per answer token (nats) on held-out records of each domain "
        "(never in any selection), mean ± std over seeds; the delta vs random is paired by seed "
        "with a 95% t-interval; 'outside spread' = the interval excludes 0.\n\n"
        f"{ctx}\n\n{table}\n![losses](losses.png)\n")
    return summary


# --------------------------------------------------------------------------------------------
# One comparison from a pool: held-out sets, one slice, every method's selection at one budget

DEFAULT_POOL = Path(__file__).resolve().parents[2] / "shared" / "data" / "daar_pool" / \
    "daar_pool.jsonl.gz"  # beside a source checkout; elsewhere pass --pool
# name -> recipe, relative to the recipes shipped in the package (daar_ops/recipes, package data);
# "random" is sampled here, seeded per seed.
RECIPES = Path(__file__).resolve().parent / "recipes"
RECIPE_METHODS = {
    "instruction_length": "baselines/instruction_length.yaml",
    "qdit": "baselines/qdit.yaml",
    "ds2": "baselines/ds2.yaml",
    "daar": "sandbox/process_daar.yaml",
    "daar_per_domain": "sandbox/process_daar_per_domain.yaml",
}
DEFAULT_METHODS = (RANDOM, *RECIPE_METHODS)
FULL = "full"  # the whole slice: the upper reference (budget 100%)
EVAL_ONLY_FIELDS = ("domain", "source")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL(.gz) file or a directory of shards (the package's one reader, strict:
    a malformed line is an error naming it)."""
    from daar_ops.core import read_jsonl as read

    return read(path, strict=True)[0]


def held_out_eval_sets(records: Sequence[Mapping[str, Any]], held: Sequence[int],
                       per_domain: int, domain_key: str = "domain") -> dict[str, list[dict]]:
    """The first ``per_domain`` held-out records of each domain in hash order (order-free)."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for i in held:
        rec = records[i]
        domain = rec.get(domain_key)
        if domain is None:
            raise ValueError(f"held-out record {i} has no '{domain_key}' field: per-domain "
                             "evaluation needs it (pass --eval-set DOMAIN=FILE instead)")
        groups.setdefault(str(domain), []).append((text_hash(rec), dict(rec)))
    return {d: [r for _, r in sorted(items, key=lambda x: x[0])[:per_domain]]
            for d, items in sorted(groups.items())}


def _compare_methods_module():
    """The recipe runner (:mod:`daar_ops.compare_methods`, also ``tools/compare_methods.py``)."""
    from daar_ops import compare_methods

    return compare_methods


@dataclass
class Comparison:
    """What :func:`prepare_comparison` built: the inputs of :func:`evaluate_selections`."""

    selections: dict[str, Selection]
    eval_sets: dict[str, list[dict[str, Any]]]
    held_hashes: set[str]
    context: dict[str, Any]


def write_eval_sets(eval_sets: Mapping[str, Sequence[Mapping[str, Any]]],
                    directory: str | Path) -> Path:
    """One ``DOMAIN.jsonl`` per domain (the sandbox hooks pass the folder between jobs)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for domain, records in eval_sets.items():
        with open(directory / f"{domain}.jsonl", "w", encoding="utf-8") as handle:
            for rec in records:
                handle.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return directory


def read_eval_sets(directory: str | Path) -> dict[str, list[dict[str, Any]]]:
    return {p.name[:-len(".jsonl")]: read_jsonl(p)
            for p in sorted(Path(directory).glob("*.jsonl"))}


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


def prepare_comparison(out_dir: str | Path, pool: str | Path = DEFAULT_POOL, n: int = 5000,
                       ratio: float = 0.2, methods: Sequence[str] = DEFAULT_METHODS,
                       seeds: Sequence[int] = (0, 1, 2), slice_seed: int = 0,
                       held_out_fraction: float = 0.05, eval_per_domain: int = 50,
                       model: str = "smollm2-135m-instruct",
                       daar_checkpoint: str | Path | None = None, daar_probe_size: int = 600,
                       selection_files: Mapping[str, str | Path] | None = None,
                       eval_files: Mapping[str, str | Path] | None = None,
                       timeout: float | None = None, progress: bool = True) -> Comparison:
    """Held-out sets, one slice of ``n`` records and each method's selection of it.

    1. held out: pool records with text hash below ``held_out_fraction`` (and every text of
       ``eval_files``); per domain the first ``eval_per_domain`` of them in hash order, unless
       ``eval_files`` ({domain: JSONL}) are given;
    2. the rest, without ``domain``/``source``, is the selection pool; the slice is ``n`` of it
       drawn with ``slice_seed`` (``daar_ops.compare_methods.write_slice``);
    3. each method in ``methods`` selects ``ratio`` of the slice: ``random`` is sampled with each
       seed; the others run their recipe through ``dj-process`` (:data:`RECIPE_METHODS`; DaaR's
       probe checkpoint comes from ``daar_checkpoint`` or ``daar-ops select --quick`` on the
       selection pool); ``full`` is the whole slice. ``selection_files`` add given JSONL files.
    """
    out_dir = Path(out_dir).resolve()  # absolute: the recipes' paths must not depend on the cwd
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_jsonl(pool)
    keep, held = split_held_out(records, held_out_fraction)
    if eval_files:
        eval_sets = {d: read_jsonl(p) for d, p in eval_files.items()}
    else:
        eval_sets = held_out_eval_sets(records, held, eval_per_domain)
    held_hashes = {text_hash(records[i]) for i in held}
    held_hashes |= {text_hash(r) for recs in eval_sets.values() for r in recs}
    train_pool = out_dir / "selection_pool.jsonl"
    with open(train_pool, "w", encoding="utf-8") as handle:
        for i in keep:
            if text_hash(records[i]) in held_hashes:
                continue
            rec = {k: v for k, v in records[i].items() if k not in EVAL_ONLY_FIELDS}
            handle.write(json.dumps(rec, ensure_ascii=False) + "\n")
    cm = _compare_methods_module()
    select_dir = out_dir / "select"
    select_dir.mkdir(exist_ok=True)
    input_path, _, size = cm.write_slice(train_pool, n, slice_seed, select_dir)
    slice_records = read_jsonl(input_path)
    from daar_ops.core import budget

    k = budget(size, ratio=ratio)  # the count every selection method keeps for this ratio
    if k == 0:
        raise ValueError(f"ratio {ratio} of a {size}-record slice keeps no record; raise --n "
                         f"or the ratio")
    selections: dict[str, Selection] = {}
    statuses: dict[str, str] = {}
    for name in methods:
        if name == RANDOM:
            selections[name] = {s: [slice_records[i] for i in np.sort(
                np.random.default_rng(s).choice(size, k, replace=False))] for s in seeds}
            statuses[name] = "ok"
        elif name == FULL:
            selections[name] = slice_records
            statuses[name] = "ok"
        elif name in RECIPE_METHODS:
            overrides: dict[str, dict] = {}
            if name.startswith("daar"):
                ckpt = Path(daar_checkpoint) if daar_checkpoint else ensure_daar_checkpoint(
                    train_pool, out_dir, model, daar_probe_size, progress=progress)
                overrides["diversity_reward_filter"] = {"checkpoint": str(Path(ckpt).resolve())}
                if name == "daar_per_domain":  # the same budget inside every predicted domain
                    domains = json.loads((Path(ckpt) / "manifest.json").read_text())["domains"]
                    overrides["diversity_reward_filter"]["domain_ratios"] = {
                        d: ratio for d in domains}
            res = cm.run_method(name, RECIPES / RECIPE_METHODS[name], input_path, select_dir, ratio,
                                size, timeout, overrides, reuse=True)
            statuses[name] = res["status"]
            if res["status"] == "ok":
                selections[name] = [{k2: v for k2, v in r.items() if not k2.startswith("__dj__")}
                                    for r in read_jsonl(res["export"])]
            else:
                logger.warning(f"{name}: {res['status']}")
        else:
            raise ValueError(f"unknown method {name!r}; known: {[*DEFAULT_METHODS, FULL]} "
                             "(or pass a selection file)")
    for name, path in (selection_files or {}).items():
        selections[name] = read_jsonl(path)
        statuses[name] = f"file {path}"
    write_eval_sets(eval_sets, out_dir / "eval_sets")
    # evaluation only: the ground-truth domains of what each method chose (joined by text hash)
    truth = {text_hash(r): str(r.get("domain")) for r in records if "domain" in r}
    composition = {}
    for name, sel in selections.items():
        chosen = selection_for_seed(sel, seeds[0]) if isinstance(sel, Mapping) else sel
        counts: dict[str, int] = {}
        for rec in chosen:
            key = truth.get(text_hash(rec), "unknown")
            counts[key] = counts.get(key, 0) + 1
        composition[name] = dict(sorted(counts.items()))
    context = {"pool": str(pool), "slice": f"{size} records (seed {slice_seed})",
               "slice_path": str(input_path),
               "budget": f"{ratio:.0%} = {k} records", "held_out_fraction": held_out_fraction,
               "eval_records": {d: len(r) for d, r in eval_sets.items()},
               "methods": statuses, "selection_domains": composition, "model": model}
    return Comparison(selections, eval_sets, held_hashes, context)


# --------------------------------------------------------------------------------------------
# Optional: benchmark accuracy through lm-eval (the DaaR paper's seven, on a GPU)

# lm-eval task names of the paper's benchmarks (it used OpenCompass): NQ, TriviaQA, HellaSwag,
# GSM8K, MATH, MBPP, HumanEval. The two code tasks execute model-written code.
PAPER_BENCHMARKS = ("nq_open", "triviaqa", "hellaswag", "gsm8k", "minerva_math", "mbpp",
                    "humaneval")
CODE_TASKS = ("mbpp", "humaneval")


def parse_tasks(value: str | None, allow_code_execution: bool = False) -> list[str]:
    """The lm-eval task names of ``--lm-eval-tasks``; code tasks (they execute model-written
    code on this machine) are refused unless ``allow_code_execution``."""
    if not value:
        return []
    tasks = list(PAPER_BENCHMARKS) if value.strip() == "paper" else \
        [t.strip() for t in value.split(",") if t.strip()]
    code = [t for t in tasks if t in CODE_TASKS]
    if code and not allow_code_execution:
        raise ValueError(f"benchmark(s) {', '.join(code)} run code the model wrote on this "
                         f"machine; pass --allow-code-execution to run them (ideally in a "
                         f"sandbox), or leave them out of --lm-eval-tasks")
    return tasks


def lm_eval_model_args(model_path: str, adapter_dir: str | Path | None, dtype: str) -> str:
    """lm-eval's ``--model_args`` for the HF backend: the base model plus a peft adapter."""
    args = f"pretrained={model_path},dtype={dtype}"
    if adapter_dir is not None:
        args += f",peft={adapter_dir}"
    return args


def run_lm_eval(model: str, adapter_dir: str | Path | None, tasks: Sequence[str],
                device: str = "cuda", limit: int | None = None,
                batch_size: str | int = "auto", allow_code_execution: bool = False
                ) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from ``lm_eval.simple_evaluate`` (needs ``pip install lm-eval``).

    Code tasks execute model-written code: refused unless ``allow_code_execution``."""
    code = [t for t in tasks if t in CODE_TASKS]
    if code and not allow_code_execution:
        raise ValueError(f"benchmark(s) {', '.join(code)} execute model-written code; pass "
                         f"allow_code_execution=True (--allow-code-execution) to run them")
    try:
        import lm_eval
    except ImportError as err:  # an optional extra, not installed by make setup
        raise ImportError("benchmarks need lm-eval: pip install 'daar-ops[lm-eval]'") from err
    from daar_ops.models import resolve_model_path

    device = resolve_eval_device(device)
    dtype = "bfloat16" if bf16_supported(device) else "float32"
    if code:
        os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")
    out = lm_eval.simple_evaluate(
        model="hf", model_args=lm_eval_model_args(resolve_model_path(model), adapter_dir, dtype),
        tasks=list(tasks), device=device, limit=limit, batch_size=batch_size,
        confirm_run_unsafe_code=bool(code))
    return {task: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in out["results"].items()}


def evaluate_benchmarks(results: Sequence[dict[str, Any]], out_dir: str | Path, model: str,
                        tasks: Sequence[str], device: str = "cuda", limit: int | None = None,
                        batch_size: str | int = "auto", allow_code_execution: bool = False
                        ) -> list[dict[str, Any]]:
    """Adds ``benchmarks`` to every run (from its saved adapter); resumable like the training."""
    out_dir = Path(out_dir)
    for r in results:
        run_dir = out_dir / "runs" / r["method"] / ("base" if r["seed"] is None
                                                   else f"seed-{r['seed']}")
        done = r.get("benchmarks", {})
        todo = [t for t in tasks if t not in done]
        if not todo:
            continue
        adapter = run_dir / "adapter"
        if r["method"] != BASE and not adapter.exists():
            raise FileNotFoundError(f"{adapter} is missing: rerun with --no-resume so the "
                                    "adapter is saved")
        done.update(run_lm_eval(model, adapter if r["method"] != BASE else None, todo, device,
                                limit, batch_size, allow_code_execution))
        r["benchmarks"] = done
        write_json_atomic(run_dir / "result.json", r)
    return list(results)
