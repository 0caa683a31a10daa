"""Is a CPU quality score for QDIT / DS2 more than noise? Matched vs mismatched answers.

A quality score worth trading against diversity must at least tell a real answer from an answer
to a different question. ``--n`` (48) pool records are drawn with ``--seed``; each is scored
twice: as it is, and with its ``output`` replaced by the output of another drawn record (a
seeded derangement: same texts, wrong pairing). AUC = P(score of a real pair > score of a
mismatched pair) (0.5 = noise). Scores, all from SmolLM2-135M-Instruct on CPU:

* ``ds2_probability``: the package's DS2 probability-mode rating (``ScoreTokenRater``, the
  expected 0-5 score from the score-token probabilities; what ``ds2_rating_filter`` writes);
* ``ifd``: Data-Juicer's ``instruction_following_difficulty_filter`` score (IFD =
  loss(output | instruction + input) / loss(output)), as ``recipes/baselines/ifd.yaml`` runs it;
  Cherry/Superfiltering keep IFD <= 1 and prefer *high* IFD;
* ``relevance`` = 1 - IFD: how much the instruction helps predict the answer (per-token
  information the instruction gives about the output, relative to the output's own loss).

Texts are cut to ``--max-chars`` characters per field so the run fits a shared CPU. Last line:
``RESULT auc_ds2_probability=<a> auc_ifd=<b> auc_relevance=<c> ifd_gt1_mismatched=<f>``.

Usage: ``.venv/bin/python tools/eval_quality_proxy.py [--n 48] [--seed 0]``
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

from daar_ops.core import default_pool  # noqa: E402
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_POOL = Path(default_pool())  # $DAAR_OPS_POOL, else the shared pool (daar_ops.core)
RATING_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(pos > neg) + 0.5 P(pos == neg) over all pairs."""
    pos, neg = np.asarray(pos, float)[:, None], np.asarray(neg, float)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded permutation without fixed points (a random cyclic shift of a shuffled order)."""
    order = rng.permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = order[(np.arange(n) + 1 + rng.integers(0, n - 1)) % n]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=Path, default=DEFAULT_POOL)
    ap.add_argument("--max-chars", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from data_juicer.ops.filter.instruction_following_difficulty_filter import \
        InstructionFollowingDifficultyFilter
    from data_juicer.utils.constant import Fields, StatsKeys

    from daar_ops.raters import ScoreTokenRater
    from daar_ops.models import resolve_model_path

    with gzip.open(args.pool, "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    rng = np.random.default_rng(args.seed)
    picked = [records[i] for i in rng.choice(len(records), size=args.n, replace=False)]
    cut = {f: [str(r.get(f) or "")[: args.max_chars] for r in picked]
           for f in ("instruction", "input", "output")}
    other = derangement(args.n, rng)
    real = [dict(instruction=cut["instruction"][i], input=cut["input"][i],
                 output=cut["output"][i]) for i in range(args.n)]
    fake = [dict(r, output=cut["output"][other[i]]) for i, r in enumerate(real)]
    model = resolve_model_path("smollm2-135m-instruct")
    print(f"N={args.n} pool records (seed {args.seed}), each real and with another record's "
          f"output; fields cut to {args.max_chars} chars; model {model}", flush=True)

    t0 = time.perf_counter()
    rater = ScoreTokenRater(model, batch_size=8)
    rate_real, _ = rater.rate([RATING_TEMPLATE.format(**r) for r in real], max_chars=2000)
    rate_fake, _ = rater.rate([RATING_TEMPLATE.format(**r) for r in fake], max_chars=2000)
    t_rate = time.perf_counter() - t0

    t0 = time.perf_counter()
    ifd_op = InstructionFollowingDifficultyFilter(hf_model=str(model),
                                                  query_template="{instruction} {input}",
                                                  response_template="{output}",
                                                  min_score=0.0, max_score=1.0)

    def ifd(rows):
        out = []
        for r in rows:
            sample = dict(r, **{Fields.stats: {}})
            out.append(float(ifd_op.compute_stats_single(sample)[Fields.stats][StatsKeys.ifd_score]))
        return np.array(out)

    ifd_real, ifd_fake = ifd(real), ifd(fake)
    t_ifd = time.perf_counter() - t0
    a_rate = auc(rate_real, rate_fake)
    a_ifd = auc(ifd_real, ifd_fake)
    a_rel = auc(1 - ifd_real, 1 - ifd_fake)
    print(f"ds2_probability rating: real {rate_real.mean():.2f} +- {rate_real.std():.2f}, "
          f"mismatched {rate_fake.mean():.2f} +- {rate_fake.std():.2f}; AUC {a_rate:.3f} "
          f"({t_rate:.0f} s for {2 * args.n} ratings)")
    print(f"IFD: real {ifd_real.mean():.3f} +- {ifd_real.std():.3f}, mismatched "
          f"{ifd_fake.mean():.3f} +- {ifd_fake.std():.3f}; AUC (higher IFD = better) {a_ifd:.3f}; "
          f"relevance 1 - IFD AUC {a_rel:.3f}; IFD > 1 (dropped by the IFD filter): real "
          f"{(ifd_real > 1).mean():.2f}, mismatched {(ifd_fake > 1).mean():.2f} "
          f"({t_ifd:.0f} s for {2 * args.n} IFD scores)")
    keep = (ifd_real <= 1), (ifd_fake <= 1)
    if keep[0].any() and keep[1].any():
        print(f"IFD among IFD <= 1 (what Cherry ranks): AUC {auc(ifd_real[keep[0]], ifd_fake[keep[1]]):.3f}")
    print(f"spearman(ds2_probability, relevance) on real pairs "
          f"{np.corrcoef(np.argsort(np.argsort(rate_real)), np.argsort(np.argsort(1 - ifd_real)))[0, 1]:.3f}")
    print(f"RESULT auc_ds2_probability={a_rate:.3f} auc_ifd={a_ifd:.3f} auc_relevance={a_rel:.3f} "
          f"ifd_gt1_mismatched={(ifd_fake > 1).mean():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
