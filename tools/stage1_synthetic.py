"""Synthetic samples of DaaR stage 1, generated once per (model, seed, settings) and cached on disk.

Synthesis does not depend on the pool, so evaluation tools generate once per seed and reuse the
accepted samples for every pool. Cache: ``~/.cache/daar_ops/synthetic/<key>.jsonl`` (+ ``.json``
with the settings and per-domain stats), ``key`` = sha256 of model fingerprint, domains, seed and
every synthesis setting. Run directly to fill the cache:
``.venv/bin/python tools/stage1_synthetic.py --seeds 0 1 2``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from daar_ops.algorithms.synthesis import DEFAULT_DOMAINS, DomainSpec  # noqa: E402

CACHE_DIR = Path(os.environ.get("DAAR_OPS_HOME", Path.home() / ".cache" / "daar_ops")) / \
    "synthetic"


@dataclass(frozen=True)
class SynthSettings:
    """The tool's synthesis settings (cheaper than the paper's 30 pairs / 2,048 tokens)."""

    model: str = "smollm2-135m-instruct"
    samples_per_domain: int = 6
    max_attempts: int = 12
    candidates_per_round: int = 4
    max_new_tokens: int = 128
    temperature: float = 0.9
    top_p: float = 0.95
    tau: float = 0.95
    batch_size: int = 16
    gen_dtype: str = "float32"  # bf16 is emulated (very slow) on CPUs without AVX512-BF16/AMX
    response_prefix: str = "Instruction:"


def cache_key(settings: SynthSettings, domains: list[DomainSpec], seed: int) -> str:
    from daar_ops.models import model_fingerprint, resolve_model_path

    blob = json.dumps({"settings": asdict(settings), "seed": seed,
                       "domains": [(d.name, d.description) for d in domains],
                       "model_fingerprint": model_fingerprint(resolve_model_path(settings.model)),
                       "version": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def synthetic_samples(seed: int, settings: SynthSettings = SynthSettings(),
                      domains: list[DomainSpec] | None = None, cache_dir: Path = CACHE_DIR,
                      threads: int = 1) -> tuple[list[dict], dict]:
    """(accepted samples ``{instruction, input, output, domain}``, info) for one seed; generated
    with the HF backend on CPU on a cache miss (minutes), read from disk otherwise."""
    import torch

    domains = list(domains or DEFAULT_DOMAINS)
    key = cache_key(settings, domains, seed)
    path, meta_path = cache_dir / f"{key}.jsonl", cache_dir / f"{key}.json"
    if path.exists() and meta_path.exists():
        with open(path, encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        return records, json.loads(meta_path.read_text())
    from daar_ops.algorithms.synthesis import SynthesisConfig, synthesize
    from daar_ops.encoders import embed_texts
    from daar_ops.features import LayerFeatureExtractor
    from daar_ops.generation import load_generator

    torch.set_num_threads(threads)
    extractor = LayerFeatureExtractor(settings.model, layer=0, max_length=512)
    generator = load_generator("hf", settings.model, batch_size=settings.batch_size,
                               dtype=settings.gen_dtype)
    config = SynthesisConfig(
        samples_per_domain=settings.samples_per_domain, max_attempts=settings.max_attempts,
        tau=settings.tau, candidates_per_round=settings.candidates_per_round, seed=seed,
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
        top_p=settings.top_p, response_prefix=settings.response_prefix)
    t0 = time.perf_counter()
    result = synthesize(generator, domains,
                        lambda texts: embed_texts(extractor, texts, "embedding"), config,
                        progress=False)
    seconds = time.perf_counter() - t0
    records = result.records()
    info = {"key": key, "seed": seed, "settings": asdict(settings), "seconds": round(seconds, 1),
            "stats": {n: s.as_dict() for n, s in result.stats.items()},
            "domains": [d.name for d in domains]}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for r in records:
            handle.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    meta_path.write_text(json.dumps(info, indent=2))
    return records, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    for seed in args.seeds:
        records, info = synthetic_samples(seed, threads=args.threads)
        print(f"seed {seed}: {len(records)} samples in {info['seconds']}s, key {info['key']}: "
              f"{ {n: s['accepted'] for n, s in info['stats'].items()} }", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
