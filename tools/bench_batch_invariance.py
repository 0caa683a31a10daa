"""Batch invariance of the layer-k features, and what it costs, against the old batching, in one process.

1. canonical (``LayerFeatureExtractor.encode``): every text padded to its own token count rounded up
   to a multiple of ``length_step``, batches of one padded width;
2. sorted (the batching before issue 13): texts sorted by length, each batch padded to its longest
   text, so a text's padding depends on its neighbours.

Invariance: the pool sample is encoded whole, then ``--subsets`` times as a random subset in a
random order with another batch size (as a run over other texts, a cache filled in another order
or a concurrent run would); a row counts as differing if any of its floats is not bit-identical.
Cost: CPU seconds (``time.process_time``, one torch thread unless --threads) of encoding the whole
sample, both methods alternated ``--repeats`` times; the ratio is canonical / sorted per repeat.
Last line:
``RESULT cost_ratio=<median> cost_ratio_range=<min>..<max> rows_differing_canonical=<n>
rows_differing_sorted=<n> max_abs_diff_sorted=<x> n=<n> seed=<s>``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from daar_ops.core import default_pool
from daar_ops.features import LayerFeatureExtractor

DEFAULT_POOL = Path(default_pool())  # $DAAR_OPS_POOL, else the shared pool (daar_ops.core)


def sample_texts(pool: Path, n: int, seed: int, template: str) -> list[str]:
    """``n`` records drawn at random (seeded) from the first 4n of the pool, rendered."""
    import gzip
    import json

    from daar_ops.text import TextTemplate

    tpl = TextTemplate(template)
    with gzip.open(pool, "rt", encoding="utf-8") as handle:
        head = [line for _, line in zip(range(4 * n), handle)]
    pick = np.sort(np.random.default_rng(seed).choice(len(head), size=min(n, len(head)),
                                                      replace=False))
    return [tpl.render(json.loads(head[i])) for i in pick]


def sorted_batches(lengths: np.ndarray, batch_size: int, max_batch_tokens: int
                   ) -> list[np.ndarray]:
    """The batching before issue 13: longest first, bounded by the longest text of each batch."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = int(lengths[order[start]])
        size = max(1, min(batch_size, max_batch_tokens // max(longest, 1)))
        batches.append(order[start:start + size])
        start += size
    return batches


def encode_sorted(ex: LayerFeatureExtractor, texts: list[str]) -> np.ndarray:
    ids, _, _ = ex.tokenize(texts)
    lengths = np.array([len(r) for r in ids])
    out = np.zeros((len(texts), ex.hidden_size), np.float32)
    for batch in sorted_batches(lengths, ex.batch_size, ex.max_batch_tokens):
        _, out[batch] = ex.forward_batch([ids[i] for i in batch],
                                         width=int(lengths[batch].max()))
    return out


def encode_canonical(ex: LayerFeatureExtractor, texts: list[str]) -> np.ndarray:
    return ex.encode(texts, progress=False).layer


def differing_rows(method, extractors, texts, full: np.ndarray, subsets: int, seed: int
                   ) -> tuple[int, float]:
    rng = np.random.default_rng(seed + 1)
    rows, worst = set(), 0.0
    for k in range(subsets):
        ex = extractors[k % len(extractors)]
        pick = rng.permutation(len(texts))[: max(1, len(texts) // 2)]
        feats = method(ex, [texts[i] for i in pick])
        bad = (feats != full[pick]).any(1)
        rows.update(pick[bad].tolist())
        worst = max(worst, float(np.abs(feats - full[pick]).max()))
    return len(rows), worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--n", type=int, default=256, help="records sampled from the pool")
    parser.add_argument("--pool", type=Path, default=DEFAULT_POOL)
    parser.add_argument("--template", default="{instruction} {input} {output}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--subsets", type=int, default=4)
    parser.add_argument("--length-step", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    texts = sample_texts(args.pool, args.n, args.seed, args.template)
    ex = LayerFeatureExtractor(args.model, layer=args.layer, length_step=args.length_step)
    others = [LayerFeatureExtractor(args.model, layer=args.layer, length_step=args.length_step,
                                    batch_size=bs, max_batch_tokens=mbt)
              for bs, mbt in ((1, 2048), (7, 1024), (32, 8192))]
    ids, _, _ = ex.tokenize(texts)
    lengths = np.array([len(r) for r in ids])
    pad_canonical = int(ex.padded_width(lengths).sum() - lengths.sum())
    pad_sorted = sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum())
                     for b in sorted_batches(lengths, ex.batch_size, ex.max_batch_tokens))
    print(f"{len(texts)} texts, {int(lengths.sum())} tokens (median {int(np.median(lengths))}); "
          f"padding tokens: canonical {pad_canonical}, sorted {pad_sorted}")

    encode_canonical(ex, texts[:8])  # warm-up
    ratios, full = [], {}
    for r in range(args.repeats):
        times = {}
        for name, method in (("canonical", encode_canonical), ("sorted", encode_sorted))[::(
                1 if r % 2 == 0 else -1)]:
            cpu = time.process_time()
            full[name] = method(ex, texts)
            times[name] = time.process_time() - cpu
        ratios.append(times["canonical"] / times["sorted"])
        print(f"repeat {r}: canonical {times['canonical']:.2f} CPU-s, sorted "
              f"{times['sorted']:.2f} CPU-s, ratio {ratios[-1]:.3f}")
    diff = {name: differing_rows(method, others, texts, full[name], args.subsets, args.seed)
            for name, method in (("canonical", encode_canonical), ("sorted", encode_sorted))}
    for name, (n_rows, worst) in diff.items():
        print(f"{name}: {n_rows}/{len(texts)} texts got other features in some subset run "
              f"(max |diff| {worst:.2e})")
    print(f"canonical vs sorted features: max |diff| "
          f"{float(np.abs(full['canonical'] - full['sorted']).max()):.2e}; "
          f"{time.perf_counter() - start:.0f} s wall in all")
    print(f"RESULT cost_ratio={np.median(ratios):.3f} "
          f"cost_ratio_range={min(ratios):.3f}..{max(ratios):.3f} "
          f"rows_differing_canonical={diff['canonical'][0]} "
          f"rows_differing_sorted={diff['sorted'][0]} "
          f"max_abs_diff_sorted={diff['sorted'][1]:.2e} n={len(texts)} seed={args.seed}")


if __name__ == "__main__":
    main()
