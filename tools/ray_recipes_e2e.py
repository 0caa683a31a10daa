"""Run every Ray recipe of the package end to end on a slice of the pool, with ``dj-process`` under
``executor_type: ray`` (a local Ray cluster) and under the default executor, and compare the rows.

    .venv/bin/daar-ops select --quick --output-dir outputs/ray_e2e_select   # stage1/ + checkpoint/
    .venv/bin/python tools/ray_recipes_e2e.py --run outputs/ray_e2e_select --n 1000

Each recipe is read as written (``recipes/ray/*.yaml``, ``recipes/daar/ray_pseudo_label.yaml``);
only its data (the first ``--n`` records of ``--pool``), its export folder and the artifacts it
names (the probe checkpoint, the fitted stage 1) are pointed at this run's. Prints per recipe and
executor the rows out and wall seconds, whether both executors kept the same rows (as a multiset
of record texts), and last

    RESULT ray_recipes_ok=<k>/<n> same_rows=<all|names that differ> ray_seconds=<sum>
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["ray/daar.yaml", "daar/ray_pseudo_label.yaml", "ray/qdit.yaml", "ray/ds2.yaml"]
ARTIFACTS = {"checkpoint": "checkpoint", "stage1_path": "stage1"}


def _slice(pool: str, n: int, path: Path) -> None:
    from daar_ops.core import iter_jsonl

    kept = 0
    with open(path, "w", encoding="utf-8") as out:
        for _, record in iter_jsonl(pool):
            if kept >= n:
                break
            if record is not None:
                out.write(json.dumps(record) + "\n")  # ASCII: U+2028 splits a line for pandas
                kept += 1


def _recipe(name: str, data: Path, run: Path, out: Path, executor: str) -> dict:
    recipe = yaml.safe_load((REPO / "recipes" / name).read_text())
    for item in recipe["process"]:
        (_, args), = item.items()
        for key, sub in ARTIFACTS.items():
            if args and key in args:
                args[key] = str(run / sub)
    recipe.update(dataset_path=str(data), export_path=str(out / "out.jsonl"), work_dir=str(out),
                  executor_type=executor, project_name=f"e2e-{Path(name).stem}-{executor}")
    if executor == "ray":
        recipe["ray_address"] = "local"
    else:
        recipe.pop("ray_address", None)
    return recipe


def _rows(export: Path) -> Counter:
    files = sorted(export.glob("*.json*")) if export.is_dir() else [export]
    texts = Counter()
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                key = "\x1f".join(str(r.get(k)) for k in ("instruction", "input", "output"))
                texts[hashlib.sha256(key.encode()).hexdigest()] += 1
    return texts


def _run(recipe: dict, folder: Path, timeout: int) -> tuple[int, float, str]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", RAY_AUTH_MODE="disabled")
    dj = Path(sys.executable).with_name("dj-process")
    start = time.perf_counter()
    proc = subprocess.run([str(dj), "--config", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, time.perf_counter() - start, proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> int:
    from daar_ops.core import default_pool

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True,
                   help="a `daar-ops select` output folder (its stage1/ and checkpoint/)")
    p.add_argument("--pool", default=None, help="pool (default: the package's default pool)")
    p.add_argument("--n", type=int, default=1000, help="records of the slice")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "ray_recipes_e2e")
    p.add_argument("--recipes", nargs="+", default=RECIPES)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per dj-process run")
    args = p.parse_args(argv)
    for sub in ARTIFACTS.values():
        if not (args.run / sub).is_dir():
            p.error(f"{args.run / sub} is missing: --run needs a `daar-ops select` output")
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "slice.jsonl"
    _slice(args.pool or str(default_pool()), args.n, data)
    ok, differ, ray_seconds = 0, [], 0.0
    for name in args.recipes:
        rows = {}
        for executor in ("default", "ray"):
            folder = args.out / Path(name).stem / executor
            code, seconds, log = _run(_recipe(name, data, args.run, folder, executor), folder,
                                      args.timeout)
            (folder / "dj-process.log").write_text(log)
            refused = "does not support" in log
            rows[executor] = _rows(folder / "out.jsonl") if code == 0 else None
            ray_seconds += seconds if executor == "ray" else 0.0
            n_out = sum(rows[executor].values()) if rows[executor] is not None else "failed"
            print(f"{name} [{executor}]: exit {code}, rows out {n_out}, {seconds:.0f} s"
                  + (" (Data-Juicer refused an op)" if refused else ""), flush=True)
        if rows["default"] is not None and rows["ray"] is not None:
            ok += 1
            if rows["default"] != rows["ray"]:
                differ.append(name)
        else:
            differ.append(name)
    print(f"RESULT ray_recipes_ok={ok}/{len(args.recipes)} "
          f"same_rows={'all' if not differ else ','.join(differ)} ray_seconds={ray_seconds:.0f}")
    return 0 if ok == len(args.recipes) and not differ else 1


if __name__ == "__main__":
    sys.exit(main())
