"""The one causal-LM loader: a tokenizer with a pad token and the model on a device, in a precision.

Generation (:mod:`daar_ops.generation`), the DS2 rater (:mod:`daar_ops.raters`) and the downstream
evaluation (:mod:`daar_ops.evaluation`) load every causal LM through :func:`load_causal_lm`;
devices and precisions are resolved by :func:`daar_ops.core.resolve_device` and
:func:`daar_ops.core.resolve_dtype` (one rule for every command).
"""

from __future__ import annotations

import os
from typing import Any

from daar_ops.core import resolve_device, resolve_dtype
from daar_ops.models import resolve_model_path


def load_tokenizer(model: str | os.PathLike, padding_side: str | None = None,
                   chat_template_for: str | None = None) -> Any:
    """The tokenizer of ``model`` (short name, local folder or hub id) with a pad token: its
    end-of-sequence token where it has none.

    :param padding_side: set on the tokenizer when given (``"left"`` for batched generation).
    :param chat_template_for: what needs the model's chat template; a tokenizer without one is
        then a ``ValueError`` that says so.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template_for and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"model '{model}' has no chat template; {chat_template_for} needs one "
                         f"(use an instruct/chat model)")
    return tokenizer


def load_causal_lm(model: str | os.PathLike, device: str | None = "cpu", dtype: str = "float32",
                   *, weights: str | os.PathLike | None = None, trainable: bool = False,
                   padding_side: str | None = None,
                   chat_template_for: str | None = None) -> tuple[Any, Any]:
    """(model in eval mode on the resolved device, :func:`load_tokenizer`'s tokenizer).

    :param model: short name, local folder or hub id (nothing is downloaded when offline).
    :param device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (:func:`daar_ops.core.resolve_device`).
    :param dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16`` (or ``fp32``/``bf16``/
        ``fp16``; :func:`daar_ops.core.resolve_dtype`): the precision the weights are stored in.
    :param weights: a folder whose weights replace ``model``'s (a saved full fine-tune); the
        tokenizer stays ``model``'s.
    :param trainable: keep the parameters' gradients (fine-tuning); otherwise they are frozen.
    :param padding_side: :func:`load_tokenizer`'s.
    :param chat_template_for: :func:`load_tokenizer`'s.
    """
    import torch
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = getattr(torch, resolve_dtype(dtype, device))
    tokenizer = load_tokenizer(model, padding_side, chat_template_for)
    lm = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(model if weights is None else weights), dtype=torch_dtype)
    lm.to(device).eval()
    if not trainable:
        lm.requires_grad_(False)
    return lm, tokenizer
