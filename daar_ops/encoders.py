"""Sentence-encoder embeddings (sentence-transformers), L2-normalised. No Data-Juicer import."""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np

from daar_ops.features import resolve_device
from daar_ops.models import resolve_model_path
from daar_ops.text import to_text

_CACHE: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()


def load_sentence_encoder(model: str = "all-minilm-l6-v2", device: str | None = "cpu"):
    """A cached ``SentenceTransformer`` for a short name or a local sentence-transformers folder."""
    from sentence_transformers import SentenceTransformer

    path, dev = resolve_model_path(model), resolve_device(device)
    with _LOCK:
        if (path, dev) not in _CACHE:
            _CACHE[(path, dev)] = SentenceTransformer(path, device=dev, local_files_only=True)
        return _CACHE[(path, dev)]


def encode_sentences(texts: Sequence[Any], model: str = "all-minilm-l6-v2",
                     batch_size: int = 64, device: str | None = "cpu",
                     normalize: bool = True, progress: bool = True) -> np.ndarray:
    """[N, d] float32 embeddings in input order; non-string values are rendered with to_text."""
    encoder = load_sentence_encoder(model, device)
    clean = [to_text(t) for t in texts]
    if not clean:
        return np.zeros((0, encoder.get_sentence_embedding_dimension()), dtype=np.float32)
    emb = encoder.encode(clean, batch_size=batch_size, convert_to_numpy=True,
                         normalize_embeddings=normalize, show_progress_bar=progress)
    return np.ascontiguousarray(emb, dtype=np.float32)
