"""Sentence-encoder embeddings (sentence-transformers), L2-normalised. No Data-Juicer import."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from daar_ops.core import resolve_device
from daar_ops.models import resolve_model_path
from daar_ops.text import to_text

def load_sentence_encoder(model: str = "all-minilm-l6-v2", device: str | None = "cpu"):
    """A ``SentenceTransformer`` for a short name or a local sentence-transformers folder.

    Not cached here: operators hold it through Data-Juicer's ``get_model``
    (:func:`daar_ops.model_keys.model_key`, kind ``sentence_encoder``)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_model_path(model), device=resolve_device(device),
                               local_files_only=True)


def encode_sentences(texts: Sequence[Any], model: str = "all-minilm-l6-v2",
                     batch_size: int = 64, device: str | None = "cpu",
                     normalize: bool = True, progress: bool = True, encoder: Any = None
                     ) -> np.ndarray:
    """[N, d] float32 embeddings in input order; non-string values are rendered with to_text.
    ``encoder``: an already loaded encoder (else ``model`` is loaded on ``device``)."""
    encoder = encoder if encoder is not None else load_sentence_encoder(model, device)
    clean = [to_text(t) for t in texts]
    if not clean:
        return np.zeros((0, encoder.get_sentence_embedding_dimension()), dtype=np.float32)
    emb = encoder.encode(clean, batch_size=batch_size, convert_to_numpy=True,
                         normalize_embeddings=normalize, show_progress_bar=progress)
    return np.ascontiguousarray(emb, dtype=np.float32)
