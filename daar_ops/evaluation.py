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
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from loguru import logger

from daar_ops.core import default_pool, resolve_device, write_jsonl
from daar_ops.models import SMOLLM2
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


_ANSWER_PHRASE = re.compile(r"[Tt]he (?:final )?answer(?: is)?:?[ \t]*")
_FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)


def final_answer_span(answer: str) -> tuple[tuple[int, int], str]:
    """((start, end) characters of the answer's final-answer span, which rule found it).

    In order: the content of the last ``\\boxed{...}`` (braces balanced); else the rest of the line
    after the last "the answer is" / "The answer is" / "the final answer is" / "The answer:";
    else the body of the longest fenced code block; else the whole answer ("whole": short answers
    and bare code, e.g. the pool's common-sense and coding records, are their own final answer).
    """
    start = answer.rfind("\\boxed{")
    if start >= 0:
        i, depth = start + len("\\boxed{"), 1
        while i < len(answer) and depth:
            depth += {"{": 1, "}": -1}.get(answer[i], 0)
            i += 1
        end = i - 1 if depth == 0 else len(answer)
        if end > start + len("\\boxed{"):
            return (start + len("\\boxed{"), end), "boxed"
    phrases = list(_ANSWER_PHRASE.finditer(answer))
    if phrases:
        begin = phrases[-1].end()
        line_end = answer.find("\n", begin)
        end = len(answer) if line_end < 0 else line_end
        if answer[begin:end].strip():
            return (begin, end), "answer_is"
    fences = list(_FENCE.finditer(answer))
    if fences:
        body = max(fences, key=lambda m: len(m.group(1)))
        if body.group(1).strip():
            return body.span(1), "code"
    return (0, len(answer)), "whole"


def _cut_middle(tokens: list, keep: int) -> list:
    """The first quarter of ``keep`` and the rest from the end: long reasoning loses its middle,
    never its conclusion."""
    if len(tokens) <= keep:
        return list(tokens)
    if keep <= 0:
        return []
    head = keep // 4
    return list(tokens[:head]) + list(tokens[len(tokens) - (keep - head):])


def encode_example(tokenizer, record: Mapping[str, Any], max_length: int,
                   final: bool = False) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (-100 on every prompt token) of one record.

    The prompt is the chat template up to and including the assistant header (generation prompt);
    the answer is what the full conversation adds after it. Long examples keep the end of the
    prompt (the assistant header and the end of the question), with the prompt never cut below
    half of ``max_length`` when the answer is long, and cut the answer in the middle (its first
    quarter and its end: the final answer survives). With ``final`` the result also has
    ``final`` (1 on answer tokens that overlap :func:`final_answer_span`) and ``final_rule``.
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
    response_text = full_text[len(prompt_text):]
    mask: list[int] = []
    rule = "none"
    if final:
        enc = tokenizer(response_text, add_special_tokens=False, return_offsets_mapping=True)
        response = list(enc["input_ids"])
        offset = response_text.find(answer) if answer else -1
        if offset >= 0:
            (a, b), rule = final_answer_span(answer)
            a, b = a + offset, b + offset
            mask = [int(e > a and s < b) for s, e in enc["offset_mapping"]]
        else:
            mask = [0] * len(response)
    else:
        response = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    if len(prompt) + len(response) > max_length:
        keep_prompt = min(len(prompt), max(max_length - len(response), max_length // 2))
        prompt = prompt[len(prompt) - keep_prompt:]
        response = _cut_middle(response, max_length - keep_prompt)
        mask = _cut_middle(mask, max_length - keep_prompt) if final else mask
    out = {"input_ids": prompt + response, "labels": [-100] * len(prompt) + response}
    if final:
        out["final"] = [0] * len(prompt) + mask
        out["final_rule"] = rule
    return out


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

    Defaults are the CPU instrument chosen by the positive controls (docs/evaluation.md): a full
    fine-tune of SmolLM2-135M, lr 1e-4 cosine with 10% warm-up, batch 8, 2 epochs, 128 training
    tokens, batches grouped by length, loss at 256 tokens. ``gpu_paper()`` is the 7B LoRA setting.
    """

    max_length: int = 128  # training tokens per example (prompt + answer)
    epochs: float = 2.0
    max_steps: int = -1  # > 0 caps the optimizer steps (overrides epochs)
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_fraction: float = 0.1
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    # "full": every weight is trained; "lora": adapters (peft); "auto": full for models under
    # FULL_FINETUNE_MAX_PARAMS parameters on a CPU, LoRA otherwise (resolved per run).
    finetune: str = "auto"
    group_by_length: bool = True  # batches of similar length (transformers' LengthGroupedSampler)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"  # peft's shorthand: every linear layer but the LM head
    # > 0: adapters only on the top N decoder layers. Autograd then stops N layers down, which
    # saves most of the backward pass; 0: every layer (the usual LoRA).
    lora_top_layers: int = 0
    bf16: str = "auto"  # "auto": where the device has native bf16; "yes" / "no"
    eval_batch_size: int = 8
    eval_max_length: int = 256  # tokens per evaluated example (0: max_length)

    @classmethod
    def gpu_paper(cls, **overrides: Any) -> "TrainSettings":
        """DaaR's fine-tuning scale on a GPU: 3 epochs, lr 1e-4, LoRA r 64, 1,024 tokens."""
        base = dict(max_length=1024, eval_max_length=1024, epochs=3.0, batch_size=16, lr=1e-4,
                    lora_r=64, lora_alpha=128, eval_batch_size=16, finetune="lora",
                    warmup_fraction=0.05)
        base.update(overrides)
        return cls(**base)

    @property
    def eval_length(self) -> int:
        return self.eval_max_length if self.eval_max_length > 0 else self.max_length

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL_FINETUNE_MAX_PARAMS = 1_000_000_000


def bf16_supported(device: str) -> bool:
    """Native bf16 (:func:`daar_ops.core.native_bf16`)."""
    from daar_ops.core import native_bf16

    return native_bf16(device)


def use_bf16(settings: TrainSettings, device: str) -> bool:
    if settings.bf16 not in ("auto", "yes", "no"):
        raise ValueError(f"bf16 must be auto, yes or no, got {settings.bf16!r}")
    return settings.bf16 == "yes" or (settings.bf16 == "auto" and bf16_supported(device))


def count_parameters(model: str) -> int:
    """Parameters of ``model`` from its config alone (built on the meta device: no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from daar_ops.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model))
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    return int(sum(p.numel() for p in lm.parameters()))


def resolve_finetune(settings: TrainSettings, model: str, device: str) -> str:
    """"full" or "lora" for this model on this device (``settings.finetune`` "auto" decides by
    size: a full fine-tune on a CPU below :data:`FULL_FINETUNE_MAX_PARAMS`)."""
    if settings.finetune not in ("auto", "full", "lora"):
        raise ValueError(f"finetune must be auto, full or lora, got {settings.finetune!r}")
    if settings.finetune != "auto":
        return settings.finetune
    device = resolve_eval_device(device)
    small = count_parameters(model) < FULL_FINETUNE_MAX_PARAMS
    return "full" if small and device == "cpu" else "lora"


def resolved_settings(settings: TrainSettings, model: str, device: str) -> dict[str, Any]:
    """What "auto" became on this machine: goes into every run's fingerprint, so fp32 and bf16
    runs (or full and LoRA runs) are never paired in one comparison."""
    device = resolve_eval_device(device)
    return {"bf16": use_bf16(settings, device),
            "finetune": resolve_finetune(settings, model, device),
            "device_type": "cuda" if device.startswith("cuda") else device}


def resolve_eval_device(device: str | None) -> str:
    """:func:`daar_ops.core.resolve_device` (one rule for every command)."""
    return resolve_device(device)


def load_base_model(model: str, device: str = "cpu", dtype: Any = None):
    """(model on ``device``, fp32 unless ``dtype``; tokenizer with a pad token).

    ``model``: a short name, local folder or hub id (nothing is downloaded when offline).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from daar_ops.models import resolve_model_path

    tokenizer = load_tokenizer(model)
    lm = AutoModelForCausalLM.from_pretrained(resolve_model_path(model),
                                              dtype=dtype or torch.float32).to(device)
    return lm, tokenizer


def load_tokenizer(model: str):
    """The model's tokenizer with a pad token; one with no chat template is refused."""
    from transformers import AutoTokenizer

    from daar_ops.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model} has no chat template; response-only training needs one")
    return tokenizer


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
    finetune: str = "lora"
    bf16: bool = False


def fine_tune(model: str, records: Sequence[Mapping[str, Any]], settings: TrainSettings,
              seed: int, work_dir: str | Path, device: str = "cpu", progress: bool = True,
              adapter_dir: str | Path | None = None) -> FineTuneResult:
    """Fine-tune ``model`` on ``records`` with ``transformers.Trainer``: every weight
    (``finetune`` "full") or LoRA adapters (peft), as :func:`resolve_finetune` decides.

    bf16 is autocast where :func:`use_bf16` says so (the weights and the optimizer state stay
    fp32, except a LoRA base on a bf16 GPU, stored in bf16). The seed fixes the initialisation of
    the adapters, dropout and data order. With ``adapter_dir`` the trained adapter (LoRA) or the
    whole model (full) is saved there (for lm-eval or reuse); otherwise nothing is written but
    logs.
    """
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    device = resolve_eval_device(device)
    set_seed(seed)
    bf16 = use_bf16(settings, device)
    mode = resolve_finetune(settings, model, device)
    # On a GPU with bf16 the frozen LoRA base weights are stored in bf16 (a 7B model in fp32
    # would need 28 GB); trained weights (LoRA's, or all of them) stay fp32 under autocast.
    base, tokenizer = load_base_model(
        model, device,
        torch.bfloat16 if bf16 and device.startswith("cuda") and mode == "lora" else None)
    examples = encode_records(tokenizer, records, settings.max_length)
    if not examples:
        raise ValueError("no training example has answer tokens")
    set_seed(seed)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        n_layers = int(base.config.num_hidden_layers)
        layers = (list(range(max(0, n_layers - settings.lora_top_layers), n_layers))
                  if settings.lora_top_layers > 0 else None)
        targets: Any = settings.lora_targets
        if layers is not None and targets == "all-linear":
            # peft takes layers_to_transform only with a list of module names: the linear layers'.
            targets = sorted({name.rsplit(".", 1)[-1] for name, module in base.named_modules()
                              if isinstance(module, torch.nn.Linear) and ".layers." in name})
        lm = get_peft_model(base, LoraConfig(
            r=settings.lora_r, lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout, target_modules=targets,
            layers_to_transform=layers, task_type="CAUSAL_LM"))
    else:
        lm = base
        lm.train()
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
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
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
        seconds=seconds, tokens_per_second=trained_tokens / max(seconds, 1e-9), finetune=mode,
        bf16=bf16)


def _weights_dtype(device: str):
    import torch

    return torch.bfloat16 if device.startswith("cuda") and bf16_supported(device) else None


def load_tuned(model: str, adapter_dir: str | Path | None, device: str = "cpu"):
    """(the tuned model, the base model's tokenizer): base + the saved LoRA adapter, or the saved
    full fine-tune itself (a folder without ``adapter_config.json``); no folder: the base model."""
    device = resolve_eval_device(device)
    if adapter_dir is not None and not (Path(adapter_dir) / "adapter_config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM

        tokenizer = load_tokenizer(model)
        lm = AutoModelForCausalLM.from_pretrained(
            str(adapter_dir), dtype=_weights_dtype(device) or torch.float32).to(device)
        lm.eval()
        return lm, tokenizer
    lm, tokenizer = load_base_model(model, device, _weights_dtype(device))
    if adapter_dir is not None:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(adapter_dir))
    lm.eval()
    return lm, tokenizer


def held_out_loss(lm, tokenizer, eval_sets: Mapping[str, Sequence[Mapping[str, Any]]],
                  max_length: int, batch_size: int = 8, bf16: bool = False,
                  progress: bool = False, per_record: bool = False) -> dict[str, dict[str, Any]]:
    """Per domain: mean negative log-likelihood (nats) per answer token (``loss``) and per
    final-answer token (``final_loss``, the span of :func:`final_answer_span`), with the counts.

    With ``per_record`` each domain also gets ``records``: per evaluation record, in the order
    given, the summed nll and the token count of the answer (``nll``, ``tokens``) and of its final
    answer (``final_nll``, ``final_tokens``) - what the paired bootstrap resamples. A record whose
    answer is cut away entirely counts 0 tokens.
    """
    import torch
    from tqdm.auto import tqdm

    device = next(lm.parameters()).device
    out = {}
    lm.eval()
    for domain, records in eval_sets.items():
        examples = [encode_example(tokenizer, rec, max_length, final=True) for rec in records]
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
        nll = np.zeros(len(examples))
        tokens = np.zeros(len(examples), dtype=int)
        final_nll = np.zeros(len(examples))
        final_tokens = np.zeros(len(examples), dtype=int)
        batches = range(0, len(order), batch_size)
        for start in tqdm(batches, desc=f"eval {domain}", disable=not progress, leave=False):
            rows = order[start:start + batch_size]
            chunk = [examples[i] for i in rows]
            batch = _pad_batch(chunk, tokenizer.pad_token_id)
            final = torch.zeros_like(batch["labels"])
            for row, e in enumerate(chunk):
                final[row, :len(e["final"])] = torch.tensor(e["final"])
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                 enabled=bf16):
                logits = lm(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits
            shifted = batch["labels"][:, 1:]
            token_nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), shifted, ignore_index=-100,
                reduction="none").cpu()
            scored = (shifted != -100).cpu()
            fin = final[:, 1:].bool() & scored
            for row, i in enumerate(rows):
                nll[i] = float(token_nll[row][scored[row]].sum())
                tokens[i] = int(scored[row].sum())
                final_nll[i] = float(token_nll[row][fin[row]].sum())
                final_tokens[i] = int(fin[row].sum())
        rules = [e["final_rule"] for e in examples]
        entry: dict[str, Any] = {
            "loss": float(nll.sum() / max(tokens.sum(), 1)),
            "final_loss": float(final_nll.sum() / max(final_tokens.sum(), 1)),
            "n_records": int((tokens > 0).sum()), "n_tokens": int(tokens.sum()),
            "n_final_tokens": int(final_tokens.sum()),
            "final_rules": {r: rules.count(r) for r in sorted(set(rules))}}
        if per_record:
            entry["records"] = {"nll": [round(float(v), 5) for v in nll],
                                "tokens": [int(v) for v in tokens],
                                "final_nll": [round(float(v), 5) for v in final_nll],
                                "final_tokens": [int(v) for v in final_tokens]}
        out[domain] = entry
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
                        out_dir: str | Path, model: str = SMOLLM2,
                        seeds: Sequence[int] = (0, 1, 2), settings: TrainSettings | None = None,
                        device: str = "cpu", held_hashes: set[str] | None = None,
                        include_base: bool = True, resume: bool = True, progress: bool = True,
                        keep_adapters: bool = False, results_dir: str | Path | None = None,
                        on_result: Any = None) -> list[dict[str, Any]]:
    """Fine-tune ``model`` on every selection with every seed and measure the held-out loss.

    Each (method, seed) writes ``RESULTS/runs/METHOD/seed-S/result.json`` (``RESULTS`` =
    ``results_dir``, default ``out_dir``: small files meant to be committed; adapters and trainer
    logs stay under ``out_dir``); with ``resume`` a result whose fingerprint (model, settings and
    what "auto" resolved to here, selection, eval sets, seed) matches is read back instead of
    training again, so a killed run - or a new machine with the committed files - keeps its
    finished runs. Records whose text is in ``held_hashes`` are removed from every selection
    first. ``on_result(path, result)`` is called after each new result file. Returns the results.
    """
    from tqdm.auto import tqdm

    settings = settings or TrainSettings()
    device = resolve_eval_device(device)
    out_dir = Path(out_dir)
    results_dir = Path(results_dir) if results_dir is not None else out_dir
    eval_digest = hashlib.sha256("".join(
        f"{d}:{records_digest(r)}" for d, r in sorted(eval_sets.items())).encode()).hexdigest()
    from daar_ops.models import model_fingerprint, resolve_model_path

    model_id = model_fingerprint(resolve_model_path(model))
    resolved = resolved_settings(settings, model, device)
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
            {"model": model_id, "settings": settings.to_dict(), "resolved": resolved,
             "seed": seed, "selection": records_digest(records), "eval": eval_digest},
            sort_keys=True).encode()).hexdigest()
        run_name = "base" if seed is None else f"seed-{seed}"
        run_dir = out_dir / "runs" / name / run_name
        result_file = results_dir / "runs" / name / run_name / "result.json"
        if resume and result_file.exists():
            previous = json.loads(result_file.read_text())
            if previous.get("fingerprint") == fingerprint:
                results.append(previous)
                continue
        run_dir.mkdir(parents=True, exist_ok=True)
        result = _run_one(name, seed, records, eval_sets, model, settings, device, run_dir,
                          progress, keep_adapters)
        result.update(fingerprint=fingerprint, model_id=model_id, eval_digest=eval_digest,
                      settings=settings.to_dict(), resolved=resolved,
                      config_key=comparison_key(model_id, settings, resolved, eval_digest))
        result_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(result_file, result)
        if on_result is not None:
            on_result(result_file, result)
        results.append(result)
    return results


def comparison_key(model_id: str, settings: TrainSettings, resolved: Mapping[str, Any],
                   eval_digest: str) -> str:
    """Runs are compared only with runs of the same key: same model, settings, resolved
    precision / fine-tuning mode and evaluation set."""
    return hashlib.sha256(json.dumps(
        {"model": model_id, "settings": settings.to_dict(), "resolved": dict(resolved),
         "eval": eval_digest}, sort_keys=True).encode()).hexdigest()[:16]


def _run_one(name, seed, records, eval_sets, model, settings, device, run_dir, progress,
             keep_adapters) -> dict[str, Any]:
    bf16 = use_bf16(settings, device)
    result: dict[str, Any] = {"method": name, "seed": seed, "n_selected": len(records)}
    if name == BASE:
        lora = resolve_finetune(settings, model, device) == "lora"
        lm, tokenizer = load_base_model(
            model, device, _weights_dtype(device) if bf16 and lora else None)
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
        write_jsonl(directory / f"{domain}.jsonl", records)
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
    records = read_jsonl(pool)
    keep, held = split_held_out(records, held_out_fraction)
    if eval_files:
        eval_sets = {d: read_jsonl(p) for d, p in eval_files.items()}
    else:
        eval_sets = held_out_eval_sets(records, held, eval_per_domain)
    held_hashes = {text_hash(records[i]) for i in held}
    held_hashes |= {text_hash(r) for recs in eval_sets.values() for r in recs}
    train_pool = out_dir / "selection_pool.jsonl"
    write_jsonl(train_pool, ({k: v for k, v in records[i].items() if k not in EVAL_ONLY_FIELDS}
                             for i in keep if text_hash(records[i]) not in held_hashes))
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
    slice_digest = records_digest(slice_records)
    by_hash = {text_hash(r): r for r in slice_records}
    cache_dir = Path(results_dir) / "selections" if results_dir is not None else None
    for name in methods:
        cached = _read_cached_selection(cache_dir, name, slice_digest, by_hash)
        if cached is not None and name in RECIPE_METHODS:
            selections[name] = cached
            statuses[name] = "ok (cached)"
        elif name == RANDOM:
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
                _write_cached_selection(cache_dir, name, slice_digest, selections[name])
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
    if controls:
        for name, chosen in control_selections(slice_records, truth, k, control_seed).items():
            selections[name] = chosen
            statuses[name] = "ok (control)"
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


def _read_cached_selection(cache_dir: Path | None, name: str, slice_digest: str,
                           by_hash: Mapping[str, Mapping[str, Any]]) -> list | None:
    if cache_dir is None or not (cache_dir / f"{name}.json").exists():
        return None
    payload = json.loads((cache_dir / f"{name}.json").read_text())
    if payload.get("slice") != slice_digest or not all(h in by_hash for h in payload["hashes"]):
        logger.warning(f"{name}: the cached selection belongs to another slice; selecting again")
        return None
    return [dict(by_hash[h]) for h in payload["hashes"]]


def _write_cached_selection(cache_dir: Path | None, name: str, slice_digest: str,
                            records: Sequence[Mapping[str, Any]]) -> None:
    if cache_dir is None:
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cache_dir / f"{name}.json", {
        "slice": slice_digest, "n": len(records), "hashes": [text_hash(r) for r in records]})


# --------------------------------------------------------------------------------------------
# Positive controls: selections built from the ground-truth domain (evaluation only)

CONTROL_RANDOM = "ctl_random"  # a fixed random budget: the controls' reference
CONTROL_DOUBLE = "ctl_random_2x"  # twice the budget, a superset of ctl_random
CONTROL_SINGLE = "ctl_mathematics"  # the budget from one domain only
CONTROL_SKEW = "ctl_skew"  # 70% of one domain, 10% of each other
CONTROL_NAMES = (CONTROL_RANDOM, CONTROL_DOUBLE, CONTROL_SINGLE, CONTROL_SKEW)
SINGLE_DOMAIN = "mathematics"
SKEW_DOMAIN = "common_sense"  # the mix DaaR and DS2 produced on this pool
SKEW_SHARE = 0.7
# id -> (selection, reference, what must hold); "base" is the untuned model.
CONTROLS = {
    "P0": (CONTROL_RANDOM, BASE, "movement: the average loss falls (random vs untuned)"),
    "P1": (CONTROL_DOUBLE, CONTROL_RANDOM, "quantity: twice the budget lowers the average loss"),
    "P2": (CONTROL_SINGLE, CONTROL_RANDOM,
           f"composition: {SINGLE_DOMAIN} only lowers {SINGLE_DOMAIN}'s loss (Holm-adjusted) and "
           f"raises each other domain's"),
    "P3": (CONTROL_SKEW, CONTROL_RANDOM,
           f"skew: {SKEW_SHARE:.0%} {SKEW_DOMAIN} / 10 / 10 / 10 raises the average loss with a "
           f"95% interval excluding 0"),
}


def control_selections(slice_records: Sequence[Mapping[str, Any]], truth: Mapping[str, str],
                       k: int, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The positive controls' selections of ``k`` records (``2k`` for the double budget), FIXED
    for every training seed (one permutation of the slice drawn with ``seed``), so that their
    comparisons carry training noise only, not selection noise.

    ``truth``: text hash -> ground-truth domain. ctl_random = the permutation's first k;
    ctl_random_2x its first 2k (a superset); ctl_mathematics the first k of one domain; ctl_skew
    70% of one domain and the rest split evenly over the others (largest remainder).
    """
    order = np.random.default_rng(seed).permutation(len(slice_records))
    recs = [dict(slice_records[i]) for i in order]
    domain_of = [truth.get(text_hash(r)) for r in recs]
    domains = sorted({d for d in domain_of if d is not None})
    if 2 * k > len(recs):
        raise ValueError(f"the double-budget control needs {2 * k} records; the slice has "
                         f"{len(recs)}")
    if SINGLE_DOMAIN not in domains or SKEW_DOMAIN not in domains:
        raise ValueError(f"the controls need {SINGLE_DOMAIN} and {SKEW_DOMAIN} records in the "
                         f"slice (ground truth found: {domains})")
    by_domain = {d: [r for r, dd in zip(recs, domain_of) if dd == d] for d in domains}
    others = [d for d in domains if d != SKEW_DOMAIN]
    shares = {SKEW_DOMAIN: SKEW_SHARE, **{d: (1 - SKEW_SHARE) / len(others) for d in others}}
    quota = {d: int(math.floor(shares[d] * k + 1e-9)) for d in domains}
    leftover = k - sum(quota.values())
    for d in sorted(domains, key=lambda d: -(shares[d] * k - quota[d]))[:leftover]:
        quota[d] += 1
    for d, q in list(quota.items()) + [(SINGLE_DOMAIN, k)]:
        if len(by_domain[d]) < q:
            raise ValueError(f"the controls need {q} {d} records; the slice has "
                             f"{len(by_domain[d])}")
    skew = [r for d in domains for r in by_domain[d][:quota[d]]]
    return {CONTROL_RANDOM: recs[:k], CONTROL_DOUBLE: recs[:2 * k],
            CONTROL_SINGLE: by_domain[SINGLE_DOMAIN][:k], CONTROL_SKEW: skew}


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


def _lm_eval_args(model_path: str, saved: str | Path | None, dtype: str) -> str:
    """A saved LoRA adapter rides on the base model; a saved full fine-tune is the model."""
    if saved is not None and not (Path(saved) / "adapter_config.json").exists():
        return lm_eval_model_args(str(saved), None, dtype)
    return lm_eval_model_args(model_path, saved, dtype)


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
        model="hf", model_args=_lm_eval_args(resolve_model_path(model), adapter_dir, dtype),
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
