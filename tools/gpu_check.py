"""One prepared check of the package's accelerator paths (issue 25), run by ``tools/gpu_check.sh``.

On a GPU (``--device cuda``, under 10 minutes on one GPU):

1. ``select``: ``daar-ops select --quick`` on the shared pool with ``--device cuda --dtype auto``:
   synthesis, stage 1, probe training and scoring on the GPU (``select_s``);
2. ``reward_rank_corr_vs_cpu``: the selection pool re-scored on the CPU in float32 with the same
   checkpoint; the rank correlation against the GPU run's rewards;
3. ``workers``: a Data-Juicer recipe (``diversity_reward_filter``, ``num_proc: 2``) on the device:
   two workers share it through Data-Juicer's rank-to-device mapping; every row must keep a reward
   equal (rank correlation 1) to a one-worker run;
4. ``parity_qdit`` / ``parity_ds2``: QDIT's greedy (torch kernel) and DS2's curation on the
   device against the CPU on the same embeddings: the fraction of the selection (QDIT) and of the
   curated scores (DS2) that agree;
5. ``eval_s``: one ``daar-ops evaluate`` fine-tune (random selection, one seed, a few steps) in
   bf16 where the device has it.

Last line: ``RESULT gpu=<name> select_s=<> parity_qdit=<> parity_ds2=<> reward_rank_corr_vs_cpu=<>
eval_s=<>``.

``--smoke`` (CI, ``--device cpu``): the same steps on a tiny random model built on the fly, a few
hundred synthetic records and a few training steps, so the script cannot rot; its numbers say
nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

DOMAIN_WORDS = {"coding": "def return sort list function loop code python",
                "mathematics": "sum 12 84 solve equation integer divide total",
                "common_sense": "why people usually water rain cold warm because",
                "reasoning": "if then therefore all some premise conclusion logic"}


def _smoke_inputs(work: Path) -> tuple[str, Path, Path]:
    """A tiny model, a pool of 400 records and synthetic samples (no generation)."""
    from daar_ops.testing import build_tiny_causal_lm

    rng = np.random.default_rng(0)
    model = build_tiny_causal_lm(work / "tiny_model", "llama")
    pool, synthetic = work / "pool.jsonl", work / "synthetic.jsonl"
    with open(pool, "w") as handle:
        for i in range(400):
            words = list(DOMAIN_WORDS.values())[i % 4].split()
            handle.write(json.dumps({"instruction": " ".join(rng.choice(words, 8)), "input": "",
                                     "output": " ".join(rng.choice(words, 5)),
                                     "domain": list(DOMAIN_WORDS)[i % 4]}) + "\n")
    with open(synthetic, "w") as handle:
        for name, words in DOMAIN_WORDS.items():
            for j in range(3):
                handle.write(json.dumps({"instruction": f"{words} {j}", "input": "",
                                         "output": words, "domain": name}) + "\n")
    return str(model), pool, synthetic


def check_select(args, work: Path, model: str, pool: str, synthetic: Path | None):
    from daar_ops.pipeline import SelectConfig, run_select

    overrides = dict(pool=pool, output_dir=str(work / "select"), model=model, device=args.device,
                     dtype="auto", cache_dir=str(work / "cache"), progress=False)
    if synthetic is not None:  # smoke: no generation, a small probe pool
        overrides.update(synthetic=str(synthetic), probe_size=160, pool_size=240, epochs=2,
                         max_length=64, pseudo_label_space="embedding",
                         pseudo_label_method="fixed")
    start = time.perf_counter()
    result = run_select(SelectConfig.quick(**overrides))
    return result, time.perf_counter() - start


def check_reward_vs_cpu(result, model: str) -> float:
    """The selection pool re-scored on the CPU in float32: rank correlation with the run's."""
    from scipy.stats import spearmanr

    from daar_ops.core import read_jsonl
    from daar_ops.pool import iter_rows, scan_pool
    from daar_ops.probe_checkpoint import DaarScorer
    from daar_ops.text import TextTemplate

    out = result.output_dir
    scores, _ = read_jsonl(out / "scores.jsonl")
    scorer = DaarScorer(out / "checkpoint", model=model, device="cpu", dtype="float32")
    tpl = TextTemplate(scorer.template)
    cfg = result.summary["config"]
    scan = scan_pool(cfg["pool"], tpl, cfg["seed"], progress=False)
    rows = np.array([s["pool_index"] for s in scores], dtype=np.int64)
    texts = [tpl.render(r) for _, r in iter_rows(scan, rows)]
    cpu, _, _ = scorer.score_texts(texts)
    return float(spearmanr([s["daar_diversity_reward"] for s in scores], cpu).statistic)


def check_workers(args, work: Path, result, model: str) -> float:
    """A recipe with two Data-Juicer workers on the device against one worker."""
    import yaml

    from daar_ops.core import read_jsonl

    data = work / "recipe_data.jsonl"
    probe, _ = read_jsonl(result.output_dir / "probe_pool.jsonl")
    data.write_text("".join(json.dumps({k: r.get(k) for k in ("instruction", "input", "output")})
                            + "\n" for r in probe[:120]))
    rewards = {}
    for workers in (1, 2):
        recipe = work / f"recipe_{workers}.yaml"
        export = work / f"out_{workers}" / "scored.jsonl"
        recipe.write_text(yaml.safe_dump({
            "project_name": "gpu-check", "dataset_path": str(data), "export_path": str(export),
            "text_keys": "instruction", "np": workers, "use_cache": False,
            "keep_stats_in_res_ds": True, "work_dir": str(work / f"dj_{workers}"),
            "process": [{"diversity_reward_filter": {
                "checkpoint": str(result.output_dir / "checkpoint"), "model": model,
                "dtype": "auto", "feature_cache": False, "num_proc": workers,
                "accelerator": "cuda" if args.device.startswith("cuda") else "cpu"}}]}))
        dj = Path(sys.executable).with_name("dj-process")
        subprocess.run([str(dj), "--config", str(recipe)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows, _ = read_jsonl(export)
        if len(rows) != 120:
            raise RuntimeError(f"{workers} workers exported {len(rows)} of 120 rows")
        rewards[workers] = [r["__dj__stats__"]["daar_diversity_reward"] for r in rows]
    from scipy.stats import spearmanr

    return float(spearmanr(rewards[1], rewards[2]).statistic)


def check_kernels(args) -> tuple[float, float]:
    """QDIT and DS2 on the device against the CPU, same embeddings and seeds."""
    from daar_ops.algorithms.ds2 import DS2Config, curate_scores
    from daar_ops.algorithms.qdit import qdit_select

    rng = np.random.default_rng(0)
    n = 400 if args.smoke else 20000
    emb = rng.normal(size=(n, 64)).astype(np.float32)
    labels = rng.integers(0, 6, size=n)
    runs = {d: qdit_select(emb, select_ratio=0.1, device=d, progress=False).indices
            for d in ("cpu", args.device)}
    qdit = len(set(runs["cpu"].tolist()) & set(runs[args.device].tolist())) / len(runs["cpu"])
    config = DS2Config(hoc_steps=100, detection_rounds=4)
    curated = {d: curate_scores(emb, labels, config, device=d).curated
               for d in ("cpu", args.device)}
    ds2 = float((curated["cpu"] == curated[args.device]).mean())
    return qdit, ds2


def check_evaluate(args, work: Path, model: str, pool: str) -> float:
    cmd = [sys.executable, "-m", "daar_ops.cli", "evaluate", "--pool", pool, "--model", model,
           "--methods", "random", "--seeds", "0", "--device", args.device, "--bf16", "auto",
           "--out", str(work / "evaluate"), "--no-base", "--no-progress"]
    cmd += (["--n", "200", "--eval-per-domain", "4", "--max-steps", "3", "--max-length", "64",
             "--eval-max-length", "64"]
            if args.smoke else ["--n", "1000", "--eval-per-domain", "100", "--max-steps", "50"])
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model and data (CI on CPU): checks the script, not the speed")
    parser.add_argument("--pool", default=None, help="pool for the real check (default: shared)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    gpu = torch.cuda.get_device_name(0).replace(" ", "_") if args.device.startswith("cuda") \
        else "none"
    with tempfile.TemporaryDirectory(prefix="daar_gpu_check_") as tmp:
        work = Path(tmp)
        if args.smoke:
            model, pool, synthetic = _smoke_inputs(work)
            pool = str(pool)
        else:
            from daar_ops.pipeline import default_pool

            model, pool, synthetic = args.model, args.pool or default_pool(), None
        result, select_s = check_select(args, work, model, pool, synthetic)
        print(f"select: {select_s:.1f} s, features in {result.summary['feature_dtype']}",
              flush=True)
        corr = check_reward_vs_cpu(result, model)
        print(f"reward rank correlation, device vs CPU float32: {corr:.6f}", flush=True)
        workers = check_workers(args, work, result, model)
        print(f"two Data-Juicer workers vs one: reward rank correlation {workers:.6f}", flush=True)
        qdit, ds2 = check_kernels(args)
        print(f"QDIT selection agreement device vs CPU {qdit:.4f}; DS2 curated agreement "
              f"{ds2:.4f}", flush=True)
        eval_s = check_evaluate(args, work, model, pool)
        print(f"evaluate: {eval_s:.1f} s", flush=True)
    print(f"RESULT gpu={gpu} select_s={select_s:.1f} parity_qdit={qdit:.4f} parity_ds2={ds2:.4f} "
          f"reward_rank_corr_vs_cpu={corr:.6f} eval_s={eval_s:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
