"""Memory of ``daar-ops select`` against pool size: the streamed pipeline against the former
in-memory load, each in its own process so that peak RSS is its own.

Pools are synthetic: N Alpaca-style records (four kinds of templated text with random words,
~300 characters; cached under ``--work``).

* ``stream`` (``--full-n``): :func:`daar_ops.pipeline.run_select` end to end with a tiny random LM
  built on the fly (so the model's cost does not hide the pipeline's), synthetic samples given,
  stage 1 in the LM's embedding space, ``--probe-size`` probe records, ``--workers`` scoring
  processes (default 1), ``--chunk`` records per scoring pass. Beyond the chunk size its peak should not grow with N.
* the load stage alone (``--load-n``), side by side: ``inmemory`` the way the pipeline read a pool
  before it streamed (every record parsed into a list, every text rendered, the split from the
  texts, the selection pool's view built as one Data-Juicer dataset) against ``scan`` the
  streamed way (one pass keeping a digest per record, the split from the digests, the selection
  pool read back chunk by chunk into the same views).

Prints a table (N, mode, seconds, peak RSS in MB) and

    RESULT stream_peak_rss_mb=<json> stream_rss_bytes_per_record=<slope, largest two full-n>
        load_peak_rss_mb=<json> load_rss_ratio=<inmemory / scan at the largest load-n>
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("alpha beta gamma delta river mountain city number value function list string table "
         "market reason because therefore compute solve prove triangle circle square prime "
         "history science music garden window").split()
KINDS = [("What is the capital of region {a}? Mention {w}.", "The capital of region {a} is {w}."),
         ("If {w} implies {v} and {w} holds, does {v} hold for case {a}?", "Yes, case {a}."),
         ("Compute {a} * {b} + {c} and explain {w}.", "{a} * {b} + {c} = {d}."),
         ("Write a function f_{a} that returns {w} {b} times.", "def f_{a}(): return '{w}' * {b}")]


def build_pool(path: Path, n: int, seed: int = 0) -> Path:
    import numpy as np

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as out:
        for i in range(n):
            q, a = KINDS[i % 4]
            a_, b, c = (int(x) for x in rng.integers(0, 10_000, 3))
            w, v = (WORDS[j] for j in rng.integers(0, len(WORDS), 2))
            filler = " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), 30))
            values = dict(a=a_, b=b, c=c, d=a_ * b + c, w=w, v=v)
            out.write(json.dumps({"instruction": q.format(**values), "input": filler,
                                  "output": a.format(**values), "id": i}) + "\n")
    os.replace(tmp, path)
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux


def child_stream(args: argparse.Namespace) -> dict:
    import torch

    from daar_ops.pipeline import SelectConfig, run_select
    from daar_ops.testing import build_tiny_causal_lm

    torch.set_num_threads(1)
    work = Path(args.work)
    model = work / "tiny_llama"
    if not (model / "config.json").exists():
        build_tiny_causal_lm(model)
    synthetic = work / "synthetic.jsonl"
    example = dict(a=1, b=2, c=3, d=5, w="x", v="y")  # one filled-in record of each kind
    domains = ("common_sense", "reasoning", "mathematics", "coding")
    synthetic.write_text("".join(
        json.dumps({"instruction": q.format(**example), "input": "",
                    "output": a.format(**example), "domain": d}) + "\n"
        for (q, a), d in zip(KINDS, domains)))
    cfg = SelectConfig(pool=args.pool, output_dir=str(work / f"out_{args.tag}"), model=str(model),
                       synthetic=str(synthetic), probe_size=args.probe_size, epochs=2,
                       max_length=96, cache_dir=str(work / f"cache_{args.tag}"), progress=False,
                       pseudo_label_space="embedding", pseudo_label_method="fixed",
                       workers=args.workers, score_chunk_size=args.chunk)
    start = time.perf_counter()
    result = run_select(cfg)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
            "stages": result.summary["stage_seconds"], "selected": result.summary["selected"]}


def child_scan(args: argparse.Namespace) -> dict:
    from daar_ops.pipeline import _view
    from daar_ops.pool import iter_row_chunks, scan_pool, split_by_digest
    from daar_ops.text import TextTemplate

    start = time.perf_counter()
    tpl = TextTemplate()
    scan = scan_pool(args.pool, tpl, 0, progress=False)
    _, rest, _ = split_by_digest(scan.digests, args.probe_size, None)
    n = 0
    for chunk in iter_row_chunks(scan, rest, args.chunk):
        n += len(_view(chunk, tpl))
    assert n == len(rest)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def child_inmemory(args: argparse.Namespace) -> dict:
    from data_juicer.core.data import NestedDataset

    from daar_ops.core import read_jsonl
    from daar_ops.pool import split_by_text
    from daar_ops.text import TextTemplate

    start = time.perf_counter()
    tpl = TextTemplate()
    records, _ = read_jsonl(args.pool)
    texts = tpl.render_all(records)
    _, rest, _ = split_by_text(texts, args.probe_size, None, 0)
    view = NestedDataset.from_list([{"__daar_row__": int(i), "instruction": records[i]
                                     ["instruction"], "input": records[i]["input"],
                                     "output": records[i]["output"]} for i in rest.tolist()])
    assert len(view) == len(rest)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def run_child(mode: str, pool: Path, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--pool", str(pool), "--tag", str(n),
           "--work", str(args.work), "--probe-size", str(args.probe_size), "--chunk",
           str(args.chunk), "--workers", str(args.workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("CHILD ")]
    if proc.returncode or not line:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{mode} at N={n} failed (exit {proc.returncode})")
    res = json.loads(line[-1][6:])
    print(f"{n:>9} {mode:>9} {res['seconds']:>9.1f} {res['peak_rss_mb']:>12.1f}"
          + (f"  stages {res['stages']}" if "stages" in res else ""), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full-n", type=int, nargs="*", default=[20_000, 100_000, 200_000])
    ap.add_argument("--load-n", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--probe-size", type=int, default=2000)
    ap.add_argument("--chunk", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=1,
                    help="scoring processes (peak RSS is the main process's, which holds the "
                         "pool's arrays; each worker holds the model and one batch)")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "daar_ops" / "bench" /
                                          "stream"))
    ap.add_argument("--child", choices=["stream", "scan", "inmemory"], help=argparse.SUPPRESS)
    ap.add_argument("--pool", help=argparse.SUPPRESS)
    ap.add_argument("--tag", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child = {"stream": child_stream, "scan": child_scan, "inmemory": child_inmemory}
        print("CHILD " + json.dumps(child[args.child](args)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{'N':>9} {'mode':>9} {'seconds':>9} {'peak RSS MB':>12}", flush=True)
    load: dict[str, dict[int, float]] = {"scan": {}, "inmemory": {}}
    for n in args.load_n:
        pool = build_pool(work / f"pool_{n}.jsonl", n)
        for mode in load:
            load[mode][n] = round(run_child(mode, pool, n, args)["peak_rss_mb"], 1)
    stream: dict[int, float] = {}
    for n in args.full_n:
        pool = build_pool(work / f"pool_{n}.jsonl", n)
        stream[n] = round(run_child("stream", pool, n, args)["peak_rss_mb"], 1)
    slope = float("nan")
    if len(stream) > 1:
        lo, hi = sorted(stream)[-2:]
        slope = (stream[hi] - stream[lo]) * 2 ** 20 / (hi - lo)
    ratio = float("nan")
    if args.load_n:
        top = max(args.load_n)
        ratio = load["inmemory"][top] / load["scan"][top]
    print(f"RESULT stream_peak_rss_mb={json.dumps(stream)} stream_rss_bytes_per_record={slope:.0f} "
          f"load_peak_rss_mb={json.dumps(load)} load_rss_ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
