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

:class:`RatingConfig` holds the settings of a rating (``ds2_rating_filter`` builds it, validated
once); :func:`rate_by_generation` is the retry loop of the generation mode around any
``generate`` callable (the op passes its model's).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

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
# Settings and the generation mode's retry loop

MODES = ("probability", "generate")
BACKENDS = ("hf", "api", "vllm")
# (low, high) of the raw rating that becomes classes 0..5: the probability mode's expected 0-5
# score as it is; DS2's 1-10 generated rating as clip(s, 4, 9) - 4
COMPRESSION = {"probability": (0.0, 5.0), "generate": (4.0, 9.0)}
RATING_CLASSES = 6


@dataclass(frozen=True)
class RatingConfig:
    """Every setting of a DS2 rating, validated once when built (``ValueError`` naming the
    field); ``ds2_rating_filter``'s parameters of the same names document them."""

    mode: str = "probability"
    backend: str = "hf"
    min_score: float | None = None
    max_score: float | None = None
    try_num: int = 3
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    max_length: int = 2048
    max_sample_chars: int = 6000

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name, allowed in (("mode", MODES), ("backend", BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"RatingConfig.{name} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")
        if self.mode == "probability" and self.backend != "hf":
            raise ValueError(f"RatingConfig.backend: probability mode reads token probabilities "
                             f"of a local model; use backend 'hf' or mode 'generate' for "
                             f"'{self.backend}'")
        for name in ("min_score", "max_score"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(float(value)):
                raise ValueError(f"RatingConfig.{name} must be a finite number, got {value}")
        if self.min_score is not None and self.max_score is not None and \
                self.min_score > self.max_score:
            raise ValueError(f"RatingConfig.min_score {self.min_score} > max_score "
                             f"{self.max_score}")
        for name in ("try_num", "max_new_tokens", "max_length", "max_sample_chars"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"RatingConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise ValueError(f"RatingConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"RatingConfig.top_p must be in (0, 1], got {self.top_p}")

    @property
    def compression(self) -> tuple[float, float]:
        """(low, high) of the raw rating mapped to classes 0..5 (see :data:`COMPRESSION`)."""
        return COMPRESSION[self.mode]


def rate_by_generation(generate: Callable[[list, int], Sequence[str]], texts: Sequence[str],
                       config: RatingConfig) -> tuple[np.ndarray, np.ndarray]:
    """DS2's rating by generation: every sample's :data:`DS2_RATING_PROMPT` answered by
    ``generate(conversations, seed)``, parsed by :func:`parse_rating` (1-10); unparsable answers
    are retried up to ``try_num`` times with seed ``seed + attempt``, and a sample whose every
    attempt failed is rated 0 (as DS2). A call that raises is a failed attempt for its samples.

    :returns: (ratings [N], failures [N]: unparsable answers per sample).
    """
    ratings = np.full(len(texts), np.nan)
    failures = np.zeros(len(texts))
    todo = list(range(len(texts)))
    for attempt in range(config.try_num):
        if not todo:
            break
        convs = [[{"role": "user", "content": build_prompt(texts[i], DS2_RATING_PROMPT,
                                                           config.max_sample_chars)}]
                 for i in todo]
        try:
            answers = generate(convs, config.seed + attempt)
        except Exception as err:  # a failed call is a failed attempt for these samples
            logger.warning(f"DS2 rating: generation attempt {attempt + 1} failed: {err}")
            answers = [""] * len(todo)
        left = []
        for i, answer in zip(todo, answers):
            value = parse_rating(answer, low=1.0, high=10.0)
            if value is None:
                failures[i] += 1
                left.append(i)
            else:
                ratings[i] = value
        todo = left
    if todo:
        logger.warning(f"DS2 rating: {len(todo)}/{len(texts)} samples got no parsable rating in "
                       f"{config.try_num} attempts; their rating is 0 (as DS2)")
    return np.nan_to_num(ratings, nan=0.0), failures
