"""knn_cosine: faiss exact / IVF / HNSW and the torch path, the tie rule, duplicates, bad k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daar_ops.algorithms.knn import (knn_cosine, knn_cosine_torch, l2_normalize, nearest_cosine)


def brute_force(x: np.ndarray, k: int, exclude_self: bool = True):
    """Reference: float64 similarities, stable sort (lower index first among equal values)."""
    xn = l2_normalize(x).astype(np.float64)
    s = xn @ xn.T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, axis=1)


def assert_matches_reference(idx, sim, ref_idx, ref_sim, gap=1e-5):
    """Same similarities; same indices wherever the reference's neighbours are not near-tied."""
    np.testing.assert_allclose(sim, ref_sim, atol=1e-5)
    near_tie = np.zeros_like(ref_sim, dtype=bool)
    d = np.abs(np.diff(ref_sim, axis=1)) < gap
    near_tie[:, 1:] |= d
    near_tie[:, :-1] |= d
    assert (idx[~near_tie] == ref_idx[~near_tie]).all()


@pytest.fixture(scope="module")
def gaussian():
    return np.random.default_rng(0).standard_normal((1500, 24)).astype(np.float32)


def test_exact_faiss_and_torch_match_brute_force(gaussian):
    ref_idx, ref_sim = brute_force(gaussian, 12)
    for fn in (knn_cosine, knn_cosine_torch):
        idx, sim = fn(gaussian, 12, block_size=256)
        assert idx.dtype == np.int64 and sim.dtype == np.float32 and idx.shape == (1500, 12)
        assert_matches_reference(idx, sim, ref_idx, ref_sim)
        assert (np.diff(sim, axis=1) <= 0).all()  # most similar first
    a = knn_cosine(gaussian, 12)
    b = knn_cosine_torch(gaussian, 12)
    assert (a[0] == b[0]).mean() > 0.999


def test_exact_agrees_with_faiss_index_flat_ip(gaussian):
    import faiss

    x = l2_normalize(gaussian)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    d, i = index.search(x, 11)
    idx, sim = knn_cosine(x, 10)
    np.testing.assert_allclose(sim, d[:, 1:], atol=1e-6)  # position 0 is the row itself


def test_duplicates_ties_and_self_exclusion():
    rng = np.random.default_rng(1)
    # 6 groups of 25 exact duplicates: every similarity inside a group ties at 1, far past the
    # tie margin, so the exact fallback must apply the lower-index rule
    groups = rng.standard_normal((6, 16)).astype(np.float32)
    label = np.repeat(np.arange(6), 25)[rng.permutation(150)]
    x = groups[label]
    # The expected neighbours follow from the groups alone, never from a GEMM's rounding (a
    # float64 matmul may give exact duplicates similarities a last bit apart, and which ones
    # differs between CPUs, e.g. with or without AVX512): first the row's 24 duplicates by index,
    # then, tied with each other, the lowest 6 indices of the nearest other group.
    gn = groups.astype(np.float64) / np.linalg.norm(groups.astype(np.float64), axis=1,
                                                      keepdims=True)
    gsim = gn @ gn.T
    np.fill_diagonal(gsim, -np.inf)
    nearest = gsim.argmax(1)
    top2 = np.sort(gsim, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0] > 1e-3).all()  # the nearest group is clear of the next
    members = [np.flatnonzero(label == g) for g in range(6)]
    expected = np.array([[j for j in members[label[r]] if j != r] + members[nearest[label[r]]][:6]
                         .tolist() for r in range(len(x))])
    expected_sim = np.concatenate([np.ones((len(x), 24)),
                                   np.repeat(gsim[label, nearest[label]][:, None], 6, axis=1)],
                                  axis=1)
    for fn in (knn_cosine, knn_cosine_torch):
        idx, sim = fn(x, 30, block_size=64, tie_margin=2)
        assert not (idx == np.arange(len(x))[:, None]).any()  # never its own neighbour
        assert (idx == expected).all()
        np.testing.assert_allclose(sim, expected_sim, atol=1e-5)
        # tied rows carry bit-identical similarities (what makes the index rule applicable)
        assert (sim[:, :24] == sim[:, :1]).all() and (sim[:, 24:] == sim[:, 24:25]).all()


def test_equal_similarities_without_duplicates_sort_by_index():
    # the row 0 query is equidistant (similarity 0) from the 8 axis-aligned rows
    x = np.zeros((10, 9), dtype=np.float32)
    x[0, 0] = 1.0
    x[1:9, 1:9] = np.eye(8, dtype=np.float32)
    x[9] = x[1]  # a duplicate at the end
    for fn in (knn_cosine, knn_cosine_torch):
        idx, sim = fn(x, 9, tie_margin=0)
        assert idx[0].tolist() == list(range(1, 10))
        assert idx[1, 0] == 9 and idx[9, 0] == 1  # duplicates are each other's neighbours
        assert idx[1, 1:].tolist() == [0, 2, 3, 4, 5, 6, 7, 8]


def test_exclude_self_false_finds_self_first_and_k_bounds():
    x = np.random.default_rng(2).standard_normal((50, 8)).astype(np.float32)
    idx, sim = knn_cosine(x, 50, exclude_self=False)
    assert (idx[:, 0] == np.arange(50)).all()
    np.testing.assert_allclose(sim[:, 0], 1.0, atol=1e-6)
    assert sorted(idx[7].tolist()) == list(range(50))
    idx, _ = knn_cosine(x, 49)
    assert all(sorted(idx[r].tolist()) == [j for j in range(50) if j != r] for r in range(50))
    for bad in (0, 50, -1):
        with pytest.raises(ValueError, match="k must be in"):
            knn_cosine(x, bad)
        with pytest.raises(ValueError, match="k must be in"):
            knn_cosine_torch(x, bad)
    with pytest.raises(ValueError, match="k must be in"):
        knn_cosine(x, 51, exclude_self=False)
    with pytest.raises(ValueError, match="index must be one of"):
        knn_cosine(x, 5, index="annoy")
    with pytest.raises(ValueError, match="faiss-gpu"):
        knn_cosine(x, 5, index="ivf", device="cuda")


@pytest.mark.parametrize("index, params, min_recall", [
    ("ivf", dict(nlist=16, nprobe=16), 0.999),  # every cell probed: exact
    ("ivf", dict(nlist=32, nprobe=4), 0.5),
    ("hnsw", dict(hnsw_m=16, ef_search=64), 0.9),
])
def test_approximate_indexes_recall_and_contract(gaussian, index, params, min_recall):
    ref_idx, _ = brute_force(gaussian, 10)
    idx, sim = knn_cosine(gaussian, 10, index=index, **params)
    assert idx.shape == (1500, 10) and idx.dtype == np.int64 and sim.dtype == np.float32
    assert not (idx == np.arange(1500)[:, None]).any()
    assert (np.diff(sim, axis=1) <= 0).all()
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, ref_idx)])
    assert recall >= min_recall
    # similarities are the true cosines of the returned rows
    xn = l2_normalize(gaussian)
    np.testing.assert_allclose(sim, np.einsum("nd,nkd->nk", xn, xn[idx]), atol=1e-5)
    # deterministic (same seed, same data)
    again = knn_cosine(gaussian, 10, index=index, **params)
    assert (again[0] == idx).all()


def test_ivf_with_too_few_probed_candidates_falls_back_to_exact():
    # 40 rows, 8 cells, 1 probed: some rows see fewer than k candidates and are recomputed
    x = np.random.default_rng(3).standard_normal((40, 4)).astype(np.float32)
    idx, sim = knn_cosine(x, 20, index="ivf", nlist=8, nprobe=1)
    assert (idx >= 0).all() and np.isfinite(sim).all()
    assert not (idx == np.arange(40)[:, None]).any()
    assert all(len(set(r)) == 20 for r in idx.tolist())


def test_nearest_cosine_matches_matmul():
    rng = np.random.default_rng(4)
    pool = rng.standard_normal((700, 16)).astype(np.float32)
    sel = np.concatenate([pool[:30], pool[:5]])  # duplicates: the lower index wins
    idx, sim = nearest_cosine(pool, sel, block_size=128)
    s = l2_normalize(pool).astype(np.float64) @ l2_normalize(sel).astype(np.float64).T
    np.testing.assert_allclose(sim, s.max(1), atol=1e-5)
    assert (idx[:30] == np.arange(30)).all()


def test_faiss_threads_follow_torch():
    import faiss

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        knn_cosine(np.eye(5, dtype=np.float32), 2)
        assert faiss.omp_get_max_threads() == 1
    finally:
        torch.set_num_threads(old)


def test_ds2_curation_through_an_ivf_index_probing_every_cell_equals_exact():
    from daar_research.ds2 import make_synthetic_ds2

    from daar_ops.algorithms.ds2 import DS2Config, curate_scores

    data = make_synthetic_ds2(n=1200, seed=0)
    exact = curate_scores(data["embeddings"], data["observed"], DS2Config(hoc_steps=200))
    ivf_config = DS2Config(hoc_steps=200, knn_index="ivf", knn_params=dict(nlist=8, nprobe=8))
    ivf = curate_scores(data["embeddings"], data["observed"], ivf_config)
    assert (ivf.curated == exact.curated).all()
    np.testing.assert_allclose(ivf.long_tail, exact.long_tail, atol=1e-6)
    assert ivf.info["knn_index"] == "ivf" and ivf.info["knn_params"] == dict(nlist=8, nprobe=8)
    with pytest.raises(ValueError, match="DS2Config.knn_index must be one of"):
        DS2Config(knn_index="lsh")
