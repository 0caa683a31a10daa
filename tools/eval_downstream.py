"""Fine-tune the same model on each method's selection and compare held-out loss per domain.

    .venv/bin/python tools/eval_downstream.py                      # the CPU measurement (below)
    .venv/bin/python tools/eval_downstream.py --n 5000 --eval-per-domain 50 --max-length 256 \
        --lora-top-layers 0                                        # a bigger run

One process does everything (``daar_ops.evaluation``): held-out records by text hash (never in any
selection), one slice of the rest, every method's selection at one budget (random seeded per
seed; instruction length, QDIT, DS2, DaaR and DaaR per-domain through their Data-Juicer recipes;
``full`` = the whole slice as the upper reference), then LoRA fine-tuning with identical settings
per (method, seed) and the held-out loss per domain. Finished runs are reused (resumable);
``--seeds`` lets several processes share the work, and a last call with all seeds aggregates.
Outputs in ``--out``: results.json, table.md/csv, losses.png, summary.md. The last line is

    RESULT methods=<n> seeds=<n> random_avg_loss=<> daar_avg_loss=<> best_method=<name> \
best_delta_vs_random=<> ci95=<>

(methods counts the selections at the budget: not ``base`` and not ``full``; best = the lowest
average loss among them; delta and ci95 are paired over seeds.)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    from daar_ops.commands.evaluate import add_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)  # the options of `daar-ops evaluate`, same defaults
    p.set_defaults(out=REPO / "outputs" / "eval_downstream", device="cpu")
    return p


def result_line(summary: dict, seeds: int) -> str:
    rows = {r["method"]: r for r in summary["rows"]}
    tuned = [r for r in summary["rows"] if r["method"] not in ("base", "full")]

    def fmt(v):
        return "nan" if v is None or v != v else f"{v:.4f}"

    best = summary["best_method"]
    b = rows.get(best, {})
    return (f"RESULT methods={len(tuned)} seeds={seeds} "
            f"random_avg_loss={fmt(rows.get('random', {}).get('avg_loss'))} "
            f"daar_avg_loss={fmt(rows.get('daar', {}).get('avg_loss'))} best_method={best} "
            f"best_delta_vs_random={fmt(b.get('delta_vs_random', 0.0 if best == 'random' else None))} "
            f"ci95={fmt(b.get('delta_ci95'))}")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from daar_ops.commands.evaluate import run_from_args

    args = build_parser().parse_args(argv)
    summary, _, context = run_from_args(args)
    print((args.out / "table.md").read_text())
    print(f"outputs: {args.out}/summary.md, results.json, losses.png; took {context['seconds']} s")
    print(result_line(summary, len(context["seeds"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
