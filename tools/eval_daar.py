"""Run DaaR end to end on the shared pool and evaluate it with the hidden ``domain`` field.

Evaluation only: the pipeline (``daar_ops.pipeline.run_select``) never reads ``domain``; this tool
reads it afterwards to measure how good the pseudo-labels were and how diverse the selection is.

Last line:
``RESULT probe_val_acc=<a> selected=<n> pool=<m> domain_entropy=<h> pseudo_agreement=<p>``
(``domain_entropy``: entropy in nats of the true-domain distribution of the selected subset;
``pseudo_agreement``: fraction of the probe pool whose pseudo-domain equals its true domain.)
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter

from daar_ops.pipeline import SelectConfig, read_jsonl, run_select


def entropy_nats(labels: list[str]) -> float:
    counts = Counter(labels)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick preset of daar-ops select")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples-per-domain", type=int, default=None)
    parser.add_argument("--probe-size", type=int, default=None)
    parser.add_argument("--pool-size", type=int, default=None)
    args = parser.parse_args()
    overrides = {k: v for k, v in vars(args).items() if k != "quick" and v is not None}
    cfg = SelectConfig.quick(**overrides) if args.quick else SelectConfig(**overrides)
    result = run_select(cfg)
    out, summary = result.output_dir, result.summary

    probe = [r for _, r in read_jsonl(out / "probe_pool.jsonl")]
    agree = [r["__dj__meta__"]["daar_pseudo_domain"] == r.get("domain") for r in probe]
    selected = [r.get("domain", "?") for _, r in read_jsonl(out / "selected.jsonl")]
    evaluation = {
        "pseudo_agreement": sum(agree) / len(agree),
        "selected_true_domains": dict(Counter(selected)),
        "domain_entropy": entropy_nats(selected),
        "probe_val_acc": summary["probe_metrics"].get("dom_val_accuracy", float("nan")),
        "stage_seconds": summary["stage_seconds"],
    }
    (out / "evaluation.json").write_text(json.dumps(evaluation, indent=2, sort_keys=True))
    print(f"true domains of the selection: {evaluation['selected_true_domains']}")
    print(f"stage seconds: {summary['stage_seconds']} (total {summary['total_seconds']})")
    print(f"RESULT probe_val_acc={evaluation['probe_val_acc']:.4f} selected={summary['selected']} "
          f"pool={summary['selection_pool']} domain_entropy={evaluation['domain_entropy']:.4f} "
          f"pseudo_agreement={evaluation['pseudo_agreement']:.4f}")


if __name__ == "__main__":
    main()
