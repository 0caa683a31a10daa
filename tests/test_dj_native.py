"""Every op behaves as a native Data-Juicer op under Data-Juicer's own machinery: the Analyzer
(no row lost), the tracer (what a selection drops is traced), op fusion (order kept),
``use_checkpoint`` (a rerun resumes to the same result), Filter base parameters, null stats; and
every method keeps the same count for the same ratio (one budget rule)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import tiny_records
from daar_ops.core import budget

N = 24


def _rows(n: int = N) -> list[dict]:
    rows = tiny_records(n, label=True)
    rng = np.random.default_rng(1)
    for r in rows:
        r["text"] = f"{r['instruction']} {r['output']}"
        r["score"] = float(rng.integers(1, 6))
        r["vec"] = rng.normal(size=8).tolist()
    return rows


def _process_list(art: dict) -> list[dict]:
    """One of every op of the package (tiny model, no real model needed)."""
    model = str(art["model"])
    return [
        {"domain_pseudo_label_mapper": {"centroids_path": str(art["centroids"]), "model": model}},
        {"diversity_reward_filter": {"checkpoint": str(art["probe"]), "min_score": 0.0}},
        {"ds2_rating_filter": {"mode": "probability", "model": model, "max_length": 64,
                               "text_template": "{instruction} {output}"}},
        {"domain_contrastive_selector": {"model": model, "lower_percentile": 0.0,
                                         "upper_percentile": 90.0}},
        {"diversity_reward_filter": {"checkpoint": str(art["probe"]), "select_ratio": 0.9}},
        {"ds2_filter": {"score_key": "score", "embedding_key": "vec", "select_ratio": 0.9,
                        "k": 3, "k_pool": 6, "hoc_steps": 50, "detection_rounds": 2}},
        {"qdit_filter": {"select_ratio": 0.8, "embedder": "daar_features",
                         "model": model, "text_template": "{instruction} {output}"}},
    ]


def _config(tmp_path: Path, process: list[dict], rows: list[dict], **extra):
    from data_juicer.config import init_configs

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"project_name": "daar_native", "dataset_path": str(data),
              "export_path": str(tmp_path / "out" / "result.jsonl"), "np": 1,
              "work_dir": str(tmp_path / "work"), "process": process, **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return init_configs(args=["--config", str(path)])


def _export(tmp_path: Path) -> list[dict]:
    path = tmp_path / "out" / "result.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_analyzer_loses_no_row_with_every_op(tiny_artifacts, tmp_path):
    from data_juicer.core import Analyzer

    cfg = _config(tmp_path, _process_list(tiny_artifacts), _rows())
    analyzed = Analyzer(cfg).run(skip_export=True)
    assert len(analyzed) == N  # selectors write their stats in an analysis but drop nothing
    stats = analyzed.to_list()
    assert all(isinstance(r["__dj__stats__"]["daar_diversity_reward"], float) for r in stats)
    assert all(r["__dj__meta__"]["daar_pseudo_domain"] for r in stats)
    for key in ("qdit_rank", "ds2_curated_score"):  # a selector stat, for every row
        assert all(r["__dj__stats__"].get(key) is not None for r in stats), key


def test_analyzer_on_the_documented_one_liner_exports_its_stats(tiny_artifacts, tmp_path):
    from data_juicer.core import Analyzer

    one_liner = [{"diversity_reward_filter": {"checkpoint": str(tiny_artifacts["probe"]),
                                              "select_ratio": 0.2}}]
    cfg = _config(tmp_path, one_liner, _rows())
    analyzed = Analyzer(cfg).run(skip_export=True)
    assert len(analyzed) == N
    assert all(isinstance(r["__dj__stats__"]["daar_diversity_reward"], float)
               for r in analyzed.to_list())


def test_pipeline_of_every_op_and_the_tracer_records_what_selections_drop(tiny_artifacts,
                                                                          tmp_path):
    from data_juicer.core import DefaultExecutor

    cfg = _config(tmp_path, _process_list(tiny_artifacts), _rows(), open_tracer=True,
                  trace_num=100)
    DefaultExecutor(cfg).run()
    out = _export(tmp_path)
    n = N
    for item in _process_list(tiny_artifacts)[3:]:
        (name, args), = item.items()
        ratio = args.get("select_ratio")
        if name == "domain_contrastive_selector":
            continue
        n = budget(n, ratio=ratio)
    assert 0 < len(out) <= n
    trace = Path(cfg.work_dir) / "trace"
    for name in ("qdit_filter", "ds2_filter", "diversity_reward_filter"):
        files = list(trace.glob(f"*{name}*"))
        assert files, f"no trace of {name} in {sorted(p.name for p in trace.iterdir())}"
        dropped = [json.loads(line) for f in files for line in f.read_text().splitlines()]
        kept_ids = {r["id"] for r in out}
        assert dropped and not ({r["id"] for r in dropped} & kept_ids)


def test_op_fusion_keeps_a_filter_before_a_selection(tmp_path, fake_minilm=None):
    """words_num_filter + word_repetition_filter fuse (shared 'words' context); QDIT after them
    must still see only what they kept."""
    from data_juicer.core import DefaultExecutor

    rows = _rows()
    for i, r in enumerate(rows):  # every third text is too short for the words filter
        r["text"] = "short" if i % 3 == 0 else r["text"] + " extra words here"
    process = [
        {"words_num_filter": {"min_num": 3}},
        {"word_repetition_filter": {"rep_len": 1, "min_ratio": 0.0, "max_ratio": 1.0}},
        {"qdit_filter": {"select_num": 100, "embedder": "daar_features",
                         "model": str(_tiny(tmp_path)), "feature": "embedding",
                         "text_template": "{text}"}},
    ]
    cfg = _config(tmp_path, process, rows, op_fusion=True, keep_stats_in_res_ds=True)
    DefaultExecutor(cfg).run()
    out = _export(tmp_path)
    assert len(out) == 16 and all(r["text"] != "short" for r in out)
    assert all(r["__dj__stats__"]["qdit_rank"] >= 0 for r in out)


def _tiny(tmp_path: Path) -> Path:
    from conftest import build_tiny_causal_lm

    target = tmp_path / "tiny_model"
    if not target.exists():
        build_tiny_causal_lm(target)
    return target


def test_use_checkpoint_rerun_gives_the_same_selection(tiny_artifacts, tmp_path):
    from data_juicer.core import DefaultExecutor

    # top_ratio: the design card's alias of select_ratio, accepted in a recipe
    process = [{"diversity_reward_filter": {"checkpoint": str(tiny_artifacts["probe"]),
                                            "top_ratio": 0.5}}]
    cfg = _config(tmp_path, process, _rows(), use_checkpoint=True)
    DefaultExecutor(cfg).run()
    first = _export(tmp_path)
    DefaultExecutor(_config(tmp_path, process, _rows(), use_checkpoint=True)).run()
    assert _export(tmp_path) == first and len(first) == N // 2


def test_reversed_range_and_interval_flags_are_honoured(tiny_artifacts):
    from data_juicer.core.data import NestedDataset

    from daar_ops.ops.diversity_reward_filter import DiversityRewardFilter

    probe = str(tiny_artifacts["probe"])
    ds = NestedDataset.from_list(tiny_records(30, label=False))
    scored = DiversityRewardFilter(checkpoint=probe).run(ds)
    rewards = np.array([r["__dj__stats__"]["daar_diversity_reward"] for r in scored.to_list()])
    mid = float(np.median(rewards))
    inside = DiversityRewardFilter(checkpoint=probe, min_score=mid).run(ds)
    outside = DiversityRewardFilter(checkpoint=probe, min_score=mid, reversed_range=True).run(ds)
    assert len(inside) + len(outside) == 30
    assert set(inside["id"]).isdisjoint(outside["id"])
    open_low = DiversityRewardFilter(checkpoint=probe, min_score=mid,
                                     min_closed_interval=False).run(ds)
    assert len(open_low) == int((rewards > mid).sum())


def test_a_null_or_non_dict_stats_row_costs_nothing(tiny_artifacts):
    from data_juicer.core.data import NestedDataset

    from daar_ops.ops.diversity_reward_filter import DiversityRewardFilter

    rows = tiny_records(20, label=False)
    for r in rows:
        r["__dj__stats__"] = {"other": 1.0}
    batch = {k: [r.get(k) for r in rows] for k in rows[0]}
    batch["__dj__stats__"][3] = None
    batch["__dj__stats__"][7] = "not a dict"
    op = DiversityRewardFilter(checkpoint=str(tiny_artifacts["probe"]))
    out = op.compute_stats_batched(batch)
    assert all(isinstance(s["daar_diversity_reward"], float) for s in out["__dj__stats__"])
    ds = NestedDataset.from_list([{**r, "__dj__stats__": None if i == 5 else r["__dj__stats__"]}
                                  for i, r in enumerate(rows)])
    assert len(DiversityRewardFilter(checkpoint=str(tiny_artifacts["probe"]),
                                     select_ratio=0.5).run(ds)) == 10


@pytest.mark.parametrize("n, ratio", [(10, 0.25), (24, 0.2), (7, 0.5)])
def test_every_method_keeps_the_same_count_for_the_same_ratio(tiny_artifacts, n, ratio):
    from data_juicer.core.data import NestedDataset

    from daar_ops.algorithms.contrastive import percentile_band
    from daar_ops.algorithms.selection import top_mask
    from daar_ops.ops.diversity_reward_filter import DiversityRewardFilter
    from daar_ops.ops.ds2_selector import DS2Selector
    from daar_ops.ops.qdit_selector import QditSelector

    want = budget(n, ratio=ratio)
    ds = NestedDataset.from_list(_rows(n))
    model = str(tiny_artifacts["model"])
    counts = {
        "daar": len(DiversityRewardFilter(checkpoint=str(tiny_artifacts["probe"]),
                                          select_ratio=ratio).run(ds)),
        "qdit": len(QditSelector(select_ratio=ratio, embedder="daar_features",
                                 model=model, text_template="{instruction}").run(ds)),
        "ds2": len(DS2Selector(score_key="score", embedding_key="vec", select_ratio=ratio, k=2,
                               k_pool=4, hoc_steps=20, detection_rounds=1).run(ds)),
        "top_mask": int(top_mask(np.arange(n, dtype=float), select_ratio=ratio).sum()),
        "band": int(percentile_band(np.arange(n, dtype=float), np.zeros(n, int),
                                    100 - ratio * 100, 100).sum()),
    }
    assert set(counts.values()) == {want}, counts


def test_model_loaders_are_data_juicer_model_types(tiny_llama):
    from data_juicer.utils.model_utils import get_model, prepare_model

    import daar_ops.ops  # noqa: F401  (registers the loaders)

    key = prepare_model("daar_layer_features", model=str(tiny_llama), layer=1)
    extractor = get_model(key)
    assert extractor.encode(["a text"]).layer.shape[0] == 1
