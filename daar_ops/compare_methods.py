"""Run every available selection method on the same slice of the pool and compare what they pick.

    .venv/bin/python tools/compare_methods.py                 # 1,000 records, select 20%, seed 0
    .venv/bin/python tools/compare_methods.py --n 5000 --methods random,instruction_length
    .venv/bin/python tools/compare_methods.py --full          # the whole pool (e.g. on a GPU)
    python -m daar_ops.compare_methods ...                    # the same, from an installed wheel

Methods are Data-Juicer recipes run with ``dj-process`` (one subprocess each, timed):
``recipes/baselines/{random,instruction_length,ifd,alpagasus,qdit,ds2}.yaml`` and the first
``recipes/daar/*.yaml`` (shipped in the package as ``daar_ops/recipes``) that uses
``diversity_reward_filter``; a method is available when its recipe exists and every op in it is
registered in ``data_juicer.ops.OPERATORS``. ``--recipe NAME=PATH`` adds more. For each method a
copy of the recipe is written with the slice as ``dataset_path``, its own ``export_path``, every
``select_ratio``/``top_ratio`` set to the ratio, every ``topk``/``select_num`` set to
``core.budget`` (floor(ratio * n)), and short model names (:data:`daar_ops.models.KNOWN_MODELS`)
replaced by the prepared local folders.

The slice given to the methods has the evaluation-only fields (``domain``, ``source``) removed, so
no method can read them. The evaluation (``daar_ops.report``) joins them back by text, then writes
one report (Markdown + PNG) of all selections and one table (``comparison.md`` and
``comparison.csv``): per method the true-domain distribution of the selection, its entropy,
coverage of the slice in the MiniLM space, and runtime (``runtime_s``: the whole ``dj-process``
call; ``executor_s``: Data-Juicer's own "Running executor took" time, without start-up).
The last line printed is

    RESULT methods=<n> best_coverage=<method> daar_domain_entropy=<h> random_domain_entropy=<h2>

(``nan`` where DaaR or random did not run).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from daar_ops.core import EVAL_ONLY_FIELDS, budget, default_pool, read_jsonl, write_jsonl

# The recipes ship inside the package (package data), so an installed wheel has them too.
RECIPES = Path(__file__).resolve().parent / "recipes"
BASELINES = ("random", "instruction_length", "ifd", "alpagasus", "qdit", "ds2")
LLM_METHODS = ("ifd", "alpagasus", "ds2")
RATIO_KEYS = ("select_ratio", "top_ratio")
DEFAULT_RATIO = 0.2  # the paper's budget: every method keeps 20% of the pool
COUNT_KEYS = ("topk", "select_num")
MODEL_KEYS = ("hf_model", "api_or_hf_model", "model", "hf_model_path",
              "model_path")
ARTIFACT_KEYS = ("checkpoint", "centroids_path")


def discover_methods(extra: dict[str, str] | None = None) -> dict[str, Path]:
    """name -> recipe path of every method whose recipe exists (availability checked later)."""
    found: dict[str, Path] = {}
    for name in BASELINES:
        path = RECIPES / "baselines" / f"{name}.yaml"
        if path.exists():
            found[name] = path
    for path in sorted((RECIPES / "daar").glob("*.yaml")):
        if "diversity_reward_filter" in path.read_text():
            found["daar"] = path
            break
    for name, path in (extra or {}).items():
        found[name] = Path(path)
    return found


def recipe_ops(recipe: dict) -> list[str]:
    return [next(iter(op)) for op in recipe.get("process", []) if isinstance(op, dict) and op]


def missing_ops(recipe: dict) -> list[str]:
    from data_juicer.ops import OPERATORS

    return [op for op in recipe_ops(recipe) if op not in OPERATORS.modules]


def derive_recipe(recipe: dict, dataset_path: Path, export_path: Path, ratio: float, n: int,
                  overrides: dict[str, dict] | None = None) -> dict:
    """A copy of ``recipe`` pointed at the slice, with the budget and model paths fixed.

    ``overrides`` (op name -> {param: value}) is applied last; a ``report_dir`` goes next to the
    export; a ``dataset:`` block (and its ``max_sample_num``) is replaced by the slice.
    """
    from daar_ops.models import KNOWN_MODELS, prepared_path

    out = copy.deepcopy(recipe)
    out.pop("dataset", None)
    out["dataset_path"] = str(dataset_path)
    out["export_path"] = str(export_path)
    out["use_cache"] = False
    k = budget(n, ratio=ratio)  # the package's one budget rule: floor(ratio * n)
    for op in out.get("process", []):
        for name, params in op.items():
            if params is None:
                params = op[name] = {}
            if not isinstance(params, dict):
                continue
            if "report_dir" in params:
                params["report_dir"] = str(Path(export_path).parent / f"{name}_report")
            params.update((overrides or {}).get(name, {}))
            for key in RATIO_KEYS:
                if key in params and params[key] is not None:
                    params[key] = ratio
            for key in COUNT_KEYS:
                if key in params and params[key] is not None:
                    params[key] = k
            for key in MODEL_KEYS:
                if isinstance(params.get(key), str) and params[key] in KNOWN_MODELS:
                    params[key] = str(prepared_path(params[key]))
    return out


def write_slice(pool: Path, n: int | None, seed: int, out_dir: Path) -> tuple[Path, Path, int]:
    """(method input without eval-only fields, evaluation copy with them, size).

    ``n`` records drawn uniformly without replacement with ``seed`` (kept in pool order);
    ``None`` = the whole pool.
    """
    records = read_jsonl(pool, strict=True)[0]
    if n is not None and n < len(records):
        idx = np.sort(np.random.default_rng(seed).choice(len(records), n, replace=False))
        records = [records[i] for i in idx]
    eval_path, input_path = out_dir / "slice_eval.jsonl", out_dir / "slice_input.jsonl"
    write_jsonl(eval_path, records)
    write_jsonl(input_path, ({k: v for k, v in rec.items() if k not in EVAL_ONLY_FIELDS}
                             for rec in records))
    return input_path, eval_path, len(records)


def missing_inputs(recipe: dict) -> list[str]:
    """Artifact paths (probe checkpoints, centroid files) a recipe needs that do not exist
    (relative ones from the working directory, where ``dj-process`` runs)."""
    gone = []
    for op in recipe.get("process", []):
        for name, params in op.items():
            for key in ARTIFACT_KEYS:
                value = (params or {}).get(key)
                if isinstance(value, str) and value and not Path(value).expanduser().exists():
                    gone.append(f"{name}.{key}={value}")
    return gone


def run_method(name: str, recipe_path: Path, input_path: Path, out_dir: Path, ratio: float,
               n: int, timeout: float | None, overrides: dict[str, dict] | None = None,
               reuse: bool = False) -> dict:
    """Run one method's derived recipe with dj-process; the outcome is also saved to run.json.

    With ``reuse``, a previous successful run in the same output folder on the same slice is
    taken as is (its recorded runtime included) instead of running again.
    """
    run_file = out_dir / "methods" / name / "run.json"
    if reuse and run_file.exists():
        previous = json.loads(run_file.read_text())
        if (previous.get("status") == "ok" and Path(previous.get("export", "")).exists()
                and previous.get("slice_sha256") == _sha256(input_path)):
            print(f"[{name}] reusing {previous['export']}", flush=True)
            return previous
    result = _run_method(name, recipe_path, input_path, out_dir, ratio, n, timeout, overrides)
    if result["status"] == "ok":
        result["slice_sha256"] = _sha256(input_path)
        run_file.write_text(json.dumps(result, indent=2))
    return result


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _run_method(name: str, recipe_path: Path, input_path: Path, out_dir: Path, ratio: float,
                n: int, timeout: float | None, overrides: dict[str, dict] | None) -> dict:
    import yaml

    recipe = yaml.safe_load(recipe_path.read_text())
    missing = missing_ops(recipe)
    if missing:
        return {"method": name, "status": f"unavailable (ops not registered: {missing})"}
    method_dir = out_dir / "methods" / name
    method_dir.mkdir(parents=True, exist_ok=True)
    export = method_dir / "selected.jsonl"
    for stale in method_dir.glob("selected*.jsonl"):
        stale.unlink()
    derived_recipe = derive_recipe(recipe, input_path, export, ratio, n, overrides)
    gone = missing_inputs(derived_recipe)
    if gone:
        return {"method": name, "status": f"unavailable (missing {', '.join(gone)}; "
                                          "pass --set OP.PARAM=PATH)"}
    derived = method_dir / "recipe.yaml"
    derived.write_text(yaml.safe_dump(derived_recipe, sort_keys=False))
    from daar_ops.models import models_dir

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TOKENIZERS_PARALLELISM="false",
               DATA_JUICER_EXTERNAL_MODELS_HOME=str(models_dir()))
    dj = Path(sys.executable).with_name("dj-process")
    cmd = [str(dj) if dj.exists() else "dj-process", "--config", str(derived)]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(method_dir / "dj-process.log", "w") as log:
        try:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    runtime = time.perf_counter() - start
    found = re.findall(r"Running executor took ([0-9.]+) seconds",
                       (method_dir / "dj-process.log").read_text(errors="replace"))
    executor_s = float(found[-1]) if found else float("nan")
    if rc != 0 or not export.exists():
        return {"method": name, "status": f"failed (rc={rc}, see {method_dir}/dj-process.log)",
                "runtime_s": runtime}
    return {"method": name, "status": "ok", "runtime_s": runtime, "executor_s": executor_s,
            "export": str(export)}


def comparison_rows(results: list[dict], metrics: dict, domains: list[str]) -> list[dict]:
    rows = []
    for res in results:
        row = {"method": res["method"], "status": res["status"],
               "runtime_s": round(res.get("runtime_s", float("nan")), 1),
               "executor_s": round(res.get("executor_s", float("nan")), 1)}
        m = metrics["subsets"].get(res["method"]) if metrics else None
        if m is not None:
            dom = m["labels"].get("domain", {})
            counts = dom.get("counts", {})
            total = max(sum(counts.values()), 1)
            row.update(n_selected=m["n"], domain_entropy=dom.get("entropy", float("nan")),
                       normalized_entropy=dom.get("normalized_entropy", float("nan")),
                       fl_coverage=m["facility_location_coverage"],
                       nearest_selected_cos=m["mean_nearest_selected_cosine"],
                       pairwise_cos=m["mean_pairwise_similarity"])
            for d in domains:
                row[f"%{d}"] = round(100 * counts.get(d, 0) / total, 1)
        rows.append(row)
    return rows


def write_table(rows: list[dict], domains: list[str], out_dir: Path, header: str) -> str:
    cols = (["method", "status", "n_selected"] + [f"%{d}" for d in domains]
            + ["domain_entropy", "normalized_entropy", "fl_coverage", "nearest_selected_cos",
               "pairwise_cos", "runtime_s", "executor_s"])
    with open(out_dir / "comparison.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in cols})

    def fmt(v, col=""):
        if isinstance(v, float) and col.startswith("%"):
            return f"{v:.1f}"
        if isinstance(v, float):
            return "nan" if v != v else f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, ""), c) for c in cols) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    (out_dir / "comparison.md").write_text(text)
    return text


def result_line(rows: list[dict]) -> str:
    ok = [r for r in rows if r["status"] == "ok" and "fl_coverage" in r]

    def entropy(name: str) -> str:
        r = next((r for r in ok if r["method"] == name), None)
        h = r.get("domain_entropy", float("nan")) if r else float("nan")
        return "nan" if h != h else f"{h:.4f}"

    best = max(ok, key=lambda r: (-math.inf if r["fl_coverage"] != r["fl_coverage"]
                                  else r["fl_coverage"]))["method"] if ok else "none"
    return (f"RESULT methods={len(ok)} best_coverage={best} "
            f"daar_domain_entropy={entropy('daar')} random_domain_entropy={entropy('random')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=Path, default=None,
                        help="default: $DAAR_OPS_POOL, else the shared pool beside a checkout")
    parser.add_argument("--n", type=int, default=1000, help="slice size (default 1000)")
    parser.add_argument("--full", action="store_true", help="use the whole pool")
    parser.add_argument("--ratio", type=float, default=DEFAULT_RATIO, help="fraction to select")
    parser.add_argument("--seed", type=int, default=0, help="seed of the slice")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of methods (default: every available one)")
    parser.add_argument("--skip-llm", action="store_true",
                        help=f"leave out the LLM-scored baselines {LLM_METHODS}")
    parser.add_argument("--recipe", action="append", default=[], metavar="NAME=PATH",
                        help="an extra method given as a Data-Juicer recipe")
    parser.add_argument("--set", action="append", default=[], metavar="OP.PARAM=VALUE",
                        help="override an op parameter in every recipe using OP (value parsed "
                             "as YAML), e.g. --set diversity_reward_filter.checkpoint=DIR")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse successful runs already in --out for the same slice")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds allowed per method (default unlimited)")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "compare")
    parser.add_argument("--projection", choices=("pca", "tsne"), default="pca")
    parser.add_argument("--max-points", type=int, default=5000)
    return parser


def parse_overrides(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, dict]:
    """``--set OP.PARAM=VALUE`` items as {op: {param: value}} (values parsed as YAML)."""
    import yaml

    overrides: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        op, dot, param = key.partition(".")
        if not (sep and dot and op and param):
            parser.error(f"--set expects OP.PARAM=VALUE, got {item!r}")
        overrides.setdefault(op, {})[param] = yaml.safe_load(value)
    return overrides


def chosen_methods(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Path]:
    """name -> recipe of the methods the options ask for."""
    methods = discover_methods(dict(r.split("=", 1) for r in args.recipe))
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in methods]
        if unknown:
            parser.error(f"unknown or missing methods {unknown}; found {sorted(methods)}")
        methods = {m: methods[m] for m in wanted}
    if args.skip_llm:
        methods = {m: p for m, p in methods.items() if m not in LLM_METHODS}
    return methods


def write_comparison(args: argparse.Namespace, results: list[dict], eval_path: Path,
                     n: int) -> str:
    """The report of every successful selection and the comparison table; returns the RESULT
    line (also written to RESULT.txt)."""
    from daar_ops.models import MINILM
    from daar_ops.report import build_report

    ok = {r["method"]: r["export"] for r in results if r["status"] == "ok"}
    metrics = None
    if ok:
        metrics = build_report(eval_path, ok, args.out / "report", label_keys=(
            "domain", "__dj__meta__.daar_pseudo_domain"), projection=args.projection,
            max_points=args.max_points, seed=args.seed, cache_dir=args.out / "cache")
    domains = sorted(metrics["pool"]["labels"].get("domain", {}).get("counts", {})) \
        if metrics else []
    rows = comparison_rows(results, metrics, domains)
    pool_h = metrics["pool"]["labels"].get("domain", {}).get("entropy", float("nan")) \
        if metrics else float("nan")
    header = (f"Selection of {args.ratio:.0%} of a {n}-record slice (seed {args.seed}) of "
              f"`{args.pool.name}`; slice domain entropy {pool_h:.4f} nats (max ln 4 = 1.3863). "
              f"Coverage in the {MINILM} space. Report: `{args.out / 'report'}`.")
    print(write_table(rows, domains, args.out, header))
    line = result_line(rows)
    (args.out / "RESULT.txt").write_text(line + "\n")
    return line


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.ratio < 1:
        parser.error("--ratio must be in (0, 1)")
    if not args.full and args.n < 2:
        parser.error("--n must be >= 2")

    import torch

    torch.set_num_threads(1)
    overrides = parse_overrides(parser, args.set)
    methods = chosen_methods(parser, args)
    args.out.mkdir(parents=True, exist_ok=True)
    args.pool = Path(args.pool or default_pool())
    input_path, eval_path, n = write_slice(args.pool, None if args.full else args.n, args.seed,
                                           args.out)
    print(f"slice: {n} records (seed {args.seed}), selecting {args.ratio:.0%} with "
          f"{len(methods)} methods: {', '.join(methods)}", flush=True)
    results = [run_method(name, path, input_path, args.out, args.ratio, n, args.timeout,
                          overrides, args.reuse) for name, path in methods.items()]
    for res in results:
        print(f"[{res['method']}] {res['status']}"
              + (f" in {res['runtime_s']:.1f} s" if "runtime_s" in res else ""), flush=True)
    print(write_comparison(args, results, eval_path, n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
