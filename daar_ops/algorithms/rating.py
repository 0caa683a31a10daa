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
from typing import Any


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


