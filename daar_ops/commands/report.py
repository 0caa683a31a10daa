"""``daar-ops report``: a self-contained report (Markdown + PNG) of one or more selections."""

from __future__ import annotations

import argparse

from daar_ops.models import MINILM, SENTENCE_MAX_TOKENS
from daar_ops.report import DEFAULT_LABEL_KEYS, PROJECTIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="report label distributions, coverage and projections of selections")
    parser.add_argument("--pool", required=True, help="pool JSONL / JSONL.gz / JSON list")
    parser.add_argument("--subset", action="append", required=True, metavar="[NAME=]PATH",
                        help="a selected subset (JSONL or Data-Juicer export); repeatable")
    parser.add_argument("--out", required=True, help="report directory to write")
    parser.add_argument("--label-key", action="append", default=None, metavar="KEY",
                        help=f"label field(s) to tabulate, dotted for nested "
                             f"(default: {', '.join(DEFAULT_LABEL_KEYS)})")
    parser.add_argument("--template", default="{instruction} {input} {output}",
                        help="record fields rendered into the embedded text")
    parser.add_argument("--model", default=MINILM,
                        help="sentence encoder (short name or local folder)")
    parser.add_argument("--max-seq-length", type=int, default=SENTENCE_MAX_TOKENS,
                        help="encoder tokens per text (0: the encoder's own limit)")
    parser.add_argument("--projection", choices=PROJECTIONS, default="pca")
    parser.add_argument("--max-points", type=int, default=5000,
                        help="pool points in the projection (half as many per subset)")
    parser.add_argument("--pool-limit", type=int, default=None,
                        help="use only the first N pool records")
    parser.add_argument("--cache-dir", default=None,
                        help="embedding cache (default OUT/cache); share it across reports")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import torch

    from daar_ops.report import build_report, parse_subset_args

    torch.set_num_threads(1)
    metrics = build_report(args.pool, parse_subset_args(args.subset), args.out,
                           label_keys=tuple(args.label_key or DEFAULT_LABEL_KEYS),
                           template=args.template, model=args.model, projection=args.projection,
                           max_points=args.max_points, seed=args.seed, cache_dir=args.cache_dir,
                           pool_limit=args.pool_limit, device=args.device,
                           max_seq_length=args.max_seq_length or None,
                           require_labels=bool(args.label_key))
    for name, m in metrics["subsets"].items():
        print(f"{name}: n={m['n']} coverage={m['facility_location_coverage']:.4f} "
              f"pairwise={m['mean_pairwise_similarity']:.4f}")
    print(f"report: {args.out}/report.md")
    return 0
