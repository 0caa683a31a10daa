"""``daar-ops fit-stage1``: fit DaaR's stage 1 on a probe pool and write it as a file."""

from __future__ import annotations

import argparse

from daar_ops.defaults import FEATURE_DTYPE, PSEUDO_LABEL_DEFAULTS
from daar_ops.models import SMOLLM2
from daar_ops.text import ALPACA_TEMPLATE


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fit-stage1", help="fit stage 1 (pseudo-labelling) on a probe pool; write a stage-1 file",
        description="Embed the synthesized samples and the probe pool, fit stage 1 (the "
                    "consensus clusterings with their domains, by default) and write a "
                    "checksummed daar_stage1 folder. domain_pseudo_label_mapper with "
                    "stage1_path labels every record on its own from it, under executor_type: "
                    "ray too (docs/ray.md).")
    p.add_argument("--samples", required=True,
                   help="synthesized samples (JSONL with a 'domain' field)")
    p.add_argument("--input", required=True,
                   help="the probe pool: JSONL / JSONL.gz, or a directory of .json/.jsonl shards")
    p.add_argument("--output", required=True, help="stage-1 folder to write (new or ours)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N records")
    p.add_argument("--text-template", default=ALPACA_TEMPLATE,
                   help="text of a record (str.format over fields)")
    p.add_argument("--preset", choices=["paper"], default=None,
                   help="paper: fixed prototypes of the synthetic samples in the LM's embedding "
                        "layer (Stage1Config.paper())")
    p.add_argument("--method", choices=["cluster", "kmeans", "fixed"],
                   default=PSEUDO_LABEL_DEFAULTS["method"])
    p.add_argument("--feature", choices=["sentence", "embedding", "layer"],
                   default=PSEUDO_LABEL_DEFAULTS["feature"], help="the labelling space")
    p.add_argument("--no-descriptions", action="store_true",
                   help="anchors are the synthetic samples only")
    p.add_argument("--seed", type=int, default=0, help="seed of the clustering")
    p.add_argument("--model", default=SMOLLM2, help="LM short name or folder")
    p.add_argument("--dtype", default=FEATURE_DTYPE, help="LM feature precision")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import torch

    from daar_ops.core import read_jsonl
    from daar_ops.ops.domain_pseudo_label_mapper import DomainPseudoLabelMapper
    from daar_ops.text import TextTemplate

    torch.set_num_threads(max(1, args.threads))
    records, _ = read_jsonl(args.input, args.limit, strict=True)
    if not records:
        raise ValueError(f"{args.input} holds no records")
    texts = TextTemplate(args.text_template).render_all(records, source=str(args.input))
    op = DomainPseudoLabelMapper(
        samples_path=args.samples, save_stage1=args.output, model=args.model,
        feature=args.feature, method=args.method, use_descriptions=not args.no_descriptions,
        seed=args.seed, text_template=args.text_template, dtype=args.dtype, preset=args.preset)
    op.fit_texts(texts)
    info = op.stage1_info
    print(f"stage 1: {args.output} ({op.method} in the {op.feature} space, domains "
          f"{op.domains})")
    if "label_counts" in info:
        print(f"labels of {len(set(texts))} distinct texts: "
              f"{dict(zip(op.domains, info['label_counts']))}; half-split agreement "
              f"{info.get('half_split_agreement')} (reliable: {info.get('reliable')})")
    return 0
