"""Text templates, model name resolution, artifacts and the CLI entry points."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from daar_ops.artifacts import ArtifactError, check_compatible, load_artifact, save_artifact
from daar_ops.models import KNOWN_MODELS, model_fingerprint, prepare_model, resolve_model_path
from daar_ops.text import TemplateFieldError, TextTemplate, to_text


def test_template_renders_fields_and_tolerates_missing_ones():
    tpl = TextTemplate()
    assert tpl.render({"instruction": "Hi", "input": "there", "output": "!"}) == "Hi there !"
    assert tpl.render({"instruction": "Hi"}) == "Hi"
    assert tpl.render({}) == ""
    assert TextTemplate("text").render({"text": 3}) == "3"
    assert TextTemplate("{meta.src}: {text}").render({"meta": {"src": "a"}, "text": "b"}) == "a: b"
    assert TextTemplate("{meta.src}: {text}").render({"text": "b"}) == ": b"


def test_render_all_refuses_a_field_that_leaves_every_text_empty(warnings_log):
    # Issue 13 item 6: `--template {nonexistent_field}` gave every record an empty text, exit 0.
    records = [{"instruction": "Hi", "output": "!"}, {"instruction": "Yo", "input": None}]
    with pytest.raises(TemplateFieldError, match=r"nonexistent_field.*all 2 of the records.*"
                                                 r"fields present: instruction, output"):
        TextTemplate("{nonexistent_field}").render_all(records)
    with pytest.raises(TemplateFieldError, match="text"):  # null in every record counts too
        TextTemplate("{text}").render_all([{"text": None, "other": 1}])
    assert TextTemplate("{nonexistent_field}").render_all([]) == []
    assert not warnings_log


def test_a_field_no_record_has_is_an_error_even_when_texts_remain(warnings_log):
    # A typo in one field ({instrction}) used to warn and run to a quietly wrong selection.
    records = [{"instruction": "Hi", "input": "", "output": "!"},
               {"instruction": "Yo", "input": None, "output": "?"}]
    with pytest.raises(TemplateFieldError, match=r"instrction missing or null in all 2 .*"
                                                 r"fields present: input, instruction, output"):
        TextTemplate("{instrction} {input} {output}").render_all(records)
    assert TextTemplate().render_all(records) == ["Hi  !", "Yo  ?"]  # '' and null: present
    records[1].pop("output")
    assert TextTemplate("{instruction} {output}").render_all(records) == ["Hi !", "Yo"]
    assert not warnings_log  # 'output' missing from one record only: not a warning


def test_a_template_field_that_is_not_a_column_is_named_before_any_batch():
    from daar_ops.ops._columns import check_template_columns, render_rows

    check_template_columns(TextTemplate("{instruction} {output}"), ["instruction", "output"], "op")
    with pytest.raises(TemplateFieldError, match=r"qdit_filter: .*instrution.*columns: "
                                                 r"instruction, output"):
        check_template_columns(TextTemplate("{instrution} {output}"),
                               ["instruction", "output", "__dj__stats__"], "qdit_filter")
    # inside a batch nothing raises (dj-process would drop the batch): missing renders as ""
    batch = {"instruction": ["a", "b"], "output": ["x", "y"], "__dj__stats__": [{}, {}]}
    assert render_rows(TextTemplate("{instrution} {output}"), batch, [0, 1], "op") == ["x", "y"]


def test_render_all_on_missing_warn_never_raises(warnings_log):
    texts = TextTemplate("{text}").render_all([{"a": 1}] * 3, on_missing="warn",
                                              source="this batch")
    assert texts == ["", "", ""]
    assert len(warnings_log) == 1 and "all 3 of this batch" in warnings_log[0] \
        and "fields present: a" in warnings_log[0]
    with pytest.raises(ValueError, match="on_missing"):
        TextTemplate("{text}").render_all([], on_missing="ignore")


@pytest.mark.parametrize("bad", ["", "  ", "{}", "{0}", "{a", 5])
def test_template_rejects_bad_templates(bad):
    with pytest.raises(ValueError):
        TextTemplate(bad)


def test_to_text_cleans_values():
    assert to_text(None) == "" and to_text(float("nan")) == ""
    assert to_text(b"\xffab") == "\ufffdab"
    assert to_text("x\ud800y") == "x?y"
    assert to_text({"a": 1}) == '{"a": 1}'


def test_resolve_model_path(tmp_path, monkeypatch):
    monkeypatch.setenv("DAAR_OPS_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="daar-ops models prepare"):
        resolve_model_path("smollm2-135m-instruct")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    assert resolve_model_path(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_model_path("Qwen/Qwen2.5-7B") == "Qwen/Qwen2.5-7B"
    with pytest.raises(ValueError, match="unknown model"):
        prepare_model("gpt-5")


def test_prepare_is_idempotent_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("DAAR_OPS_HOME", str(tmp_path))
    path = prepare_model("all-minilm-l6-v2")
    assert (path / "config.json").exists() and not path.with_name(path.name + ".partial").exists()
    mtime = (path / "config.json").stat().st_mtime_ns
    assert prepare_model("all-minilm-l6-v2") == path
    assert (path / "config.json").stat().st_mtime_ns == mtime
    assert resolve_model_path("all-minilm-l6-v2") == str(path)


def test_fingerprint_ignores_volatile_keys(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "config.json").write_text(json.dumps({"hidden_size": 8, "transformers_version": "4"}))
    (b / "config.json").write_text(json.dumps({"hidden_size": 8, "transformers_version": "5"}))
    assert model_fingerprint(a) == model_fingerprint(b) != "unknown"
    (b / "config.json").write_text(json.dumps({"hidden_size": 16}))
    assert model_fingerprint(a) != model_fingerprint(b)


def test_artifact_roundtrip_and_corruption(tmp_path):
    tensors = {"centroids": np.arange(12, dtype=np.float32).reshape(3, 4)}
    save_artifact(tmp_path / "c", tensors, {"domains": ["a", "b", "c"]}, kind="daar_centroids")
    loaded, manifest = load_artifact(tmp_path / "c", kind="daar_centroids")
    np.testing.assert_array_equal(loaded["centroids"], tensors["centroids"])
    assert manifest["domains"] == ["a", "b", "c"] and manifest["tensors"] == {"centroids": [3, 4]}
    with pytest.raises(ArtifactError, match="not 'daar_probe'"):
        load_artifact(tmp_path / "c", kind="daar_probe")
    blob = tmp_path / "c" / manifest["tensor_file"]
    blob.write_bytes(blob.read_bytes()[:-3] + b"xyz")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_artifact(tmp_path / "c")
    (tmp_path / "c" / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupted manifest"):
        load_artifact(tmp_path / "c")
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "missing")


def test_check_compatible_names_each_difference():
    manifest = {"model": "m1", "model_fingerprint": "aa", "layer": 3, "feature_dim": 576}
    check_compatible(manifest, dict(manifest))
    with pytest.raises(ArtifactError, match=r"(?s)model_fingerprint.*feature_dim"):
        check_compatible(manifest, {"model": "m2", "model_fingerprint": "bb", "layer": 3,
                                    "feature_dim": 64})


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "daar_ops.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "models" in out
    out = subprocess.run([sys.executable, "-m", "daar_ops.cli", "models", "list"],
                         capture_output=True, text=True, check=True).stdout
    for name in KNOWN_MODELS:
        assert name in out


def test_entry_point_registers_every_op_module():
    import importlib
    import pkgutil

    import daar_ops.ops
    from data_juicer.ops import OPERATORS, load_op_plugins

    assert "daar_ops" in load_op_plugins()
    for info in pkgutil.iter_modules(daar_ops.ops.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"daar_ops.ops.{info.name}")
        registered = [name for name, cls in OPERATORS.modules.items()
                      if getattr(cls, "__module__", "") == module.__name__]
        assert registered, f"daar_ops.ops.{info.name} registers no operator"


def test_fingerprint_covers_the_weights(tmp_path):
    from daar_ops.models import model_fingerprint

    a, b = tmp_path / "a", tmp_path / "b"
    for folder, weights in ((a, b"\x00" * 64), (b, b"\x00" * 63 + b"\x01")):
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
        (folder / "model.safetensors").write_bytes(weights)
    assert model_fingerprint(a) != model_fingerprint(b)  # a fine-tune of the same architecture
    (b / "model.safetensors").write_bytes(b"\x00" * 64)
    assert model_fingerprint(a) == model_fingerprint(b)
