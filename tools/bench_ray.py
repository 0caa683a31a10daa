"""Whole-dataset choices: the default executor vs Data-Juicer's Ray executor (a local cluster),
through ``dj-process``, on synthetic records.

Each record carries a text and the stats a ``diversity_reward_filter`` writes (reward rounded to
0.01, so there are many ties; one in 50 records without a reward, one in 97 with a null stats
cell; three predicted domains). The recipes choose over those stats, so the model-free part is
measured: ``diversity_reward_selector`` with ``select_ratio: 0.2`` and with per-domain quotas. Each
recipe runs once per executor, each ``dj-process`` in its own process: wall time, the driver's
peak RSS (the ``dj-process`` process, sampled every 0.2 s; Ray's own processes are not counted)
and, for Ray, what the op logged as gathered to the driver. Parity: the exported ``id`` sets are
equal. ``ray_address: local`` starts a cluster with the machine's CPUs.

Partitioned QDIT (``--qdit-n``, default 20,000 records of 50 synthetic topics, embedded with a
tiny random LM built on the fly, ``feature: embedding``): ``qdit_selector`` with
``select_ratio: 0.05`` once exact with the default executor and once on Ray with
``partition_size: 5000`` (GreeDi: each of the 4 partitions picks K on a worker, the driver picks K
from the union); the ratio of their facility-location values d(A) over the whole set.

Last line: ``RESULT ray_parity=<all|ops that differ> ray_1m_seconds=<s|pending>
ray_1m_driver_peak_mb=<mb|pending> qdit_greedi_objective_ratio=<partitioned d(A) / exact d(A)>``
(1M is run only with ``--ns`` including 1000000; the ratio is ``n/a`` with ``--qdit-n 0``.)

Run: ``PYTHONPATH=. .venv/bin/python tools/bench_ray.py --ns 100000``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: the research helpers
DOMAINS = ("coding", "math", "general")
RECIPES = {
    "diversity_reward_selector select_ratio": {"diversity_reward_selector": {"select_ratio": 0.2}},
    "diversity_reward_selector quotas": {"diversity_reward_selector": {
        "domain_ratios": {"coding": 0.3, "math": 0.1}, "select_ratio": 0.2}},
}


def write_records(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    rewards = np.round(rng.random(n), 2)
    with path.open("w") as handle:
        for i in range(n):
            stats = None if i % 97 == 5 else {
                "daar_diversity_reward": None if i % 50 == 3 else float(rewards[i]),
                "daar_probe_domain": DOMAINS[i % 3]}
            handle.write(json.dumps({"id": i, "text": f"record {i} " + "word " * (i % 20),
                                     "__dj__stats__": stats}) + "\n")


def run_dj(recipe: dict, work: Path) -> dict:
    path = work / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled")
    dj = Path(sys.executable).with_name("dj-process")
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen([str(dj), "--config", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample():
        handle = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], handle.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - start
    watcher.join()
    (work / "log.txt").write_text(out)
    if proc.returncode != 0:
        raise RuntimeError(f"dj-process failed ({work}):\n{out[-3000:]}")
    gathered = re.findall(r"gathered (\d+) rows of (\[.*?\]) \(([\d.]+) MiB\)", out)
    return {"seconds": round(seconds, 1), "driver_peak_mb": round(peak[0] / 2**20),
            "gathered": [f"{g[0]} rows of {g[1]}: {g[2]} MiB" for g in gathered]}


def write_topic_records(path: Path, n: int, topics: int = 50, seed: int = 0) -> list[str]:
    """Records whose text draws 8-15 words from one of ``topics`` seeded vocabularies of 20
    made-up words (so the embeddings have cluster structure); returns the texts."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = [["".join(rng.choice(letters, rng.integers(3, 8))) for _ in range(20)]
             for _ in range(topics)]
    texts = [" ".join(rng.choice(vocab[int(t)], int(rng.integers(8, 16))))
             for t in rng.integers(0, topics, n)]
    with path.open("w") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": i, "text": text}) + "\n")
    return texts


def qdit_greedi(n: int, tmp: Path) -> dict:
    """Exact QDIT (default executor) against partitioned QDIT on Ray: d(A) ratio and times."""
    from daar_ops.ops.qdit_selector import QditSelector
    from daar_ops.testing import build_tiny_causal_lm
    from daar_research.qdit import facility_location_value

    model = build_tiny_causal_lm(tmp / "tiny_lm", "llama")
    data = tmp / f"topics_{n}.jsonl"
    texts = write_topic_records(data, n)
    params = {"select_ratio": 0.05, "embedder": "daar_features", "model": str(model),
              "feature": "embedding", "text_template": "{text}"}
    out = {}
    for executor, extra in (("default", {}), ("ray", {"partition_size": 5000})):
        work = tmp / f"qdit_{executor}"
        work.mkdir()
        recipe = {"project_name": "bench-ray-qdit", "dataset_path": str(data),
                  "export_path": str(work / "out.jsonl"), "work_dir": str(work),
                  "executor_type": executor, "np": 1, "use_cache": False,
                  "keep_stats_in_res_ds": True,
                  "process": [{"qdit_selector": dict(params, **extra)}]}
        if executor == "ray":
            recipe["ray_address"] = "local"
        row = dict(n=n, op=f"qdit_selector {'exact' if executor == 'default' else 'GreeDi'}",
                   executor=executor, **run_dj(recipe, work))
        ids = sorted(exported_ids(work / "out.jsonl"))
        row["kept"] = len(ids)
        print(json.dumps(row), flush=True)
        out[executor] = (row, ids)
    emb = QditSelector(**params).embed(texts)
    exact, part = (facility_location_value(emb, out[e][1]) for e in ("default", "ray"))
    print(f"n={n} qdit_selector: d(A) exact {exact:.2f}, partitioned on Ray {part:.2f}, ratio "
          f"{part / exact:.4f}", flush=True)
    return dict(rows=[out["default"][0], out["ray"][0]], ratio=part / exact)


def exported_ids(export: Path) -> set:
    files = sorted(export.glob("*.json*")) if export.is_dir() else [export]
    return {json.loads(line)["id"] for f in files for line in f.read_text().splitlines()
            if line.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[100_000])
    parser.add_argument("--qdit-n", type=int, default=20_000,
                        help="records of the partitioned-QDIT comparison (0: skip it)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_ray")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results, differ = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in args.ns:
            data = tmp / f"records_{n}.jsonl"
            write_records(data, n)
            for name, op in RECIPES.items():
                ids = {}
                for executor in ("default", "ray"):
                    work = tmp / f"{n}_{name.replace(' ', '_')}_{executor}"
                    work.mkdir()
                    recipe = {"project_name": "bench-ray", "dataset_path": str(data),
                              "export_path": str(work / "out.jsonl"), "work_dir": str(work),
                              "executor_type": executor, "np": 1, "use_cache": False,
                              "keep_stats_in_res_ds": True, "process": [op]}
                    if executor == "ray":
                        recipe["ray_address"] = "local"
                    row = dict(n=n, op=name, executor=executor, **run_dj(recipe, work))
                    ids[executor] = exported_ids(work / "out.jsonl")
                    row["kept"] = len(ids[executor])
                    results.append(row)
                    print(json.dumps(row), flush=True)
                same = ids["default"] == ids["ray"]
                print(f"n={n} {name}: same rows: {same}", flush=True)
                if not same and name not in differ:
                    differ.append(name)
        ratio = "n/a"
        if args.qdit_n:
            greedi = qdit_greedi(args.qdit_n, tmp)
            results.extend(greedi["rows"])
            ratio = f"{greedi['ratio']:.4f}"
    (args.out / "bench_ray.json").write_text(json.dumps(results, indent=1))
    at_1m = [r for r in results if r["n"] == 1_000_000 and r["executor"] == "ray"
             and r["op"] == "diversity_reward_selector select_ratio"]
    seconds = at_1m[0]["seconds"] if at_1m else "pending"
    peak = at_1m[0]["driver_peak_mb"] if at_1m else "pending"
    print(f"RESULT ray_parity={'all' if not differ else ','.join(differ).replace(' ', ':')} "
          f"ray_1m_seconds={seconds} ray_1m_driver_peak_mb={peak} "
          f"qdit_greedi_objective_ratio={ratio}")


if __name__ == "__main__":
    main()
