"""Ray executor parity: per-sample ops give the default executor's stats, and every whole-dataset
choice keeps the default executor's rows (ties and null stats included); nothing is skipped."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import yaml


REPO = Path(__file__).resolve().parents[1]
from conftest import TINY_DOMAINS as DOMAINS  # noqa: E402
from conftest import tiny_records as _records  # noqa: E402


@pytest.fixture(scope="module")
def artifacts(tiny_artifacts) -> dict:
    return tiny_artifacts


def _per_sample_process(artifacts: dict) -> list[dict]:
    """Every per-sample op of the package, in one recipe (one Ray start)."""
    # The mapper comes after the filters: DJ 1.6.1's Ray executor appends a fresh, empty
    # __dj__stats__ column before the first Filter when the loaded data had none, hiding the stats
    # a Mapper wrote before it (see docs/ray.md).
    return [
        {"diversity_reward_filter": {"checkpoint": str(artifacts["probe"]), "min_score": 0.0,
                                     "batch_size": 8}},
        {"ds2_rating_filter": {"mode": "probability", "model": str(artifacts["model"]),
                               "text_template": "{instruction} {input} {output}",
                               "max_length": 128, "batch_size": 8}},
        {"domain_pseudo_label_mapper": {"stage1_path": str(artifacts["stage1"]),
                                        "batch_size": 8}},
    ]


def _run_dj(recipe: dict, path: Path, timeout: int = 540) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", RAY_AUTH_MODE="disabled")
    dj = Path(sys.executable).with_name("dj-process")
    return subprocess.run([str(dj), "--config", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _read_rows(export: Path) -> list[dict]:
    files = sorted(export.glob("*.json*")) if export.is_dir() else [export]
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["id"])


def _assert_close(a, b, where: str) -> None:
    if isinstance(a, float) or isinstance(b, float):
        assert math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=1e-5), f"{where}: {a} != {b}"
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _run_both_executors(data: Path, process: list[dict], tmp_path: Path, name: str
                        ) -> tuple[list[dict], list[dict]]:
    """One recipe through `dj-process` with the default executor and with a local Ray cluster:
    the exported rows of each, by id. Data-Juicer's refusal message must not appear."""
    base = {"dataset_path": str(data), "text_keys": "instruction", "np": 1, "use_cache": False,
            "keep_stats_in_res_ds": True, "process": process}
    outs = {}
    for executor in ("default", "ray"):
        recipe = dict(base, project_name=f"{name}-{executor}", executor_type=executor,
                      export_path=str(tmp_path / executor / "out.jsonl"),
                      work_dir=str(tmp_path / executor))
        if executor == "ray":
            recipe["ray_address"] = "local"
        proc = _run_dj(recipe, tmp_path / f"{executor}.yaml")
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "does not support" not in proc.stdout + proc.stderr
        outs[executor] = _read_rows(tmp_path / executor / "out.jsonl")
    return outs["default"], outs["ray"]


@pytest.mark.integration
def test_per_sample_ops_give_the_same_stats_under_ray_and_default(artifacts, tmp_path):
    data = tmp_path / "in.jsonl"
    rows = _records(20, label=False)
    rows[3]["input"] = None  # a missing field travels through both executors the same way
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    default, ray = _run_both_executors(data, _per_sample_process(artifacts), tmp_path,
                                       "ray-parity")
    # psi_div is a regression head: some predicted rewards are < min_score and are filtered, the
    # same ones under both executors
    assert 0 < len(default) <= 20
    assert all(r["__dj__stats__"]["daar_diversity_reward"] >= 0.0 for r in default)
    assert [r["id"] for r in ray] == [r["id"] for r in default]
    stat_keys = {"daar_domain_similarity", "daar_diversity_reward", "daar_domain_probs",
                 "daar_probe_domain", "ds2_rating", "ds2_score", "ds2_rating_failures",
                 "ds2_rating_mass"}
    for d, r in zip(default, ray):
        assert stat_keys <= set(d["__dj__stats__"]), sorted(d["__dj__stats__"])
        assert d["__dj__meta__"]["daar_pseudo_domain"] in DOMAINS
        assert r["__dj__meta__"]["daar_pseudo_domain"] == d["__dj__meta__"]["daar_pseudo_domain"]
        for key in sorted(stat_keys):
            _assert_close(d["__dj__stats__"][key], r["__dj__stats__"][key], f"id {d['id']} {key}")
        for field in ("instruction", "input", "output"):
            assert r[field] == d[field]


@pytest.mark.integration
def test_selector_recipe_runs_under_dj_process_ray_with_the_default_rows(artifacts, tmp_path):
    """`dj-process` with executor_type: ray runs the global choices (Data-Juicer's preflight
    accepts them, its RayDataset runs them as Pipelines) and exports the default executor's
    rows and stats, also through a Mapper between them; Data-Juicer's refusal message never
    appears."""
    data = tmp_path / "in.jsonl"
    rows = _records(30, label=False)
    rows[4]["instruction"], rows[4]["output"] = rows[1]["instruction"], rows[1]["output"]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    process = [
        {"diversity_reward_filter": {"checkpoint": str(artifacts["probe"]), "select_ratio": 0.6,
                                     "batch_size": 8, "feature_cache": False}},
        # a Mapper after a selector (as recipes/ray/daar.yaml): it labels the kept rows
        {"domain_pseudo_label_mapper": {"centroids_path": str(artifacts["centroids"]),
                                        "model": str(artifacts["model"]), "batch_size": 8}},
        {"qdit_selector": {"select_num": 8, "embedder": "daar_features",
                           "model": str(artifacts["model"]),
                           "text_template": "{instruction} {output}"}},
    ]
    default, ray = _run_both_executors(data, process, tmp_path, "ray-select")
    assert len(default) == 8
    assert [r["id"] for r in ray] == [r["id"] for r in default]
    for d, r in zip(default, ray):
        for key in ("daar_diversity_reward", "daar_domain_similarity", "qdit_rank", "qdit_gain"):
            _assert_close(d["__dj__stats__"][key], r["__dj__stats__"][key], f"id {d['id']} {key}")
        assert r["__dj__meta__"]["daar_pseudo_domain"] == d["__dj__meta__"]["daar_pseudo_domain"]


# -- whole-dataset choices under Ray: the same rows as the default executor -------------------------

@pytest.fixture()
def ray_mode(monkeypatch):
    """What `dj-process` sets once the config says executor_type: ray (data_juicer.config)."""
    monkeypatch.setenv("RAY_JOB", "1")


@pytest.fixture(scope="module")
def local_ray():
    """A small in-process Ray cluster (2 CPUs) whose workers import this checkout's daar_ops."""
    ray = pytest.importorskip("ray")
    import daar_ops

    # the workers import this test module too (the functions it maps are pickled by reference)
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO / "tests")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})

    @ray.remote
    def where():
        import daar_ops as worker_pkg

        return worker_pkg.__file__

    assert ray.get(where.remote()) == daar_ops.__file__
    yield ray
    ray.shutdown()


def _late_first_blocks(table):
    """Delay the block that holds the first rows, so it finishes last (the other CPU runs the
    rest): an order-blind choice would see the rows out of input order (and break ties the
    wrong way)."""
    import time

    if min(table.column("id").to_pylist()) == 0:
        time.sleep(1.5)
    return table


def _ray_dataset(rows: list[dict], block: int = 6):
    import pyarrow as pa
    import ray

    table = pa.Table.from_pylist(rows)
    ds = ray.data.from_arrow([table.slice(i, block) for i in range(0, len(rows), block)])
    return ds.map_batches(_late_first_blocks, batch_format="pyarrow", batch_size=None)


def test_row_ids_follow_the_input_order_when_the_first_block_finishes_last(local_ray):
    """The global row id (the tie rule's "earlier sample") is the input position, not the order in
    which the workers happened to finish; only the named fields travel to the driver."""
    from daar_ops.ops._ray import ROW_ID, gather, with_row_ids

    table = gather(with_row_ids(_ray_dataset(_scored_rows())),
                   ["id", "__dj__stats__.daar_diversity_reward"])
    assert table.column_names == [ROW_ID, "id", "__dj__stats__"]
    assert table.column(ROW_ID).to_pylist() == list(range(40))
    assert table.column("id").to_pylist() == list(range(40))
    stats = table.column("__dj__stats__").to_pylist()
    assert stats[5] is None and set(stats[0]) == {"daar_diversity_reward"}


def _both(op_factory, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(default executor rows, Ray rows) of one op, both in input order by id."""
    from data_juicer.core.data import NestedDataset
    from data_juicer.core.data.ray_dataset import RayDataset

    default = op_factory().run(NestedDataset.from_list(rows)).to_list()
    runner = RayDataset(_ray_dataset(rows))
    runner.process([op_factory()])  # Data-Juicer's own Ray dispatch (a Pipeline op)
    ray_rows = sorted(runner.data.take_all(), key=lambda r: r["id"])
    return default, ray_rows


def _assert_same_selection(default, ray_rows, stat_keys=()):
    assert 0 < len(default) < 40
    assert [r["id"] for r in ray_rows] == [r["id"] for r in default]
    assert all("__daar_row_id__" not in r for r in ray_rows)
    for d, r in zip(default, ray_rows):
        for key in stat_keys:
            _assert_close(d["__dj__stats__"][key], r["__dj__stats__"][key], f"id {d['id']} {key}")


def _scored_rows(n: int = 40) -> list[dict]:
    """Reward stats with many ties (the first 12 samples all tie at the best reward, across the
    first two blocks), missing rewards, samples without a domain and null cells."""
    rows = []
    for i in range(n):
        reward = 3.0 if i < 12 else float((i * 7) % 4)
        stats = {"daar_diversity_reward": reward if i % 7 else None,
                 "daar_probe_domain": ["coding", "math", ""][i % 3]}
        rows.append({"id": i, "text": f"sample {i}",
                     "__dj__stats__": None if i % 11 == 5 else stats})
    return rows


REWARD_RULES = {
    "select_ratio": dict(select_ratio=0.3),
    "select_num": dict(select_num=7),
    "select_num above N": dict(select_num=400),
    "quotas": dict(domain_ratios={"coding": 0.5, "math": 0.2}, select_ratio=0.1),
    "per_domain": dict(select_ratio=0.3, per_domain=True),
    "select_ratio and min_score": dict(select_ratio=0.5, min_score=1.0),
}


@pytest.mark.parametrize("rule", list(REWARD_RULES))
def test_reward_selection_under_ray_keeps_the_default_executors_rows(rule, local_ray):
    """Ties go to the earlier sample and null stats rank last under Ray too, although the first
    blocks finish last."""
    from daar_ops.ops.diversity_reward_filter import DiversityRewardFilter

    default, ray_rows = _both(lambda: DiversityRewardFilter(**REWARD_RULES[rule]), _scored_rows())
    if rule == "select_num above N":
        assert len(default) == 40 and [r["id"] for r in ray_rows] == list(range(40))
        return
    _assert_same_selection(default, ray_rows)


def test_reward_selector_scores_on_the_workers_under_ray(artifacts, local_ray):
    """With a checkpoint, the Filter's stats pass scores every sample on the workers; only the
    scores come back to choose: same rewards, same rows."""
    from daar_ops.ops.diversity_reward_filter import DiversityRewardFilter

    rows = _records(40, label=False)
    rows[5]["instruction"] = rows[9]["instruction"]  # a tie between two samples
    rows[5]["output"] = rows[9]["output"]
    default, ray_rows = _both(lambda: DiversityRewardFilter(
        checkpoint=str(artifacts["probe"]), select_ratio=0.4, batch_size=8, feature_cache=False),
        rows)
    assert len(default) == 16
    _assert_same_selection(default, ray_rows, ("daar_diversity_reward", "daar_domain_probs",
                                               "daar_probe_domain"))


def test_qdit_ds2_and_contrastive_under_ray_keep_the_default_executors_rows(artifacts,
                                                                           local_ray):
    """Every other StatsSelector: the fields its choice reads are gathered, the same choice runs
    on the driver, and the chosen rows (with their stats) are kept on the workers."""
    from daar_ops.ops.domain_contrastive_selector import DomainContrastiveSelector
    from daar_ops.ops.ds2_selector import DS2Selector
    from daar_ops.ops.qdit_selector import QditSelector

    import numpy as np

    rng = np.random.default_rng(3)
    rows = _records(40, label=True)
    for i, r in enumerate(rows):
        r["vec"] = rng.normal(size=8).tolist()
        r["__dj__stats__"] = {"q": float(i % 3), "ds2_score": float(rng.integers(1, 6))}
        if i % 9 == 4:
            r["__dj__stats__"] = None  # a null stats cell: missing quality and score
    rows[7]["__dj__meta__"] = None  # no label
    rows[20]["instruction"], rows[20]["output"] = rows[2]["instruction"], rows[2]["output"]
    model = str(artifacts["model"])
    cases = {
        "qdit": (lambda: QditSelector(select_num=9, alpha=0.5, embedder="daar_features",
                                      model=model, quality_key="__dj__stats__.q",
                                      text_template="{instruction} {output}"),
                 ("qdit_rank", "qdit_gain")),
        "ds2": (lambda: DS2Selector(score_key="ds2_score", embedding_key="vec",
                                    select_ratio=0.3, k=2, k_pool=4, hoc_steps=20,
                                    detection_rounds=1),
                ("ds2_raw_score", "ds2_curated_score", "ds2_long_tail")),
        "contrastive": (lambda: DomainContrastiveSelector(
            centroids_path=str(artifacts["centroids"]), model=model,
            lower_percentile=50.0), ("daar_phi_inter", "daar_phi_intra")),
    }
    for name, (factory, keys) in cases.items():
        default, ray_rows = _both(factory, rows)
        _assert_same_selection(default, ray_rows, keys)


def _qdit_objective(op, rows: list[dict], ids: list[int]) -> float:
    """QDIT's objective of a selection on the whole set: (1 - alpha) d(A) / (0.1 N / K) +
    alpha * sum of the normalised quality (d: facility location over the op's embeddings)."""
    import numpy as np

    from daar_ops.algorithms.qdit import normalize_quality
    from daar_research.qdit import facility_location_value

    emb = op.embed(op.template.render_all(rows, source="test"))
    q, _ = normalize_quality(op.quality_values(rows))
    pos = [next(i for i, r in enumerate(rows) if r["id"] == j) for j in ids]
    scale = 0.1 * len(rows) / len(ids)
    alpha = op.config.alpha
    return (1 - alpha) * facility_location_value(emb, pos) / scale + alpha * float(np.sum(q[pos]))


def test_partitioned_qdit_under_ray_is_close_to_the_exact_objective(artifacts, local_ray):
    """GreeDi on Ray (issue 23): batches of partition_size rows (or Ray's blocks, when the
    embeddings exceed driver_memory_mb) pick K on the workers, the driver picks K from the union
    of their picks; its objective against the exact greedy of the default executor."""
    from data_juicer.core.data import NestedDataset
    from data_juicer.core.data.ray_dataset import RayDataset
    from loguru import logger

    from daar_ops.ops.qdit_selector import QditSelector

    rows = _records(40, label=False)
    for i, r in enumerate(rows):
        r["__dj__stats__"] = {"q": None if i % 13 == 2 else float((i * 5) % 7)}

    def make(**kw):
        return QditSelector(select_num=4, alpha=0.3, quality_key="__dj__stats__.q",
                            embedder="daar_features", model=str(artifacts["model"]),
                            text_template="{instruction} {output}", **kw)

    exact = [r["id"] for r in make().run(NestedDataset.from_list(rows)).to_list()]
    best = _qdit_objective(make(), rows, exact)
    for kw, parts in ((dict(partition_size=15), "3 partitions (about 15 rows)"),
                      (dict(driver_memory_mb=0.0), "7 partitions (the Ray blocks)")):
        messages = []
        sink = logger.add(lambda m: messages.append(str(m)), level="INFO")
        try:
            runner = RayDataset(_ray_dataset(rows))  # blocks of 6 rows
            runner.process([make(**kw)])
            kept = sorted(runner.data.take_all(), key=lambda r: r["id"])
        finally:
            logger.remove(sink)
        assert any(f"partitioned QDIT: {parts}" in m for m in messages), messages
        assert len(kept) == 4 and all("__daar_row_id__" not in r for r in kept)
        assert sorted(r["__dj__stats__"]["qdit_rank"] for r in kept) == [0, 1, 2, 3], kw
        assert _qdit_objective(make(), rows, [r["id"] for r in kept]) / best > 0.9, kw


def test_a_selector_over_an_emptied_ray_dataset_returns_it_empty(local_ray):
    """An earlier op of the recipe may drop every row (Data-Juicer checks emptiness only once, at
    the start): the choice then keeps nothing and does not fail."""
    from daar_ops.ops.diversity_reward_filter import DiversityRewardFilter

    emptied = _ray_dataset(_scored_rows()).filter(lambda row: row["id"] < 0)
    assert DiversityRewardFilter(select_ratio=0.5).run(emptied).take_all() == []


def _package_op_classes():
    import daar_ops.ops  # noqa: F401  (registers the ops)
    from data_juicer.ops.base_op import OPERATORS

    return {name: cls for name, cls in OPERATORS.modules.items()
            if cls.__module__.startswith("daar_ops.")}


def test_no_op_of_the_package_is_silently_skipped_under_ray():
    """Data-Juicer's RayDataset passes an op that claims "ray" but is none of Mapper, Filter,
    Deduplicator or Pipeline through untouched: every op of the package that claims Ray is one of
    them, and every whole-dataset choice claims Ray as a Pipeline."""
    from data_juicer.ops.base_op import Deduplicator, Filter, Mapper, Pipeline, Selector

    from daar_ops.ops._selector import StatsSelector

    classes = _package_op_classes()
    assert {"diversity_reward_selector", "qdit_selector", "ds2_selector",
            "domain_contrastive_selector"} <= set(classes)
    for name, cls in classes.items():
        if "ray" in cls._supported_exec_modes:
            assert issubclass(cls, (Mapper, Filter, Deduplicator, Pipeline)), name
        if issubclass(cls, Selector):
            assert issubclass(cls, StatsSelector) and issubclass(cls, Pipeline), name
            assert "ray" in cls._supported_exec_modes, name
            assert "ray_partitioned" not in cls._supported_exec_modes, name
            assert "choose_fields" in vars(cls) or any(
                "choose_fields" in vars(b) for b in cls.__mro__[1:]
                if b is not StatsSelector and issubclass(b, StatsSelector)), name


def _global_ops(artifacts):
    from daar_ops.ops.diversity_reward_filter import DiversityRewardFilter
    from daar_ops.ops.domain_contrastive_selector import DomainContrastiveSelector
    from daar_ops.ops.ds2_selector import DS2Filter
    from daar_ops.ops.qdit_selector import QditFilter

    probe = str(artifacts["probe"])
    return {
        "qdit_filter": lambda: QditFilter(select_ratio=0.2),
        "ds2_filter": lambda: DS2Filter(select_ratio=0.2),
        "diversity_reward_filter select_ratio": lambda: DiversityRewardFilter(
            checkpoint=probe, select_ratio=0.2),
        "diversity_reward_filter select_num": lambda: DiversityRewardFilter(checkpoint=probe,
                                                                           select_num=5),
        "diversity_reward_filter domain_ratios": lambda: DiversityRewardFilter(
            checkpoint=probe, domain_ratios={"coding": 0.5}, select_ratio=0.1),
        "domain_contrastive_selector": lambda: DomainContrastiveSelector(
            centroids_path=str(artifacts["centroids"]), model=str(artifacts["model"])),
    }


GLOBAL_CASES = ["qdit_filter", "ds2_filter", "diversity_reward_filter select_ratio",
                "diversity_reward_filter select_num", "diversity_reward_filter domain_ratios",
                "domain_contrastive_selector"]


def _preflight_ray(ops, executor_type="ray"):
    from data_juicer.core.preflight import post_instantiation_check

    cfg = Namespace(executor_type=executor_type,
                    export_path="/tmp/daar_ray_preflight/out.jsonl")
    post_instantiation_check(ops, None, cfg)


@pytest.mark.parametrize("case", GLOBAL_CASES)
def test_global_selectors_pass_ray_preflight_and_refuse_partitioned(case, artifacts, ray_mode):
    """Whole-dataset choices are Selectors (default executor, dj-analyze, op_fusion) and
    Pipelines (Ray): Data-Juicer's preflight accepts them under Ray and refuses the partitioned
    Ray executor, whose partitions would each choose alone."""
    from data_juicer.core.preflight import PipelineRuntimeError
    from data_juicer.ops.base_op import Filter, Pipeline, Selector

    op = _global_ops(artifacts)[case]()
    assert isinstance(op, Selector) and isinstance(op, Pipeline) and not isinstance(op, Filter)
    _preflight_ray([op])
    with pytest.raises(PipelineRuntimeError, match="ray_partitioned"):
        _preflight_ray([op], "ray_partitioned")


def test_every_op_of_the_package_passes_ray_preflight(artifacts):
    """Data-Juicer's refusal never appears: centroid_synthesis_mapper and the stage-1 fit
    (samples_path, method cluster) are Pipeline ops over the whole dataset; the fitted stage 1
    (stage1_path) and a centroid file label per sample."""
    from daar_ops.ops.centroid_synthesis_mapper import CentroidSynthesisMapper
    from daar_ops.ops.domain_pseudo_label_mapper import DomainPseudoLabelMapper

    _preflight_ray([
        CentroidSynthesisMapper(model=str(artifacts["model"])),
        DomainPseudoLabelMapper(samples_path=str(artifacts["stage1"].parent / "samples.jsonl"),
                                model=str(artifacts["model"]), feature="embedding"),
        DomainPseudoLabelMapper(stage1_path=str(artifacts["stage1"])),
        DomainPseudoLabelMapper(centroids_path=str(artifacts["centroids"]),
                                model=str(artifacts["model"]))])


def test_synthesis_under_ray_gives_the_default_executors_samples(artifacts, local_ray,
                                                                 monkeypatch, tmp_path):
    """The few domain rows are gathered to the driver and synthesized there: the same samples and
    centroid file as the default executor (a scripted generator stands in for the LM)."""
    import ray
    from data_juicer.core.data import NestedDataset

    import daar_ops.model_keys
    from daar_ops.centroid_file import load_centroids
    from daar_ops.ops.centroid_synthesis_mapper import CentroidSynthesisMapper
    from test_stage1_ops import _Scripted

    rows = [{"domain": "mathematics", "description": "numbers"},
            {"domain": "coding", "description": "programs"}]
    outs, cents = [], []
    for i, data in enumerate([NestedDataset.from_list(rows), ray.data.from_items(rows)]):
        monkeypatch.setitem(daar_ops.model_keys.LOADERS, "generator", lambda **k: _Scripted())
        op = CentroidSynthesisMapper(samples_per_domain=2, max_attempts=6, tau=0.9999,
                                     feature_model=str(artifacts["model"]),
                                     centroids_path=str(tmp_path / f"c{i}"))
        out = op.run(data)
        outs.append([(r["domain"], r["instruction"], r["output"])
                     for r in (out.to_list() if i == 0 else out.take_all())])
        cents.append(load_centroids(tmp_path / f"c{i}")[0])
    assert len(outs[0]) == 4 and outs[1] == outs[0]
    assert (cents[0] == cents[1]).all()


@pytest.mark.integration
def test_the_stage1_fit_labels_the_same_under_ray_and_default(artifacts, tmp_path):
    """samples_path with the default method (consensus clusters in the joint space) under
    dj-process: fitted on the driver from the gathered texts, labelled on the workers; the same
    labels and similarities as the default executor."""
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(30, label=False)))
    process = [{"domain_pseudo_label_mapper": {
        "samples_path": str(artifacts["stage1"].parent / "samples.jsonl"),
        "model": str(artifacts["model"]), "feature": "embedding", "batch_size": 8}}]
    default, ray = _run_both_executors(data, process, tmp_path, "ray-fit")
    assert len(default) == len(ray) == 30
    assert [r["id"] for r in ray] == [r["id"] for r in default]
    for d, r in zip(default, ray):
        assert r["__dj__meta__"]["daar_pseudo_domain"] == d["__dj__meta__"]["daar_pseudo_domain"]
        _assert_close(d["__dj__stats__"]["daar_domain_similarity"],
                      r["__dj__stats__"]["daar_domain_similarity"], f"id {d['id']}")


def test_per_sample_ops_are_accepted_under_ray(artifacts, ray_mode):
    from daar_ops.ops.diversity_reward_filter import DiversityRewardFilter
    from daar_ops.ops.domain_pseudo_label_mapper import DomainPseudoLabelMapper
    from daar_ops.ops.ds2_rating_filter import DS2RatingFilter

    ops = [DomainPseudoLabelMapper(centroids_path=str(artifacts["centroids"]),
                                   model=str(artifacts["model"])),
           DiversityRewardFilter(checkpoint=str(artifacts["probe"]), min_score=0.5),
           DS2RatingFilter(model=str(artifacts["model"]))]
    _preflight_ray(ops)
    assert all("ray" in op._supported_exec_modes for op in ops)


@pytest.mark.parametrize("recipe_path", ["daar/ray_pseudo_label.yaml", "ray/daar.yaml",
                                         "ray/qdit.yaml", "ray/ds2.yaml"])
def test_ray_recipes_are_valid_and_use_only_ray_capable_ops(recipe_path):
    from data_juicer.core.preflight import pre_instantiation_check
    from data_juicer.ops.base_op import OPERATORS

    import daar_ops.ops  # noqa: F401  (registers the ops)

    recipe = yaml.safe_load((REPO / "recipes" / recipe_path).read_text())
    assert recipe["executor_type"] == "ray" and "ray_address" in recipe
    pre_instantiation_check(recipe["process"])
    for item in recipe["process"]:
        (name, args), = item.items()
        assert "ray" in OPERATORS.modules[name]._supported_exec_modes, name
        assert "samples_path" not in (args or {}), "recipes label the pool from stage1_path"


@pytest.mark.parametrize("name", ["qdit", "ds2"])
def test_ray_baseline_recipes_run_the_baselines_ops(name):
    """recipes/ray/{qdit,ds2}.yaml are the baselines with executor_type: ray (the choice itself is
    the same code; only the report folder of DS2 is left out)."""
    ray_recipe = yaml.safe_load((REPO / "recipes" / "ray" / f"{name}.yaml").read_text())
    base = yaml.safe_load((REPO / "recipes" / "baselines" / f"{name}.yaml").read_text())
    for item in base["process"]:
        for args in item.values():
            args.pop("report_dir", None)
    assert ray_recipe["process"] == base["process"]
