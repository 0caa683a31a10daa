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
