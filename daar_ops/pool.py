"""A JSONL record pool read from disk in passes, so that its size costs bytes, not records, of
memory: :func:`scan_pool` renders every record once and keeps only a 32-byte digest of its text;
:func:`split_by_digest` splits the pool into a probe pool and a selection pool from the digests;
:func:`iter_rows` / :func:`iter_row_chunks` read the records of given rows back in later passes.

Rows are the ordinal numbers of the pool's JSON-object records (0, 1, ... in file order; malformed
lines are skipped and reported, exactly as :func:`daar_ops.core.read_jsonl` does), so row ``i``
here is ``read_jsonl(pool)[0][i]``. The files must not change between passes: each pass checks
their size and modification time against the scan and refuses a changed file.

No Data-Juicer import.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from daar_ops.core import JsonlReport, iter_jsonl, jsonl_files
from daar_ops.text import TemplateCheck, TextTemplate

DIGEST_BYTES = 32  # SHA-256


def text_digest(text: str, seed: int) -> bytes:
    """The seeded SHA-256 of a rendered text that orders the probe/selection split."""
    return hashlib.sha256(f"daar-split:{seed}:".encode() + text.encode("utf-8", "replace")).digest()


def _stamp(path: str | os.PathLike, strict: bool = True) -> list[tuple[str, int, int]]:
    """(file, size, mtime_ns) of the files the pool is read from (one file or its shards)."""
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in jsonl_files(path, strict)]


@dataclass
class PoolScan:
    """What one pass over a pool keeps: the record count, a digest per record, the read report."""

    path: str
    seed: int
    digests: np.ndarray  # [n, 32] uint8, row order
    report: JsonlReport
    stamp: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.digests)

    def check_unchanged(self) -> None:
        if _stamp(self.path, strict=False) != self.stamp:
            raise RuntimeError(f"{self.path} changed while it was being read (size or "
                               f"modification time differ from the first pass); rerun on a "
                               f"pool that is not being written to")


def scan_pool(path: str | os.PathLike, template: TextTemplate, seed: int,
              source: str | None = None, progress: bool = True) -> PoolScan:
    """Pass 1: render every record, make :meth:`TextTemplate.render_all`'s template checks, and
    keep the seeded digest of each text (32 bytes a record)."""
    stamp = _stamp(path)
    report = JsonlReport(str(path))
    check = TemplateCheck(template)
    buffer = bytearray()
    for _, record in tqdm(iter_jsonl(path, report), desc="reading pool", unit="record",
                          disable=not progress, mininterval=2.0):
        if record is not None:
            buffer += text_digest(check.render(record), seed)
    check.finish(source or f"the records of {path}")
    digests = np.frombuffer(bytes(buffer), dtype=np.uint8).reshape(-1, DIGEST_BYTES)
    return PoolScan(str(path), seed, digests, report, stamp)


def split_by_digest(digests: np.ndarray, probe_size: int, pool_size: int | None
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """Disjoint (probe rows, selection-pool rows, number of duplicated texts), both sorted.

    Distinct texts (equal digests) are ordered by digest; whole texts (every copy) go to the
    probe pool until it holds ``probe_size`` records, the rest to the selection pool (its first
    ``pool_size`` records in that order). So no text is on both sides, and the split of a record
    does not depend on the pool's order."""
    n = len(digests)
    # lexicographic byte order of the digests = order of their four big-endian 64-bit words
    words = np.ascontiguousarray(digests, dtype=np.uint8).view(">u8").astype(np.uint64)
    order = np.lexsort((np.arange(n), words[:, 3], words[:, 2], words[:, 1], words[:, 0]))
    sorted_words = words[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = (sorted_words[1:] != sorted_words[:-1]).any(axis=1)
    group = np.cumsum(starts) - 1  # distinct-text number of each sorted row
    sizes = np.bincount(group)
    duplicated = int((sizes > 1).sum())
    before = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # records in earlier texts
    in_probe = (before < probe_size)[group]
    probe, rest = order[in_probe], order[~in_probe]
    if not len(rest):
        raise ValueError(f"probe_size {probe_size} takes all {n} records ({len(sizes)} distinct "
                         f"texts); nothing is left to select from")
    if pool_size is not None:
        rest = rest[:pool_size]
    return np.sort(probe).astype(np.int64), np.sort(rest).astype(np.int64), duplicated


def split_by_text(texts: Sequence[str], probe_size: int, pool_size: int | None, seed: int
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`split_by_digest` of rendered texts held in memory."""
    digests = np.frombuffer(b"".join(text_digest(t, seed) for t in texts), dtype=np.uint8)
    return split_by_digest(digests.reshape(-1, DIGEST_BYTES), probe_size, pool_size)


def iter_rows(scan: PoolScan, rows: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row, record) for the given rows, in row order, in one pass over the pool."""
    wanted = np.zeros(scan.n, dtype=bool)
    wanted[np.asarray(rows, dtype=np.int64)] = True
    scan.check_unchanged()
    row = -1
    for _, record in iter_jsonl(scan.path, strict=False):
        if record is None:
            continue
        row += 1
        if wanted[row]:
            yield row, record
    if row + 1 != scan.n:
        raise RuntimeError(f"{scan.path} now holds {row + 1} records, {scan.n} at the first pass")
    scan.check_unchanged()


def iter_row_chunks(scan: PoolScan, rows: np.ndarray, chunk_size: int
                    ) -> Iterator[list[tuple[int, dict[str, Any]]]]:
    """:func:`iter_rows` in lists of at most ``chunk_size`` (row, record) pairs."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk: list[tuple[int, dict[str, Any]]] = []
    for item in iter_rows(scan, rows):
        chunk.append(item)
        if len(chunk) == chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
