import gzip
import hashlib
import json
import math

import numpy as np
import pytest

import daar_ops.report as report
from daar_ops.report import build_report, parse_subset_args, read_records

DOMAINS = ["coding", "common_sense", "mathematics", "reasoning"]


def _pool(n=40):
    return [{"instruction": f"task {i} about {DOMAINS[i % 4]}", "input": "" if i % 3 else None,
             "output": f"answer {i}", "domain": DOMAINS[i % 4]} for i in range(n)]


def _fake_embed(texts, model="x", cache_dir=None, batch_size=64, device="cpu", progress=True,
                max_seq_length=128):
    """Deterministic stand-in for the sentence encoder: unit vectors from a text hash, with a
    strong per-domain component so that domains cluster."""
    out = np.zeros((len(texts), 16), dtype=np.float32)
    for i, t in enumerate(texts):
        seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
        out[i] = np.random.default_rng(seed).normal(size=16)
        for j, d in enumerate(DOMAINS):
            if d in t:
                out[i, j] += 4.0
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture
def fake_encoder(monkeypatch):
    monkeypatch.setattr(report, "embed_texts", _fake_embed)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_records_formats_and_dj_stats_file(tmp_path):
    rows = _pool(5)
    assert read_records(_write_jsonl(tmp_path / "a.jsonl", rows)) == rows
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_records(tmp_path / "b.jsonl.gz", limit=3) == rows[:3]
    (tmp_path / "c.json").write_text(json.dumps(rows))
    assert read_records(tmp_path / "c.json") == rows
    # a Data-Juicer export with stats in a side file gets them back under __dj__stats__
    _write_jsonl(tmp_path / "sel.jsonl", rows[:2])
    _write_jsonl(tmp_path / "sel_stats.jsonl", [{"__dj__stats__": {"s": 1.0}},
                                                {"__dj__stats__": {"s": 2.0}}])
    got = read_records(tmp_path / "sel.jsonl")
    assert [r["__dj__stats__"]["s"] for r in got] == [1.0, 2.0]
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_records(tmp_path / "bad.jsonl")


def test_report_numbers_files_and_domain_joined_from_pool(tmp_path, fake_encoder):
    pool = _pool(40)
    # the selection never carried `domain` (stripped, as compare_methods does); the report joins
    # it back from the pool by text
    math_only = [{k: v for k, v in r.items() if k != "domain"} | {"__dj__stats__": {
        "score": float(i), "bad": float("nan"), "flag": True, "name": "x"}}
        for i, r in enumerate(pool) if r["domain"] == "mathematics"]
    balanced = pool[:20]
    outside = [{"instruction": "not in the pool at all", "input": "", "output": "?"}]
    metrics = build_report(pool, {"math_only": math_only, "balanced": balanced,
                                  "everything": pool, "outside": outside},
                           tmp_path / "rep", max_points=10)
    subs = metrics["subsets"]
    assert subs["math_only"]["n"] == 10
    assert subs["math_only"]["labels"]["domain"]["counts"] == {"mathematics": 10}
    assert subs["math_only"]["labels"]["domain"]["entropy"] == 0.0
    assert subs["balanced"]["labels"]["domain"]["entropy"] == pytest.approx(math.log(4))
    assert subs["everything"]["facility_location_coverage"] == pytest.approx(1.0, abs=1e-5)
    # a balanced half covers the pool better than one domain of the same pool
    assert subs["balanced"]["facility_location_coverage"] > \
        subs["math_only"]["facility_location_coverage"]
    assert subs["math_only"]["mean_pairwise_similarity"] > \
        subs["balanced"]["mean_pairwise_similarity"]
    assert subs["outside"]["n_not_in_pool"] == 1
    assert subs["outside"]["labels"] == {}
    assert metrics["pool"]["contrast"]["Phi_inter"] > 0
    assert set(metrics["pool"]["contrast"]["Phi_intra"]) == set(DOMAINS)
    # only finite numeric stats are histogrammed
    assert list(subs["math_only"]["stats_keys"]) == ["score"]
    out = tmp_path / "rep"
    for name in ("report.md", "metrics.json", "projection.png", "labels_domain.png",
                 "stats_math_only.png"):
        assert (out / name).exists(), name
    assert (out / "projection.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "| math_only | 10 | 25.0 |" in md and "![projection](projection.png)" in md
    json.loads((out / "metrics.json").read_text())


def test_report_pseudo_labels_from_meta_and_tsne(tmp_path, fake_encoder):
    pool = [{k: v for k, v in r.items() if k != "domain"} for r in _pool(24)]
    sel = [dict(r, __dj__meta__={"daar_pseudo_domain": "a" if i % 2 else "b"})
           for i, r in enumerate(pool[:8])]
    metrics = build_report(pool, {"sel": sel}, tmp_path / "r", projection="tsne", max_points=20)
    block = metrics["subsets"]["sel"]["labels"]["__dj__meta__.daar_pseudo_domain"]
    assert block["counts"] == {"a": 4, "b": 4}
    assert block["entropy"] == pytest.approx(math.log(2))
    assert (tmp_path / "r" / "projection.png").exists()


def test_report_rejects_bad_arguments(tmp_path, fake_encoder):
    with pytest.raises(ValueError, match="projection"):
        build_report(_pool(4), {"s": _pool(2)}, tmp_path, projection="umapx")
    with pytest.raises(ValueError, match="empty"):
        build_report([], {"s": _pool(2)}, tmp_path)
    with pytest.raises(ValueError, match="at least one subset"):
        build_report(_pool(4), {}, tmp_path)
    # an empty selection is reported (NaN coverage), not a crash
    m = build_report(_pool(8), {"none": []}, tmp_path / "e", max_points=10)
    assert m["subsets"]["none"]["n"] == 0
    assert math.isnan(m["subsets"]["none"]["facility_location_coverage"])


def test_parse_subset_args(tmp_path):
    (tmp_path / "random").mkdir()
    sel = tmp_path / "random" / "selected.jsonl"
    sel.write_text("")
    assert parse_subset_args([str(sel), "len=/x/y.jsonl"]) == {"random": str(sel),
                                                               "len": "/x/y.jsonl"}
    with pytest.raises(ValueError, match="twice"):
        parse_subset_args(["a=1", "a=2"])


def test_cli_report(tmp_path, fake_encoder, capsys):
    from daar_ops.cli import main

    pool = _write_jsonl(tmp_path / "pool.jsonl", _pool(20))
    sel = _write_jsonl(tmp_path / "sel.jsonl", _pool(20)[:5])
    assert main(["report", "--pool", str(pool), "--subset", f"first={sel}",
                 "--out", str(tmp_path / "out"), "--max-points", "10"]) == 0
    assert "first: n=5" in capsys.readouterr().out
    assert (tmp_path / "out" / "report.md").exists()


@pytest.mark.integration
def test_real_encoder_embeddings_are_cached(tmp_path, minilm_path):
    import torch

    torch.set_num_threads(1)
    texts = ["What is 2 + 2?", "Write a Python function.", "Why is the sky blue?"]
    a = report.embed_texts(texts, cache_dir=tmp_path, progress=False)
    assert a.shape == (3, 384)
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert len(list(tmp_path.glob("emb-*"))) == 1
    b = report.embed_texts(texts, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(a, b)


def test_inputs_are_checked_before_any_embedding(tmp_path, monkeypatch):
    import daar_ops.report as report

    def no_embedding(*a, **k):
        raise AssertionError("embedded before the inputs were checked")

    monkeypatch.setattr(report, "embed_texts", no_embedding)
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"instruction": f"q{i}", "input": "", "output": "a",
                                        "domain": "x"}) + "\n" for i in range(20)))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        report.build_report(pool, {"s": tmp_path / "missing.jsonl"}, tmp_path / "out")
    sub = tmp_path / "sub.jsonl"
    sub.write_text(pool.read_text().splitlines(keepends=True)[0])
    with pytest.raises(ValueError, match=r"label key\(s\) domian found in no.*domain"):
        report.build_report(pool, {"s": sub}, tmp_path / "out", label_keys=("domian",),
                             require_labels=True)
