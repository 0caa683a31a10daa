"""LLM raters (the model layer of DS2's rating): the probability-mode rater reads the next-token
probabilities of the score tokens. Prompts and parsing live in :mod:`daar_ops.algorithms.rating`;
operators load raters through :func:`daar_ops.model_keys.model_key` (``score_rater``)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from daar_ops.algorithms.rating import (PROBABILITY_ANSWER_PREFIX, PROBABILITY_PROMPT,
                                        build_prompt)
from daar_ops.models import SMOLLM2


class ScoreTokenRater:
    """Expected score from the next-token probabilities of the score tokens (deterministic).

    :param model: short name, local folder or hub id of a causal LM with a chat template.
    :param scores: the integer scores whose tokens are read (default 0..5); each must be a single
        token of the tokenizer, otherwise ``ValueError``.
    :param device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
    :param dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (bfloat16 where the device
        has it natively; :func:`daar_ops.causal_lm.load_causal_lm`).
    :param batch_size: prompts per forward pass (left-padded).
    :param max_length: prompt tokens kept; longer prompts lose tokens from the left of the sample
        text only in the sense that the sample was already cut by :func:`build_prompt`; as a last
        resort the prompt keeps its last ``max_length`` tokens (the answer prefix).
    """

    def __init__(self, model: str = SMOLLM2, scores: Sequence[int] = range(6),
                 device: str | None = "cpu", dtype: str = "float32", batch_size: int = 8,
                 max_length: int = 2048, prompt: str = PROBABILITY_PROMPT,
                 answer_prefix: str = PROBABILITY_ANSWER_PREFIX):
        import torch

        from daar_ops.causal_lm import load_causal_lm
        from daar_ops.core import resolve_device
        from daar_ops.models import resolve_model_path

        self.model_path = resolve_model_path(model)
        self.device = resolve_device(device)
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.prompt, self.answer_prefix = prompt, answer_prefix
        self.model, self.tokenizer = load_causal_lm(model, self.device, dtype)
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


