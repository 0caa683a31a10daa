"""``daar-ops split``: the disjoint probe / selection split of ``daar-ops select``, as files, for
the recipe path (recipe 02 labels the probe part, recipe 03 scores the selection part)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "split", help="split a pool into a probe part and a disjoint selection part (by text)",
        description="Split a pool as `daar-ops select` does: by a seeded hash of each record's "
                    "rendered text, so every copy of a text is on one side. Writes "
                    "OUT/probe.jsonl and OUT/selection.jsonl (records unchanged).")
    p.add_argument("--pool", default=None, help="JSONL(.gz) pool (default: the select default)")
    p.add_argument("--out", required=True, help="directory for probe.jsonl and selection.jsonl")
    p.add_argument("--probe-size", type=int, default=5000)
    p.add_argument("--pool-size", type=int, default=None,
                   help="records of the selection part (default: all the rest)")
    p.add_argument("--template", default="{instruction} {input} {output}")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from loguru import logger

    from daar_ops.core import write_jsonl
    from daar_ops.pipeline import default_pool
    from daar_ops.pool import iter_rows, scan_pool, split_by_digest
    from daar_ops.text import TextTemplate

    pool = args.pool or default_pool()
    # streamed: one pass for the digests, one per output file; memory does not hold the pool
    scan = scan_pool(pool, TextTemplate(args.template), args.seed, source=str(pool))
    if scan.report.message():
        logger.warning(scan.report.message())
    if not scan.n:
        raise ValueError(f"{pool} holds no JSON object record")
    probe, rest, duplicated = split_by_digest(scan.digests, args.probe_size, args.pool_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "probe.jsonl", (r for _, r in iter_rows(scan, probe)))
    write_jsonl(out / "selection.jsonl", (r for _, r in iter_rows(scan, rest)))
    print(f"probe: {len(probe)} records -> {out / 'probe.jsonl'}")
    print(f"selection: {len(rest)} records -> {out / 'selection.jsonl'} "
          f"({duplicated} texts occur more than once; each on one side)")
    return 0
