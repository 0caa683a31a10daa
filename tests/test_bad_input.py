"""The bad-input table: every operator of the package x the messy inputs users feed it.

Each case has a defined outcome: either a clear error before processing (ValueError,
FileNotFoundError or ArtifactError naming the problem) or a defined per-sample value, and
nothing is lost: an op keeps every sample it was not asked to drop. The last test runs
``dj-process`` (``skip_op_error`` true) on a file with bad records and counts input vs output
plus explicitly filtered records, so a batch dropped by an exception of ours would show.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from daar_ops.algorithms.synthesis import DomainSpec
from daar_ops.centroid_file import save_centroids
from daar_ops.encoders import embed_texts
from daar_ops.algorithms.probes import TrainConfig
from daar_ops.artifacts import ArtifactError
from daar_ops.features import LayerFeatureExtractor
from daar_ops.probe_checkpoint import train_probe_checkpoint

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "{instruction} {input} {output}"
DOMAINS = ["coding", "math", "qa"]
WORDS = {"coding": "def return list sort function code loop", "math": "12 7 84 sum solve x",
         "qa": "capital France Paris what who where"}
BAD_MODEL = "/nonexistent/daar/model"


def _records(n: int) -> list[dict]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        dom = DOMAINS[i % 3]
        words = WORDS[dom].split()
        out.append({"instruction": " ".join(rng.choice(words, 5)), "input": "",
                    "output": " ".join(rng.choice(words, 3)),
                    "__dj__meta__": {"daar_pseudo_domain": dom}})
    return out


def _centroids(path: Path, model: Path, names=DOMAINS) -> Path:
    ext = LayerFeatureExtractor(str(model), layer=0)
    feats = embed_texts(ext, [WORDS[d] for d in names], "embedding")
    save_centroids(path, feats, [DomainSpec(d) for d in names], ext.describe(), "embedding",
                   TEMPLATE, [1] * len(names))
    return path


@pytest.fixture(scope="module")
def art(tiny_llama, tiny_qwen2, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad_input")
    cfg = TrainConfig(epochs=2, batch_size=16, lr=3e-3, val_fraction=0.2, hidden=[16])
    train_probe_checkpoint(_records(60), root / "probe", model=str(tiny_llama), layer=2,
                           max_length=64, config=cfg, use_cache=False, progress=False)
    train_probe_checkpoint(_records(60), root / "probe_qwen", model=str(tiny_qwen2), layer=2,
                           max_length=64, config=cfg, use_cache=False, progress=False)
    return {"model": tiny_llama, "probe": root / "probe", "probe_qwen": root / "probe_qwen",
            "centroids": _centroids(root / "centroids", tiny_llama),
            "centroids_qwen": _centroids(root / "centroids_qwen", tiny_qwen2),
            "centroids_k1": _centroids(root / "centroids_k1", tiny_llama, ["coding"]),
            "root": root}


# -- operator factories ---------------------------------------------------------------------------

def make(name: str, art: dict, **kw):
    from daar_ops.ops.diversity_reward_filter import DiversityRewardFilter
    from daar_ops.ops.domain_contrastive_selector import DomainContrastiveSelector
    from daar_ops.ops.domain_pseudo_label_mapper import DomainPseudoLabelMapper
    from daar_ops.ops.ds2_selector import DS2Filter
    from daar_ops.ops.ds2_rating_filter import DS2RatingFilter
    from daar_ops.ops.qdit_selector import QditFilter

    model = str(art["model"])
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_proc", 1)
    if name == "domain_pseudo_label_mapper":
        kw.setdefault("centroids_path", str(art["centroids"]))
        return DomainPseudoLabelMapper(model=kw.pop("model", model), **kw)
    if name == "diversity_reward_filter":
        return DiversityRewardFilter(checkpoint=kw.pop("checkpoint", str(art["probe"])), **kw)
    if name == "ds2_rating_filter":
        return DS2RatingFilter(model=kw.pop("model", model), text_template=TEMPLATE,
                               max_length=64, **kw)
    if name == "ds2_filter":
        from daar_ops.models import prepared_path

        if not (prepared_path("all-minilm-l6-v2") / "config.json").exists():
            # the sentence encoder is the thing under test here (`make test-fast` has no models;
            # `make test` prepares them and these cases run)
            pytest.skip("ds2_filter embeds with all-MiniLM-L6-v2, which is not prepared")
        return DS2Filter(score_key=kw.pop("score_key", "score"), text_template=TEMPLATE, k=2,
                         hoc_steps=50, detection_rounds=2, **kw)
    if name == "qdit_filter":
        kw.setdefault("select_num", 2)
        return QditFilter(text_template=TEMPLATE, embedder="daar_features",
                          model=kw.pop("model", model), feature="embedding",
                          max_length=64, **kw)
    if name == "domain_contrastive_selector":
        kw.pop("batch_size"), kw.pop("num_proc")
        kw.setdefault("centroids_path", str(art["centroids"]))
        return DomainContrastiveSelector(model=kw.pop("model", model), lower_percentile=0.0,
                                         upper_percentile=100.0, **kw)
    raise KeyError(name)


def run(op, rows: list[dict]):
    from data_juicer.core.data import NestedDataset
    from data_juicer.ops.base_op import Selector

    ds = NestedDataset.from_list(rows)
    return op.process(ds) if isinstance(op, Selector) else op.run(ds)


# What each op writes per sample (checked for a defined, fixed type) and whether it keeps every
# sample when configured without a selection rule.
STATS = {
    "domain_pseudo_label_mapper": {"daar_domain_similarity": list},
    "diversity_reward_filter": {"daar_diversity_reward": float, "daar_domain_probs": list,
                                "daar_probe_domain": str},
    "ds2_rating_filter": {"ds2_rating": float, "ds2_score": float,
                          "ds2_rating_failures": float},
    "ds2_filter": {"ds2_raw_score": float, "ds2_curated_score": float, "ds2_long_tail": float},
    "qdit_filter": {},
    "domain_contrastive_selector": {"daar_phi_inter": float, "daar_phi_intra": float},
}
KEEPS_ALL = {"domain_pseudo_label_mapper", "diversity_reward_filter", "ds2_rating_filter",
             "ds2_filter", "domain_contrastive_selector"}
OPS = list(STATS)


def _check_rows(name: str, out, n_in: int) -> None:
    if name in KEEPS_ALL:
        assert len(out) == n_in, f"{name} dropped samples it was not asked to drop"
    else:  # qdit_filter select_num=2
        assert len(out) == min(2, n_in)
    for row in out.to_list():
        stats = row.get("__dj__stats__") or {}
        for key, typ in STATS[name].items():
            if name == "domain_contrastive_selector":
                key = {"daar_phi_inter": _stat_key("STAT_INTER"),
                       "daar_phi_intra": _stat_key("STAT_INTRA")}[key]
            assert isinstance(stats.get(key), typ), f"{name}: {key}={stats.get(key)!r}"
            value = stats[key]
            values = value if isinstance(value, list) else [value] if typ is float else []
            assert all(isinstance(v, float) and math.isfinite(v) for v in values), (key, value)
        if name == "domain_pseudo_label_mapper":
            assert row["__dj__meta__"]["daar_pseudo_domain"] in DOMAINS


def _stat_key(attr: str) -> str:
    from daar_ops.ops import domain_contrastive_selector as mod

    return getattr(mod, attr)


def _with_score(rows: list[dict]) -> list[dict]:
    return [dict(r, score=float(len(str(r.get("instruction"))) % 6)) for r in rows]


def _labelled(rows: list[dict]) -> list[dict]:
    return [dict(r, __dj__meta__={"daar_pseudo_domain": DOMAINS[i % 3]})
            for i, r in enumerate(rows)]


def _prepare(name: str, rows: list[dict]) -> list[dict]:
    rows = _with_score(rows) if name == "ds2_filter" else rows
    return _labelled(rows) if name == "domain_contrastive_selector" else rows


LONG = "word " * 20000  # 100k characters: truncated to max_length tokens
TEXT_CASES = {
    # (the first record names every column: Dataset.from_list takes its keys as the columns)
    "missing_fields": [{"instruction": "Solve 12 * 7", "input": None, "output": None},
                       {"output": "def f(): pass"},
                       {"instruction": "what capital", "input": "France", "output": "Paris"},
                       {"instruction": "sum 12 7"}],
    "empty_and_whitespace": [{"instruction": "", "input": "", "output": ""},
                             {"instruction": "   \n\t ", "input": " ", "output": "\n"},
                             {"instruction": "sort list", "input": "", "output": "def"},
                             {"instruction": "12 7", "input": None, "output": None}],
    "non_string_values": [{"instruction": 7, "input": 1.5, "output": True},
                          {"instruction": 8, "input": float("nan"), "output": False},
                          {"instruction": 9, "input": 2.5, "output": True},
                          {"instruction": 10, "input": -1.0, "output": False}],
    "list_values": [{"instruction": ["a", "b"], "input": ["12"], "output": ["def"]},
                    {"instruction": [], "input": ["x"], "output": []},
                    {"instruction": ["sum"], "input": [], "output": ["84"]}],
    "extremely_long_text": [{"instruction": LONG, "input": LONG, "output": "x"},
                            {"instruction": "sum 12 7", "input": "", "output": "84"},
                            {"instruction": "what", "input": "", "output": LONG}],
    "duplicate_records": [{"instruction": "sort list def", "input": "", "output": "code"}] * 3
                         + [{"instruction": "capital France", "input": "", "output": "Paris"}],
}


@pytest.mark.parametrize("case", list(TEXT_CASES))
@pytest.mark.parametrize("name", OPS)
def test_messy_text_gets_defined_stats_and_nothing_is_lost(name, case, art):
    rows = _prepare(name, TEXT_CASES[case])
    out = run(make(name, art), rows)
    _check_rows(name, out, len(rows))
    if case == "duplicate_records" and STATS[name]:
        stats = out.to_list()
        for key in STATS[name]:
            if name != "domain_contrastive_selector":  # phi depends only on the text: also equal
                assert stats[0]["__dj__stats__"][key] == stats[1]["__dj__stats__"][key] \
                    == stats[2]["__dj__stats__"][key]


# -- lone surrogates (cannot live in an Arrow column: the ops' batch entry points get them) -------

SURROGATE_BATCH = {"instruction": ["\ud800 sum 12", "ok \udfff", "fine"],
                   "input": ["\ud83d", "", None], "output": ["x", "\ud800\ud800", ""]}


@pytest.mark.parametrize("name", ["domain_pseudo_label_mapper", "diversity_reward_filter",
                                  "ds2_rating_filter"])
def test_lone_surrogates_are_repaired_not_raised(name, art):
    op = make(name, art)
    batch = {k: list(v) for k, v in SURROGATE_BATCH.items()}
    if name == "domain_pseudo_label_mapper":
        out = op.process_batched(batch)
        assert [m["daar_pseudo_domain"] in DOMAINS for m in out["__dj__meta__"]] == [True] * 3
        return
    batch["__dj__stats__"] = [{} for _ in range(3)]
    out = op.compute_stats_batched(batch)
    key = "daar_diversity_reward" if name == "diversity_reward_filter" else "ds2_score"
    values = [s[key] for s in out["__dj__stats__"]]
    assert all(isinstance(v, float) and math.isfinite(v) for v in values)
    assert list(op.process_batched(out)) == [True] * 3


def test_lone_surrogates_in_global_selectors(art):
    """QDIT / DS2 / contrastive render text through the same TextTemplate: check that path."""
    from daar_ops.text import TextTemplate

    text = TextTemplate(TEMPLATE).render({"instruction": "\ud800a", "input": None,
                                          "output": "b\udfff"})
    text.encode("utf-8")  # would raise on a lone surrogate
    assert "a" in text and "b" in text


# -- NaN / inf scores ------------------------------------------------------------------------------

SCORES = [float("nan"), float("inf"), float("-inf"), 3.0, 5.0, 1.0]


def test_ds2_filter_nan_inf_scores_get_the_missing_score(art):
    rows = [dict(r, score=s) for r, s in zip(_records(6), SCORES)]
    out = run(make("ds2_filter", art, missing_score=0.0), rows).to_list()
    assert len(out) == 6
    raw = [r["__dj__stats__"]["ds2_raw_score"] for r in out]
    assert all(math.isfinite(v) for v in raw)
    assert raw[:3] == [0.0, 0.0, 0.0]


def test_qdit_nan_inf_quality_is_filled_and_logged(art):
    rows = [dict(r, q=s) for r, s in zip(_records(6), SCORES)]
    out = run(make("qdit_filter", art, select_num=3, quality_key="q", alpha=0.5), rows)
    assert len(out) == 3
    again = run(make("qdit_filter", art, select_num=3, quality_key="q", alpha=0.5), rows)
    assert out.to_list() == again.to_list()  # deterministic


def test_existing_nan_diversity_reward_never_passes_a_threshold(art):
    op = make("diversity_reward_filter", art, min_score=0.0)
    stats = [{"daar_diversity_reward": float("nan"), "daar_probe_domain": "coding"},
             {"daar_diversity_reward": float("inf"), "daar_probe_domain": "coding"},
             {"daar_diversity_reward": 0.5, "daar_probe_domain": "coding"}]
    assert list(op.process_batched({"__dj__stats__": stats})) == [False, False, True]


# -- empty dataset, dataset smaller than the selection -----------------------------------------

@pytest.mark.parametrize("name", OPS)
def test_empty_dataset_gives_an_empty_result(name, art):
    from data_juicer.core.data import NestedDataset
    from data_juicer.ops.base_op import Selector

    rows = _prepare(name, _records(2))
    ds = NestedDataset.from_list(rows).select([])
    op = make(name, art)
    out = op.process(ds) if isinstance(op, Selector) else op.run(ds)
    assert len(out) == 0


SMALL_SELECTION = {
    "diversity_reward_filter": dict(select_num=50),
    "ds2_filter": dict(select_num=50),
    "qdit_filter": dict(select_num=50),
}


@pytest.mark.parametrize("name", list(SMALL_SELECTION))
def test_dataset_smaller_than_the_selection_keeps_everything(name, art):
    rows = _prepare(name, _records(5))
    out = run(make(name, art, **SMALL_SELECTION[name]), rows)
    assert len(out) == 5


def test_ratio_selection_of_a_tiny_dataset_keeps_floor_not_crash(art):
    out = run(make("diversity_reward_filter", art, select_ratio=0.2), _records(3))
    assert len(out) == 0  # floor(0.2 * 3) = 0, documented
    from daar_ops.core import budget

    out = run(make("ds2_filter", art, select_ratio=0.2), _with_score(_records(3)))
    assert len(out) == budget(3, ratio=0.2)


# -- K = 1 domain ----------------------------------------------------------------------------------

def test_k1_centroid_file_labels_everything_with_the_one_domain(art):
    op = make("domain_pseudo_label_mapper", art, centroids_path=str(art["centroids_k1"]))
    out = run(op, _records(4)).to_list()
    assert [r["__dj__meta__"]["daar_pseudo_domain"] for r in out] == ["coding"] * 4
    assert all(len(r["__dj__stats__"]["daar_domain_similarity"]) == 1 for r in out)


def test_k1_probe_training_is_refused(art, tmp_path):
    rows = [dict(r, __dj__meta__={"daar_pseudo_domain": "coding"}) for r in _records(20)]
    with pytest.raises(ValueError, match="at least 2 domains"):
        train_probe_checkpoint(rows, tmp_path / "p", model=str(art["model"]), layer=2,
                               use_cache=False, progress=False)


def test_k1_contrastive_selection_has_a_defined_outcome(art):
    rows = [dict(r, __dj__meta__={"daar_pseudo_domain": "coding"}) for r in _records(6)]
    op = make("domain_contrastive_selector", art, centroids_path=str(art["centroids_k1"]))
    out = run(op, rows)  # one domain: every sample is ranked within it; the 0-100 band keeps all
    assert len(out) == 6
    assert all(math.isfinite(r["__dj__stats__"]["daar_phi_intra"]) for r in out.to_list())


# -- checkpoints / centroid files from another model, corrupted, missing model --------------------

def _corrupt(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    tensor = next(p for p in dst.iterdir() if p.suffix == ".safetensors")
    data = bytearray(tensor.read_bytes())
    data[-1] ^= 0xFF
    tensor.write_bytes(bytes(data))
    return dst


def test_probe_checkpoint_of_another_model_is_refused(art):
    with pytest.raises(ValueError, match="does not fit|fingerprint|model"):
        make("diversity_reward_filter", art, checkpoint=str(art["probe_qwen"]),
             model=str(art["model"]))


def test_corrupted_probe_checkpoint_is_refused(art, tmp_path):
    bad = _corrupt(art["probe"], tmp_path / "probe")
    with pytest.raises(ValueError, match="(?i)sha256|checksum|corrupt"):
        make("diversity_reward_filter", art, checkpoint=str(bad))


def test_centroid_file_of_another_model_is_refused(art):
    with pytest.raises((ValueError, ArtifactError), match="(?i)fingerprint|model"):
        make("domain_pseudo_label_mapper", art, centroids_path=str(art["centroids_qwen"]))


@pytest.mark.parametrize("name", ["domain_pseudo_label_mapper", "domain_contrastive_selector"])
def test_corrupted_centroid_file_is_refused(name, art, tmp_path):
    bad = _corrupt(art["centroids"], tmp_path / "c")
    with pytest.raises(ArtifactError, match="(?i)sha256|checksum|corrupt"):
        make(name, art, centroids_path=str(bad))


def test_contrastive_centroids_of_another_model_refused_before_selection(art):
    op = make("domain_contrastive_selector", art, centroids_path=str(art["centroids_qwen"]))
    with pytest.raises((ValueError, ArtifactError), match="(?i)fingerprint|feature_dim"):
        run(op, _records(6))


MISSING_MODEL = {
    "domain_pseudo_label_mapper": dict(model=BAD_MODEL),
    "diversity_reward_filter": dict(model=BAD_MODEL),
    "ds2_rating_filter": dict(model=BAD_MODEL),
}


@pytest.mark.parametrize("name", list(MISSING_MODEL))
def test_missing_model_path_is_refused_at_init(name, art):
    with pytest.raises((FileNotFoundError, ValueError), match="nonexistent"):
        make(name, art, **MISSING_MODEL[name])


@pytest.mark.parametrize("name,kw", [("qdit_filter", dict(model=BAD_MODEL)),
                                     ("domain_contrastive_selector", dict(model=BAD_MODEL)),
                                     ("ds2_filter", dict(model=BAD_MODEL))])
def test_missing_model_path_of_global_ops_is_a_clear_error(name, kw, art):
    rows = _prepare(name, _records(4))
    with pytest.raises((FileNotFoundError, ValueError, OSError), match="nonexistent"):
        run(make(name, art, **kw), rows)


def test_missing_checkpoint_and_centroid_files_are_refused(art, tmp_path):
    with pytest.raises(ValueError, match="checkpoint"):
        make("diversity_reward_filter", art, checkpoint=str(tmp_path / "nope"))
    with pytest.raises((ArtifactError, FileNotFoundError)):
        make("domain_pseudo_label_mapper", art, centroids_path=str(tmp_path / "nope"))


# -- dj-process with skip_op_error: no batch silently dropped ------------------------------------

@pytest.mark.integration
def test_dj_process_keeps_every_bad_record(art, tmp_path):
    """Input count == output count + records the recipe explicitly filters (ds2 max_score)."""
    lines = [
        {"instruction": "sum 12 7", "input": "", "output": "84"},
        {"instruction": "   ", "input": None, "output": None},          # whitespace text
        {"instruction": "", "input": "x", "output": "y"},               # empty text key
        {"instruction": "sort list", "output": "def"},                  # missing field
        {"instruction": "what capital", "input": 12, "output": 3.5},   # non-string values
        {"instruction": LONG, "input": LONG, "output": LONG},          # 300k characters
        {"instruction": "caf\ud800e", "input": "", "output": "x"},     # lone surrogate escape
        {"instruction": "sort list", "output": "def"},                  # duplicate
    ] + _records(13)
    data = tmp_path / "bad.jsonl"
    with data.open("w") as fh:
        for i, r in enumerate(lines):
            r = {k: v for k, v in r.items() if k != "__dj__meta__"}
            fh.write(json.dumps(dict(r, id=i)) + "\n")
    recipe = {
        "project_name": "bad-input", "dataset_path": str(data), "text_keys": "instruction",
        "export_path": str(tmp_path / "out" / "out.jsonl"), "np": 1, "use_cache": False,
        "keep_stats_in_res_ds": True,
        "process": [
            {"domain_pseudo_label_mapper": {"centroids_path": str(art["centroids"]),
                                            "model": str(art["model"]), "batch_size": 4}},
            {"diversity_reward_filter": {"checkpoint": str(art["probe"]), "batch_size": 4}},
            {"ds2_rating_filter": {"model": str(art["model"]), "text_template": TEMPLATE,
                                   "max_length": 64, "batch_size": 4}},
        ],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    dj = Path(sys.executable).with_name("dj-process")
    proc = subprocess.run([str(dj), "--config", str(tmp_path / "r.yaml")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = [json.loads(x) for x in (tmp_path / "out" / "out.jsonl").read_text().splitlines()]
    # No op here has a selection rule, so explicitly filtered = 0 and input == output: a batch
    # dropped by an exception (skip_op_error) would show up as missing ids. (DJ's loader keeps the
    # empty-instruction record too.)
    assert sorted(r["id"] for r in out) == list(range(len(lines)))
    errors = [line for line in proc.stderr.splitlines() if "| ERROR" in line]
    assert not errors, errors[:5]
    for r in out:
        s = r["__dj__stats__"]
        assert isinstance(s["daar_diversity_reward"], float)
        assert isinstance(s["ds2_score"], float) and math.isfinite(s["ds2_score"])
        assert r["__dj__meta__"]["daar_pseudo_domain"] in DOMAINS
