"""Shared fixtures: tiny random causal LMs built on the fly, thread limits, real-model gating."""

from __future__ import annotations

import json

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# features in float32 whatever the CPU: the default "auto" would pick bf16 only on CPUs with native
# bf16, and tests must not depend on CPU features (tests/test_precision.py checks "auto" itself)
os.environ.setdefault("DAAR_OPS_FEATURE_DTYPE", "float32")

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SHARED_POOL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "daar_pool" / "daar_pool.jsonl.gz"

from daar_ops.testing import CHATML_TEMPLATE, build_tiny_causal_lm  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")


def _prepared(name: str) -> Path | None:
    from daar_ops.models import prepared_path

    path = prepared_path(name)
    return path if (path / "config.json").exists() else None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = _prepared("smollm2-135m-instruct")
    if path is None:
        pytest.fail("SmolLM2 is not prepared: run the README's setup command first")
    return path


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    path = _prepared("all-minilm-l6-v2")
    if path is None:
        pytest.fail("all-MiniLM-L6-v2 is not prepared: run the README's setup command first")
    return path


@pytest.fixture(scope="session")
def shared_pool() -> Path:
    if not SHARED_POOL.exists():
        pytest.fail(f"shared pool not found at {SHARED_POOL}")
    return SHARED_POOL


# -------------------------------------------------------------------------------------------------
# DaaR artifacts on the tiny model (fabricated labels): shared by the op, Ray and DJ-native tests

TINY_DOMAINS = ["coding", "math", "qa"]
TINY_WORDS = {"coding": "def return list sort function code loop", "math": "12 7 84 sum solve x",
              "qa": "capital France Paris what who where"}


def tiny_records(n: int, label: bool = True) -> list[dict]:
    """Alpaca-style records with an ``id`` whose words lean to one of three domains."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        dom = TINY_DOMAINS[i % 3]
        words = TINY_WORDS[dom].split() + (
            TINY_WORDS[TINY_DOMAINS[(i + 1) % 3]].split() if i % 4 == 0 else [])
        rec = {"id": i, "instruction": " ".join(rng.choice(words, 6)), "input": "",
               "output": " ".join(rng.choice(words, 4))}
        if label:
            rec["__dj__meta__"] = {"daar_pseudo_domain": dom}
        out.append(rec)
    return out


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_llama, tmp_path_factory) -> dict:
    """A probe checkpoint and a centroid file built on the tiny random model."""
    from daar_ops.algorithms.synthesis import DomainSpec
    from daar_ops.centroid_file import save_centroids
    from daar_ops.encoders import embed_texts
    from daar_ops.algorithms.probes import TrainConfig
    from daar_ops.features import LayerFeatureExtractor
    from daar_ops.probe_checkpoint import train_probe_checkpoint

    root = tmp_path_factory.mktemp("tiny_artifacts")
    cfg = TrainConfig(epochs=2, batch_size=16, lr=3e-3, val_fraction=0.2, hidden=[16])
    train_probe_checkpoint(tiny_records(60), root / "probe", model=str(tiny_llama), layer=2,
                           max_length=64, config=cfg, use_cache=False, progress=False)
    ext = LayerFeatureExtractor(str(tiny_llama), layer=0)
    feats = embed_texts(ext, [TINY_WORDS[d] for d in TINY_DOMAINS], "embedding")
    save_centroids(root / "centroids", feats, [DomainSpec(d) for d in TINY_DOMAINS],
                   ext.describe(), "embedding", "{instruction} {input} {output}",
                   [1] * len(TINY_DOMAINS))
    samples = root / "samples.jsonl"
    samples.write_text("".join(json.dumps({"instruction": f"{TINY_WORDS[d]} {i}", "input": "",
                                           "output": "", "domain": d}) + "\n"
                               for d in TINY_DOMAINS for i in range(4)))
    from daar_ops.ops.domain_pseudo_label_mapper import DomainPseudoLabelMapper
    from daar_ops.text import ALPACA_TEMPLATE, TextTemplate

    fit = DomainPseudoLabelMapper(samples_path=str(samples), model=str(tiny_llama),
                                  feature="embedding", save_stage1=str(root / "stage1"))
    fit.fit_texts(TextTemplate(ALPACA_TEMPLATE).render_all(tiny_records(60, label=False)))
    return {"probe": root / "probe", "centroids": root / "centroids", "model": tiny_llama,
            "stage1": root / "stage1"}


@pytest.fixture
def warnings_log():
    """Messages logged at WARNING or above while the test runs."""
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{message}")
    yield lines
    logger.remove(sink)
