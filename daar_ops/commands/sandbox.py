"""``daar-ops sandbox CONFIG``: run a Data-Juicer sandbox experiment with this package's hooks."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from daar_ops.models import SMOLLM2

# The vendored snapshot beside the repository (never copied into it; see docs/sandbox.md).
DEFAULT_SANDBOX_PATH = Path(__file__).resolve().parents[2].parent / "shared" / "vendor" / \
    "data-juicer-sandbox"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sandbox", help="run a Data-Juicer sandbox experiment (select -> train -> evaluate) with "
                        "daar-ops' train / evaluate hooks",
        description="Register DaarPrepareHook, DaarTrainModelHook, DaarEvaluateModelHook and "
                    "DaarSummaryHook into the sandbox's HOOK_MAPPING, then run its "
                    "SandBoxExecutor on CONFIG (e.g. recipes/sandbox/sandbox.yaml). Needs the "
                    "sandbox importable (docs/sandbox.md); WANDB_MODE defaults to disabled.")
    parser.add_argument("config", nargs="?", default=None,
                        help="sandbox config (YAML); omitted: the comparison is built from the "
                             "options below (a small run: --methods random,instruction_length "
                             "--seeds 0 --n 40, see docs/sandbox.md for times)")
    small = parser.add_argument_group("the experiment without a config (build_sandbox_config)")
    small.add_argument("--methods", default=",".join(METHOD_RECIPES),
                       help=f"comma-separated selection methods of {METHOD_RECIPES} "
                            "(default: all)")
    small.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds")
    small.add_argument("--n", type=int, default=250, help="slice size the methods select from")
    small.add_argument("--eval-per-domain", type=int, default=12,
                       help="held-out records per domain evaluated")
    small.add_argument("--model", default=SMOLLM2,
                       help="model fine-tuned (short name or local folder)")
    small.add_argument("--pool", default=None, help="pool (default: the shared pool)")
    small.add_argument("--work-dir", default="outputs/sandbox",
                       help="where the config, recipes and results go")
    parser.add_argument("--sandbox-path", default=os.environ.get("DJ_SANDBOX_PATH"),
                        help="folder of the data-juicer-sandbox snapshot, put first on sys.path "
                             f"(default $DJ_SANDBOX_PATH, else {DEFAULT_SANDBOX_PATH} when it "
                             "exists, else whatever is importable)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="further sandbox options, e.g. --work_dir DIR")
    parser.set_defaults(func=_run)


METHOD_RECIPES = ("random", "instruction_length", "qdit", "ds2", "daar", "daar_per_domain")
RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes" / "sandbox"  # package data


def build_sandbox_config(work_dir: str | os.PathLike = "outputs/sandbox",
                         methods: tuple[str, ...] | list[str] = METHOD_RECIPES,
                         model: str = SMOLLM2, seeds: tuple[int, ...] = (0, 1, 2),
                         pool: str | None = None, n: int = 250, eval_per_domain: int = 12,
                         held_out_fraction: float = 0.05, settings: dict | None = None,
                         device: str = "cpu", write_recipes: bool = False,
                         project_name: str = "daar-sandbox") -> dict:
    """The sandbox experiment as a dict: a ``prepare`` pipeline, one pipeline per method
    (ProcessDataHook with ``recipes/sandbox/process_METHOD.yaml`` -> DaarTrainModelHook ->
    DaarEvaluateModelHook) and a ``summary`` pipeline.

    With ``write_recipes`` the process recipes are copied under ``work_dir/recipes`` with the
    slice, export path and DaaR checkpoint of ``work_dir`` (otherwise they are used as shipped,
    which expects ``work_dir`` = ``outputs/sandbox``).
    """
    import yaml

    work_dir = str(work_dir)
    settings = dict(settings or {"max_length": 128, "lora_top_layers": 8})
    prepare = {"work_dir": work_dir, "n": n, "eval_per_domain": eval_per_domain,
               "held_out_fraction": held_out_fraction, "model": model,
               "daar_probe": any(m.startswith("daar") for m in methods)}
    if pool:
        prepare["pool"] = str(pool)
    pipelines: list[dict] = [{"prepare": {"probe_job_configs": [{
        "hook": "DaarPrepareHook", "meta_name": "prepare",
        "output": ["slice_path", "eval_dir", "daar_checkpoint"], "extra_configs": prepare}]}}]
    for method in methods:
        recipe = RECIPE_DIR / f"process_{method}.yaml"
        if write_recipes:
            body = yaml.safe_load(recipe.read_text())
            body["dataset_path"] = f"{work_dir}/select/slice_input.jsonl"
            body["export_path"] = f"{work_dir}/selections/{method}/selected.jsonl"
            for op in body.get("process", []):
                for name, params in op.items():
                    if name == "diversity_reward_filter":
                        params["checkpoint"] = f"{work_dir}/daar_probe/checkpoint"
            target = Path(work_dir) / "recipes" / recipe.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(yaml.safe_dump(body, sort_keys=False))
            recipe = target
        else:
            recipe = recipe.relative_to(RECIPE_DIR.parents[1])  # run from the repository root
        common = {"method": method, "model": model, "work_dir": work_dir, "device": device,
                  "settings": dict(settings)}
        pipelines.append({method: {
            "execution_job_configs": [
                {"hook": "ProcessDataHook", "meta_name": "select", "output": "selected_path",
                 "dj_configs": str(recipe)},
                {"hook": "DaarTrainModelHook", "meta_name": "train", "output": "adapters",
                 "input": {"extra_configs.train_dataset": f"{method}.select.selected_path"},
                 "extra_configs": {**common, "seeds": list(seeds)}}],
            "evaluation_job_configs": [
                {"hook": "DaarEvaluateModelHook", "meta_name": "evaluate",
                 "output": ["avg_loss", "domain_losses"],
                 "input": {"extra_configs.adapters": f"{method}.train.adapters"},
                 "extra_configs": {**common, "settings": dict(settings)}}]}})
    pipelines.append({"summary": {"evaluation_job_configs": [{
        "hook": "DaarSummaryHook", "meta_name": "summary",
        "output": ["best_method", "summary_path"], "extra_configs": {"work_dir": work_dir}}]}})
    return {"project_name": project_name, "experiment_name": "compare-selections",
            "work_dir": work_dir, "hpo_config": None, "pipelines": pipelines}


def import_sandbox(path: str | os.PathLike | None = None):
    """The sandbox's (init_sandbox_configs, SandBoxExecutor); ImportError says how to install."""
    os.environ.setdefault("WANDB_MODE", "disabled")  # offline wandb hangs; no key exits 0
    root = Path(path) if path else (DEFAULT_SANDBOX_PATH if DEFAULT_SANDBOX_PATH.exists()
                                    else None)
    if root is not None and str(root) not in sys.path:
        sys.path.insert(0, str(root))  # its top-level `thirdparty` package needs the root
    try:
        from data_juicer_sandbox.cli.sandbox_starter import init_sandbox_configs
        from data_juicer_sandbox.pipelines import SandBoxExecutor
    except Exception as err:  # a missing extra, or one of the wrong version, fails differently
        raise ImportError(f"the Data-Juicer sandbox is not importable ({err!r}); see "
                          "docs/sandbox.md for the install steps") from err
    return init_sandbox_configs, SandBoxExecutor


def run_sandbox(config: str | os.PathLike, overrides: list[str] | None = None,
                sandbox_path: str | os.PathLike | None = None):
    """Register the hooks and run the experiment.

    Returns {pipeline: {job meta name: {output key: value}}} of the last iteration, read from the
    ``context_infos.json`` the sandbox writes into its work_dir (the executor runs deep copies of
    its pipelines, so its own watcher stays empty).
    """
    init_sandbox_configs, SandBoxExecutor = import_sandbox(sandbox_path)
    from daar_ops.sandbox_hooks import register_hooks

    register_hooks()
    cfg = init_sandbox_configs(["--config", str(config), *(overrides or [])])
    if cfg is None:
        raise ValueError(f"the sandbox could not parse {config}")
    SandBoxExecutor(cfg).run()
    import json

    iterations = json.loads((Path(cfg.work_dir) / "context_infos.json").read_text())
    last = iterations[-1]["pipeline_infos"] if iterations else []
    return {p["pipeline_name"]: {j["meta_name"]: {k: v for k, v in j.items() if k != "meta_name"}
                                 for j in p["job_infos"]} for p in last}


def write_small_config(args: argparse.Namespace) -> Path:
    """``WORK_DIR/sandbox.yaml`` built from --methods/--seeds/--n/... (no config given)."""
    import yaml

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_RECIPES]
    if not methods or unknown:
        raise ValueError(f"--methods: unknown {unknown or methods}; choose from {METHOD_RECIPES}")
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError as err:
        raise ValueError(f"--seeds expects comma-separated integers, got {args.seeds!r}") from err
    if not seeds or args.n < 2 or args.eval_per_domain < 1:
        raise ValueError("need at least one seed, --n >= 2 and --eval-per-domain >= 1")
    cfg = build_sandbox_config(args.work_dir, methods=methods, model=args.model, seeds=seeds,
                               pool=args.pool, n=args.n, eval_per_domain=args.eval_per_domain,
                               write_recipes=True)
    path = Path(args.work_dir) / "sandbox.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"sandbox config: {path} ({len(methods)} methods x {len(seeds)} seeds, n={args.n})")
    return path


def _run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    config = args.config or write_small_config(args)
    if not Path(config).is_file():
        raise FileNotFoundError(f"sandbox config {config} does not exist (an example is "
                                f"recipes/sandbox/sandbox.yaml; docs/sandbox.md)")
    try:
        outputs = run_sandbox(config, args.overrides, args.sandbox_path)
    except ImportError as err:
        raise ValueError(str(err)) from err
    for pipeline, jobs in outputs.items():
        for job, values in jobs.items():
            print(f"{pipeline}.{job}: {values}")
    return 0
