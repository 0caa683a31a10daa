"""Bad input and faults on the main paths: nothing lost, nothing half-written, one clear line.

Each case failed on the code before the structure change (issue 13): a lone surrogate crashed
``daar-ops select`` after all the work and left a mixed output directory; a truncated ``.gz`` was
a bare ``EOFError``; a synthetic record without ``domain`` a ``KeyError``; a template naming no
field of the pool a meaningless selection with exit code 0; a centroid file with too few rows a
bare ``IndexError``; duplicate texts were split across the probe/selection boundary."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from daar_ops.core import dumps_record, iter_jsonl, read_jsonl, write_jsonl
from daar_ops.pipeline import SelectConfig, run_select
from daar_ops.pool import split_by_text
from test_pipeline import SYNTHETIC, pool_records

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, records: list[dict], extra_lines: tuple[str, ...] = ()) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for r in records:
            handle.write(json.dumps(r) + "\n")
        for line in extra_lines:
            handle.write(line + "\n")
    return path


def _cfg(tiny_llama, tmp_path, pool, out, **kw) -> SelectConfig:
    syn = _write(tmp_path / "syn.jsonl", SYNTHETIC)
    base = dict(pool=str(pool), output_dir=str(out), model=str(tiny_llama), synthetic=str(syn),
                probe_size=20, select_ratio=0.25, epochs=1, max_length=32,
                cache_dir=str(tmp_path / "cache"), progress=False,
                pseudo_label_space="embedding", pseudo_label_method="fixed")
    base.update(kw)
    return SelectConfig(**base)


# -- the reader and writer -----------------------------------------------------------------------

def test_lone_surrogates_and_invalid_utf8_round_trip(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"instruction": "a\\ud800b", "output": "x"}\n'
                     b'{"instruction": "caf\xe9", "output": "y"}\n'
                     b'{"instruction": "ok \xc3\xa9", "output": "z"}\n')
    records, report = read_jsonl(path)
    assert len(records) == 3 and report.invalid_utf8 == [2]
    assert records[0]["instruction"] == "a\ud800b"
    write_jsonl(tmp_path / "out.jsonl", records)  # no UnicodeEncodeError
    again, _ = read_jsonl(tmp_path / "out.jsonl")
    assert again == records  # every record comes out as it came in
    assert dumps_record(records[2]) == '{"instruction": "ok é", "output": "z"}\n'.encode()


def test_truncated_gzip_names_the_file(tmp_path):
    full = gzip.compress(b"".join(json.dumps({"i": i}).encode() + b"\n" for i in range(500)))
    path = tmp_path / "pool.jsonl.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match=r"pool\.jsonl\.gz.*truncated"):
        read_jsonl(path)


def test_write_is_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"a": 1}])

    def broken():
        yield {"a": 2}
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_jsonl(path, broken())
    assert read_jsonl(path)[0] == [{"a": 1}] and not list(tmp_path.glob("*.tmp"))


def test_malformed_and_non_object_lines_are_reported(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"a": 1}\n{oops\n[1, 2]\n\n{"a": 2}\n')
    records, report = read_jsonl(path)
    assert records == [{"a": 1}, {"a": 2}]
    assert report.malformed == [2] and report.non_dict == [3] and report.skipped == [2, 3]
    with pytest.raises(ValueError, match="p.jsonl:2"):
        read_jsonl(path, strict=True)
    assert [n for n, r in iter_jsonl(path)] == [1, 2, 3, 5]


# -- daar-ops select -------------------------------------------------------------------------------

def test_select_keeps_surrogates_and_replaces_outputs_as_one_set(tiny_llama, tmp_path):
    rows = pool_records(60)
    rows[3]["instruction"] = "lone \ud800 surrogate"
    rows[7]["output"] = "another \udfff one"
    pool = tmp_path / "pool.jsonl"
    write_jsonl(pool, rows)
    out = tmp_path / "out"
    run_select(_cfg(tiny_llama, tmp_path, pool, out, select_ratio=0.5))  # a previous output
    result = run_select(_cfg(tiny_llama, tmp_path, pool, out))
    assert result.summary["selected"] < 30  # the output directory is the new set only
    assert not list(tmp_path.glob("out.*"))  # no staging or old directory left behind
    scores, _ = read_jsonl(out / "scores.jsonl")
    probe, _ = read_jsonl(out / "probe_pool.jsonl")
    written = {r["instruction"] for r in probe} | {rows[s["pool_index"]]["instruction"]
                                                   for s in scores}
    assert "lone \ud800 surrogate" in written
    assert result.summary["pool_records"] == 60
    assert len(probe) + len(scores) == 60  # nothing lost


def test_failed_select_leaves_the_previous_outputs(tiny_llama, tmp_path):
    pool = _write(tmp_path / "pool.jsonl", pool_records(40))
    out = tmp_path / "out"
    run_select(_cfg(tiny_llama, tmp_path, pool, out))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    bad_syn = _write(tmp_path / "bad_syn.jsonl", [{"instruction": "x", "output": "y"}])
    with pytest.raises(ValueError, match="bad_syn.jsonl:1.*'domain'"):
        run_select(_cfg(tiny_llama, tmp_path, pool, out, synthetic=str(bad_syn)))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not list(tmp_path.glob("out.partial-*"))


def test_select_user_errors_are_one_line(tiny_llama, tmp_path):
    pool = _write(tmp_path / "pool.jsonl", pool_records(40))
    syn = _write(tmp_path / "syn.jsonl", SYNTHETIC[:2])  # only one domain
    empty = _write(tmp_path / "empty.jsonl", [], ("{not json",))
    cases = [
        (["--template", "{nonexistent_field}"], "nonexistent_field"),
        (["--synthetic", str(syn)], "has no sample of domains"),
        (["--pool", str(empty)], "holds no JSON object record"),
        (["--probe-size", "1000"], "nothing is left to select"),
    ]
    cli = [sys.executable, "-m", "daar_ops.cli", "select", "--model", str(tiny_llama),
           "--output-dir", str(tmp_path / "o"), "--no-progress", "--epochs", "1",
           "--probe-size", "20", "--pseudo-label-space", "embedding",
           "--pseudo-label-method", "fixed"]
    for extra, message in cases:
        args = cli + ["--pool", str(pool), "--synthetic", str(_write(tmp_path / "s.jsonl",
                                                                     SYNTHETIC))] + extra
        proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_duplicates_stay_on_one_side_and_are_counted(tiny_llama, tmp_path):
    rows = pool_records(40)
    rows += [dict(rows[i]) for i in range(10)]  # 10 exact duplicates
    pool = _write(tmp_path / "pool.jsonl", rows)
    result = run_select(_cfg(tiny_llama, tmp_path, pool, tmp_path / "out"))
    assert result.summary["duplicated_texts"] == 10
    probe, _ = read_jsonl(tmp_path / "out" / "probe_pool.jsonl")
    scores, _ = read_jsonl(tmp_path / "out" / "scores.jsonl")
    probe_texts = {r["instruction"] for r in probe}
    assert not probe_texts & {rows[s["pool_index"]]["instruction"] for s in scores}


def test_split_depends_on_the_text_not_on_the_order():
    texts = [f"text {i}" for i in range(50)]
    a = split_by_text(texts, 10, None, seed=0)[0]
    b = split_by_text(texts[::-1], 10, None, seed=0)[0]
    assert {texts[i] for i in a} == {texts[::-1][i] for i in b}


# -- operators ------------------------------------------------------------------------------------

def test_contrastive_selector_refuses_a_centroid_file_with_too_few_rows(tiny_artifacts, tmp_path):
    import numpy as np

    from daar_ops.artifacts import read_manifest, save_artifact
    from daar_ops.ops.domain_contrastive_selector import DomainContrastiveSelector

    manifest = read_manifest(tiny_artifacts["centroids"])
    manifest["domains"] = manifest["domains"] + ["extra"]  # 3 rows for 4 domains
    from safetensors.numpy import load_file

    tensors = load_file(str(Path(tiny_artifacts["centroids"]) / manifest["tensor_file"]))
    bad = tmp_path / "bad_centroids"
    save_artifact(bad, {"centroids": np.asarray(tensors["centroids"])},
                  {k: v for k, v in manifest.items() if k not in ("sha256", "tensors")},
                  kind="daar_centroids")
    with pytest.raises(ValueError, match="K domain names"):
        DomainContrastiveSelector(centroids_path=str(bad), model=str(tiny_artifacts["model"]))


# -- reading a pool (issue 22 item 3) --------------------------------------------------------------

def test_shard_folder_refuses_other_files_and_reads_any_suffix_case(tmp_path):
    shards = tmp_path / "pool"
    shards.mkdir()
    _write(shards / "a.jsonl", [{"i": 1}])
    _write(shards / "b.JSONL", [{"i": 2}], ("{broken",))
    with gzip.open(shards / "c.Json.GZ", "wt") as handle:
        handle.write('{"i": 3}\n')
    (shards / ".hidden").write_text("ignored")
    records, report = read_jsonl(shards)
    assert [r["i"] for r in records] == [1, 2, 3]
    assert report.malformed == ["b.JSONL:2"] and "b.JSONL:2" in report.message()
    (shards / "d.txt").write_text('{"i": 4}\n')
    with pytest.raises(ValueError, match=r"d\.txt.*rename them to \.jsonl"):
        read_jsonl(shards)


def test_bom_and_deep_nesting_lose_nothing_silently(tmp_path):
    path = tmp_path / "p.jsonl"
    deep = "[" * 100_000 + "]" * 100_000
    path.write_bytes(b"\xef\xbb\xbf" + b'{"i": 1}\n' + deep.encode() + b'\n{"i": 2}\n')
    records, report = read_jsonl(path)
    assert [r["i"] for r in records] == [1, 2]
    assert report.malformed == [2] and "nest too deeply" in report.message()
