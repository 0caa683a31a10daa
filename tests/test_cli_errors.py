"""One error format for every command (issue 22 item 8): ``daar-ops <cmd>: error: ...`` on one
line, no traceback, exit code 2; disk faults named; nothing half-written left behind."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from daar_ops.cli import main
from daar_ops.core import JsonlReport


def _run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def _one_error(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"daar-ops {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def pool(tmp_path) -> Path:
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n"
                            for i in range(5)))
    return path


def test_train_probe_errors_once_with_the_prefix(tmp_path, capsys):
    code, err = _run(capsys, ["train-probe", "--input", str(tmp_path / "missing.jsonl"),
                              "--output", str(tmp_path / "ck")])
    assert code == 2
    assert "missing.jsonl does not exist" in _one_error(err, "train-probe")


def test_evaluate_selection_without_a_name(tmp_path, capsys):
    code, err = _run(capsys, ["evaluate", "--selection", str(tmp_path / "sel.jsonl"),
                              "--out", str(tmp_path / "ev")])
    assert code == 2 and "expects NAME=PATH" in _one_error(err, "evaluate")


def test_sandbox_with_a_missing_config(tmp_path, capsys):
    code, err = _run(capsys, ["sandbox", str(tmp_path / "nope.yaml")])
    assert code == 2
    line = _one_error(err, "sandbox")
    assert "nope.yaml does not exist" in line and "--config" not in err


def test_select_domains_file_with_bad_json_is_named(tmp_path, capsys, pool):
    bad = tmp_path / "domains.json"
    bad.write_text("{not json\n")
    code, err = _run(capsys, ["select", "--pool", str(pool), "--domains", str(bad),
                              "--output-dir", str(tmp_path / "o"), "--no-progress"])
    assert code == 2 and "domains.json" in _one_error(err, "select")


def test_select_into_the_working_folder_is_refused_before_any_work(tmp_path, capsys, pool,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("the user's")
    code, err = _run(capsys, ["select", "--pool", str(pool), "--output-dir", ".",
                              "--no-progress"])
    line = _one_error(err, "select")
    assert code == 2 and "did not write" in line and "mine.txt" in line
    assert "empty name" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt", "pool.jsonl"]


def test_read_only_or_full_cache_is_named_before_the_work(tmp_path, monkeypatch):
    from daar_ops.feature_cache import check_writable

    real = Path.write_bytes

    def refuse(self, data):
        if self.name.startswith(".write-check"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(OSError) as err:
        check_writable(tmp_path)
    from daar_ops.cli import error_message

    message = error_message(err.value)
    assert str(tmp_path) in message and "read-only file system" in message
    assert not list(tmp_path.iterdir())


def test_a_full_disk_leaves_no_partial_chunk(tmp_path, tiny_llama, monkeypatch):
    from daar_ops.feature_cache import FeatureCache
    from daar_ops.features import LayerFeatureExtractor

    cache = FeatureCache(LayerFeatureExtractor(str(tiny_llama), layer=1, max_length=16),
                         tmp_path, template=None)

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space"):
        cache.encode(["a text", "another"], progress=False)
    assert not [p for p in cache.dir.iterdir() if p.suffix == ".tmp"]


def test_invalid_utf8_lines_are_reported_as_kept():
    report = JsonlReport("p.jsonl", invalid_utf8=[3])
    assert "kept" in report.message() and "skipped" not in report.message()


def test_code_benchmarks_need_an_explicit_flag(tmp_path, capsys):
    from daar_ops.evaluation import parse_tasks

    assert parse_tasks("gsm8k,mbpp", allow_code_execution=True) == ["gsm8k", "mbpp"]
    with pytest.raises(ValueError, match="--allow-code-execution"):
        parse_tasks("paper")
    code, err = _run(capsys, ["evaluate", "--methods", "random", "--lm-eval-tasks", "humaneval",
                              "--out", str(tmp_path / "ev")])
    assert code == 2 and "--allow-code-execution" in _one_error(err, "evaluate")
    assert not (tmp_path / "ev").exists()  # refused before any work


def test_an_api_key_parameter_is_warned_about(warnings_log):
    from daar_ops.generation import load_generator

    try:
        load_generator("api", model="some-model", api_key="sk-secret", client=lambda m, **k: "")
    except ImportError:
        pass  # the openai package is an optional extra
    assert any("OPENAI_API_KEY" in line for line in warnings_log)
    assert not any("sk-secret" in line for line in warnings_log)  # never echoed
