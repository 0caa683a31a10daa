"""The ground floor: the one budget rule, the tie rule, null-safe cells, JSON records."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from daar_ops.core import (as_dict, budget, is_number, rank_order, read_json_records,
                           uniform_dicts)


def test_the_one_budget_rule():
    # floor(ratio * n), as topk_specified_field_selector; round() would keep 3 and 2
    assert budget(10, ratio=0.29) == 2 and budget(3, ratio=0.5) == 1
    # 0.7 * 90 is 62.999999999999993 in floating point: the epsilon keeps it from flooring to 62
    assert 0.7 * 90 < 63 and budget(90, ratio=0.7) == 63
    assert budget(10, num=50) == 10 and budget(10, num=3) == 3
    assert budget(0, ratio=0.5) == 0 and budget(7, ratio=1.0) == 7
    for bad in (dict(), dict(ratio=0.1, num=1), dict(ratio=1.5), dict(ratio=-0.1),
                dict(num=-1), dict(num=2.5), dict(num=True)):
        with pytest.raises(ValueError):
            budget(10, **bad)


def test_tie_rule_and_non_finite_scores():
    order = rank_order([1.0, 3.0, 3.0, np.nan, -np.inf, np.inf, 2.0])
    assert order.tolist()[:4] == [1, 2, 6, 0]  # ties: the earlier sample first
    assert set(order.tolist()[4:]) == {3, 4, 5}  # non-finite last


def test_null_and_non_dict_cells_are_empty_and_batches_share_keys():
    assert as_dict(None) == {} and as_dict("x") == {} and as_dict([1]) == {}
    d = {"a": 1}
    assert as_dict(d) == d and as_dict(d) is not d
    assert uniform_dicts([{"a": 1}, None, {"b": 2}]) == [
        {"a": 1, "b": None}, {"a": None, "b": None}, {"a": None, "b": 2}]


def test_json_records_are_a_json_list_or_jsonl_and_a_bad_file_is_named(tmp_path):
    items = [{"a": 1}, {"a": 2}, "not an object"]
    (tmp_path / "list.json").write_text("\ufeff \n " + json.dumps(items))  # BOM, blanks first
    assert read_json_records(tmp_path / "list.json") == items
    assert read_json_records(tmp_path / "list.json", limit=1) == items[:1]
    (tmp_path / "list.json.gz").write_bytes(gzip.compress(json.dumps(items).encode()))
    assert read_json_records(tmp_path / "list.json.gz") == items
    (tmp_path / "rows.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_json_records(tmp_path / "rows.jsonl") == items[:2]
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_json_records(tmp_path / "bad.jsonl")
    (tmp_path / "bad.json").write_text('[{"a": 1},')
    with pytest.raises(ValueError, match="bad.json: not a valid JSON list"):
        read_json_records(tmp_path / "bad.json")
    (tmp_path / "cut.json.gz").write_bytes(gzip.compress(json.dumps(items).encode())[:-8])
    with pytest.raises(ValueError, match="cut.json.gz: cannot be read to the end"):
        read_json_records(tmp_path / "cut.json.gz")
    with pytest.raises(FileNotFoundError, match="absent.json"):
        read_json_records(tmp_path / "absent.json")


def test_is_number_is_finite_and_not_a_bool():
    assert all(is_number(v) for v in (0, -3, 0.5, np.float32(2.0), np.int64(7)))
    assert not any(is_number(v) for v in (True, np.bool_(False), float("nan"), float("inf"),
                                          "1", None, [1]))
