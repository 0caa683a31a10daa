"""Loss scoring: the mean negative log-likelihood per answer token and per final-answer token on
each domain's held-out records (the evaluation may read the ground-truth ``domain``; selection
never does), and loading a tuned model back from its saved adapter or weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from daar_ops.causal_lm import load_causal_lm
from daar_ops.core import resolve_device
from daar_ops.evaluation.encoding import encode_example, pad_batch
from daar_ops.evaluation.finetune import RESPONSE_ONLY, weights_dtype


def load_tuned(model: str, adapter_dir: str | Path | None, device: str = "cpu"):
    """(the tuned model, the base model's tokenizer): base + the saved LoRA adapter, or the saved
    full fine-tune itself (a folder without ``adapter_config.json``); no folder: the base model."""
    device = resolve_device(device)
    full = adapter_dir is not None and not (Path(adapter_dir) / "adapter_config.json").exists()
    lm, tokenizer = load_causal_lm(model, device, weights_dtype(device),
                                   weights=adapter_dir if full else None,
                                   chat_template_for=RESPONSE_ONLY)
    if adapter_dir is not None and not full:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(adapter_dir))
    lm.eval()
    return lm, tokenizer


def held_out_loss(lm, tokenizer, eval_sets: Mapping[str, Sequence[Mapping[str, Any]]],
                  max_length: int, batch_size: int = 8, bf16: bool = False,
                  progress: bool = False, per_record: bool = False) -> dict[str, dict[str, Any]]:
    """Per domain: mean negative log-likelihood (nats) per answer token (``loss``) and per
    final-answer token (``final_loss``, the span of
    :func:`~daar_ops.evaluation.encoding.final_answer_span`), with the counts.

    With ``per_record`` each domain also gets ``records``: per evaluation record, in the order
    given, the summed nll and the token count of the answer (``nll``, ``tokens``) and of its final
    answer (``final_nll``, ``final_tokens``) - what the paired bootstrap resamples. A record whose
    answer is cut away entirely counts 0 tokens.
    """
    lm.eval()
    out = {}
    for domain, records in eval_sets.items():
        examples = [encode_example(tokenizer, rec, max_length, final=True) for rec in records]
        sums = _score_examples(lm, examples, tokenizer.pad_token_id, batch_size, bf16,
                               f"eval {domain}" if progress else None)
        out[domain] = _domain_entry(sums, [e["final_rule"] for e in examples], per_record)
    return out


def _score_examples(lm, examples: Sequence[Mapping[str, Any]], pad_id: int, batch_size: int,
                    bf16: bool, progress: str | None) -> dict[str, np.ndarray]:
    """Per example (in the order given): summed nll and count of the answer tokens (``nll``,
    ``tokens``) and of the final-answer tokens (``final_nll``, ``final_tokens``); batches of
    similar length."""
    import torch
    from tqdm.auto import tqdm

    device = next(lm.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    sums = {"nll": np.zeros(len(examples)), "tokens": np.zeros(len(examples), dtype=int),
            "final_nll": np.zeros(len(examples)),
            "final_tokens": np.zeros(len(examples), dtype=int)}
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc=progress, disable=progress is None, leave=False):
        rows = order[start:start + batch_size]
        chunk = [examples[i] for i in rows]
        batch = pad_batch(chunk, pad_id)
        final = torch.zeros_like(batch["labels"])
        for row, e in enumerate(chunk):
            final[row, :len(e["final"])] = torch.tensor(e["final"])
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = lm(input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).logits
        shifted = batch["labels"][:, 1:]
        token_nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), shifted, ignore_index=-100,
            reduction="none").cpu()
        scored = (shifted != -100).cpu()
        fin = final[:, 1:].bool() & scored
        for row, i in enumerate(rows):
            sums["nll"][i] = float(token_nll[row][scored[row]].sum())
            sums["tokens"][i] = int(scored[row].sum())
            sums["final_nll"][i] = float(token_nll[row][fin[row]].sum())
            sums["final_tokens"][i] = int(fin[row].sum())
    return sums


def _domain_entry(sums: Mapping[str, np.ndarray], rules: Sequence[str],
                  per_record: bool) -> dict[str, Any]:
    """One domain's losses and counts (and per-record sums) from :func:`_score_examples`."""
    nll, tokens = sums["nll"], sums["tokens"]
    final_nll, final_tokens = sums["final_nll"], sums["final_tokens"]
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
    return entry
