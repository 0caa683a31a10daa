"""Output folders (daar_ops.outdir): a user's folder is never replaced, publishing is safe under
concurrency, staging folders of killed runs are cleaned (issue 22, items 1 and 2)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from daar_ops import outdir

CMD = "daar-ops test"


def _output(final: Path, content: str) -> None:
    staging = outdir.new_staging(final, CMD)
    (staging / "selected.jsonl").write_text(content)
    (staging / "sub").mkdir()
    (staging / "sub" / "x.bin").write_bytes(b"\0" * 1000)
    outdir.publish(staging, final, CMD)


def test_a_folder_with_user_files_is_refused_and_left_alone(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "notes.txt").write_text("mine")
    with pytest.raises(outdir.OutputDirError, match=r"notes\.txt.*nothing is overwritten"):
        outdir.check_target(final, CMD)
    staging = outdir.new_staging(final, CMD)
    with pytest.raises(outdir.OutputDirError):
        outdir.publish(staging, final, CMD)  # checked again at publish time
    assert (final / "notes.txt").read_text() == "mine"


def test_previous_output_is_replaced_but_not_once_a_user_file_was_added(tmp_path):
    final = tmp_path / "out"
    _output(final, "one")
    _output(final, "two")
    assert (final / "selected.jsonl").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (final / "sub" / "mine.txt").write_text("added by the user")
    with pytest.raises(outdir.OutputDirError, match=r"sub/mine\.txt"):
        _output(final, "three")
    assert (final / "selected.jsonl").read_text() == "two"
    assert (final / "sub" / "mine.txt").exists()


def test_empty_folder_and_file_targets(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _output(empty, "x")
    assert (empty / "selected.jsonl").read_text() == "x"
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    with pytest.raises(outdir.OutputDirError, match="a_file"):
        outdir.check_target(a_file, CMD)
    with pytest.raises(outdir.OutputDirError, match="no name"):
        outdir.resolve_target("/")
    assert outdir.resolve_target(".") == Path.cwd()


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_stale_staging_of_dead_processes_is_cleaned_only_when_ours(tmp_path):
    final = tmp_path / "out"
    dead = _dead_pid()
    ours_dead = tmp_path / f"out.partial-{dead}-abc123"
    ours_dead.mkdir()
    (ours_dead / outdir.MARKER).write_text(json.dumps({"writer": "daar-ops", "state": "partial"}))
    (ours_dead / "selected.jsonl").write_text("complete-looking")
    not_ours = tmp_path / f"out.partial-{dead}-def456"
    not_ours.mkdir()
    (not_ours / "data.txt").write_text("someone else's")
    alive = tmp_path / f"out.partial-{os.getpid()}-0a0a0a"
    alive.mkdir()
    (alive / outdir.MARKER).write_text(json.dumps({"writer": "daar-ops", "state": "partial"}))
    removed = outdir.clean_stale(final)
    assert removed == [ours_dead]
    assert not ours_dead.exists() and not_ours.exists() and alive.exists()


def _publish_many(final: str, tag: str, n: int) -> None:
    for i in range(n):
        _output(Path(final), f"{tag}-{i}")


def test_concurrent_publishes_take_turns_and_a_reader_always_sees_an_output(tmp_path):
    final = tmp_path / "out"
    _output(final, "first")
    seen_missing = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            if not (final / "selected.jsonl").exists():
                seen_missing.append(1)

    thread = threading.Thread(target=reader)
    thread.start()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_publish_many, args=(str(final), t, 15)) for t in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    stop.set()
    thread.join()
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old / .partial left
    assert (final / "selected.jsonl").read_text() in ("a-14", "b-14")
    if outdir._exchange_supported(tmp_path):
        assert not seen_missing
