"""Early-layer features of a causal LM, fast. No Data-Juicer import.

:class:`LayerFeatureExtractor` returns, for each text and in one forward pass,

* ``embedding``: the masked mean over tokens of the token-embedding layer output, and
* ``layer``: the masked mean over tokens of the *raw* output of decoder layer ``k``, i.e. the full
  model's ``hidden_states[k]`` (no final norm).

Only the embeddings and the first ``k`` decoder layers are built and loaded; later layers are never
executed and their weights never reach memory. The final norm is replaced by the identity: after
truncating a model to ``k`` layers, HF applies ``model.norm`` to the last hidden state, which the
reference code's "layer-3 feature" silently includes; we do not.

Determinism promise (what ``tests/test_features.py`` checks): on CPU, for a given model, layer,
max_length, dtype, torch build and torch thread count, a text's features are bit-for-bit the same
whatever other texts are encoded with it, in whatever order, batch size or chunk, and therefore
whether they come fresh or from the feature cache. This holds because every forward pass sees a
text in a shape that depends on the text alone: the padded width is the text's token count rounded
up to a multiple of ``length_step`` (see :meth:`LayerFeatureExtractor.padded_width`) and a batch
only holds texts of one width. Measured on SmolLM2 / torch 2.13 CPU: linear layers give the same
rows whatever the batch size or the other rows, but fused SDPA attention reduces over the padded
key length, so one text padded to different widths (as when it is batched with longer texts)
differs by a few 1e-6, which made rewards depend on the cache's history
(``tools/bench_batch_invariance.py`` measures both batchings side by side). CUDA is not covered:
GPU kernels may be chosen by batch shape, and this was not measured there.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from loguru import logger
from tqdm.auto import tqdm

from daar_ops.core import resolve_device, resolve_dtype
from daar_ops.models import DEFAULT_LAYER, SMOLLM2, model_fingerprint, resolve_model_path
from daar_ops.text import ALPACA_TEMPLATE, TextTemplate, to_text

DTYPES = {"float32": torch.float32, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# Tokens from a text are found within its first max_length * this many characters; cutting very
# long texts before tokenizing keeps a 10 MB record from costing seconds of tokenizer time.
_CHARS_PER_TOKEN_BOUND = 32


@dataclass
class LayerFeatures:
    """Features of N texts, in input order. ``n_tokens`` counts tokens after truncation."""

    embedding: np.ndarray  # [N, d] float32
    layer: np.ndarray  # [N, d] float32
    n_tokens: np.ndarray  # [N] int64
    truncated: np.ndarray  # [N] bool: the text was longer than max_length tokens
    empty: np.ndarray  # [N] bool: empty/whitespace text, encoded as a single EOS token
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_truncated(self) -> int:
        return int(self.truncated.sum())

    @property
    def n_empty(self) -> int:
        return int(self.empty.sum())


class LayerFeatureExtractor:
    """Embedding-layer and layer-k masked-mean features of a causal LM.

    :param model: a short name (``smollm2-135m-instruct``), a local HF folder or a hub id.
    :param layer: k >= 0; features are the raw output of decoder layer k (``hidden_states[k]``);
        k = 0 loads the embedding matrix only.
    :param max_length: tokens kept per text; longer texts are truncated and counted.
    :param batch_size: at most this many texts per forward pass.
    :param max_batch_tokens: at most this many (padded) tokens per forward pass. Batches hold texts
        of one padded width, widest first, so batches of long texts shrink under this budget. On
        CPU, per-token throughput is flat from ~500 tokens per pass on: the defaults (32
        texts, 2,048 tokens) measured 27% less CPU time than (64, 8,192) on the shared pool. On a
        GPU raise both.
    :param length_step: texts are padded to their token count rounded up to a multiple of this
        (capped at max_length) and batched only with texts of the same padded width, so a text's
        features never depend on the other texts (see the module docstring). Larger steps mean
        fuller batches but more padding; it is part of the feature definition (``describe()``).
        On 1,024 pool texts (SmolLM2, k=3, CPU) step 8 cost 1.00x the CPU time of batches padded
        to their longest text (range 0.99-1.03 over 3 repeats), step 16 1.08x (1.06-1.13).
    :param dtype: ``float32`` (exact), ``bfloat16``/``float16`` (faster on GPUs and on CPUs with
        AMX / AVX512-BF16), or ``auto``: bfloat16 where the device has it natively, else float32
        (:func:`daar_ops.core.resolve_dtype`). The resolved precision keys the feature cache.
    :param device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
    """

    def __init__(
        self,
        model: str = SMOLLM2,
        layer: int = DEFAULT_LAYER,
        max_length: int = 512,
        batch_size: int = 32,
        max_batch_tokens: int = 2048,
        dtype: str = "float32",
        device: str | None = "cpu",
        length_step: int = 8,
    ):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer must be an int >= 0, got {layer!r}")
        if max_length < 1 or batch_size < 1 or max_batch_tokens < 1 or length_step < 1:
            raise ValueError("max_length, batch_size, max_batch_tokens and length_step must be >= 1")
        self.device = resolve_device(device)
        dtype = resolve_dtype(dtype, self.device)  # "auto": bf16 where native, else fp32
        self.model_name = str(model)
        self.model_path = resolve_model_path(model)
        self.layer = layer
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_batch_tokens = max(max_batch_tokens, max_length)
        self.length_step = int(length_step)
        self.dtype = DTYPES[dtype]

        config = AutoConfig.from_pretrained(self.model_path)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        total = text_config.num_hidden_layers
        if layer > total:
            raise ValueError(f"layer {layer} > the model's {total} decoder layers")
        self.total_layers = total
        self.hidden_size = text_config.hidden_size
        self.fingerprint = model_fingerprint(self.model_path)
        text_config.num_hidden_layers = layer
        if getattr(text_config, "layer_types", None):
            text_config.layer_types = text_config.layer_types[:layer]

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        with _quiet_transformers():
            self.model = AutoModel.from_pretrained(self.model_path, config=config, dtype=self.dtype)
        if hasattr(self.model, "norm"):
            self.model.norm = torch.nn.Identity()
        self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.fill_token_id = self._pick_fill_token()

    def _pick_fill_token(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id, tok.unk_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> dict[str, Any]:
        """What a checkpoint or centroid file must record to reuse these features safely."""
        return {
            "model": self.model_name,
            "model_path": self.model_path,
            "model_fingerprint": self.fingerprint,
            "layer": self.layer,
            "feature_dim": self.hidden_size,
            "max_length": self.max_length,
            "pooling": "masked_mean",
            "layer_definition": "raw output of decoder layer k (hidden_states[k], no final norm)",
            "padding": f"right, to the token count rounded up to a multiple of {self.length_step}",
        }

    def tokenize(self, texts: Sequence[Any]) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
        """Token ids per text (truncated), truncated flags and empty flags."""
        clean = [to_text(t) for t in texts]
        char_cap = self.max_length * _CHARS_PER_TOKEN_BOUND
        cut = np.array([len(t) > char_cap for t in clean], dtype=bool)
        clean = [t[:char_cap] if c else t for t, c in zip(clean, cut)]
        empty = np.array([not t.strip() for t in clean], dtype=bool)
        encoded = (self.tokenizer(clean, add_special_tokens=True, truncation=False)["input_ids"]
                   if clean else [])
        ids, truncated = [], np.zeros(len(clean), dtype=bool)
        for i, row in enumerate(encoded):
            if empty[i] or not row:
                empty[i] = True
                row = [self.fill_token_id]
            if len(row) > self.max_length:
                truncated[i] = True
                row = row[: self.max_length]
            ids.append(row)
        return ids, truncated | cut, empty

    def padded_width(self, lengths: Any) -> np.ndarray:
        """The width a text of ``lengths`` tokens is padded to: its token count rounded up to a
        multiple of ``length_step``, capped at ``max_length``; a function of its own length only."""
        lengths = np.asarray(lengths, dtype=np.int64)
        return np.minimum(-(-lengths // self.length_step) * self.length_step, self.max_length)

    def plan_batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Index batches: texts of one padded width each, widest first, bounded by batch_size and
        max_batch_tokens. Which batch a text lands in never changes its features."""
        lengths = np.asarray(lengths, dtype=np.int64)
        widths = self.padded_width(lengths)
        order = np.lexsort((np.arange(len(lengths)), -widths))  # widest first, then input order
        batches = []
        for width in dict.fromkeys(widths[order].tolist()):
            group = order[widths[order] == width]
            size = max(1, min(self.batch_size, self.max_batch_tokens // max(int(width), 1)))
            batches.extend(group[start:start + size] for start in range(0, len(group), size))
        return batches

    def encode(self, texts: Sequence[Any], progress: bool = True,
               desc: str = "layer features", bar: Any = None,
               log_counts: bool = True) -> LayerFeatures:
        """Features of ``texts`` in input order.

        :param bar: an open progress bar (anything with ``update(n)``) to advance by each batch's
            size instead of opening one; the feature cache passes its own so it moves per batch.
        :param log_counts: log how many of these texts are truncated or empty (the feature
            cache, which encodes unique texts chunk by chunk, logs counts over all its inputs).
        """
        n = len(texts)
        d = self.hidden_size
        emb_out = np.zeros((n, d), dtype=np.float32)
        layer_out = np.zeros((n, d), dtype=np.float32)
        ids, truncated, empty = self.tokenize(texts)
        lengths = np.array([len(r) for r in ids], dtype=np.int64)
        own_bar = bar is None
        if own_bar:
            bar = tqdm(total=n, desc=desc, unit="text", disable=not progress or n == 0,
                       mininterval=1.0)
        try:
            for batch in self.plan_batches(lengths):
                emb_out[batch], layer_out[batch] = self.forward_batch([ids[i] for i in batch])
                bar.update(len(batch))
        finally:
            if own_bar:
                bar.close()
        if log_counts:
            log_feature_counts(n, truncated, empty, self.max_length)
        return LayerFeatures(emb_out, layer_out, lengths, truncated, empty, meta=self.describe())

    def forward_batch(self, rows: Sequence[Sequence[int]], width: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """(embedding means, layer-k means) [B, d] of token-id rows padded on the right to
        ``width`` (default: the canonical :meth:`padded_width` of the longest row)."""
        lengths = [len(r) for r in rows]
        if width is None:
            width = int(self.padded_width(max(lengths)))
        input_ids = torch.full((len(rows), width), self.fill_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, : lengths[b]] = torch.tensor(row)
            mask[b, : lengths[b]] = 1
        with torch.inference_mode():
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            weights = mask.unsqueeze(-1).to(torch.float32)
            counts = weights.sum(1)
            emb = self.model.get_input_embeddings()(input_ids).to(torch.float32)
            emb_mean = ((emb * weights).sum(1) / counts).cpu().numpy()
            if self.layer == 0:
                return emb_mean, emb_mean.copy()
            # No attention mask on purpose: padding is on the right, so under the causal mask no
            # real token ever attends to a pad, and outputs of real tokens are those of the
            # unpadded text up to summation order. Without a mask SDPA takes its fused is_causal
            # path instead of materialising a [B, 1, L, L] mask.
            hidden = self.model(input_ids=input_ids, use_cache=False).last_hidden_state
            layer_mean = ((hidden.to(torch.float32) * weights).sum(1) / counts).cpu().numpy()
        return emb_mean, layer_mean

    def encode_records(self, records: Iterable[Mapping[str, Any]],
                       template: str | TextTemplate = ALPACA_TEMPLATE,
                       progress: bool = True) -> LayerFeatures:
        tpl = template if isinstance(template, TextTemplate) else TextTemplate(template)
        return self.encode([tpl.render(r) for r in records], progress=progress)


def log_feature_counts(n: int, truncated: np.ndarray, empty: np.ndarray, max_length: int) -> None:
    """One INFO line for truncated texts, one WARNING for empty ones, counted over ``n`` inputs."""
    if truncated.any():
        logger.info(f"{int(truncated.sum())}/{n} texts truncated to {max_length} tokens")
    if empty.any():
        logger.warning(f"{int(empty.sum())}/{n} texts are empty; encoded as one EOS token")


@contextlib.contextmanager
def _quiet_transformers():
    # Loading a truncated model reports every skipped weight of the later layers as "unexpected";
    # that is the point of truncating, not a problem worth a wall of warnings.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
