"""``daar-ops train-probe``: train DaaR's psi_dom / psi_div probes on pseudo-labelled records."""

from __future__ import annotations

import argparse

from daar_ops.defaults import FEATURE_DTYPE
from daar_ops.models import SMOLLM2

DEFAULT_LABEL_KEY = "__dj__meta__.daar_pseudo_domain"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-probe", help="train DaaR's domain probe and diversity-reward probe",
        description="Extract layer-k features of pseudo-labelled records (cached on disk, "
                    "resumable), train psi_dom (cross-entropy on the labels) then psi_div (MSE on "
                    "psi_dom's entropy), and write a checkpoint directory for "
                    "diversity_reward_filter.")
    p.add_argument("--input", required=True,
                   help="pseudo-labelled JSONL / JSONL.gz (a Data-Juicer export), or a directory "
                        "of .json/.jsonl shards")
    p.add_argument("--output", required=True, help="checkpoint directory to write")
    p.add_argument("--model", default=SMOLLM2, help="LM short name or folder")
    p.add_argument("--layer", type=int, default=3, help="decoder layer k of the features")
    p.add_argument("--max-length", type=int, default=512, help="tokens kept per text")
    p.add_argument("--template", default="{instruction} {input} {output}",
                   help="text of a record the model sees (str.format over fields)")
    p.add_argument("--label-key", default=DEFAULT_LABEL_KEY,
                   help="dotted field holding the label (default: the pseudo-domain written by "
                        "domain_pseudo_label_mapper)")
    p.add_argument("--domains", nargs="+", default=None,
                   help="domain names in probe output order (default: sorted labels of the data)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N records")
    g = p.add_argument_group("training (defaults: ~25 s on 5k samples on a 2-core CPU)")
    g.add_argument("--epochs", type=int, default=None, help="default 3 (--paper: 1)")
    g.add_argument("--batch-size", type=int, default=None, help="default 32 (--paper: 1)")
    g.add_argument("--lr", type=float, default=None, help="default 3e-5 (--paper: 1e-5)")
    g.add_argument("--optimizer", choices=["adamw", "adam", "sgd"], default=None,
                   help="default adamw")
    g.add_argument("--weight-decay", type=float, default=None, help="default 0.01")
    g.add_argument("--val-fraction", type=float, default=0.03)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-standardize", action="store_true",
                   help="train on raw features (the paper) instead of standardised ones")
    g.add_argument("--paper", action="store_true",
                   help="the paper's setting: AdamW lr 1e-5, batch 1, 1 epoch, raw features "
                        "(explicit --lr/--epochs/--batch-size still win)")
    f = p.add_argument_group("features")
    f.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    f.add_argument("--dtype", default=FEATURE_DTYPE,
                   help="feature precision: float32, bfloat16, or auto (bfloat16 where the "
                        f"device has it natively) (default: {FEATURE_DTYPE})")
    f.add_argument("--model-batch-size", type=int, default=64, help="texts per forward pass")
    f.add_argument("--cache-dir", default=None,
                   help="feature cache directory (default $DAAR_OPS_HOME/feature_cache)")
    f.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    f.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def training_config(args: argparse.Namespace):
    """TrainConfig from the defaults (or --paper's), overridden by the options given."""
    from daar_ops.algorithms.probes import TrainConfig

    values = TrainConfig.paper().to_dict() if args.paper else TrainConfig().to_dict()
    values.update(val_fraction=args.val_fraction, seed=args.seed)
    for key in ("epochs", "batch_size", "lr", "optimizer", "weight_decay"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.no_standardize:
        values["standardize"] = False
    return TrainConfig(**values)


def _run(args: argparse.Namespace) -> int:
    import json

    import torch

    from daar_ops.core import read_jsonl
    from daar_ops.probe_checkpoint import RUN_INFO, train_probe_checkpoint

    torch.set_num_threads(max(1, args.threads))
    cfg = training_config(args)
    records, _ = read_jsonl(args.input, args.limit, strict=True)
    if not records:
        raise ValueError(f"{args.input} holds no records")
    directory, manifest = train_probe_checkpoint(
        records, args.output, model=args.model, layer=args.layer, max_length=args.max_length,
        template=args.template, label_key=args.label_key, domains=args.domains, config=cfg,
        cache_dir=args.cache_dir, use_cache=not args.no_cache,
        model_batch_size=args.model_batch_size, dtype=args.dtype, device=args.device,
        progress=not args.quiet, extra={"input": str(args.input)})
    m = manifest["metrics"]
    print(f"checkpoint: {directory}")
    print(f"domains: {manifest['domains']}  train/val: {m['n_train']}/{m['n_val']}")
    print(f"psi_dom val_accuracy={m['dom_val_accuracy']} "
          f"(majority baseline {m['dom_val_majority_baseline']})")
    print(f"psi_div val_mse={m['div_val_mse']} "
          f"(predict-mean baseline {m['div_val_mse_predict_mean_baseline']}, "
          f"spearman {m['div_val_spearman']})")
    t = json.loads((directory / RUN_INFO).read_text())["timings"]
    print(f"time: features {t['features_s']:.1f}s, training {t['training_s']:.1f}s")
    return 0
