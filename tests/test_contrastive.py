import math

import numpy as np
import pytest

from daar_ops.algorithms.contrastive import (encode_labels, global_phi_inter, global_phi_intra,
                                             label_centroids, percentile_band, phi_scores)


def test_phi_scores_follow_eq2_and_eq4():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 6))
    labels = rng.integers(0, 3, size=30)
    labels[5] = -1
    c = label_centroids(x, labels, 3)
    inter, intra = phi_scores(x, c, labels)

    def cos(a, b):
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    for i in range(30):
        if labels[i] < 0:
            assert math.isnan(inter[i]) and math.isnan(intra[i])
            continue
        assert intra[i] == pytest.approx(cos(x[i], c[labels[i]]), abs=1e-5)
        assert inter[i] == pytest.approx(sum(cos(x[i], c[j]) for j in range(3) if j != labels[i]),
                                         abs=1e-5)


def test_centroids_are_label_means_and_empty_domain_is_an_error():
    x = np.array([[0.0, 2.0], [2.0, 0.0], [4.0, 4.0]])
    c = label_centroids(x, np.array([0, 0, 1]), 2)
    np.testing.assert_allclose(c, [[1.0, 1.0], [4.0, 4.0]])
    with pytest.raises(ValueError, match="without samples"):
        label_centroids(x, np.array([0, 0, 0]), 2)


def test_global_metrics_eq3_eq5():
    square = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # 4 sides of length 1, 2 diagonals of sqrt(2)
    assert global_phi_inter(square) == pytest.approx((4 + 2 * math.sqrt(2)) / 6)
    assert math.isnan(global_phi_inter(square[:1]))
    x = np.array([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]])
    labels = np.array([0, 0, 1])
    c = np.array([[1.0, 0.0], [5.0, 5.0], [9.0, 9.0]])
    out = global_phi_intra(x, c, labels)
    assert out[0] == pytest.approx(1.0) and out[1] == pytest.approx(0.0) and math.isnan(out[2])


def test_percentile_band_is_per_domain_exact_and_deterministic():
    scores = np.array([5, 1, 3, 9, 7, 2, 8, 4, 6, 0, 3, 3], dtype=float)
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, -1, 1])
    top = percentile_band(scores, labels, 80, 100)
    # the top band keeps budget(n_k, 0.2) rows: domain 0 (5 rows) its best 1, domain 1 (6) its 1
    assert np.flatnonzero(top).tolist() == [3, 6]
    bottom = percentile_band(scores, labels, 0, 20)  # the rest of the partition: 5-4=1, 6-4=2
    assert np.flatnonzero(bottom).tolist() == [1, 5, 9]
    bands = [percentile_band(scores, labels, lo, lo + 20) for lo in range(0, 100, 20)]
    assert (np.sum(bands, axis=0) == (labels >= 0)).all()  # the 5 bands partition labeled rows
    with pytest.raises(ValueError):
        percentile_band(scores, labels, 50, 50)
    ties = percentile_band(np.zeros(4), np.zeros(4, int), 50, 100)
    assert np.flatnonzero(ties).tolist() == [0, 1]  # the package's tie rule: earlier row first


def test_nan_scores_rank_lowest():
    keep = percentile_band(np.array([np.nan, 1.0, 2.0, 3.0]), np.zeros(4, int), 75, 100)
    assert np.flatnonzero(keep).tolist() == [3]
    keep = percentile_band(np.array([np.nan, 1.0, 2.0, 3.0]), np.zeros(4, int), 0, 25)
    assert np.flatnonzero(keep).tolist() == [0]


def test_encode_labels():
    names, idx = encode_labels(["b", "a", None, "", "b", 3])
    assert names == ["3", "a", "b"] and idx.tolist() == [2, 1, -1, -1, 2, 0]
    names, idx = encode_labels(["x", "y", "z"], domains=["z", "x"])
    assert names == ["z", "x"] and idx.tolist() == [1, -1, 0]


# ------------------------------------------------------------------------------- the DJ operator

def _records():
    rows = []
    texts = {"math": ["Solve 12 * 7. The answer is 84.", "What is 3 + 5? It is 8.",
                      "Compute 2 to the power 10.", "Add 4 and 9."],
             "code": ["def add(a, b): return a + b", "Write merge sort in Python.",
                      "Sort a list of integers.", "Implement a stack class."]}
    for dom, items in texts.items():
        for t in items:
            rows.append({"instruction": t, "input": "", "output": "ok", "label": dom})
    rows.append({"instruction": "no label here", "input": None, "output": "", "label": None})
    rows.append({"instruction": "   ", "output": "", "label": "math"})  # empty text, labeled
    return rows


def _op(tiny_llama, **kw):
    import daar_ops.ops  # noqa: F401  (registers the op)
    from data_juicer.ops import OPERATORS

    return OPERATORS.modules["domain_contrastive_selector"](
        model=str(tiny_llama), label_key="label", **kw)


def test_operator_keeps_a_band_per_domain_and_writes_float_stats(tiny_llama):
    from data_juicer.core.data import NestedDataset

    ds = NestedDataset.from_list(_records())
    op = _op(tiny_llama, metric="intra", lower_percentile=50, upper_percentile=100)
    out = op.run(ds)
    rows = out.to_list()
    # the top half: math has 5 labeled rows -> budget(5, 0.5) = 2 kept; code 4 -> 2 kept;
    # unlabeled dropped
    assert sorted(r["label"] for r in rows) == ["code", "code", "math", "math"]
    for r in rows:
        assert isinstance(r["__dj__stats__"]["daar_phi_inter"], float)
        assert isinstance(r["__dj__stats__"]["daar_phi_intra"], float)
    # the kept rows are the most typical of their domain
    for dom in ("math", "code"):
        kept = [r["__dj__stats__"]["daar_phi_intra"] for r in rows if r["label"] == dom]
        assert min(kept) > -1.0
    again = _op(tiny_llama, metric="intra", lower_percentile=50, upper_percentile=100).run(
        NestedDataset.from_list(_records())).to_list()
    assert [r["instruction"] for r in again] == [r["instruction"] for r in rows]


def test_operator_keep_unlabeled_and_validation(tiny_llama, monkeypatch):
    from data_juicer.core.data import NestedDataset

    out = _op(tiny_llama, keep_unlabeled=True, lower_percentile=0, upper_percentile=100).run(
        NestedDataset.from_list(_records())).to_list()
    assert len(out) == len(_records())
    unl = [r for r in out if r["label"] is None][0]
    assert math.isnan(unl["__dj__stats__"]["daar_phi_inter"])
    with pytest.raises(ValueError, match="metric"):
        _op(tiny_llama, metric="both")
    with pytest.raises(ValueError, match="percentile"):
        _op(tiny_llama, lower_percentile=90, upper_percentile=10)


def test_operator_with_centroid_file(tiny_llama, tmp_path):
    from data_juicer.core.data import NestedDataset

    from daar_ops.artifacts import save_artifact
    from daar_ops.features import LayerFeatureExtractor

    ext = LayerFeatureExtractor(str(tiny_llama), layer=0)
    feats = ext.encode(["Solve 12 * 7.", "def add(a, b): return a + b"], progress=False).embedding
    save_artifact(tmp_path / "c", {"centroids": feats}, {
        **ext.describe(), "domains": ["math", "code"], "feature": "embedding",
        "template": "{instruction} {input} {output}", "counts": [1, 1]}, kind="daar_centroids")
    op = _op(tiny_llama, centroids_path=str(tmp_path / "c"), lower_percentile=0,
             upper_percentile=100)
    out = op.run(NestedDataset.from_list(_records())).to_list()
    assert len(out) == 9  # every labeled row, unlabeled dropped
    save_artifact(tmp_path / "bad", {"centroids": feats}, {
        **ext.describe(), "domains": ["math", "code"], "feature": "layer"}, kind="daar_centroids")
    with pytest.raises(ValueError, match="embedding"):
        _op(tiny_llama, centroids_path=str(tmp_path / "bad"))
