"""Sentence-encoder embeddings (sentence-transformers), L2-normalised, and :func:`embed_texts`,
the centroid features of texts from a loaded layer-feature extractor. No Data-Juicer import, and
no torch at import time (registering the operators stays light: tests/test_startup.py)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from daar_ops.core import resolve_device
from daar_ops.models import MINILM, SENTENCE_MAX_TOKENS, resolve_model_path
from daar_ops.text import to_text

def load_sentence_encoder(model: str = MINILM, device: str | None = "cpu",
                          max_seq_length: int | None = SENTENCE_MAX_TOKENS):
    """A ``SentenceTransformer`` for a short name or a local sentence-transformers folder, reading
    at most ``max_seq_length`` tokens per text (``None``: the model's own setting).

    Not cached here: operators hold it through Data-Juicer's ``get_model``
    (:func:`daar_ops.model_keys.model_key`, kind ``sentence_encoder``)."""
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(resolve_model_path(model), device=resolve_device(device),
                                  local_files_only=True)
    if max_seq_length is not None:
        encoder.max_seq_length = int(max_seq_length)
    return encoder


def embed_texts(extractor: Any, texts: Sequence[Any], feature: str = "embedding",
                progress: bool = False) -> np.ndarray:
    """[N, d] float32 features of ``texts`` from a :class:`daar_ops.features.LayerFeatureExtractor`
    (or anything with its ``encode`` and ``hidden_size``): ``embedding`` or ``layer`` (the
    centroid features, :data:`daar_ops.algorithms.centroids.FEATURES`)."""
    if len(texts) == 0:
        return np.zeros((0, int(extractor.hidden_size)), dtype=np.float32)
    feats = extractor.encode(list(texts), progress=progress)
    return feats.embedding if feature == "embedding" else feats.layer


def encode_sentences(texts: Sequence[Any], model: str = MINILM,
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


class SentenceFeatureSource:
    """A loaded sentence encoder as :class:`daar_ops.feature_cache.FeatureCache` sees a feature
    extractor, so sentence embeddings are cached on disk like the LM's layer features.

    The cache namespace (:meth:`describe`) holds the model's identity (path, config and weight
    fingerprint, its sentence-transformers module and pooling configs), the truncation
    (``max_seq_length``) and the normalisation; rows are keyed by the SHA-256 of the text.
    ``embedding`` holds the sentence embedding; ``layer`` is empty (``layer_size = 0``).

    Batch invariance (as :mod:`daar_ops.features`): texts are encoded in groups of one token
    count, so no text is padded and its embedding does not depend on the texts beside it; a text
    therefore gets the same bytes fresh or from the cache.
    """

    layer_size = 0
    dtype = "float32"

    def __init__(self, encoder: Any, model: str, batch_size: int = 64, normalize: bool = True):
        self.encoder = encoder
        self.model = model
        self.batch_size = int(batch_size)
        self.normalize = bool(normalize)
        self.max_length = int(encoder.max_seq_length)
        dim = getattr(encoder, "get_embedding_dimension", None) or \
            encoder.get_sentence_embedding_dimension  # the name before sentence-transformers 5.2
        self.hidden_size = int(dim())

    def describe(self) -> dict[str, Any]:
        import hashlib
        import json
        from pathlib import Path

        from daar_ops.models import model_fingerprint

        path = resolve_model_path(self.model)
        digest = hashlib.sha256()
        folder = Path(path)
        for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                     "1_Pooling/config.json", "2_Normalize/config.json"):
            if (folder / name).is_file():
                digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
        return {"model": self.model, "model_path": str(path),
                "model_fingerprint": model_fingerprint(path), "layer": None,
                "max_length": self.max_length,
                "pooling": "sentence_transformers:" + digest.hexdigest()[:16],
                "layer_definition": json.dumps({"normalize_embeddings": self.normalize}),
                "feature_dim": self.hidden_size, "padding": "none (grouped by token count)"}

    def token_counts(self, texts: Sequence[str]) -> np.ndarray:
        """Tokens of each text as the encoder sees it (special tokens included), untruncated."""
        tokenizer = self.encoder.tokenizer
        ids = tokenizer([t.strip() for t in texts], add_special_tokens=True, truncation=False,
                        verbose=False)["input_ids"]
        return np.asarray([len(i) for i in ids], dtype=np.int64)

    def encode(self, texts: Sequence[Any], progress: bool = False, bar: Any = None,
               log_counts: bool = True):
        from daar_ops.features import LayerFeatures, log_feature_counts

        clean = [to_text(t) for t in texts]
        n = len(clean)
        full = self.token_counts(clean) if n else np.zeros(0, np.int64)
        n_tokens = np.minimum(full, self.max_length)
        out = np.zeros((n, self.hidden_size), dtype=np.float32)
        for width in np.unique(n_tokens).tolist():
            rows = np.flatnonzero(n_tokens == width)
            out[rows] = encode_sentences([clean[i] for i in rows.tolist()], encoder=self.encoder,
                                         batch_size=self.batch_size, normalize=self.normalize,
                                         progress=False)
            if bar is not None:
                bar.update(len(rows))
        truncated = full > self.max_length
        empty = np.asarray([not t.strip() for t in clean], dtype=bool)
        if log_counts:
            log_feature_counts(n, truncated, empty, self.max_length)
        return LayerFeatures(out, np.zeros((n, 0), np.float32), n_tokens, truncated, empty)


def cached_sentence_embeddings(texts: Sequence[Any], encoder: Any, model: str,
                               batch_size: int = 64, cache: bool = True, cache_dir: Any = None,
                               progress: bool = False) -> np.ndarray:
    """[N, d] float32 normalised sentence embeddings of ``texts`` (:class:`SentenceFeatureSource`),
    with ``cache`` through the on-disk feature cache (``cache_dir``, default
    ``$DAAR_OPS_HOME/feature_cache``): a text encoded by any earlier run with the same model and
    truncation is read, not encoded again. The bytes are the same either way."""
    source = SentenceFeatureSource(encoder, model, batch_size=batch_size)
    if not cache:
        return source.encode(list(texts), progress=progress).embedding
    from daar_ops.feature_cache import FeatureCache

    return FeatureCache(source, cache_dir, template=None).encode(list(texts), progress).embedding
