"""``daar-ops select``: the whole DaaR method on a pool, in one command."""

from __future__ import annotations

import argparse
import dataclasses
import json

from daar_ops.pipeline import SelectConfig

_HELP = {
    "pool": "JSONL(.gz) pool of Alpaca-style records (default: the shared example pool)",
    "output_dir": "where every artifact goes",
    "model": "short name, local HF folder or hub id of the causal LM",
    "domains": "comma-separated names, or a JSON/JSONL file of {name, description} "
               "(default: the paper's four domains)",
    "template": "text template over record fields",
    "synthetic": "reuse synthetic samples from a JSONL with a `domain` field (e.g. a previous "
                 "run's synthetic.jsonl or recipe 01's output) instead of generating",
    "layer": "decoder layer k of the probe features",
    "samples_per_domain": "synthetic samples accepted per domain",
    "max_attempts": "generations per domain at most",
    "tau": "novelty threshold: a synthetic sample is accepted if its max cosine to the "
           "domain's accepted ones is below tau",
    "probe_size": "records pseudo-labelled to train the probes (disjoint from the selection pool)",
    "pool_size": "records scored for selection (default: all the rest)",
    "refine_iters": "k-means iterations moving the prototypes on the probe pool (method kmeans; "
                    "default: Stage1Config's)",
    "pseudo_label_space": "space the probe pool is labelled in: sentence (MiniLM), embedding "
                          "or layer (the LM)",
    "pseudo_label_method": "stage-1 labelling: cluster (k-means clusters labelled by prototype), "
                           "kmeans or fixed (nearest prototype, the paper's)",
    "pseudo_label_preset": "paper: stage 1 exactly as the DaaR paper (fixed prototypes in the "
                           "LM's embedding space, no descriptions, no purity filter, no hubness "
                           "correction); overrides the pseudo-label space, method and "
                           "descriptions",
    "select_ratio": "fraction of the selection pool kept",
    "epochs": "probe training epochs (default: the trainer's)",
    "threads": "torch CPU threads per process (results are reproducible for a fixed value)",
    "workers": "processes scoring the selection pool on CPU (the output does not depend on it; "
               "default: min(2, CPU count))",
    "score_chunk_size": "selection-pool records read and scored per pass (bounds memory: the "
                        "pool is streamed from disk)",
    "cache_dir": "feature cache directory (default $DAAR_OPS_HOME/feature_cache)",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "select", help="run DaaR end to end: synthesize centroids, pseudo-label, train probes, "
                       "score and select",
        description="Run DaaR end to end on a pool and write the selected JSONL, scores, the "
                    "probe checkpoint and a summary. Defaults: SmolLM2 + the shared pool.")
    defaults, quick = SelectConfig(), SelectConfig.quick()
    preset = ", ".join(f"--{f.name.replace('_', '-')} {getattr(quick, f.name)}"
                       for f in dataclasses.fields(SelectConfig)
                       if getattr(quick, f.name) != getattr(defaults, f.name))
    parser.add_argument("--quick", action="store_true",
                        help=f"preset for a fast run: {preset} (its own output folder, so it "
                             "never replaces a full run's output)")
    for f in dataclasses.fields(SelectConfig):
        if f.name in ("progress", "domains", "per_domain", "descriptions"):
            continue
        default = getattr(defaults, f.name)
        kind = type(default) if default is not None else (
            int if f.name in ("pool_size", "epochs", "refine_iters") else str)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None,
                            help=f"{_HELP.get(f.name, f.name.replace('_', ' '))} "
                                 f"(default: {default}"
                                 + (f"; with --quick: {getattr(quick, f.name)}"
                                    if getattr(quick, f.name) != default else "") + ")")
    parser.add_argument("--domains", default=None, help=_HELP["domains"])
    parser.add_argument("--per-domain", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the top --select-ratio within each predicted pseudo-domain "
                             "(the default: measured better downstream, docs/evaluation.md); "
                             "--no-per-domain: over the whole pool (the paper's global top)")
    parser.add_argument("--no-descriptions", dest="descriptions", action="store_false",
                        default=None, help="stage 1 anchors are the synthetic samples only "
                                           "(the paper's), not also the domain descriptions")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars of the pipeline's own loops (the operators' and "
                             "Data-Juicer's bars still show)")
    parser.set_defaults(func=_run)


def _domains(value: str | None):
    if value is None:
        return None
    if value.endswith((".json", ".jsonl")):
        with open(value, encoding="utf-8") as handle:
            text = handle.read()
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"--domains {value}: neither a JSON document nor JSON lines "
                             f"(line {err.lineno}: {err.msg})") from err
    return [name.strip() for name in value.split(",") if name.strip()]


def _run(args: argparse.Namespace) -> int:
    from daar_ops.pipeline import run_select

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(SelectConfig)
                 if getattr(args, f.name, None) is not None and f.name not in ("domains",)}
    overrides["domains"] = _domains(args.domains)
    overrides["progress"] = not args.no_progress
    cfg = SelectConfig.quick(**overrides) if args.quick else SelectConfig(**overrides)
    result = run_select(cfg)
    s = result.summary
    print(f"selected {s['selected']} of {s['selection_pool']} records -> "
          f"{result.output_dir / 'selected.jsonl'}")
    print(f"pseudo-domains of the selection: {s['selected_pseudo_domain_counts']}")
    print(f"stage seconds: {s['stage_seconds']} (total {s['total_seconds']})")
    return 0
