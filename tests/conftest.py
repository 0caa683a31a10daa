"""Shared fixtures: tiny random causal LMs built on the fly, thread limits, real-model gating."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SHARED_POOL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "daar_pool" / "daar_pool.jsonl.gz"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

_CORPUS = [
    "Instruction: Write a function that adds two numbers. Output: def add(a, b): return a + b",
    "What is the capital of France? The capital of France is Paris.",
    "Solve 12 * 7. The answer is 84.",
    "If all cats are animals and Tom is a cat, is Tom an animal? Yes, by deduction.",
    "Explain photosynthesis in one sentence. Plants turn light, water and CO2 into sugar.",
    "Input: a list of integers. Output: the sorted list, using merge sort in O(n log n).",
]


def build_tiny_causal_lm(target: Path, arch: str = "llama", n_layers: int = 4,
                         hidden: int = 32, seed: int = 0) -> Path:
    """A random ``arch`` model with a locally trained byte-level BPE tokenizer, saved to target."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast,
                              Qwen2Config)

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML_TEMPLATE
    common = dict(vocab_size=fast.vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                  num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                  tie_word_embeddings=True)
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(target)
    fast.save_pretrained(target)
    return target


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
    from daar_ops.algorithms.centroids import DomainSpec, embed_texts, save_centroids
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
    return {"probe": root / "probe", "centroids": root / "centroids", "model": tiny_llama}
