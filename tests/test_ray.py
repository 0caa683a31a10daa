"""Ray executor parity: per-sample ops give the default executor's stats; global selectors refuse
to start under Ray with a message naming the alternative (never a silent no-op)."""

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
        {"domain_pseudo_label_mapper": {"centroids_path": str(artifacts["centroids"]),
                                        "model": str(artifacts["model"]), "batch_size": 8}},
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


@pytest.mark.integration
def test_per_sample_ops_give_the_same_stats_under_ray_and_default(artifacts, tmp_path):
    data = tmp_path / "in.jsonl"
    rows = _records(20, label=False)
    rows[3]["input"] = None  # a missing field travels through both executors the same way
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"dataset_path": str(data), "text_keys": "instruction", "np": 1, "use_cache": False,
            "keep_stats_in_res_ds": True, "process": _per_sample_process(artifacts)}
    outs = {}
    for executor in ("default", "ray"):
        recipe = dict(base, project_name=f"ray-parity-{executor}", executor_type=executor,
                      export_path=str(tmp_path / executor / "out.jsonl"),
                      work_dir=str(tmp_path / executor))
        if executor == "ray":
            recipe["ray_address"] = "local"
        proc = _run_dj(recipe, tmp_path / f"{executor}.yaml")
        assert proc.returncode == 0, proc.stderr[-4000:]
        outs[executor] = _read_rows(tmp_path / executor / "out.jsonl")

    default, ray = outs["default"], outs["ray"]
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


# -- global selectors under Ray: fail before processing ------------------------------------------

@pytest.fixture()
def ray_mode(monkeypatch):
    """What `dj-process` sets once the config says executor_type: ray (data_juicer.config)."""
    monkeypatch.setenv("RAY_JOB", "1")


def _global_ops(artifacts):
    from daar_ops.ops.diversity_reward_filter import DiversityRewardFilter
    from daar_ops.ops.domain_contrastive_selector import DomainContrastiveSelector
    from daar_ops.ops.ds2_selector import DS2Filter
    from daar_ops.ops.qdit_selector import QditFilter

    probe = str(artifacts["probe"])
    return {
        "qdit_filter": lambda: QditFilter(select_ratio=0.2),
        "ds2_filter": lambda: DS2Filter(select_ratio=0.2),
        "diversity_reward_filter top_ratio": lambda: DiversityRewardFilter(checkpoint=probe,
                                                                          top_ratio=0.2),
        "diversity_reward_filter top_k": lambda: DiversityRewardFilter(checkpoint=probe, top_k=5),
        "diversity_reward_filter domain_ratios": lambda: DiversityRewardFilter(
            checkpoint=probe, domain_ratios={"coding": 0.5}, top_ratio=0.1),
        "domain_contrastive_selector": lambda: DomainContrastiveSelector(
            centroids_path=str(artifacts["centroids"]), hf_model=str(artifacts["model"])),
    }


GLOBAL_CASES = ["qdit_filter", "ds2_filter", "diversity_reward_filter top_ratio",
                "diversity_reward_filter top_k", "diversity_reward_filter domain_ratios",
                "domain_contrastive_selector"]


def _preflight_ray(ops):
    from data_juicer.core.preflight import post_instantiation_check

    cfg = Namespace(executor_type="ray", export_path="/tmp/daar_ray_preflight/out.jsonl")
    post_instantiation_check(ops, None, cfg)


@pytest.mark.parametrize("case", GLOBAL_CASES)
def test_global_selectors_are_refused_by_ray_preflight(case, artifacts, ray_mode):
    """Whole-dataset choices are Selectors: Data-Juicer's own preflight refuses them under Ray
    before any op runs, with its message, and they construct as usual (no private refusal)."""
    from data_juicer.core.preflight import PipelineRuntimeError
    from data_juicer.ops.base_op import Filter, Selector

    op = _global_ops(artifacts)[case]()
    assert isinstance(op, Selector) and not isinstance(op, Filter)
    with pytest.raises(PipelineRuntimeError, match="(?i)ray"):
        _preflight_ray([op])



def test_whole_dataset_mappers_are_rejected_by_preflight_under_ray(artifacts):
    """centroid_synthesis_mapper and k-means refinement of the pseudo-labeller need the whole
    dataset: DJ's preflight (and RayDataset.process) reject them instead of skipping them."""
    from data_juicer.core.preflight import PipelineRuntimeError

    from daar_ops.ops.centroid_synthesis_mapper import CentroidSynthesisMapper
    from daar_ops.ops.domain_pseudo_label_mapper import DomainPseudoLabelMapper

    refine = DomainPseudoLabelMapper(centroids_path=str(artifacts["centroids"]),
                                     model=str(artifacts["model"]), refine_iters=2)
    synth = CentroidSynthesisMapper(model=str(artifacts["model"]))
    for op in (refine, synth):
        with pytest.raises(PipelineRuntimeError, match="(?i)ray"):
            _preflight_ray([op])
    fixed = DomainPseudoLabelMapper(centroids_path=str(artifacts["centroids"]),
                                    model=str(artifacts["model"]), refine_iters=0)
    _preflight_ray([fixed])  # per-sample: accepted


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


def test_example_ray_recipe_is_valid_and_uses_only_ray_capable_ops():
    recipe = yaml.safe_load((REPO / "recipes" / "daar" / "ray_pseudo_label.yaml").read_text())
    assert recipe["executor_type"] == "ray" and "ray_address" in recipe
    from data_juicer.core.preflight import pre_instantiation_check

    import daar_ops.ops  # noqa: F401  (registers the ops)

    pre_instantiation_check(recipe["process"])
    names = [next(iter(item)) for item in recipe["process"]]
    assert "domain_pseudo_label_mapper" in names
    for item in recipe["process"]:
        (name, args), = item.items()
        assert not (args or {}).get("refine_iters"), "k-means refinement is default-only"
        if name == "diversity_reward_filter":
            assert not {"top_ratio", "top_k", "domain_ratios"} & set(args)
