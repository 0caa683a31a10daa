"""``daar-ops evaluate``: fine-tune one model on each selection, compare the held-out loss per
domain."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from daar_ops.models import SMOLLM2


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared with ``tools/eval_downstream.py``; defaults are the CPU-sized comparison
    (the fine-tuning ones are :class:`~daar_ops.evaluation.TrainSettings`'s)."""
    _selection_arguments(p.add_argument_group("selections and evaluation sets"))
    _training_arguments(p.add_argument_group("fine-tuning (identical for every selection)"))
    _benchmark_arguments(p.add_argument_group(
        "benchmarks (optional; pip install 'daar-ops[lm-eval]', a GPU)"))
    p.add_argument("--out", type=Path, default=Path("outputs") / "evaluate")
    p.add_argument("--no-base", action="store_true", help="skip the untuned base model row")
    p.add_argument("--no-resume", action="store_true", help="retrain even finished runs")
    p.add_argument("--no-progress", action="store_true")


def _selection_arguments(s: argparse._ArgumentGroup) -> None:
    from daar_ops import evaluation as ev

    s.add_argument("--methods", default=None,
                   help=f"comma-separated methods run on one slice of --pool at one budget, of "
                        f"{[*ev.DEFAULT_METHODS, ev.FULL]} (default: all but full when no "
                        f"--selection is given)")
    s.add_argument("--selection", action="append", default=[], metavar="NAME=PATH",
                   help="a selection given as a JSONL file (repeatable); texts held out are "
                        "removed from it")
    s.add_argument("--pool", type=Path, default=None,
                   help="pool for the slice and the held-out sets (default: the shared pool)")
    s.add_argument("--n", type=int, default=1000, help="slice size the methods select from")
    s.add_argument("--ratio", type=float, default=0.2, help="budget: fraction of the slice")
    s.add_argument("--slice-seed", type=int, default=0)
    s.add_argument("--held-out-fraction", type=float, default=0.05,
                   help="pool records held out by text hash (never in any selection)")
    s.add_argument("--eval-per-domain", type=int, default=100,
                   help="held-out records per domain evaluated")
    s.add_argument("--controls", action="store_true",
                   help="run the positive controls instead of the methods: P0 random vs untuned, "
                        "P1 twice the budget, P2 mathematics only, P3 a 70/10/10/10 mix (fixed "
                        "selections built from the ground-truth domain; only the training seed "
                        "varies)")
    s.add_argument("--results-dir", type=Path, default=None,
                   help="where the small per-run result files and cached selections go (default: "
                        "--out); point it at a committed folder to resume on another machine")
    s.add_argument("--eval-set", action="append", default=[], metavar="DOMAIN=PATH",
                   help="a user-given evaluation file per domain (replaces the pool's held-out "
                        "sets; its texts are removed from every selection)")
    s.add_argument("--daar-checkpoint", default=None,
                   help="DaaR probe checkpoint (default: `daar-ops select --quick` on the "
                        "selection pool, once)")


def _training_arguments(t: argparse._ArgumentGroup) -> None:
    from daar_ops import evaluation as ev

    d = ev.TrainSettings  # its defaults (class attributes: nothing is validated or imported)
    t.add_argument("--model", default=SMOLLM2,
                   help="model tuned: short name, local folder or hub id")
    t.add_argument("--seeds", default="0,1,2,3,4",
                   help="training seeds (and random's sampling)")
    t.add_argument("--finetune", choices=ev.FINETUNE_MODES, default=d.finetune,
                   help=f"full: every weight; lora: adapters; auto: full for models under "
                        f"{ev.FULL_FINETUNE_MAX_PARAMS:,} parameters on a CPU, LoRA otherwise")
    t.add_argument("--max-length", type=int, default=d.max_length,
                   help="training tokens per example")
    t.add_argument("--eval-max-length", type=int, default=d.eval_max_length,
                   help="tokens per evaluated example (long answers lose their middle)")
    t.add_argument("--epochs", type=float, default=d.epochs)
    t.add_argument("--max-steps", type=int, default=d.max_steps,
                   help="> 0 caps the optimizer steps")
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--warmup", type=float, default=d.warmup_fraction,
                   help="warm-up fraction (cosine schedule)")
    t.add_argument("--no-group-by-length", action="store_true",
                   help="random batches instead of batches grouped by length")
    t.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank (alpha = 2 r)")
    t.add_argument("--lora-top-layers", type=int, default=d.lora_top_layers,
                   help="LoRA only: adapters on the top N decoder layers, which saves most of "
                        "the backward pass on a CPU (0: every layer)")
    t.add_argument("--bf16", choices=ev.BF16_MODES, default=d.bf16,
                   help="bf16 autocast (auto: where the CPU/GPU has native bf16)")
    t.add_argument("--paper", action="store_true",
                   help="the GPU preset: 1,024 tokens, 3 epochs, lr 1e-4, LoRA r 64 on every "
                        "layer, batch 16 (explicit options above do not override it)")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def _benchmark_arguments(b: argparse._ArgumentGroup) -> None:
    from daar_ops import evaluation as ev

    b.add_argument("--lm-eval-tasks", default=None,
                   help=f"comma-separated lm-eval tasks, or 'paper' for "
                        f"{','.join(ev.PAPER_BENCHMARKS)}")
    b.add_argument("--lm-eval-limit", type=int, default=None, help="examples per task")
    b.add_argument("--lm-eval-batch-size", default="auto")
    b.add_argument("--allow-code-execution", action="store_true",
                   help="let the code benchmarks (mbpp, humaneval) execute model-written code "
                        "on this machine; without it they are refused")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="fine-tune one model on each selection and compare the held-out "
                         "loss per domain",
        description="Fine-tune the same model with the same settings and seeds on each selection "
                    "(given JSONL files, or methods run on one slice of a pool at one budget) "
                    "and measure the loss on held-out records of each domain. Writes "
                    "results.json, table.md/csv, losses.png and summary.md; finished runs are "
                    "reused.")
    add_arguments(parser)
    parser.set_defaults(func=_run)


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not (sep and name and path):
            raise ValueError(f"{what} expects NAME=PATH, got {item!r}")
        out[name] = path
    return out


def settings_from_args(args: argparse.Namespace):
    from daar_ops import evaluation as ev

    if args.paper:
        return ev.TrainSettings.gpu_paper(bf16=args.bf16)
    return ev.TrainSettings(
        max_length=args.max_length, eval_max_length=args.eval_max_length, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
        warmup_fraction=args.warmup, finetune=args.finetune,
        group_by_length=not args.no_group_by_length, lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r, lora_top_layers=args.lora_top_layers, bf16=args.bf16)


def run_from_args(args: argparse.Namespace, on_result=None):
    """(summary, results, context) of the comparison the options describe (``--controls``: the
    positive controls and the untuned model; otherwise the methods / given selections)."""
    import torch

    from daar_ops import evaluation as ev

    torch.set_num_threads(max(1, args.threads))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    files = _pairs(args.selection, "--selection")
    # checked before any work: code benchmarks need --allow-code-execution
    tasks = ev.parse_tasks(args.lm_eval_tasks, args.allow_code_execution)
    controls = bool(getattr(args, "controls", False))
    if controls:
        methods = []
    elif args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    else:
        methods = [] if files else list(ev.DEFAULT_METHODS)
    if not methods and not files and not controls:
        raise ValueError("nothing to evaluate: give --methods, --selection or --controls")
    results_dir = args.results_dir or args.out
    start = time.perf_counter()
    comparison = ev.prepare_comparison(
        args.out, pool=args.pool, n=args.n, ratio=args.ratio, methods=methods, seeds=seeds,
        slice_seed=args.slice_seed, held_out_fraction=args.held_out_fraction,
        eval_per_domain=args.eval_per_domain, model=args.model,
        daar_checkpoint=args.daar_checkpoint, selection_files=files,
        eval_files=_pairs(args.eval_set, "--eval-set") or None, progress=not args.no_progress,
        controls=controls, results_dir=results_dir)
    select_s = time.perf_counter() - start
    settings = settings_from_args(args)
    results = ev.evaluate_selections(
        comparison.selections, comparison.eval_sets, args.out, model=args.model, seeds=seeds,
        settings=settings, device=args.device, held_hashes=comparison.held_hashes,
        include_base=not args.no_base, resume=not args.no_resume,
        progress=not args.no_progress, keep_adapters=bool(tasks), results_dir=results_dir,
        on_result=on_result)
    if tasks:
        results = ev.evaluate_benchmarks(results, args.out, args.model, tasks,
                                         device=args.device, limit=args.lm_eval_limit,
                                         batch_size=args.lm_eval_batch_size,
                                         allow_code_execution=args.allow_code_execution)
    context = {**comparison.context, "seeds": seeds, "settings": settings.to_dict(),
               "resolved": ev.resolved_settings(settings, args.model, args.device),
               "selection_seconds": round(select_s, 1),
               "seconds": round(time.perf_counter() - start, 1)}
    summary = ev.write_outputs(results, args.out, context)
    return summary, results, context


def _run(args: argparse.Namespace) -> int:
    from daar_ops.evaluation_report import write_report

    summary, _, context = run_from_args(args)
    print((args.out / "table.md").read_text())
    print(f"best method: {summary['best_method']}; took {context['seconds']} s")
    print(f"outputs: {args.out}/summary.md, results.json, table.csv, losses.png")
    report = write_report(args.results_dir or args.out)
    print(f"controls, detectable effects, verdict: {args.results_dir or args.out}/summary.md")
    print(report["result_line"])
    return 0
