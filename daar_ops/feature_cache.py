"""Resumable on-disk cache of :class:`~daar_ops.features.LayerFeatureExtractor` outputs.

Layout::

    <root>/<namespace>/namespace.json              what the namespace key was built from
    <root>/<namespace>/chunk-<sha256>.safetensors  one finished chunk of texts

* The **namespace** is a hash of everything that changes the features of a given text: the model
  fingerprint (config hash), model path, the name/size/mtime of its weight files, layer,
  max_length, padding rule, dtype, the feature definition and the text template. A different
  model, layer or template therefore lands in another namespace and can never reuse stale features.
* Inside a namespace, rows are keyed by the SHA-256 of the rendered text (first 16 bytes stored as
  ``text_hash`` [n, 16] uint8), so any dataset containing an already-encoded text reuses it.
* Missing texts are encoded ``chunk_size`` at a time; each finished chunk is written to a temporary
  file and atomically renamed. A killed run leaves only complete chunks (plus at most one stale
  ``.tmp``), so the next run recomputes only unfinished chunks.
* A chunk is named by the SHA-256 of its bytes and the file is verified against its name every
  time rows are read from it: a chunk that fails to parse, has inconsistent shapes or fails its
  checksum (one overwritten float) is logged, removed and its texts recomputed; it is never used.
* Files are safetensors only (no pickle).

Determinism: a text's features do not depend on the other texts it is encoded with (see
:mod:`daar_ops.features`), so a run gives bit-identical features whether its texts come fresh or
from the cache, whatever earlier or concurrent runs stored, and two processes writing the same text
store the same bytes. The index of the chunk files is kept between calls and, before each chunk is
encoded, extended by the files written since, so a text another process has stored meanwhile is
read, not computed again (first writer wins).

No Data-Juicer import.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from loguru import logger
from tqdm.auto import tqdm

from daar_ops.features import LayerFeatureExtractor, LayerFeatures, log_feature_counts
from daar_ops.models import daar_ops_home
from daar_ops.text import ALPACA_TEMPLATE, TextTemplate, to_text

HASH_BYTES = 16
CACHE_VERSION = 2  # 2: canonical padding (batch-invariant features), checksummed chunks
CHUNK_DIGEST_HEX = 32  # hex digits of the chunk file's SHA-256 kept in its name
_ARRAYS = ("embedding", "layer", "n_tokens", "truncated", "empty")


def default_cache_dir() -> Path:
    return daar_ops_home() / "feature_cache"


def text_hashes(texts: Sequence[Any]) -> np.ndarray:
    """[N, 16] uint8: the first 16 bytes of SHA-256 of each text (as :func:`to_text` renders it)."""
    out = np.zeros((len(texts), HASH_BYTES), dtype=np.uint8)
    for i, t in enumerate(texts):
        digest = hashlib.sha256(to_text(t).encode("utf-8")).digest()[:HASH_BYTES]
        out[i] = np.frombuffer(digest, dtype=np.uint8)
    return out


def weights_stamp(model_path: str | os.PathLike) -> list[list[Any]]:
    """(file name, size, mtime_ns) of a local model's weight files: re-saved weights in the same
    folder (same config, so same fingerprint) still change the cache namespace."""
    path = Path(model_path)
    if not path.is_dir():
        return []
    files = sorted(q for q in path.iterdir()
                   if q.suffix in (".safetensors", ".bin", ".pt", ".gguf") and q.is_file())
    return [[q.name, q.stat().st_size, q.stat().st_mtime_ns] for q in files]


def namespace_key(extractor_description: Mapping[str, Any], dtype: str, template: str | None
                  ) -> dict[str, Any]:
    """The fields that define a cache namespace (what changes a text's features)."""
    keys = ("model_path", "model_fingerprint", "layer", "max_length", "pooling",
            "layer_definition", "feature_dim", "padding")
    key = {k: extractor_description.get(k) for k in keys}
    key.update(dtype=str(dtype), template=template, cache_version=CACHE_VERSION,
               weights=weights_stamp(str(extractor_description.get("model_path", ""))))
    return key


class _HashIndex:
    """text hash -> (chunk file, row), looked up a batch of hashes at a time.

    Sorted 16-byte keys with a file number and a row (24 bytes a text), plus a dict of the
    entries added since the last merge: a plain dict of Python objects costs ~150 bytes a text,
    ~150 MB per scoring process for a million-text pool. Keys are numpy ``S16`` values made by
    viewing the hash bytes, which compare as the 16 bytes do (numpy pads with NULs)."""

    def __init__(self) -> None:
        self.files: list[Path] = []
        self._file_ids: dict[Path, int] = {}
        self._keys = np.empty(0, dtype=f"S{HASH_BYTES}")
        self._file = np.empty(0, dtype=np.int32)
        self._row = np.empty(0, dtype=np.int32)
        self._recent: dict[bytes, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self._keys) + len(self._recent)

    def find(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found, file number, row) for each row of ``hashes`` ([n, 16] uint8)."""
        n = len(hashes)
        found, file, row = np.zeros(n, bool), np.full(n, -1, np.int64), np.full(n, -1, np.int64)
        if not n:
            return found, file, row
        keys = np.ascontiguousarray(hashes, dtype=np.uint8).view(self._keys.dtype).ravel()
        if len(self._keys):
            at = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
            found = self._keys[at] == keys
            file[found], row[found] = self._file[at[found]], self._row[at[found]]
        if self._recent:
            for i in np.flatnonzero(~found).tolist():
                hit = self._recent.get(hashes[i].tobytes())
                if hit is not None:
                    found[i], (file[i], row[i]) = True, hit
        return found, file, row

    def add(self, path: Path, hashes: np.ndarray) -> None:
        """Row r of ``path`` holds the text of ``hashes[r]``, unless the text is already indexed
        (the first chunk that stored a text wins, as ``dict.setdefault``)."""
        if path not in self._file_ids:
            self._file_ids[path] = len(self.files)
            self.files.append(path)
        number = self._file_ids[path]
        found = self.find(hashes)[0]
        for r in np.flatnonzero(~found).tolist():
            self._recent.setdefault(hashes[r].tobytes(), (number, r))
        if len(self._recent) >= max(65536, len(self._keys) // 4):
            self._merge()

    def _merge(self) -> None:
        keys = np.frombuffer(b"".join(self._recent), dtype=self._keys.dtype)
        file_row = np.array(list(self._recent.values()), dtype=np.int32).reshape(-1, 2)
        merged = np.concatenate([self._keys, keys])
        order = np.argsort(merged, kind="stable")
        self._keys = merged[order]
        self._file = np.concatenate([self._file, file_row[:, 0]])[order]
        self._row = np.concatenate([self._row, file_row[:, 1]])[order]
        self._recent = {}


class FeatureCache:
    """Features of texts for one extractor + template, cached in ``root`` and resumable.

    :param extractor: the feature extractor (its ``describe()`` and dtype define the namespace).
    :param root: cache directory (default ``$DAAR_OPS_HOME/feature_cache``).
    :param template: the text template the texts were rendered with (part of the key), or None
        when texts are given as-is.
    :param chunk_size: texts encoded and saved together; a killed run loses at most one chunk.
    """

    def __init__(self, extractor: LayerFeatureExtractor, root: str | os.PathLike | None = None,
                 template: str | None = ALPACA_TEMPLATE, chunk_size: int = 1024):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.extractor = extractor
        self.chunk_size = chunk_size
        self.template = template
        self.key = namespace_key(extractor.describe(), str(extractor.dtype).replace("torch.", ""),
                                 template)
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True, default=str).encode())
        self.namespace = digest.hexdigest()[:20]
        self.dir = Path(root if root is not None else default_cache_dir()) / self.namespace
        check_writable(self.dir)  # a read-only or full cache fails now, not after the encoding
        # the index of the chunk files read so far, kept between encode() calls: a scorer calls
        # encode() once per batch, and rereading every chunk's hashes each time is quadratic
        self._known = _HashIndex()
        self._seen: set[Path] = set()
        info = self.dir / "namespace.json"
        if not info.exists():
            tmp = self.dir / f".namespace.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(self.key, indent=2, sort_keys=True, default=str))
            os.replace(tmp, info)

    # -- reading ---------------------------------------------------------------------------------
    def _chunk_files(self) -> list[Path]:
        return sorted(self.dir.glob("chunk-*.safetensors"))

    def _index(self, index: _HashIndex | None = None, seen: set[Path] | None = None
               ) -> _HashIndex:
        """text hash -> (chunk file, row), adding chunk files not in ``seen`` to ``index``.

        Only headers and text hashes are read here; a chunk that cannot even be parsed is removed.
        Rows are verified against the chunk's checksum when they are read (:meth:`_read_chunk`).
        """
        from safetensors import safe_open

        index = _HashIndex() if index is None else index
        seen = set() if seen is None else seen
        for path in self._chunk_files():
            if path in seen:
                continue
            seen.add(path)
            try:
                with safe_open(str(path), framework="numpy") as handle:
                    hashes = handle.get_tensor("text_hash")
                    names = set(handle.keys())
                if not set(_ARRAYS) <= names or hashes.ndim != 2 or hashes.shape[1] != HASH_BYTES:
                    raise ValueError(f"missing tensors or bad text_hash shape {hashes.shape}")
            except Exception as err:  # safetensors raises its own error types
                seen.discard(path)  # a rewritten chunk of the same name is read again later
                if path.exists():  # else removed meanwhile by a run that found it broken
                    self._drop(path, f"unreadable ({err})")
                continue
            index.add(path, hashes)
        return index

    def _drop(self, path: Path, why: str) -> None:
        logger.warning(f"feature cache: dropping chunk {path.name}: {why}; its texts are "
                       "recomputed")
        path.unlink(missing_ok=True)

    def _read_chunk(self, path: Path) -> dict[str, np.ndarray]:
        """All arrays of a chunk, after checking its bytes against the checksum in its name."""
        from safetensors.numpy import load

        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise _BrokenChunk(path, "removed by a concurrent run") from err
        digest = hashlib.sha256(data).hexdigest()[:CHUNK_DIGEST_HEX]
        if path.name != f"chunk-{digest}.safetensors":
            raise _BrokenChunk(path, f"checksum mismatch (file hashes to {digest}); it was "
                                     "corrupted or modified")
        try:
            arrays = load(data)
        except Exception as err:  # safetensors raises its own error types
            raise _BrokenChunk(path, f"unreadable ({err})") from err
        n = len(arrays.get("text_hash", ()))
        if not set(_ARRAYS) <= set(arrays) or any(len(arrays[k]) != n for k in _ARRAYS):
            raise _BrokenChunk(path, "missing tensors or inconsistent row counts")
        return arrays

    def __len__(self) -> int:
        return len(self._index())

    # -- main entry --------------------------------------------------------------------------------
    def encode(self, texts: Sequence[Any], progress: bool = True) -> LayerFeatures:
        """Features of ``texts`` in input order: cached rows are read, missing ones computed.

        Bit-identical to ``extractor.encode(texts)`` whatever the cache holds (module docstring).
        """
        n = len(texts)
        hashes = text_hashes(texts)
        keys = [h.tobytes() for h in hashes]
        n_hit = None
        for _attempt in range(3):
            index, seen = self._known, self._seen
            self._index(index, seen)  # adds only the chunk files written since the last call
            if n_hit is None:
                n_hit = int(index.find(hashes)[0].sum())
            self._compute_missing(texts, hashes, keys, index, seen, progress)
            out, broken = self._gather(hashes, index)
            if not broken:
                break
            for bad in broken:
                self._drop(bad.path, bad.why)
            self._known, self._seen = _HashIndex(), set()  # reread all: others may be gone too
        else:
            raise FeatureCacheError(f"feature cache {self.dir}: chunks keep failing their "
                                    "checksum after being rewritten (failing disk or a concurrent "
                                    "writer corrupting files?)")
        log_feature_counts(n, out["truncated"], out["empty"], self.extractor.max_length)
        meta = dict(self.extractor.describe(), cache_dir=str(self.dir), cache_hits=n_hit,
                    template=self.template)
        return LayerFeatures(out["embedding"], out["layer"], out["n_tokens"], out["truncated"],
                             out["empty"], meta=meta)

    def _compute_missing(self, texts: Sequence[Any], hashes: np.ndarray, keys: list[bytes],
                         index: _HashIndex, seen: set[Path],
                         progress: bool) -> None:
        """Encode and store the texts not in ``index``, one chunk at a time; ``index`` grows."""
        cached = index.find(hashes)[0]
        missing: dict[bytes, int] = {}
        for i in np.flatnonzero(~cached).tolist():
            missing.setdefault(keys[i], i)
        n_hit = int(cached.sum())
        logger.info(f"feature cache {self.dir}: {n_hit}/{len(keys)} texts cached, "
                    f"{len(missing)} unique texts to encode")
        if not missing:
            return
        todo = list(missing.values())
        with tqdm(total=len(todo), desc="layer features (cached in chunks)", unit="text",
                  disable=not progress, mininterval=1.0) as bar:
            for start in range(0, len(todo), self.chunk_size):
                block = todo[start:start + self.chunk_size]
                self._index(index, seen)  # a text a concurrent run stored meanwhile: first wins
                stored = index.find(hashes[block])[0]
                rows = [i for i, done in zip(block, stored.tolist()) if not done]
                bar.update(len(block) - len(rows))
                if not rows:
                    continue
                # the bar moves per forward batch, not per chunk
                feats = self.extractor.encode([texts[i] for i in rows], progress=False, bar=bar,
                                              log_counts=False)
                path = self._write_chunk(hashes[rows], feats)
                seen.add(path)
                index.add(path, hashes[rows])

    def _gather(self, hashes: np.ndarray, index: _HashIndex
                ) -> tuple[dict[str, np.ndarray], list[_BrokenChunk]]:
        """The rows of ``hashes`` from their verified chunks, and the chunks that failed."""
        n, d = len(hashes), self.extractor.hidden_size
        layer_d = getattr(self.extractor, "layer_size", d)  # 0: a source with embeddings only
        out = {"embedding": np.zeros((n, d), np.float32),
               "layer": np.zeros((n, layer_d), np.float32),
               "n_tokens": np.zeros(n, np.int64), "truncated": np.zeros(n, bool),
               "empty": np.zeros(n, bool)}
        found, file, row = index.find(hashes)
        if not found.all():
            raise FeatureCacheError(f"feature cache {self.dir}: {int((~found).sum())} texts are "
                                    "neither cached nor computed")  # a bug, never a silent zero
        broken = []
        order = np.argsort(file, kind="stable")
        numbers, starts = np.unique(file[order], return_index=True)
        for number, dst in zip(numbers.tolist(), np.split(order, starts[1:])):
            path = index.files[number]
            src = row[dst]
            try:
                arrays = self._read_chunk(path)
                expected = hashes[dst]
                if src.max() >= len(arrays["text_hash"]) or not np.array_equal(
                        arrays["text_hash"][src], expected):
                    raise _BrokenChunk(path, "its rows do not hold the texts the index expects")
            except _BrokenChunk as bad:
                broken.append(bad)
                continue
            for name in _ARRAYS:
                out[name][dst] = arrays[name][src]
        return out, broken

    def encode_records(self, records: Iterable[Mapping[str, Any]], progress: bool = True
                       ) -> LayerFeatures:
        """Render records with this cache's template (:meth:`TextTemplate.render_all`), then
        :meth:`encode`."""
        if self.template is None:
            raise ValueError("this cache has no template; pass rendered texts to encode()")
        return self.encode(TextTemplate(self.template).render_all(list(records)),
                           progress=progress)

    def _write_chunk(self, hashes: np.ndarray, feats: LayerFeatures) -> Path:
        from safetensors.numpy import save

        tensors = {"text_hash": np.ascontiguousarray(hashes, dtype=np.uint8),
                   "embedding": feats.embedding.astype(np.float32),
                   "layer": feats.layer.astype(np.float32),
                   "n_tokens": feats.n_tokens.astype(np.int64),
                   "truncated": feats.truncated.astype(bool),
                   "empty": feats.empty.astype(bool)}
        data = save(tensors)
        name = hashlib.sha256(data).hexdigest()[:CHUNK_DIGEST_HEX]
        path = self.dir / f"chunk-{name}.safetensors"
        tmp = self.dir / f".chunk-{name}.{os.getpid()}.tmp"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)  # atomic: a reader never sees a half-written chunk
        finally:
            tmp.unlink(missing_ok=True)  # a full disk leaves no partial chunk behind
        return path


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed; raise an OSError naming it unless a file can be written
    in it."""
    probe = folder / f".write-check.{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)
    except OSError as err:
        raise OSError(err.errno, f"the cache folder cannot be written ({err.strerror}); pass "
                      f"another cache folder or free space", str(folder)) from err
    finally:
        probe.unlink(missing_ok=True)


class FeatureCacheError(RuntimeError):
    """The feature cache cannot give verified features."""


class _BrokenChunk(Exception):
    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = path, why


def cached_encode(extractor: LayerFeatureExtractor, texts: Sequence[Any],
                  cache_dir: str | os.PathLike | None = None, template: str | None = None,
                  chunk_size: int = 1024, progress: bool = True) -> LayerFeatures:
    """``FeatureCache(extractor, cache_dir, template, chunk_size).encode(texts)`` in one call."""
    return FeatureCache(extractor, cache_dir, template, chunk_size).encode(texts, progress)
