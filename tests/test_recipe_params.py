"""Recipe parameter errors are caught when the recipe is loaded, naming op and parameter
(issue 22 item 7): Data-Juicer's preflight checks the range types of daar_ops.ops._types."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from data_juicer.core.preflight import PipelineConfigError, pre_instantiation_check
from data_juicer.ops.base_op import OPERATORS

import daar_ops.ops  # noqa: F401  (registers the ops)
from daar_ops.ops._types import _Range

OURS = sorted(name for name, cls in OPERATORS.modules.items()
              if cls.__module__.startswith("daar_ops."))


@pytest.mark.parametrize("op, param, value, message", [
    ("qdit_filter", "select_ratio", 1.5, "a number in [0, 1]"),
    ("qdit_selector", "select_num", -3, "an integer >= 0"),
    ("ds2_selector", "select_ratio", -0.1, "a number in [0, 1]"),
    ("diversity_reward_filter", "select_ratio", 2, "a number in [0, 1]"),
    ("diversity_reward_filter", "top_ratio", 2, "a number in [0, 1]"),  # the alias, too
    ("diversity_reward_selector", "top_k", -1, "an integer >= 0"),
    ("diversity_reward_filter", "model_batch_size", 0, "an integer >= 1"),
    ("domain_contrastive_selector", "upper_percentile", 101, "a number in [0, 100]"),
    ("centroid_synthesis_mapper", "top_p", 0.0, "a number in (0, 1]"),
    ("domain_pseudo_label_mapper", "refine_iters", 1.5, "an integer >= 0"),
    ("qdit_selector", "select_ratio", True, "a number in [0, 1]"),
])
def test_out_of_range_values_fail_at_load_naming_op_and_parameter(op, param, value, message):
    with pytest.raises(PipelineConfigError) as err:
        pre_instantiation_check([{op: {param: value}}])
    assert f"[{op}] Parameter '{param}' expects type '{message}'" in str(err.value)


@pytest.mark.parametrize("op", OURS)
def test_every_default_and_typical_value_passes(op):
    cls = OPERATORS.modules[op]
    ranged = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
              if isinstance(p.annotation, _Range)}
    pre_instantiation_check([{op: ranged}])
    for name in ranged:
        pre_instantiation_check([{op: {name: 1}}])  # 1 is in every range


def test_dj_process_refuses_before_reading_the_data(tmp_path):
    recipe = tmp_path / "r.yaml"
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    recipe.write_text(f"dataset_path: {tmp_path / 'd.jsonl'}\n"
                      f"export_path: {tmp_path / 'out' / 'o.jsonl'}\n"
                      "process:\n  - qdit_filter:\n      select_ratio: 1.5\n")
    dj = Path(sys.executable).with_name("dj-process")
    proc = subprocess.run([str(dj), "--config", str(recipe)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    output = proc.stderr + proc.stdout
    assert "[qdit_filter] Parameter 'select_ratio' expects type 'a number in [0, 1]'" in output
    assert "Loading dataset" not in output
