"""The pool read from disk in passes: rows as read_jsonl numbers them, the split of
split_by_text, a changed file refused, templates checked as render_all does."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from daar_ops.core import read_jsonl
from daar_ops.pool import (iter_row_chunks, iter_rows, scan_pool, split_by_digest, split_by_text,
                           text_digest)
from daar_ops.text import TemplateFieldError, TextTemplate


def reference_split(texts, probe_size, pool_size, seed):
    """The split's definition, spelled out with Python containers."""
    groups = {}
    for i, t in enumerate(texts):
        groups.setdefault(t, []).append(i)
    order = sorted(groups, key=lambda t: hashlib.sha256(
        f"daar-split:{seed}:".encode() + t.encode("utf-8", "replace")).digest())
    probe, rest = [], []
    for t in order:
        (probe if len(probe) < probe_size else rest).extend(groups[t])
    rest = rest if pool_size is None else rest[:pool_size]
    return sorted(probe), sorted(rest), sum(len(g) > 1 for g in groups.values())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_matches_its_definition_with_duplicates(seed):
    rng = np.random.default_rng(seed)
    texts = [f"text {rng.integers(0, 60)}" for _ in range(200)]  # many duplicates
    probe_size = int(rng.integers(1, 150))
    pool_size = None if seed % 2 else int(rng.integers(1, 50))
    probe, rest, dup = split_by_text(texts, probe_size, pool_size, seed)
    ref = reference_split(texts, probe_size, pool_size, seed)
    assert probe.tolist() == ref[0] and rest.tolist() == ref[1] and dup == ref[2]


def test_digest_byte_order_is_the_sort_order():
    # digests that differ only in a late byte or by a trailing zero byte sort as bytes do
    raw = [bytes(31) + b"\x01", bytes(32), b"\x01" + bytes(31), bytes(24) + b"\xff" + bytes(7)]
    digests = np.frombuffer(b"".join(raw), np.uint8).reshape(-1, 32)
    probe, rest, _ = split_by_digest(digests, 2, None)
    first_two = sorted(range(4), key=lambda i: raw[i])[:2]
    assert probe.tolist() == sorted(first_two)


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_scan_rows_are_read_jsonl_rows_and_passes_read_them_back(tmp_path):
    path = tmp_path / "pool.jsonl"
    recs = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(25)]
    lines = [json.dumps(r) for r in recs]
    lines[3:3] = ["{broken", "[1, 2]", ""]  # malformed, not an object, blank
    _write(path, lines)
    scan = scan_pool(path, TextTemplate("{instruction} {output}"), seed=5, progress=False)
    assert scan.n == 25 and scan.report.malformed == [4] and scan.report.non_dict == [5]
    assert read_jsonl(path)[0] == recs
    assert bytes(scan.digests[7]) == text_digest("q7 a7", 5)
    rows = np.array([0, 3, 4, 24])
    assert [(i, r) for i, r in iter_rows(scan, rows)] == [(i, recs[i]) for i in rows]
    chunks = list(iter_row_chunks(scan, np.arange(25), 10))
    assert [len(c) for c in chunks] == [10, 10, 5]
    assert [r for c in chunks for _, r in c] == recs
    with pytest.raises(ValueError, match="chunk_size"):
        next(iter_row_chunks(scan, rows, 0))


def test_a_pool_changed_between_passes_is_refused(tmp_path):
    path = tmp_path / "pool.jsonl"
    _write(path, [json.dumps({"text": f"t{i}"}) for i in range(5)])
    scan = scan_pool(path, TextTemplate("{text}"), seed=0, progress=False)
    _write(path, [json.dumps({"text": f"t{i}"}) for i in range(6)])
    os.utime(path, ns=(1, 1))
    with pytest.raises(RuntimeError, match="changed while it was being read"):
        list(iter_rows(scan, np.array([0])))


def test_scan_checks_the_template_like_render_all(tmp_path):
    path = tmp_path / "pool.jsonl"
    _write(path, [json.dumps({"text": "x"})] * 3)
    with pytest.raises(TemplateFieldError, match="instrution"):
        scan_pool(path, TextTemplate("{instrution}"), seed=0, progress=False)
    with pytest.raises(TemplateFieldError):
        TextTemplate("{instrution}").render_all([{"text": "x"}] * 3)


def test_a_directory_of_shards_is_read_in_name_order_and_files_added_later_do_not_count(tmp_path):
    shards = tmp_path / "pool"
    shards.mkdir()
    _write(shards / "b.jsonl", [json.dumps({"text": "second"})])
    _write(shards / "a.jsonl", [json.dumps({"text": "first"})])
    scan = scan_pool(shards, TextTemplate("{text}"), seed=0, progress=False)
    (shards / "out").mkdir()  # e.g. an output folder inside the pool folder
    (shards / "notes.txt").write_text("a file beside the shards, written during the run")
    assert [r["text"] for _, r in iter_rows(scan, np.array([0, 1]))] == ["first", "second"]
    _write(shards / "c.jsonl", [json.dumps({"text": "third"})])  # a new shard is a change
    with pytest.raises(RuntimeError, match="changed"):
        list(iter_rows(scan, np.array([0])))
