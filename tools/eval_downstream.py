"""The downstream instrument: positive controls first, then every method, resumable, committed.

    .venv/bin/python tools/eval_downstream.py --stage all --git-commit   # the CPU measurement
    .venv/bin/python tools/eval_downstream.py --report-only              # the verdict, no training

One process (``daar_ops.evaluation``): held-out records by text hash (never in any selection), one
slice of the rest (``--n`` 1,000), then

1. ``--stage controls``: the untuned model and the positive controls (fixed selections from the
   ground-truth domain, only the training seed varies; ``--control-seeds``): P0 random vs
   untuned, P1 twice the budget, P2 mathematics only, P3 a 70/10/10/10 mix;
2. ``--stage methods``: random, instruction length, QDIT, DS2, DaaR, DaaR per-domain and the full
   slice at one budget (20%), ``--seeds`` (default 5);

each run a full fine-tune (bf16 autocast where the CPU has it natively) and the held-out loss per
answer token and per final-answer token on ``--eval-per-domain`` records per domain. Every
finished run is a small ``docs/results/downstream/runs/METHOD/seed-S/result.json`` (and every
recipe selection ``selections/NAME.json``, text hashes); with ``--git-commit`` each is committed as
it lands, so another machine continues instead of restarting. The report (controls, method
table, deltas with intervals and detectable effects, chart, RESULT line) is regenerated from
those files after every stage and by ``--report-only``. The last line is

    RESULT controls_passed=<k>/4 mde=<nats> movement=<P0 delta> p3_delta=<> p3_ci95=<> \
methods=<n> seeds=<n> random_avg_loss=<> daar_delta=<> daar_ci95=<> daar_per_domain_delta=<> \
best_method=<> best_delta=<> best_ci95=<>

(``nan`` / ``pending`` where nothing is measured yet).
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results" / "downstream"


def build_parser() -> argparse.ArgumentParser:
    from daar_ops.commands.evaluate import add_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)  # the options of `daar-ops evaluate`, same defaults
    p.add_argument("--stage", choices=("controls", "methods", "all"), default="all",
                   help="controls, then methods (all); ignored with --controls")
    p.add_argument("--control-seeds", default="0,1,2", help="training seeds of the controls")
    p.add_argument("--report-only", action="store_true",
                   help="regenerate the report and print the RESULT line from the finished "
                        "runs in --results-dir; trains nothing")
    p.add_argument("--git-commit", action="store_true",
                   help="git-commit every finished result file (only the results folder) as "
                        "it lands")
    p.set_defaults(out=REPO / "outputs" / "eval_downstream", results_dir=RESULTS, device="cpu",
                   methods=",".join(["random", "instruction_length", "qdit", "ds2", "daar",
                                     "daar_per_domain", "full"]))
    return p


def commit_results(results_dir: Path, message: str) -> None:
    """Commit whatever is new under ``results_dir``'s runs/ and selections/ (nothing else staged
    is swept in; a commit that failed, e.g. on a busy index, is picked up by the next one);
    failures are only reported."""
    paths = [os.path.relpath(results_dir / sub, REPO) for sub in ("runs", "selections")
             if (results_dir / sub).exists()]
    if not paths:
        return
    try:
        subprocess.run(["git", "add", "--", *paths], cwd=REPO, check=True, capture_output=True)
        staged = subprocess.run(["git", "diff", "--cached", "--quiet", "--", *paths], cwd=REPO)
        if staged.returncode == 0:
            return
        subprocess.run(["git", "commit", "-q", "-m", message, "--", *paths], cwd=REPO,
                       check=True, capture_output=True)
    except subprocess.CalledProcessError as err:
        print(f"git commit of {paths} failed: {err.stderr.decode(errors='replace')[-300:]}",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from daar_ops.evaluation_report import write_report

    args = build_parser().parse_args(argv)
    results_dir = Path(args.results_dir)
    if not args.report_only:
        from daar_ops.commands.evaluate import run_from_args

        def on_result(path, result):
            print(f"finished {result['method']} seed {result['seed']}: avg loss "
                  f"{result['avg_loss']:.4f} ({result.get('train_seconds', 0):.0f} s train, "
                  f"{result['eval_seconds']:.0f} s eval)", flush=True)
            if args.git_commit:
                commit_results(results_dir, f"downstream: {result['method']} seed "
                                            f"{result['seed']}")

        stages = (["controls"] if args.controls else
                  {"all": ["controls", "methods"]}.get(args.stage, [args.stage]))
        for stage in stages:
            seeds = args.control_seeds if stage == "controls" else args.seeds
            # seed-major: every selection gets seed 0, then seed 1, ... so that an interrupted
            # measurement already compares every method (the untuned model runs once)
            for seed in [x.strip() for x in seeds.split(",") if x.strip()]:
                stage_args = copy.copy(args)
                stage_args.controls, stage_args.seeds = stage == "controls", seed
                run_from_args(stage_args, on_result=on_result)
                if args.git_commit:
                    commit_results(results_dir, f"downstream: {stage} seed {seed}")
                report = write_report(results_dir)
                print(report["result_line"], flush=True)
    report = write_report(results_dir)
    print((results_dir / "table.md").read_text())
    print(f"report: {results_dir}/summary.md, report.json, table.md, deltas.png")
    print(report["result_line"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
