"""The resumable feature cache: exact reuse, resume after a kill, no stale reuse."""

from __future__ import annotations

import numpy as np
import pytest

from daar_ops.feature_cache import FeatureCache, cached_encode
from daar_ops.features import LayerFeatureExtractor

TEXTS = [f"sample number {i}: what is {i} plus {i}? It is {2 * i}." for i in range(23)]


@pytest.fixture(scope="module")
def extractor(tiny_llama):
    return LayerFeatureExtractor(str(tiny_llama), layer=2, max_length=32, batch_size=8)


class SimulatedKill(Exception):
    """Stands for a SIGKILL: nothing after the raise runs (the cache has no cleanup handler)."""


class Counting:
    """Wraps an extractor's encode: counts texts encoded, optionally dies after N calls."""

    def __init__(self, extractor, die_after: int | None = None):
        # the class attribute, so wrapping an already wrapped instance still counts real work
        self.inner = type(extractor).encode.__get__(extractor)
        self.die_after, self.calls, self.texts = die_after, 0, 0

    def __call__(self, texts, *args, **kwargs):
        if self.die_after is not None and self.calls >= self.die_after:
            raise SimulatedKill("simulated kill")
        self.calls += 1
        self.texts += len(texts)
        return self.inner(texts, *args, **kwargs)


def test_cached_features_equal_direct_features_in_input_order(extractor, tmp_path):
    texts = TEXTS + [TEXTS[3], "", TEXTS[0]]  # duplicates and an empty text
    direct = extractor.encode(texts, progress=False)
    cached = cached_encode(extractor, texts, tmp_path, template="t", chunk_size=5,
                           progress=False)
    np.testing.assert_allclose(cached.layer, direct.layer, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cached.embedding, direct.embedding, rtol=1e-5, atol=1e-6)
    assert np.array_equal(cached.n_tokens, direct.n_tokens)
    assert np.array_equal(cached.empty, direct.empty) and cached.empty[-2]
    assert np.array_equal(cached.layer[-1], cached.layer[0])


def test_second_run_computes_nothing(extractor, tmp_path, monkeypatch):
    first = FeatureCache(extractor, tmp_path, template="t", chunk_size=10).encode(TEXTS, False)
    counter = Counting(extractor)
    monkeypatch.setattr(extractor, "encode", counter)
    again = FeatureCache(extractor, tmp_path, template="t", chunk_size=10).encode(
        list(reversed(TEXTS)), False)
    assert counter.texts == 0
    assert again.meta["cache_hits"] == len(TEXTS)
    assert np.array_equal(again.layer, first.layer[::-1])


def test_killed_run_resumes_without_recomputing_finished_chunks(extractor, tmp_path,
                                                                 monkeypatch):
    cache = FeatureCache(extractor, tmp_path, template="t", chunk_size=5)
    monkeypatch.setattr(extractor, "encode", Counting(extractor, die_after=2))
    with pytest.raises(SimulatedKill):
        cache.encode(TEXTS, progress=False)
    assert len(cache) == 10  # two finished chunks of 5 survived the kill
    counter = Counting(extractor)
    monkeypatch.setattr(extractor, "encode", counter)
    feats = FeatureCache(extractor, tmp_path, template="t", chunk_size=5).encode(TEXTS, False)
    assert counter.texts == len(TEXTS) - 10
    monkeypatch.undo()
    np.testing.assert_allclose(feats.layer, extractor.encode(TEXTS, progress=False).layer,
                               rtol=1e-5, atol=1e-6)


def test_changed_template_model_or_layer_never_reuses_features(extractor, tiny_llama,
                                                               tiny_qwen2, tmp_path):
    base = FeatureCache(extractor, tmp_path, template="{instruction}")
    base.encode(TEXTS[:4], progress=False)
    other_template = FeatureCache(extractor, tmp_path, template="{instruction} {output}")
    assert other_template.dir != base.dir and len(other_template) == 0
    other_layer = FeatureCache(LayerFeatureExtractor(str(tiny_llama), layer=1, max_length=32),
                               tmp_path, template="{instruction}")
    assert other_layer.dir != base.dir and len(other_layer) == 0
    other_model = FeatureCache(LayerFeatureExtractor(str(tiny_qwen2), layer=2, max_length=32),
                               tmp_path, template="{instruction}")
    assert other_model.dir != base.dir and len(other_model) == 0
    other_padding = FeatureCache(LayerFeatureExtractor(str(tiny_llama), layer=2, max_length=32,
                                                       length_step=16),
                                 tmp_path, template="{instruction}")
    assert other_padding.dir != base.dir and len(other_padding) == 0
    assert FeatureCache(extractor, tmp_path, template="{instruction}").dir == base.dir


def test_resaved_weights_in_the_same_folder_change_the_namespace(tmp_path):
    from tests.conftest import build_tiny_causal_lm

    path = build_tiny_causal_lm(tmp_path / "m", "llama", seed=0)
    before = FeatureCache(LayerFeatureExtractor(str(path), layer=1), tmp_path / "c", template="t")
    build_tiny_causal_lm(path, "llama", seed=1)  # same config (same fingerprint), new weights
    after = FeatureCache(LayerFeatureExtractor(str(path), layer=1), tmp_path / "c", template="t")
    assert before.dir != after.dir


def test_corrupted_chunk_is_dropped_and_recomputed(extractor, tmp_path):
    cache = FeatureCache(extractor, tmp_path, template="t", chunk_size=8)
    good = cache.encode(TEXTS, progress=False)
    chunk = sorted(cache.dir.glob("chunk-*.safetensors"))[0]
    chunk.write_bytes(chunk.read_bytes()[:100])  # truncated, as by a full disk
    again = FeatureCache(extractor, tmp_path, template="t", chunk_size=8).encode(TEXTS, False)
    np.testing.assert_allclose(again.layer, good.layer, rtol=1e-5, atol=1e-6)
    assert not list(cache.dir.glob("*.pkl"))


def test_empty_input_and_bad_chunk_size(extractor, tmp_path):
    feats = FeatureCache(extractor, tmp_path, template="t").encode([], progress=False)
    assert feats.layer.shape == (0, extractor.hidden_size)
    with pytest.raises(ValueError, match="chunk_size"):
        FeatureCache(extractor, tmp_path, chunk_size=0)


def test_encode_records_renders_the_template(extractor, tmp_path):
    records = [{"instruction": "add 2 and 2", "output": "4"}, {"instruction": "hi"}]
    cache = FeatureCache(extractor, tmp_path, template="{instruction} {output}")
    feats = cache.encode_records(records, progress=False)
    direct = extractor.encode(["add 2 and 2 4", "hi"], progress=False)
    np.testing.assert_allclose(feats.layer, direct.layer, rtol=1e-5, atol=1e-6)


def _varied_texts(n: int, seed: int = 0) -> list[str]:
    words = "the of a cat dog sum list plus solve explain capital answer sorted output".split()
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 50)))) for _ in range(n)]


def _overwrite_float(chunk, tensor: str, row: int, value: float) -> None:
    """Overwrite one float32 of ``tensor`` in a safetensors file in place (same size: it parses)."""
    import json
    import struct

    data = bytearray(chunk.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    info = json.loads(data[8:8 + header_len])[tensor]
    width = info["shape"][1]
    offset = 8 + header_len + info["data_offsets"][0] + 4 * row * width
    data[offset:offset + 4] = struct.pack("<f", value)
    chunk.write_bytes(bytes(data))


def test_features_do_not_depend_on_what_the_cache_holds(tiny_llama, tmp_path):
    # Issue 13 item 3: a run after a run over the same texts in another order (or a subset, or
    # with other chunking) must give the same features bit for bit, and equal fresh features.
    extractor = LayerFeatureExtractor(str(tiny_llama), layer=2, max_length=256, batch_size=8)
    texts = _varied_texts(40)
    fresh = extractor.encode(texts, progress=False)
    FeatureCache(extractor, tmp_path / "a", template="t", chunk_size=7).encode(
        texts[::-1][:25], progress=False)
    warm = FeatureCache(extractor, tmp_path / "a", template="t", chunk_size=5).encode(texts,
                                                                                      False)
    cold = FeatureCache(extractor, tmp_path / "b", template="t", chunk_size=64).encode(texts,
                                                                                       False)
    assert warm.meta["cache_hits"] == 25 and cold.meta["cache_hits"] == 0
    for feats in (warm, cold):
        np.testing.assert_array_equal(feats.layer, fresh.layer)
        np.testing.assert_array_equal(feats.embedding, fresh.embedding)


def test_runs_that_cannot_see_each_other_store_identical_copies(tiny_llama, tmp_path,
                                                                monkeypatch):
    # Two runs started together on one cache both encode the shared texts, in their own order and
    # chunks. Before batch-invariant features they stored conflicting copies (issue 13 item 3).
    from safetensors.numpy import load_file

    extractor = LayerFeatureExtractor(str(tiny_llama), layer=2, max_length=256, batch_size=8)
    texts = _varied_texts(36, seed=5)
    first = FeatureCache(extractor, tmp_path, template="t", chunk_size=9)
    a = first.encode(texts[:30], progress=False)
    blind = FeatureCache(extractor, tmp_path, template="t", chunk_size=16)
    monkeypatch.setattr(blind, "_index", lambda index=None, seen=None: {} if index is None
                        else index)  # sees none of the first run's chunks
    b = blind.encode(texts[6:][::-1], progress=False)
    np.testing.assert_array_equal(b.layer[::-1][:24], a.layer[6:30])
    copies: dict[bytes, list[np.ndarray]] = {}
    for chunk in first.dir.glob("chunk-*.safetensors"):
        arrays = load_file(str(chunk))
        for h, row in zip(arrays["text_hash"], arrays["layer"]):
            copies.setdefault(h.tobytes(), []).append(row)
    assert sum(len(c) > 1 for c in copies.values()) == 24
    for rows in copies.values():
        for row in rows[1:]:
            np.testing.assert_array_equal(row, rows[0])


def test_a_text_stored_by_a_concurrent_run_is_read_not_recomputed(extractor, tmp_path,
                                                                  monkeypatch):
    texts = _varied_texts(30, seed=3)
    other = FeatureCache(extractor, tmp_path, template="t", chunk_size=8)
    mine = FeatureCache(extractor, tmp_path, template="t", chunk_size=10)
    counter = Counting(extractor)

    def encode_while_another_run_writes(batch, *args, **kwargs):
        if counter.calls == 0:  # the other run stores texts 10..29 (in its own chunks) meanwhile
            monkeypatch.setattr(extractor, "encode", counter.inner)
            other.encode(texts[10:][::-1], progress=False)
            monkeypatch.setattr(extractor, "encode", encode_while_another_run_writes)
        return counter(batch, *args, **kwargs)

    monkeypatch.setattr(extractor, "encode", encode_while_another_run_writes)
    feats = mine.encode(texts, progress=False)
    assert counter.texts == 10  # only its first chunk; the rest came from the other run
    monkeypatch.undo()
    np.testing.assert_array_equal(feats.layer, extractor.encode(texts, progress=False).layer)


def test_one_overwritten_float_in_a_chunk_is_detected_and_recomputed(extractor, tmp_path,
                                                                     monkeypatch, warnings_log):
    # Issue 13 item 4: the chunk still parses, so only a checksum can tell it was changed.
    cache = FeatureCache(extractor, tmp_path, template="t", chunk_size=8)
    good = cache.encode(TEXTS, progress=False)
    chunk = sorted(cache.dir.glob("chunk-*.safetensors"))[0]
    _overwrite_float(chunk, "layer", 0, -3.2e27)
    counter = Counting(extractor)
    monkeypatch.setattr(extractor, "encode", counter)
    again = FeatureCache(extractor, tmp_path, template="t", chunk_size=8).encode(TEXTS, False)
    np.testing.assert_array_equal(again.layer, good.layer)
    assert counter.texts == 8  # exactly the texts of the changed chunk
    assert any("checksum mismatch" in line and chunk.name in line for line in warnings_log)
    # the rewritten chunk has the same bytes as the original, hence the same checksum name
    assert cache._read_chunk(chunk)["layer"][0, 0] != np.float32(-3.2e27)
    assert len(cache) == len(TEXTS)


def test_cache_progress_moves_per_batch_not_per_chunk(extractor, tmp_path, monkeypatch):
    import daar_ops.feature_cache as fc

    bars = []

    class RecordingBar:
        def __init__(self, *args, total=0, **kwargs):
            self.total, self.updates = total, []
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            self.updates.append(n)

    monkeypatch.setattr(fc, "tqdm", RecordingBar)
    FeatureCache(extractor, tmp_path, template="t", chunk_size=1024).encode(TEXTS)
    (bar,) = bars
    assert bar.total == len(TEXTS) and sum(bar.updates) == len(TEXTS)
    assert len([n for n in bar.updates if n]) >= len(TEXTS) // extractor.batch_size


def test_empty_text_warning_counts_every_input_not_unique_texts(extractor, tmp_path,
                                                                warnings_log):
    FeatureCache(extractor, tmp_path, template="t").encode(["", " ", "", "text", ""], False)
    assert any("4/5 texts are empty" in line for line in warnings_log), warnings_log


def test_encode_records_refuses_a_field_no_record_has(extractor, tmp_path):
    from daar_ops.text import TemplateFieldError

    cache = FeatureCache(extractor, tmp_path, template="{nonexistent_field}")
    with pytest.raises(TemplateFieldError, match="nonexistent_field.*instruction"):
        cache.encode_records([{"instruction": "a"}, {"instruction": "b", "output": "c"}], False)


def test_chunks_that_keep_failing_their_checksum_are_a_clear_error(extractor, tmp_path,
                                                                   monkeypatch):
    from daar_ops.feature_cache import FeatureCacheError, _BrokenChunk

    cache = FeatureCache(extractor, tmp_path, template="t", chunk_size=8)
    cache.encode(TEXTS[:10], progress=False)

    def always_corrupt(path):
        raise _BrokenChunk(path, "checksum mismatch (simulated failing disk)")

    monkeypatch.setattr(cache, "_read_chunk", always_corrupt)
    with pytest.raises(FeatureCacheError, match="keep failing their checksum"):
        cache.encode(TEXTS[:10], progress=False)


def test_repeated_calls_read_each_chunk_index_once_and_survive_a_removed_chunk(
        extractor, tmp_path, monkeypatch):
    import safetensors

    cache = FeatureCache(extractor, tmp_path, template="t", chunk_size=4)
    first = cache.encode(TEXTS, False)
    opened = []
    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda path, **kw: opened.append(path) or
                        real(path, **kw))
    for start in range(0, len(TEXTS), 5):  # a scorer's batches: one call each
        part = cache.encode(TEXTS[start:start + 5], False)
        np.testing.assert_array_equal(part.layer, first.layer[start:start + 5])
    assert opened == []  # the chunk files were indexed by the first call
    # another process drops a chunk (say it found it broken): the kept index is reread
    victim = sorted(tmp_path.rglob("chunk-*.safetensors"))[0]
    victim.unlink()
    again = cache.encode(TEXTS, False)
    np.testing.assert_array_equal(again.layer, first.layer)


def test_hash_index_agrees_with_a_dict_across_merges_and_nul_padded_keys():
    from pathlib import Path

    from daar_ops.feature_cache import _HashIndex

    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 256, (70_000, 16), dtype=np.uint8)  # > the merge threshold
    hashes[:500, 12:] = 0  # keys that end in NUL bytes (numpy S16 pads with NULs)
    hashes[500:1000] = hashes[:500]  # duplicates: the first file that stored a text wins
    hashes[1000:1200, 15] = 0
    index, reference = _HashIndex(), {}
    for start in range(0, len(hashes), 1024):
        path = Path(f"chunk-{start}")
        index.add(path, hashes[start:start + 1024])
        for row, h in enumerate(hashes[start:start + 1024]):
            reference.setdefault(h.tobytes(), (path, row))
    assert len(index) == len(reference)
    queries = np.concatenate([hashes[::7], rng.integers(0, 256, (300, 16), dtype=np.uint8)])
    found, file, row = index.find(queries)
    for q, f, n, r in zip(queries, found, file, row):
        expected = reference.get(q.tobytes())
        assert f == (expected is not None)
        if f:
            assert (index.files[n], r) == expected
