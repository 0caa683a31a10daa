"""Layer-k feature extractor: exactness against the full model, robustness, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel

from daar_ops.features import LayerFeatureExtractor
from daar_ops.text import TextTemplate

TEXTS = [
    "What is the capital of France?",
    "Write a function that adds two numbers. def add(a, b): return a + b",
    "Solve 12 * 7.",
    "short",
    "If all cats are animals and Tom is a cat, is Tom an animal? " * 3,
]


def full_model_means(path, extractor: LayerFeatureExtractor, texts, layer: int):
    full = AutoModel.from_pretrained(path).eval()
    ids, _, _ = extractor.tokenize(texts)
    emb, hid = [], []
    with torch.inference_mode():
        for row in ids:
            hs = full(input_ids=torch.tensor([row]), output_hidden_states=True).hidden_states
            emb.append(hs[0][0].mean(0).numpy())
            hid.append(hs[layer][0].mean(0).numpy())
    return np.stack(emb), np.stack(hid), len(hs) - 1


@pytest.mark.parametrize("arch_fixture", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("layer", [1, 3])
def test_equals_full_model_hidden_state(request, arch_fixture, layer):
    path = request.getfixturevalue(arch_fixture)
    ex = LayerFeatureExtractor(str(path), layer=layer, batch_size=2)
    feats = ex.encode(TEXTS, progress=False)
    emb, hid, n_layers = full_model_means(path, ex, TEXTS, layer)
    assert n_layers == 4 and ex.total_layers == 4
    np.testing.assert_allclose(feats.embedding, emb, atol=1e-5)
    np.testing.assert_allclose(feats.layer, hid, atol=1e-4)


def test_last_layer_is_raw_not_final_normed(tiny_llama):
    # The full model's hidden_states[-1] has the final norm applied; our layer-4 features must be
    # the raw output of decoder layer 4 instead, like every other layer k.
    ex = LayerFeatureExtractor(str(tiny_llama), layer=4)
    feats = ex.encode(TEXTS[:2], progress=False)
    full = AutoModel.from_pretrained(tiny_llama).eval()
    captured = {}
    full.layers[3].register_forward_hook(lambda m, i, o: captured.setdefault(
        "raw", (o[0] if isinstance(o, tuple) else o)))
    with torch.inference_mode():
        ids = torch.tensor([ex.tokenize(TEXTS[:1])[0][0]])
        normed = full(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
    raw = captured["raw"][0].mean(0).numpy()
    np.testing.assert_allclose(feats.layer[0], raw, atol=1e-5)
    assert np.abs(feats.layer[0] - normed.numpy()).max() > 1e-3


def test_only_first_k_layers_are_loaded(tiny_llama):
    ex = LayerFeatureExtractor(str(tiny_llama), layer=2)
    assert len(ex.model.layers) == 2
    full = AutoModel.from_pretrained(tiny_llama)
    assert ex.n_parameters < sum(p.numel() for p in full.parameters())
    emb_only = LayerFeatureExtractor(str(tiny_llama), layer=0)
    assert len(emb_only.model.layers) == 0
    feats = emb_only.encode(TEXTS, progress=False)
    np.testing.assert_array_equal(feats.layer, feats.embedding)


def test_order_and_batching_do_not_change_features(tiny_qwen2):
    texts = [TEXTS[i % len(TEXTS)] + " x" * i for i in range(23)]
    a = LayerFeatureExtractor(str(tiny_qwen2), layer=2, batch_size=1).encode(texts, progress=False)
    b_ex = LayerFeatureExtractor(str(tiny_qwen2), layer=2, batch_size=7, max_batch_tokens=64)
    perm = np.random.RandomState(0).permutation(len(texts))
    b = b_ex.encode([texts[i] for i in perm], progress=False)
    np.testing.assert_allclose(b.layer, a.layer[perm], atol=1e-5)
    np.testing.assert_array_equal(b.n_tokens, a.n_tokens[perm])
    again = b_ex.encode([texts[i] for i in perm], progress=False)
    np.testing.assert_array_equal(again.layer, b.layer)


def _varied_texts(n: int, seed: int = 0) -> list[str]:
    words = ("the of a cat dog sum list plus solve explain function capital answer sorted output "
             "input").split()
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for _ in range(n)]


@pytest.mark.parametrize("arch_fixture", ["tiny_llama", "tiny_qwen2"])
def test_features_are_bit_identical_whatever_else_is_in_the_batch(request, arch_fixture):
    # The module's determinism promise: a text's features depend on the text alone. Before the
    # canonical padding, a text padded to its batch's longest text differed in the last bits.
    path = str(request.getfixturevalue(arch_fixture))
    texts = _varied_texts(40)
    reference = LayerFeatureExtractor(path, layer=2, batch_size=32,
                                      max_batch_tokens=4096).encode(texts, progress=False)
    rng = np.random.default_rng(1)
    for batch_size, max_batch_tokens in ((1, 2048), (5, 64), (16, 4096)):
        ex = LayerFeatureExtractor(path, layer=2, batch_size=batch_size,
                                   max_batch_tokens=max_batch_tokens)
        subset = rng.permutation(len(texts))[: 3 * len(texts) // 4]
        feats = ex.encode([texts[i] for i in subset], progress=False)
        np.testing.assert_array_equal(feats.layer, reference.layer[subset])
        np.testing.assert_array_equal(feats.embedding, reference.embedding[subset])
    alone = np.stack([encode_alone(path, t) for t in texts[:6]])
    np.testing.assert_array_equal(alone, reference.layer[:6])


def encode_alone(path: str, text: str) -> np.ndarray:
    return LayerFeatureExtractor(path, layer=2).encode([text], progress=False).layer[0]


def test_batches_hold_one_padded_width_that_depends_on_the_length_only(tiny_llama):
    ex = LayerFeatureExtractor(str(tiny_llama), layer=1, max_length=50, batch_size=4,
                               max_batch_tokens=64, length_step=16)
    lengths = np.array([1, 16, 17, 50, 49, 33, 2, 3, 4, 5, 6, 32])
    widths = ex.padded_width(lengths)
    assert widths.tolist() == [16, 16, 32, 50, 50, 48, 16, 16, 16, 16, 16, 32]
    batches = ex.plan_batches(lengths)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for batch in batches:
        assert len(set(widths[batch].tolist())) == 1
        assert len(batch) <= max(1, min(4, 64 // int(widths[batch[0]])))
    assert [int(widths[b[0]]) for b in batches] == sorted((int(widths[b[0]]) for b in batches),
                                                          reverse=True)
    with pytest.raises(ValueError, match="length_step"):
        LayerFeatureExtractor(str(tiny_llama), layer=1, length_step=0)


class RecordingBar:
    def __init__(self):
        self.updates: list[int] = []

    def update(self, n: int = 1) -> None:
        self.updates.append(n)


def test_progress_moves_once_per_batch(tiny_llama):
    ex = LayerFeatureExtractor(str(tiny_llama), layer=1, batch_size=4)
    texts = _varied_texts(18)
    bar = RecordingBar()
    ex.encode(texts, bar=bar)
    assert bar.updates == [len(b) for b in ex.plan_batches(
        np.array([len(r) for r in ex.tokenize(texts)[0]]))]
    assert sum(bar.updates) == len(texts) and len(bar.updates) >= 5


def test_bad_inputs_get_defined_features(tiny_llama):
    ex = LayerFeatureExtractor(str(tiny_llama), layer=2, max_length=16)
    texts = ["", "   \n\t", None, 12.5, float("nan"), ["a", 1], "bad \ud800 surrogate",
             "long text " * 5000, "normal text"]
    feats = ex.encode(texts, progress=False)
    assert feats.layer.shape == (len(texts), ex.hidden_size)
    assert np.isfinite(feats.layer).all() and np.isfinite(feats.embedding).all()
    assert feats.empty.tolist() == [True, True, True, False, True, False, False, False, False]
    assert feats.truncated[7] and feats.n_tokens[7] == 16
    assert feats.n_truncated == int(feats.truncated.sum())
    # All empty texts share one representation (a single EOS token).
    np.testing.assert_array_equal(feats.layer[0], feats.layer[1])
    assert ex.encode([], progress=False).layer.shape == (0, ex.hidden_size)


def test_records_template(tiny_llama):
    ex = LayerFeatureExtractor(str(tiny_llama), layer=1)
    recs = [{"instruction": "Add", "input": "", "output": "3"}, {"instruction": "Add", "output": "3"}]
    feats = ex.encode_records(recs, progress=False)
    np.testing.assert_array_equal(feats.layer[0], feats.layer[1])
    single = ex.encode_records(recs, template="instruction", progress=False)
    np.testing.assert_allclose(single.layer[0], ex.encode(["Add"], progress=False).layer[0],
                               atol=1e-6)
    assert TextTemplate().render(recs[0]) == "Add  3"


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": 5}, "decoder layers"), ({"layer": -1}, "layer"), ({"dtype": "int8"}, "dtype"),
    ({"max_length": 0}, ">= 1"), ({"batch_size": 0}, ">= 1")])
def test_invalid_parameters_raise(tiny_llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerFeatureExtractor(str(tiny_llama), **kwargs)


def test_bf16_close_to_fp32(tiny_llama):
    a = LayerFeatureExtractor(str(tiny_llama), layer=2).encode(TEXTS, progress=False)
    b = LayerFeatureExtractor(str(tiny_llama), layer=2, dtype="bfloat16").encode(TEXTS, progress=False)
    assert b.layer.dtype == np.float32
    np.testing.assert_allclose(b.layer, a.layer, atol=0.1)


@pytest.mark.integration
def test_smollm2_layer3_matches_full_model(smollm2_path, shared_pool):
    import gzip
    import json

    with gzip.open(shared_pool, "rt") as handle:
        records = [json.loads(line) for _, line in zip(range(6), handle)]
    texts = [TextTemplate().render(r) for r in records]
    ex = LayerFeatureExtractor("smollm2-135m-instruct", layer=3, max_length=128)
    assert len(ex.model.layers) == 3 and ex.total_layers == 30
    feats = ex.encode(texts, progress=False)
    _, hid, _ = full_model_means(smollm2_path, ex, texts, 3)
    assert np.abs(feats.layer - hid).max() <= 1e-4
