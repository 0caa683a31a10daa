"""Sentence embeddings through the on-disk feature cache (issue 22 item 14): the default stage 1
(``domain_pseudo_label_mapper``, MiniLM space) no longer re-embeds every text on every run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from daar_ops.encoders import SentenceFeatureSource, cached_sentence_embeddings

pytestmark = pytest.mark.integration

TEXTS = (["Solve 12 * 7. The answer is 84.", "Compute 3 + 5 = 8.", "What is 10 / 2? It is 5.",
          "Write a function def add(a, b): return a + b", "def f(x): return sorted(x)", "",
          "Input: a list of integers. Output: the sorted list, using merge sort"] +
         [f"Explain step {i} of long division of {i * 37} by {i + 3}, with the remainder."
          for i in range(17)])


@pytest.fixture(scope="module")
def encoder(minilm_path):
    from daar_ops.encoders import load_sentence_encoder

    enc = load_sentence_encoder(str(minilm_path))
    enc.max_seq_length = 128
    return enc


class Counting:
    """Counts the texts SentenceFeatureSource really encodes."""

    def __init__(self, monkeypatch):
        self.texts = 0
        inner = SentenceFeatureSource.encode

        def encode(source, texts, *args, **kwargs):
            self.texts += len(texts)
            return inner(source, texts, *args, **kwargs)

        monkeypatch.setattr(SentenceFeatureSource, "encode", encode)


def test_a_text_gets_the_same_bytes_fresh_cached_or_beside_other_texts(encoder, minilm_path,
                                                                       tmp_path, monkeypatch):
    counting = Counting(monkeypatch)
    model = str(minilm_path)
    fresh = cached_sentence_embeddings(TEXTS, encoder, model, batch_size=5, cache=False)
    assert fresh.shape == (len(TEXTS), 384) and fresh.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fresh, axis=1), 1.0, atol=1e-5)
    # another mix and order of texts, another batch size: the same rows, bit for bit
    mixed = cached_sentence_embeddings(TEXTS[::-1][:15] + ["unrelated text"], encoder, model,
                                       batch_size=3, cache=False)
    np.testing.assert_array_equal(mixed[:15], fresh[::-1][:15])
    counting.texts = 0
    first = cached_sentence_embeddings(TEXTS, encoder, model, cache_dir=tmp_path)
    np.testing.assert_array_equal(first, fresh)
    assert counting.texts == len(TEXTS)
    again = cached_sentence_embeddings(TEXTS[5:] + TEXTS[:5], encoder, model, cache_dir=tmp_path)
    np.testing.assert_array_equal(again, np.concatenate([fresh[5:], fresh[:5]]))
    assert counting.texts == len(TEXTS)  # nothing encoded the second time


def test_truncation_and_model_are_part_of_the_key(encoder, minilm_path, tmp_path, monkeypatch):
    counting = Counting(monkeypatch)
    model = str(minilm_path)
    cached_sentence_embeddings(TEXTS[:4], encoder, model, cache_dir=tmp_path)
    old = encoder.max_seq_length
    try:
        encoder.max_seq_length = 8  # another truncation: another namespace, encoded again
        short = cached_sentence_embeddings(TEXTS[:4], encoder, model, cache_dir=tmp_path)
    finally:
        encoder.max_seq_length = old
    assert counting.texts == 8
    namespaces = [json.loads(p.read_text()) for p in tmp_path.glob("*/namespace.json")]
    assert sorted(n["max_length"] for n in namespaces) == [8, 128]
    assert all(n["model_fingerprint"] not in (None, "unknown") for n in namespaces)
    assert not np.array_equal(short[0], cached_sentence_embeddings(TEXTS[:1], encoder, model,
                                                                   cache=False)[0])


def test_pseudo_label_rerun_reads_the_cache_and_labels_identically(minilm_path, tmp_path,
                                                                  monkeypatch):
    from data_juicer.core.data import NestedDataset

    from daar_ops.ops.domain_pseudo_label_mapper import DomainPseudoLabelMapper

    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"instruction": t, "output": "", "domain": d}) + "\n"
                               for d, texts in (("mathematics", TEXTS[:3]), ("coding", TEXTS[3:5]))
                               for t in texts))
    rows = [{"instruction": t} for t in TEXTS[5:]]
    counting = Counting(monkeypatch)

    def run():
        op = DomainPseudoLabelMapper(samples_path=str(samples), cache_dir=str(tmp_path / "c"),
                                     text_template="{instruction}")
        assert op.feature == "sentence"
        out = op.run(NestedDataset.from_list(rows)).to_list()
        return [(r["__dj__meta__"]["daar_pseudo_domain"],
                 r["__dj__stats__"]["daar_domain_similarity"]) for r in out]

    first = run()
    encoded = counting.texts
    assert encoded >= len(rows)
    assert run() == first
    assert counting.texts == encoded  # the rerun embedded nothing
    # feature_cache=False: nothing read or written, same labels
    op = DomainPseudoLabelMapper(samples_path=str(samples), feature_cache=False,
                                 text_template="{instruction}",
                                 cache_dir=str(tmp_path / "off"))
    out = op.run(NestedDataset.from_list(rows)).to_list()
    assert [(r["__dj__meta__"]["daar_pseudo_domain"],
             r["__dj__stats__"]["daar_domain_similarity"]) for r in out] == first
    assert not (tmp_path / "off").exists()
