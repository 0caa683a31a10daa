"""DS2 quality rating: prompts, tolerant JSON parsing, expected score from token probabilities.

No Data-Juicer import. Two ways to rate a sample:

* **generation** (DS2): the model answers the :data:`DS2_RATING_PROMPT` with a JSON object rating
  Rarity, Complexity, Informativeness and "Overall rating" on 1-10; :func:`parse_rating` reads the
  overall rating from the *last* JSON object of the answer (tolerating single quotes, trailing
  commas, unquoted keys, code fences, "8/10"), with a regex fallback. ``None`` = parse failure.
* **probability** (deterministic, one forward per sample, batched): the model reads
  :data:`PROBABILITY_PROMPT` (overall rating on the compressed 0-5 scale) followed by the start of
  its answer ``{"Overall rating": ``; :class:`ScoreTokenRater` reads the next-token probabilities of
  the score tokens ``"0"``..``"5"`` and returns the expected score ``sum_s s * P(s) / sum_s P(s)``
  and the probability mass on the score tokens. The 0-5 scale is used because with digit-splitting
  tokenizers (SmolLM2, Qwen, Llama 3) "10" is two tokens, so on a 1-10 scale P("1") would mix up 1
  and 10.
"""

from __future__ import annotations

import json
import math
import re
import threading
from typing import Any, Sequence

import numpy as np
from loguru import logger

DS2_RATING_PROMPT = """We would like your feedback on the quality of an instruction-tuning \
sample: an instruction, possibly an input, and the response of an AI assistant.

Rate the sample on:
1. Rarity: how uncommon, specialised or creative the task is, compared to common requests.
2. Complexity: how much knowledge, reasoning or skill the task and the response require.
3. Informativeness: how much useful, correct and relevant information the response gives.
4. Overall rating: how valuable the sample is as training data for an AI assistant.

Give each a score from 1 (lowest) to 10 (highest). Answer with one JSON object only, like:
{{"Rarity": <score>, "Complexity": <score>, "Informativeness": <score>, "Overall rating": <score>}}

## Sample
{sample}"""

PROBABILITY_PROMPT = """We would like your feedback on the quality of an instruction-tuning \
sample: an instruction, possibly an input, and the response of an AI assistant.

Judge its rarity, complexity and informativeness, then give an overall rating of how valuable the \
sample is as training data for an AI assistant, from 0 (lowest) to 5 (highest). Answer with one \
JSON object only, like: {{"Overall rating": <score>}}

## Sample
{sample}"""

PROBABILITY_ANSWER_PREFIX = '{"Overall rating": '

SAMPLE_TEMPLATE = ("### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                   "### Response:\n{output}")


def build_prompt(sample_text: str, prompt: str = DS2_RATING_PROMPT, max_chars: int = 6000) -> str:
    """The rating prompt for one rendered sample; samples longer than ``max_chars`` characters are
    cut (the prompt must fit the model's context) and marked ``[...]``."""
    if len(sample_text) > max_chars:
        sample_text = sample_text[:max_chars] + " [...]"
    return prompt.format(sample=sample_text)


# --------------------------------------------------------------------------------------------------
# Tolerant parsing

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_FALLBACK = re.compile(
    r"overall[\s_\-]*(?:rating|score|quality)?[\"']?\s*[:=]\s*[\"']?\s*([-+]?\d+(?:\.\d+)?)",
    re.IGNORECASE)


def _json_objects(text: str) -> list[str]:
    """Outermost balanced ``{...}`` substrings, in order (braces inside strings ignored)."""
    found, stack, in_str, quote, escape = [], [], False, "", False
    for i, ch in enumerate(text):
        if in_str:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == quote:
                in_str = False
            continue
        if ch == '"' and stack:
            in_str, quote = True, ch
        elif ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            start = stack.pop()
            if not stack:
                found.append(text[start:i + 1])
    return found


def _repair(obj: str) -> str:
    fixed = obj.replace("\u201c", '"').replace("\u201d", '"')
    if '"' not in fixed:
        fixed = fixed.replace("'", '"')
    fixed = re.sub(r",\s*([}\]])", r"\1", fixed)  # trailing commas
    fixed = re.sub(r"([{,]\s*)([A-Za-z_][\w \-]*?)(\s*:)", r'\1"\2"\3', fixed)  # bare keys
    return fixed


def _normalise_key(key: str) -> str:
    return re.sub(r"[^a-z]", "", key.lower())


def _to_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        match = _NUMBER.search(value)
        return float(match.group()) if match else None
    if isinstance(value, dict):  # {"Overall rating": {"score": 7}}
        for v in value.values():
            number = _to_number(v)
            if number is not None:
                return number
    return None


def _find_key(obj: Any, wanted: str) -> Any:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if _normalise_key(str(key)) in (wanted, "overall", "overallscore", "overallquality"):
                return value
        for value in obj.values():
            hit = _find_key(value, wanted)
            if hit is not None:
                return hit
    return None


def parse_rating(text: Any, key: str = "Overall rating", low: float = 1.0, high: float = 10.0
                 ) -> float | None:
    """The ``key`` rating from a model answer, or ``None`` if there is none in [low, high].

    Reads the last JSON object holding the key (DS2 parses the last object), repairing common
    JSON mistakes; falls back to a ``"overall ...: <number>"`` regex over the whole answer.
    Never raises, whatever ``text`` is.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    wanted = _normalise_key(key)
    for obj in reversed(_json_objects(text)):
        parsed = None
        for candidate in (obj, _repair(obj)):
            try:
                parsed = json.loads(candidate)
                break
            except (ValueError, RecursionError):
                continue
        number = _to_number(_find_key(parsed, wanted)) if parsed is not None else None
        if number is not None and low <= number <= high:
            return number
    matches = _FALLBACK.findall(text)
    for raw in reversed(matches):
        number = float(raw)
        if low <= number <= high:
            return number
    return None


# --------------------------------------------------------------------------------------------------
# Probability mode


class ScoreTokenRater:
    """Expected score from the next-token probabilities of the score tokens (deterministic).

    :param model: short name, local folder or hub id of a causal LM with a chat template.
    :param scores: the integer scores whose tokens are read (default 0..5); each must be a single
        token of the tokenizer, otherwise ``ValueError``.
    :param device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
    :param dtype: ``float32``, ``bfloat16`` or ``float16``.
    :param batch_size: prompts per forward pass (left-padded).
    :param max_length: prompt tokens kept; longer prompts lose tokens from the left of the sample
        text only in the sense that the sample was already cut by :func:`build_prompt`; as a last
        resort the prompt keeps its last ``max_length`` tokens (the answer prefix).
    """

    def __init__(self, model: str = "smollm2-135m-instruct", scores: Sequence[int] = range(6),
                 device: str | None = "cpu", dtype: str = "float32", batch_size: int = 8,
                 max_length: int = 2048, prompt: str = PROBABILITY_PROMPT,
                 answer_prefix: str = PROBABILITY_ANSWER_PREFIX):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from daar_ops.features import DTYPES, resolve_device
        from daar_ops.models import resolve_model_path

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.model_path = resolve_model_path(model)
        self.device = resolve_device(device)
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.prompt, self.answer_prefix = prompt, answer_prefix
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.scores = np.asarray(list(scores), dtype=np.float64)
        ids = []
        for s in scores:
            tok = self.tokenizer.encode(str(int(s)), add_special_tokens=False)
            if len(tok) != 1:
                raise ValueError(f"score {s} is {len(tok)} tokens for {model}; probability mode "
                                 f"needs single-token scores (use a 0-9 scale)")
            ids.append(tok[0])
        self.token_ids = ids
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=DTYPES[dtype])
        self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        self._torch = torch

    def prompt_ids(self, sample_text: str, max_chars: int = 6000) -> list[int]:
        content = build_prompt(sample_text, self.prompt, max_chars)
        if self.has_chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                      tokenize=False, add_generation_prompt=True)
        else:
            text = content + "\n"
        ids = self.tokenizer(text + self.answer_prefix, add_special_tokens=False)["input_ids"]
        return ids[-self.max_length:]

    def rate(self, sample_texts: Sequence[str], max_chars: int = 6000
             ) -> tuple[np.ndarray, np.ndarray]:
        """(expected score [N], probability mass on the score tokens [N]) in input order."""
        torch = self._torch
        prompts = [self.prompt_ids(t, max_chars) for t in sample_texts]
        expected = np.zeros(len(prompts), dtype=np.float64)
        mass = np.zeros(len(prompts), dtype=np.float64)
        pad = self.tokenizer.pad_token_id
        ids_t = torch.tensor(self.token_ids, dtype=torch.long)
        values = torch.tensor(self.scores, dtype=torch.float64)
        # Sort by length so batches pad little; results go back to input order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = max(len(prompts[r]) for r in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids = prompts[r]
                input_ids[j, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                mask[j, width - len(ids):] = 1
            # Positions count real tokens only, so a left-padded row scores like an unpadded one.
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            with torch.inference_mode():
                out = self.model(input_ids=input_ids.to(self.device),
                                 attention_mask=mask.to(self.device),
                                 position_ids=positions.to(self.device), logits_to_keep=1)
            logits = out.logits[:, -1, :].to(torch.float64).cpu()
            log_all = torch.logsumexp(logits, dim=-1)
            score_logits = logits[:, ids_t]
            probs = torch.softmax(score_logits, dim=-1)
            expected[rows] = (probs @ values).numpy()
            mass[rows] = torch.exp(torch.logsumexp(score_logits, -1) - log_all).numpy()
        return expected, mass


_RATERS: dict[tuple, ScoreTokenRater] = {}
_LOCK = threading.Lock()


def cached_score_rater(model: str = "smollm2-135m-instruct", device: str | None = "cpu",
                       dtype: str = "float32", batch_size: int = 8, max_length: int = 2048
                       ) -> ScoreTokenRater:
    """A :class:`ScoreTokenRater` loaded once per process for the same arguments."""
    key = (str(model), device, dtype, batch_size, max_length)
    with _LOCK:
        if key not in _RATERS:
            logger.info(f"loading score-token rater {model} on {device} ({dtype})")
            _RATERS[key] = ScoreTokenRater(model, device=device, dtype=dtype,
                                           batch_size=batch_size, max_length=max_length)
        return _RATERS[key]
