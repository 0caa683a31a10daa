"""centroid_synthesis_mapper and domain_pseudo_label_mapper as Data-Juicer operators."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from data_juicer.core.data import NestedDataset
from data_juicer.utils.constant import Fields

import daar_ops.ops.centroid_synthesis_mapper as synth_mod
from daar_ops.algorithms.synthesis import DomainSpec
from daar_ops.centroid_file import load_centroids, save_centroids
from daar_ops.encoders import embed_texts
from daar_ops.artifacts import ArtifactError
from daar_ops.features import LayerFeatureExtractor
from daar_ops.ops.centroid_synthesis_mapper import CentroidSynthesisMapper
from daar_ops.ops.domain_pseudo_label_mapper import DomainPseudoLabelMapper

REPO = Path(__file__).resolve().parents[1]

TOPIC_TEXTS = {
    "mathematics": ["Solve 12 * 7. The answer is 84.", "Compute 3 + 5 = 8.",
                    "What is 10 / 2? It is 5."],
    "coding": ["Write a function def add(a, b): return a + b",
               "Input: a list of integers. Output: the sorted list, using merge sort",
               "def f(x): return sorted(x)"],
}


def _centroid_file(path: Path, model: Path, names=("mathematics", "coding")) -> Path:
    ext = LayerFeatureExtractor(str(model), layer=0)
    texts = [t for n in names for t in TOPIC_TEXTS[n]]
    feats = embed_texts(ext, texts, "embedding")
    cents = np.stack([feats[i * 3:(i + 1) * 3].mean(0) for i in range(len(names))])
    # the template names only 'instruction': the raw batches below have no other column
    save_centroids(path, cents, [DomainSpec(n) for n in names], ext.describe(), "embedding",
                   "{instruction}", [3] * len(names))
    return path


@pytest.fixture(scope="module")
def cfile(tiny_llama, tmp_path_factory) -> Path:
    return _centroid_file(tmp_path_factory.mktemp("cent") / "c", tiny_llama)


ROWS = [
    {"instruction": "Solve 12 * 7.", "input": "", "output": "The answer is 84."},
    {"instruction": "Write a function", "input": None, "output": "def add(a, b): return a + b"},
    {"instruction": "", "input": "", "output": ""},  # empty text
    {"instruction": "   ", "input": None, "output": None},  # whitespace / missing parts
]


# ------------------------------------------------------------------------- pseudo-label op

def test_pseudo_label_op_writes_typed_meta_and_stats(cfile, tiny_llama):
    op = DomainPseudoLabelMapper(centroids_path=str(cfile), model=str(tiny_llama), num_proc=1)
    out = op.run(NestedDataset.from_list([dict(r) for r in ROWS] + [{"instruction": "x"}]))
    assert len(out) == len(ROWS) + 1  # nothing dropped
    for row in out:
        label = row[Fields.meta]["daar_pseudo_domain"]
        sims = row[Fields.stats]["daar_domain_similarity"]
        assert label in ("mathematics", "coding")
        assert isinstance(sims, list) and len(sims) == 2 and all(isinstance(v, float) for v in sims)
        assert label == ("mathematics", "coding")[int(np.argmax(sims))]
    # non-string values in a raw batch get a label too
    odd = op.process_batched({"instruction": [123, None], "input": [["x"], 1.5],
                              "output": [float("nan"), {"a": 1}]})
    assert [type(m["daar_pseudo_domain"]) for m in odd[Fields.meta]] == [str, str]
    # exactly the texts of the centroid's own samples go to their own centroid
    op2 = DomainPseudoLabelMapper(centroids_path=str(cfile))  # model taken from the file
    res = op2.process_batched({"instruction": TOPIC_TEXTS["mathematics"][:1]
                               + TOPIC_TEXTS["coding"][2:]})
    assert [m["daar_pseudo_domain"] for m in res[Fields.meta]] == ["mathematics", "coding"]


def test_pseudo_label_op_never_reads_the_domain_field(cfile, tiny_llama):
    op = DomainPseudoLabelMapper(centroids_path=str(cfile), model=str(tiny_llama))
    plain = op.process_batched({"instruction": ["Solve 2+2", "def f(): pass"]})
    lying = op.process_batched({"instruction": ["Solve 2+2", "def f(): pass"],
                                "domain": ["coding", "mathematics"]})
    assert plain[Fields.meta] == lying[Fields.meta]
    assert plain[Fields.stats] == lying[Fields.stats]


def test_pseudo_label_op_keeps_its_own_labels_and_relabels_stale_ones(cfile, tiny_llama):
    from daar_ops.core import CENTROIDS_SHA_KEY

    op = DomainPseudoLabelMapper(centroids_path=str(cfile), model=str(tiny_llama))
    batch = {"instruction": ["Solve 2+2", "Solve 2+2", "Solve 2+2"],
             Fields.meta: [{"daar_pseudo_domain": "coding"}] * 3,
             Fields.stats: [{"daar_domain_similarity": [0.0, 1.0], CENTROIDS_SHA_KEY: op.source_sha},
                            {"daar_domain_similarity": [0.0, 1.0], CENTROIDS_SHA_KEY: "other"},
                            {"daar_domain_similarity": [0.0, 1.0]}]}
    out = op.process_batched(batch)
    assert out[Fields.meta][0]["daar_pseudo_domain"] == "coding"  # from these centroids: kept
    fresh = op.process_batched({"instruction": ["Solve 2+2"]})[Fields.meta][0]
    for i in (1, 2):  # another centroid file's label, or one without a digest: relabelled
        assert out[Fields.meta][i] == fresh
        assert out[Fields.stats][i][CENTROIDS_SHA_KEY] == op.source_sha


def test_pseudo_label_op_refuses_mismatched_centroids(cfile, tiny_qwen2, tmp_path):
    with pytest.raises(ArtifactError, match="model_fingerprint"):
        DomainPseudoLabelMapper(centroids_path=str(cfile), model=str(tiny_qwen2))
    with pytest.raises(ArtifactError, match="feature"):
        DomainPseudoLabelMapper(centroids_path=str(cfile), feature="layer", layer=2)
    from conftest import build_tiny_causal_lm

    wide = build_tiny_causal_lm(tmp_path / "wide", "llama", hidden=48)
    with pytest.raises(ArtifactError, match="feature_dim"):
        DomainPseudoLabelMapper(centroids_path=str(cfile), model=str(wide))


def test_pseudo_label_op_validates_parameters(cfile, tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        DomainPseudoLabelMapper()
    from data_juicer.core.preflight import PipelineConfigError, pre_instantiation_check

    with pytest.raises(PipelineConfigError, match="metric"):  # cosine only, caught at recipe load
        pre_instantiation_check([{"domain_pseudo_label_mapper": {"centroids_path": str(cfile),
                                                                 "metric": "euclidean"}}])
    with pytest.raises(ValueError, match="refine_iters"):
        DomainPseudoLabelMapper(centroids_path=str(cfile), refine_iters=5)
    with pytest.raises(ValueError, match="save_stage1"):
        DomainPseudoLabelMapper(centroids_path=str(cfile), save_stage1=str(tmp_path / "s"))
    with pytest.raises(ArtifactError, match="does not exist"):
        DomainPseudoLabelMapper(centroids_path=str(tmp_path / "missing"))


def test_pseudo_label_op_from_samples_file(tiny_llama, tmp_path):
    path = tmp_path / "samples.jsonl"
    with open(path, "w") as handle:
        for name, texts in TOPIC_TEXTS.items():
            for t in texts:
                handle.write(json.dumps({"instruction": t, "output": "", "domain": name}) + "\n")
    op = DomainPseudoLabelMapper(samples_path=str(path), model=str(tiny_llama),
                                 text_template="{instruction}",
                                 preset="paper")  # the paper's: plain mean per domain
    assert op.domains == ["mathematics", "coding"] and op.centroids.shape == (2, 32)
    out = op.process_batched({"instruction": ["def f(x): return sorted(x)"]})
    assert out[Fields.meta][0]["daar_pseudo_domain"] == "coding"


def _samples_file(tmp_path: Path) -> Path:
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"instruction": t, "output": "", "domain": name}) + "\n"
                            for name, texts in TOPIC_TEXTS.items() for t in texts))
    return path


def _probe_rows() -> list[dict]:
    rows = [{"instruction": t} for texts in TOPIC_TEXTS.values() for t in texts]
    return rows + [{"instruction": t} for t in ("The cat sat on the mat.", "Plants turn light "
                                                "into sugar.", "Paris is the capital of France.")]


@pytest.mark.parametrize("method", ["cluster", "kmeans"])
def test_a_fitted_stage1_file_labels_per_sample_as_the_fit_did(method, tiny_llama, tmp_path):
    """samples_path fits on the dataset (default executor); save_stage1 writes the fit;
    stage1_path labels every sample on its own (Ray-safe) with the same labels."""
    rows = _probe_rows()
    fit = DomainPseudoLabelMapper(
        samples_path=str(_samples_file(tmp_path)), model=str(tiny_llama),
        text_template="{instruction}", feature="embedding", method=method,
        save_stage1=str(tmp_path / "stage1"), num_proc=1)
    from data_juicer.ops.base_op import Mapper, Pipeline

    # the fit sees every row first: a Pipeline op (whole dataset, under Ray too), not a Mapper
    assert isinstance(fit, Pipeline) and not isinstance(fit, Mapper)
    assert "ray" in fit._supported_exec_modes and fit._name == "domain_pseudo_label_mapper"
    fitted = fit.run(NestedDataset.from_list(rows)).to_list()
    assert (tmp_path / "stage1" / "manifest.json").is_file()
    per_sample = DomainPseudoLabelMapper(stage1_path=str(tmp_path / "stage1"))
    assert "ray" in per_sample._supported_exec_modes and per_sample.method == method
    assert per_sample.domains == fit.domains and per_sample.model == str(tiny_llama)
    one_by_one = [per_sample.process_batched({"instruction": [r["instruction"]]})[Fields.meta][0]
                  for r in reversed(rows)][::-1]
    assert [m["daar_pseudo_domain"] for m in one_by_one] == \
        [r[Fields.meta]["daar_pseudo_domain"] for r in fitted]


def test_a_stage1_file_is_checked_against_the_model(tiny_llama, tiny_qwen2, tmp_path):
    fit = DomainPseudoLabelMapper(samples_path=str(_samples_file(tmp_path)),
                                  model=str(tiny_llama), text_template="{instruction}",
                                  feature="embedding", save_stage1=str(tmp_path / "s1"))
    fit.run(NestedDataset.from_list(_probe_rows()))
    with pytest.raises(ArtifactError, match="another model"):
        DomainPseudoLabelMapper(stage1_path=str(tmp_path / "s1"), model=str(tiny_qwen2))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="did not write"):
        DomainPseudoLabelMapper(samples_path=str(_samples_file(tmp_path)),
                                model=str(tiny_llama), save_stage1=str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------- synthesis op

class _Scripted:
    """Stands in for a generator: a numbered on-topic pair per call (always novel)."""

    def __init__(self):
        self.n = 0

    def describe(self):
        return {"backend": "scripted", "model": "scripted"}

    def generate(self, conversations, **kwargs):
        out = []
        for conv in conversations:
            self.n += 1
            if "expertise in silence" in conv[0]["content"]:
                out.append("...")  # this domain never yields a pair
                continue
            topic = "code def return" if "coding" in conv[0]["content"] else "add 12 * 7 sum"
            out.append(f" Task number {self.n} about {topic} {'x ' * self.n}\n"
                       f"Output: result {self.n} {topic}")
        return out


@pytest.fixture()
def scripted(monkeypatch):
    gen = _Scripted()
    import daar_ops.model_keys

    monkeypatch.setitem(daar_ops.model_keys.LOADERS, "generator", lambda **k: gen)
    return gen


def test_synthesis_op_turns_domain_rows_into_samples_and_centroids(scripted, tiny_llama,
                                                                   tmp_path):
    op = CentroidSynthesisMapper(samples_per_domain=3, max_attempts=10, tau=0.9999,
                                 feature_model=str(tiny_llama), centroids_path=str(tmp_path / "c"))
    rows = [{"domain": "mathematics", "description": "numbers", "text": "m"},
            {"domain": "coding", "description": "programs", "text": "c"}]
    out = op.run(NestedDataset.from_list(rows))
    recs = out.to_list()
    assert [r["domain"] for r in recs] == ["mathematics"] * 3 + ["coding"] * 3
    assert all(r["instruction"] and r["output"] and r["input"] == "" for r in recs)
    assert recs[0]["description"] == "numbers" and recs[-1]["text"] == "c"  # carried over
    prov = recs[0][Fields.meta]["daar_synthesis"]
    assert prov["accepted"] == 3 and prov["attempts"] >= 3 and prov["seed"] == 0
    assert isinstance(prov["acceptance_rate"], float)
    cents, manifest = load_centroids(tmp_path / "c")
    assert cents.shape == (2, 32) and manifest["domains"] == ["mathematics", "coding"]
    assert manifest["counts"] == [3, 3] and manifest["feature"] == "embedding"
    assert manifest["descriptions"]["coding"] == "programs"
    # the file feeds the pseudo-label op
    op2 = DomainPseudoLabelMapper(centroids_path=str(tmp_path / "c"))
    assert op2.model == str(tiny_llama) or Path(op2.model) == Path(tiny_llama)


def test_synthesis_op_domains_parameter_and_paper_defaults(scripted, tiny_llama):
    op = CentroidSynthesisMapper(domains={"a": "first", "b": "second", "coding": "code"},
                                 samples_per_domain=1, max_attempts=3, tau=0.9999,
                                 feature_model=str(tiny_llama))
    out = op.run(NestedDataset.from_list([{"text": "ignored"}]))
    assert sorted(set(out["domain"])) == ["a", "b", "coding"]
    op = CentroidSynthesisMapper(samples_per_domain=1, max_attempts=3, tau=0.9999,
                                 feature_model=str(tiny_llama))
    out = op.run(NestedDataset.from_list([{"text": "no domain column"}]))
    assert list(dict.fromkeys(out["domain"])) == ["common_sense", "reasoning", "mathematics",
                                                  "coding"]


def test_synthesis_op_refuses_partial_centroids_and_bad_rows(scripted, tiny_llama, tmp_path):
    rows = [{"domain": "mathematics"}, {"domain": "coding"}, {"domain": "silence"}]
    op = CentroidSynthesisMapper(samples_per_domain=1, max_attempts=2, tau=0.9999,
                                 feature_model=str(tiny_llama), centroids_path=str(tmp_path / "c"))
    with pytest.raises(RuntimeError, match="silence"):
        op.run(NestedDataset.from_list(rows))
    op = CentroidSynthesisMapper(feature_model=str(tiny_llama))
    with pytest.raises(ValueError, match="at least 2"):
        op.run(NestedDataset.from_list([{"domain": "alone"}, {"domain": "alone"}]))


def test_synthesis_op_with_junk_model_ends_with_clear_shortfall(tiny_llama, tmp_path):
    op = CentroidSynthesisMapper(model=str(tiny_llama), samples_per_domain=2, max_attempts=2,
                                 max_new_tokens=6, centroids_path=str(tmp_path / "c"))
    rows = [{"domain": "mathematics", "description": "numbers"}, {"domain": "coding"}]
    with pytest.raises(RuntimeError, match="no accepted sample"):
        op.run(NestedDataset.from_list(rows))
    assert not (tmp_path / "c" / "manifest.json").exists()
    op = CentroidSynthesisMapper(model=str(tiny_llama), samples_per_domain=2, max_attempts=2,
                                 max_new_tokens=6)
    assert len(op.run(NestedDataset.from_list(rows))) <= 4  # no centroids asked: no error


def test_synthesis_op_validates_parameters():
    with pytest.raises(ValueError, match="backend"):
        CentroidSynthesisMapper(backend="grpc")
    with pytest.raises(ValueError, match="tau"):
        CentroidSynthesisMapper(tau=1.5)
    with pytest.raises(ValueError, match="tau"):
        CentroidSynthesisMapper(tau={"coding": 0.0})
    with pytest.raises(ValueError, match="samples_per_domain"):
        CentroidSynthesisMapper(samples_per_domain=0)
    with pytest.raises(ValueError, match="at least 2"):
        CentroidSynthesisMapper(domains=["only"])
    with pytest.raises(ValueError, match="feature"):
        CentroidSynthesisMapper(feature="logits")
    # built as a Pipeline op over the whole dataset: it runs under Ray too (tests/test_ray.py)
    op = CentroidSynthesisMapper()
    assert "ray" in op._supported_exec_modes and op._name == "centroid_synthesis_mapper"


# ------------------------------------------------------------------------------ integration

@pytest.mark.integration
def test_real_smollm2_synthesis_writes_parsed_pairs_and_centroids(smollm2_path, tmp_path):
    op = CentroidSynthesisMapper(
        domains={"mathematics": "calculations with numbers", "coding": "write Python code"},
        samples_per_domain=1, max_attempts=4, candidates_per_round=2, max_new_tokens=64,
        model_batch_size=4, tau=0.95, centroids_path=str(tmp_path / "c"))
    rows = op.run(NestedDataset.from_list([{"text": "x"}])).to_list()  # seeded: deterministic
    assert {r["domain"] for r in rows} == {"mathematics", "coding"}
    for r in rows:
        assert r["instruction"].strip() and r["output"].strip()
        assert r[Fields.meta]["daar_synthesis"]["attempts"] <= 4
    cents, manifest = load_centroids(tmp_path / "c")
    assert cents.shape == (2, 576) and manifest["model"] == "smollm2-135m-instruct"


@pytest.mark.integration
def test_pseudo_label_recipe_runs_under_dj_process(minilm_path, shared_pool, tmp_path):
    """Recipe 02 as shipped (the default stage 1 from a synthetic samples file)."""
    with gzip.open(shared_pool, "rt") as handle:
        rows = [json.loads(line) for line in islice(handle, 40)]
    rows[0]["output"] = ""  # a sample with a missing part
    data = tmp_path / "slice.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = tmp_path / "synthetic.jsonl"
    samples.write_text("".join(json.dumps({"instruction": t, "output": "", "domain": name}) + "\n"
                               for name, texts in TOPIC_TEXTS.items() for t in texts))
    export = tmp_path / "out" / "labelled.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).with_name("dj-process")),
           "--config", str(REPO / "recipes/daar/02_pseudo_label.yaml"),
           "--dataset_path", str(data), "--export_path", str(export),
           "--domain_pseudo_label_mapper.samples_path", str(samples)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads(line) for line in export.read_text().splitlines()]
    assert len(out) == 40
    labels = [r[Fields.meta]["daar_pseudo_domain"] for r in out]
    assert set(labels) <= {"mathematics", "coding"}
    assert all(len(r[Fields.stats]["daar_domain_similarity"]) == 2 for r in out)
    # coding samples mostly go to the coding centroid
    coding = [lab for lab, r in zip(labels, rows) if r["domain"] == "coding"]
    assert coding and coding.count("coding") / len(coding) > 0.5


@pytest.mark.integration
def test_default_stage1_clusters_in_the_sentence_space(minilm_path, tmp_path):
    """The default stage 1: MiniLM space, anchors = synthetic samples + descriptions, k-means
    clusters of the whole dataset labelled by prototype (a fit that sees every row: a Pipeline
    op, so it runs under Ray too)."""
    from data_juicer.core.data import NestedDataset

    path = tmp_path / "samples.jsonl"
    with open(path, "w") as handle:
        for name, texts in TOPIC_TEXTS.items():
            for t in texts:
                handle.write(json.dumps({"instruction": t, "output": "", "domain": name}) + "\n")
    op = DomainPseudoLabelMapper(samples_path=str(path), text_template="{instruction}",
                                 save_stage1=str(tmp_path / "stage1"))
    assert op.feature == "sentence" and op.method == "cluster"
    assert op._supported_exec_modes == ("default", "ray")
    rows = ([{"instruction": f"Compute {i} * {i + 3} and give the sum of the digits."}
             for i in range(12)] +
            [{"instruction": f"Write a Python function f{i} that sorts a list of integers."}
             for i in range(12)])
    out = op.run(NestedDataset.from_list(rows)).to_list()
    labels = [r["__dj__meta__"]["daar_pseudo_domain"] for r in out]
    assert labels[:12].count("mathematics") >= 10 and labels[12:].count("coding") >= 10
    assert all(len(r["__dj__stats__"]["daar_domain_similarity"]) == 2 for r in out)
    # the default clusters in the joint space: the LM's embedding-layer features were passed
    assert op.stage1_info["cluster_space"] == "joint" and "consensus" in op.stage1_info
    # the file labels per sample in the same spaces: MiniLM, and the LM named by `model`
    again = DomainPseudoLabelMapper(stage1_path=str(tmp_path / "stage1"), model=op.model)
    assert again.sentence_model != again.model and again.feature == "sentence"
    relabelled = again.run(NestedDataset.from_list(rows)).to_list()
    assert [r["__dj__meta__"]["daar_pseudo_domain"] for r in relabelled] == labels


def test_paper_preset_is_exactly_the_papers_stage1(tiny_llama, tmp_path):
    """`preset: paper` (`select --pseudo-label-preset paper`) is Stage1Config.paper(): the three
    flags the README used to give for it left the purity filter and hubness correction on."""
    from daar_ops.algorithms.pseudo_labels import Stage1Config
    from daar_ops.cli import build_parser
    from daar_ops.pipeline import SelectConfig

    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"instruction": t, "output": "", "domain": name}) + "\n"
                            for name, texts in TOPIC_TEXTS.items() for t in texts))
    op = DomainPseudoLabelMapper(samples_path=str(path), model=str(tiny_llama),
                                 text_template="{instruction}", preset="paper")
    paper = Stage1Config.paper()
    assert op.stage1.to_dict() == paper.to_dict()
    assert (op.feature, op.method) == ("embedding", "fixed")
    flags = DomainPseudoLabelMapper(samples_path=str(path), model=str(tiny_llama),
                                    text_template="{instruction}", feature="embedding",
                                    method="fixed", use_descriptions=False)
    assert flags.stage1.to_dict() != paper.to_dict()  # what the three flags alone give
    args = build_parser().parse_args(["select", "--pseudo-label-preset", "paper"])
    assert args.pseudo_label_preset == "paper"
    with pytest.raises(ValueError, match="pseudo_label_preset"):
        SelectConfig(pool=str(path), pseudo_label_preset="papr").validate()
    with pytest.raises(ValueError, match="preset"):
        DomainPseudoLabelMapper(samples_path=str(path), model=str(tiny_llama), preset="papr")
    refined = DomainPseudoLabelMapper(samples_path=str(path), model=str(tiny_llama),
                                      text_template="{instruction}", preset="paper",
                                      method="kmeans", refine_iters=5)
    assert refined.stage1 == Stage1Config.paper(method="kmeans", refine_iters=5)


def test_refine_iters_never_switches_the_method_silently(tiny_llama, tmp_path):
    from daar_ops.pipeline import SelectConfig

    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"instruction": t, "output": "", "domain": name}) + "\n"
                            for name, texts in TOPIC_TEXTS.items() for t in texts))
    with pytest.raises(ValueError, match="method 'kmeans', but method is 'cluster'"):
        DomainPseudoLabelMapper(samples_path=str(path), model=str(tiny_llama),
                                text_template="{instruction}", refine_iters=5)
    op = DomainPseudoLabelMapper(samples_path=str(path), model=str(tiny_llama),
                                 text_template="{instruction}", method="kmeans", refine_iters=3)
    assert op.method == "kmeans" and op.stage1.refine_iters == 3
    with pytest.raises(ValueError, match="--pseudo-label-method kmeans"):
        SelectConfig(pool=str(path), refine_iters=2).validate()


def test_fit_stage1_command_writes_what_the_op_reads(tiny_llama, tmp_path, capsys):
    """`daar-ops fit-stage1` fits on a pool file and writes a folder stage1_path labels from; a
    folder holding a user's file is refused before any work."""
    from daar_ops.cli import main

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in _probe_rows()))
    args = ["fit-stage1", "--samples", str(_samples_file(tmp_path)), "--input", str(pool),
            "--model", str(tiny_llama), "--feature", "embedding", "--text-template",
            "{instruction}"]
    assert main(args + ["--output", str(tmp_path / "s1")]) == 0
    assert "half-split agreement" in capsys.readouterr().out
    op = DomainPseudoLabelMapper(stage1_path=str(tmp_path / "s1"))
    assert op.method == "cluster" and op.domains == ["mathematics", "coding"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    assert main(args + ["--output", str(tmp_path / "mine")]) == 2
    assert "did not write" in capsys.readouterr().err
