"""Chat-template training and evaluation examples whose loss is on the answer only.

The model's chat template renders (user: instruction + input, assistant: output); only the
assistant tokens carry loss, and :func:`final_answer_span` marks the final answer inside them.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

from daar_ops.text import to_text

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


def pad_batch(examples: Sequence[Mapping[str, list[int]]], pad_id: int):
    """``input_ids`` (right-padded with ``pad_id``), ``labels`` (-100 on padding) and
    ``attention_mask`` tensors of a batch of encoded examples."""
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
