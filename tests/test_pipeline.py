"""``daar-ops select`` end to end: outputs, nothing lost, no ground-truth leak, determinism."""

from __future__ import annotations

import json

import pytest

from daar_ops.core import iter_jsonl
from daar_ops.pipeline import SelectConfig, run_select
from daar_ops.pool import split_by_text


def read_jsonl(path):
    return list(iter_jsonl(path))

SYNTHETIC = [
    {"instruction": "What is the capital of Spain?", "input": "", "output": "Madrid.",
     "domain": "common_sense"},
    {"instruction": "Name a fruit that is yellow.", "input": "", "output": "A banana.",
     "domain": "common_sense"},
    {"instruction": "If it rains the ground is wet. It rains. Is the ground wet?", "input": "",
     "output": "Yes, by modus ponens.", "domain": "reasoning"},
    {"instruction": "Compute 17 * 3.", "input": "", "output": "51", "domain": "mathematics"},
    {"instruction": "Write a Python function that reverses a string.", "input": "",
     "output": "def rev(s): return s[::-1]", "domain": "coding"},
]


def pool_records(n: int = 90) -> list[dict]:
    """Alpaca-style records of four kinds (with a ground-truth `domain`, as the shared pool)."""
    kinds = [("common_sense", "What is the capital of country {i}?", "City {i}."),
             ("reasoning", "If A{i} implies B{i} and A{i} holds, does B{i} hold?", "Yes."),
             ("mathematics", "Compute {i} * 7 + 3.", "{j}"),
             ("coding", "Write a function f{i} that returns {i}.", "def f{i}(): return {i}")]
    out = []
    for i in range(n):
        dom, q, a = kinds[i % 4]
        out.append({"instruction": q.format(i=i), "input": "",
                    "output": a.format(i=i, j=i * 7 + 3), "source": "test", "domain": dom})
    return out


@pytest.fixture()
def small_pool(tmp_path):
    path = tmp_path / "pool.jsonl"
    with open(path, "w") as dst:
        for rec in pool_records(90):
            dst.write(json.dumps(rec) + "\n")
        dst.write("{not json\n")  # a malformed line: reported, not fatal
    syn = tmp_path / "synthetic.jsonl"
    syn.write_text("".join(json.dumps(r) + "\n" for r in SYNTHETIC))
    return path, syn


def _config(tiny_llama, pool, syn, out, cache, **kw) -> SelectConfig:
    # stage 1 in the tiny LM's embedding space (no sentence encoder needed; the default sentence
    # space is covered by test_default_stage1_* with the real MiniLM)
    base = dict(pool=str(pool), output_dir=str(out), model=str(tiny_llama), synthetic=str(syn),
                probe_size=40, pool_size=None, select_ratio=0.25, epochs=2, max_length=64,
                cache_dir=str(cache), progress=False, pseudo_label_space="embedding",
                pseudo_label_method="fixed")
    base.update(kw)
    return SelectConfig(**base)


def test_select_pipeline_outputs_and_determinism(tiny_llama, small_pool, tmp_path):
    pool, syn = small_pool
    first = run_select(_config(tiny_llama, pool, syn, tmp_path / "a", tmp_path / "cache_a",
                               workers=1, per_domain=False))  # the paper's global top
    s = first.summary
    assert s["pool_records"] == 90 and s["malformed_lines"] == [91]
    assert s["probe_pool"] == 40 and s["selection_pool"] == 50 and s["selected"] == 12
    scores = [r for _, r in read_jsonl(tmp_path / "a" / "scores.jsonl")]
    assert len(scores) == 50 and sum(r["selected"] for r in scores) == 12
    selected = [r for _, r in read_jsonl(tmp_path / "a" / "selected.jsonl")]
    assert len(selected) == 12
    # Selected records are the top rewards, carried through unchanged apart from the stats.
    threshold = min(r["__dj__stats__"]["daar_diversity_reward"] for r in selected)
    assert all(r["daar_diversity_reward"] <= threshold for r in scores if not r["selected"])
    assert all({"instruction", "output", "domain"} <= set(r) for r in selected)
    for name in ("summary.json", "summary.md", "score_histogram.png", "pseudo_domains.png",
                 "probe_pool.jsonl", "centroids/manifest.json", "checkpoint/manifest.json"):
        assert (tmp_path / "a" / name).exists(), name
    # the domain probabilities are named; the summary says how far the probes can be trusted
    assert set(selected[0]["__dj__stats__"]["daar_domain_probs"]) == set(s["domains"])
    summary_md = (tmp_path / "a" / "summary.md").read_text()
    r2 = s["probe_metrics"]["div_val_r2"]
    assert f"psi_div (diversity reward) validation R^2: {r2:.3f}" in summary_md
    assert ("**warning**: the diversity reward explains little" in summary_md) == (r2 < 0.1)

    # a rerun in two scoring processes, streaming the selection pool in chunks of 17 records
    # (fresh cache), writes the same bytes
    second = run_select(_config(tiny_llama, pool, syn, tmp_path / "b", tmp_path / "cache_b",
                                workers=2, score_chunk_size=17))
    for name in ("selected.jsonl", "scores.jsonl", "probe_pool.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert second.summary["selected_pseudo_domain_counts"] == s["selected_pseudo_domain_counts"]


def test_selection_never_reads_ground_truth(tiny_llama, small_pool, tmp_path):
    pool, syn = small_pool
    run_select(_config(tiny_llama, pool, syn, tmp_path / "a", tmp_path / "cache"))
    scrambled = tmp_path / "scrambled.jsonl"
    names = ["common_sense", "reasoning", "mathematics", "coding"]
    with open(pool) as src, open(scrambled, "w") as dst:
        for i, line in enumerate(src):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dst.write(line)
                continue
            rec["domain"] = names[(i * 7) % 4]
            dst.write(json.dumps(rec) + "\n")
    run_select(_config(tiny_llama, scrambled, syn, tmp_path / "b", tmp_path / "cache"))
    a = [(r["instruction"], r["__dj__stats__"]["daar_diversity_reward"])
         for _, r in read_jsonl(tmp_path / "a" / "selected.jsonl")]
    b = [(r["instruction"], r["__dj__stats__"]["daar_diversity_reward"])
         for _, r in read_jsonl(tmp_path / "b" / "selected.jsonl")]
    assert a == b


def test_split_is_disjoint_by_text_and_seeded():
    texts = [f"t{i}" for i in range(100)]
    probe, pool, dup = split_by_text(texts, 30, None, seed=3)
    assert len(set(probe) & set(pool)) == 0 and len(probe) + len(pool) == 100 and dup == 0
    assert len(probe) == 30
    assert (split_by_text(texts, 30, None, seed=3)[0] == probe).all()
    assert not (split_by_text(texts, 30, None, seed=4)[0] == probe).all()
    assert len(split_by_text(texts, 30, 10, seed=3)[1]) == 10
    # the split of a text does not depend on the pool's order
    shuffled = texts[::-1]
    again = split_by_text(shuffled, 30, None, seed=3)[0]
    assert sorted(shuffled[i] for i in again) == sorted(texts[i] for i in probe)
    # every copy of a duplicated text lands on one side
    dups = [f"t{i % 20}" for i in range(100)]
    probe, pool, dup = split_by_text(dups, 30, None, seed=0)
    assert dup == 20
    assert not ({dups[i] for i in probe} & {dups[i] for i in pool})
    with pytest.raises(ValueError, match="nothing is left"):
        split_by_text(texts[:10], 10, None, seed=0)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="select_ratio"):
        SelectConfig(pool=str(tmp_path), select_ratio=0).validate()
    with pytest.raises(FileNotFoundError, match="DAAR_OPS_POOL"):
        SelectConfig(pool=str(tmp_path / "missing.jsonl")).validate()
    with pytest.raises(ValueError, match="has no sample of domains"):
        bad = tmp_path / "syn.jsonl"
        bad.write_text(json.dumps(SYNTHETIC[0]) + "\n")
        pool = tmp_path / "pool.jsonl"
        pool.write_text("".join(json.dumps({"instruction": f"q{i}", "input": "", "output": "a"})
                                + "\n" for i in range(20)))
        run_select(SelectConfig(pool=str(pool), synthetic=str(bad), probe_size=5,
                                output_dir=str(tmp_path / "o"), progress=False,
                                model="smollm2-135m-instruct"))


def test_per_domain_selection_keeps_the_ratio_inside_each_predicted_domain(
        tiny_llama, small_pool, tmp_path):
    from collections import Counter

    pool, syn = small_pool
    cfg = _config(tiny_llama, pool, syn, tmp_path / "q", tmp_path / "cache")
    assert cfg.per_domain and SelectConfig(pool=str(pool)).per_domain  # the measured default
    run_select(cfg)
    scores = [r for _, r in read_jsonl(tmp_path / "q" / "scores.jsonl")]
    groups = Counter(r["daar_probe_domain"] for r in scores)
    kept = Counter(r["daar_probe_domain"] for r in scores if r["selected"])
    assert {g: kept.get(g, 0) for g in groups} == {g: int(n * 0.25) for g, n in groups.items()}
    for g in groups:  # within a domain, the kept records are its best rewards
        mine = sorted((r for r in scores if r["daar_probe_domain"] == g),
                      key=lambda r: -r["daar_diversity_reward"])
        assert all(r["selected"] for r in mine[: kept.get(g, 0)])


def test_pipeline_and_recipes_give_the_same_labels_rewards_and_selection(tiny_llama, small_pool,
                                                                         tmp_path):
    """The recipe path (domain_pseudo_label_mapper, then diversity_reward_filter with per-domain
    quotas, in dj-process's executor) on the pipeline's own artifacts reproduces the pipeline
    exactly."""
    import yaml
    from data_juicer.config import init_configs
    from data_juicer.core import DefaultExecutor

    pool, syn = small_pool
    out = tmp_path / "sel"
    run_select(_config(tiny_llama, pool, syn, out, tmp_path / "cache"))
    records = [r for _, r in read_jsonl(pool) if r is not None]
    probe = [r for _, r in read_jsonl(out / "probe_pool.jsonl")]
    scores = [r for _, r in read_jsonl(out / "scores.jsonl")]

    def run_recipe(name, rows, process):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        export = tmp_path / name / "out.jsonl"
        recipe = {"dataset_path": str(data), "export_path": str(export), "np": 1,
                  "text_keys": "instruction",
                  "work_dir": str(tmp_path / name), "keep_stats_in_res_ds": True,
                  "process": process}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        DefaultExecutor(init_configs(args=["--config", str(tmp_path / f"{name}.yaml")])).run()
        return [r for _, r in read_jsonl(export)]

    plain = [{k: v for k, v in r.items() if not k.startswith("__dj__")} for r in probe]
    labelled = run_recipe("label", plain, [{"domain_pseudo_label_mapper": {
        "samples_path": str(out / "synthetic.jsonl"), "model": str(tiny_llama),
        "max_length": 64, "feature": "embedding", "method": "fixed"}}])
    assert [r["__dj__meta__"]["daar_pseudo_domain"] for r in labelled] == \
        [r["__dj__meta__"]["daar_pseudo_domain"] for r in probe]

    pool_rows = [records[s["pool_index"]] for s in scores]
    domains = json.loads((out / "checkpoint" / "manifest.json").read_text())["domains"]
    selected = run_recipe("select", pool_rows, [{"diversity_reward_filter": {
        "checkpoint": str(out / "checkpoint"), "domain_ratios": {d: 0.25 for d in domains},
        "cache_dir": str(tmp_path / "cache")}}])  # select's default: per-domain quotas
    expected = [s for s in scores if s["selected"]]
    assert [r["instruction"] for r in selected] == \
        [records[s["pool_index"]]["instruction"] for s in expected]
    # rewards agree to float32 feature noise (a text's features vary ~1e-7 with its batch)
    assert [r["__dj__stats__"]["daar_diversity_reward"] for r in selected] == pytest.approx(
        [s["daar_diversity_reward"] for s in expected], abs=1e-5)


@pytest.mark.integration
def test_default_stage1_in_select(tiny_llama, small_pool, tmp_path, minilm_path):
    pool, syn = small_pool
    cfg = _config(tiny_llama, pool, syn, tmp_path / "d", tmp_path / "cache",
                  pseudo_label_space=SelectConfig().pseudo_label_space,
                  pseudo_label_method=SelectConfig().pseudo_label_method)
    s = run_select(cfg).summary
    assert cfg.pseudo_label_space == "sentence" and cfg.pseudo_label_method == "cluster"
    assert sum(s["probe_pseudo_domain_counts"].values()) == 40
    assert s["stage1"]["min_domain_share"] >= 0 and "prototype_agreement" in s["stage1"]
