"""The held-out split by text hash and the per-domain evaluation sets.

A pool record is held out when its text hash falls below ``fraction``; the hash depends on the
text only, so the split is the same for every method, every slice and every order of the pool,
and :func:`drop_held_out` can strip held-out texts from any selection. The digests here are part
of every run's fingerprint (:func:`daar_ops.evaluation.runs.run_fingerprint`): changing them
retrains every finished run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from daar_ops.core import GROUND_TRUTH_DOMAIN_FIELD, read_jsonl, write_jsonl
from daar_ops.text import to_text

TEXT_FIELDS = ("instruction", "input", "output")


def text_hash(record: Mapping[str, Any], fields: Sequence[str] = TEXT_FIELDS) -> str:
    """sha256 of the record's text fields (unit-separator joined): the identity of a text."""
    joined = "\x1f".join(to_text(record.get(f)).strip() for f in fields)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()


def records_digest(records: Iterable[Mapping[str, Any]]) -> str:
    """Order-independent digest of a set of records' texts (for run fingerprints)."""
    digests = sorted(text_hash(r) for r in records)
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def eval_sets_digest(eval_sets: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Digest of the evaluation sets: each domain's name and :func:`records_digest`."""
    return hashlib.sha256("".join(
        f"{d}:{records_digest(r)}" for d, r in sorted(eval_sets.items())).encode()).hexdigest()


def is_held_out(digest: str, fraction: float) -> bool:
    """A text is held out when the first 64 bits of its hash, read as a fraction, are < fraction."""
    return int(digest[:16], 16) / 2.0 ** 64 < fraction


def split_held_out(records: Sequence[Mapping[str, Any]], fraction: float,
                   fields: Sequence[str] = TEXT_FIELDS) -> tuple[list[int], list[int]]:
    """(indices kept for selection, held-out indices), both in pool order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    keep, held = [], []
    for i, rec in enumerate(records):
        (held if is_held_out(text_hash(rec, fields), fraction) else keep).append(i)
    return keep, held


def drop_held_out(selection: Iterable[Mapping[str, Any]], held_hashes: set[str],
                  fields: Sequence[str] = TEXT_FIELDS) -> tuple[list[Mapping[str, Any]], int]:
    """(the selection without any record whose text is held out, how many were dropped)."""
    kept, dropped = [], 0
    for rec in selection:
        if text_hash(rec, fields) in held_hashes:
            dropped += 1
        else:
            kept.append(rec)
    return kept, dropped


def held_out_eval_sets(records: Sequence[Mapping[str, Any]], held: Sequence[int],
                       per_domain: int, domain_key: str = GROUND_TRUTH_DOMAIN_FIELD
                       ) -> dict[str, list[dict]]:
    """The first ``per_domain`` held-out records of each domain in hash order (order-free)."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for i in held:
        rec = records[i]
        domain = rec.get(domain_key)
        if domain is None:
            raise ValueError(f"held-out record {i} has no '{domain_key}' field: per-domain "
                             "evaluation needs it (pass --eval-set DOMAIN=FILE instead)")
        groups.setdefault(str(domain), []).append((text_hash(rec), dict(rec)))
    return {d: [r for _, r in sorted(items, key=lambda x: x[0])[:per_domain]]
            for d, items in sorted(groups.items())}


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL(.gz) file or a directory of shards (:func:`daar_ops.core.read_jsonl`,
    strict: a malformed line is an error naming it)."""
    return read_jsonl(path, strict=True)[0]


def write_eval_sets(eval_sets: Mapping[str, Sequence[Mapping[str, Any]]],
                    directory: str | Path) -> Path:
    """One ``DOMAIN.jsonl`` per domain (the sandbox hooks pass the folder between jobs)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for domain, records in eval_sets.items():
        write_jsonl(directory / f"{domain}.jsonl", records)
    return directory


def read_eval_sets(directory: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The evaluation sets :func:`write_eval_sets` wrote, by domain."""
    return {p.name[:-len(".jsonl")]: read_records(p)
            for p in sorted(Path(directory).glob("*.jsonl"))}
