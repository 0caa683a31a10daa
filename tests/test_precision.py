"""Feature precision chosen by the hardware (issue 25): ``auto`` is bf16 only where the device has
it natively; fp32 and bf16 features never mix, in the feature cache or in the stats."""

from __future__ import annotations

import numpy as np
import pytest

import daar_ops.core as core
from daar_ops.core import resolve_dtype


def test_auto_follows_the_hardware_and_names_are_normalised(monkeypatch):
    monkeypatch.setattr(core, "native_bf16", lambda device: True)
    assert resolve_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(core, "native_bf16", lambda device: False)
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("bf16", "cpu") == "bfloat16" and resolve_dtype("fp32", "cpu") == "float32"
    with pytest.raises(ValueError, match="dtype must be auto or one of"):
        resolve_dtype("int8", "cpu")


def test_native_bf16_detection_matches_the_cpu_flags():
    from pathlib import Path

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    expected = "avx512_bf16" in flags or "amx_bf16" in flags
    assert core.native_bf16("cpu") == expected  # detected, never assumed


def test_fp32_and_bf16_features_never_share_a_cache_namespace(tiny_llama, tmp_path):
    from daar_ops.feature_cache import FeatureCache
    from daar_ops.features import LayerFeatureExtractor

    caches = {d: FeatureCache(LayerFeatureExtractor(str(tiny_llama), layer=1, max_length=16,
                                                    dtype=d), tmp_path, template=None)
              for d in ("float32", "bfloat16")}
    assert caches["float32"].namespace != caches["bfloat16"].namespace
    texts = ["one text", "another text"]
    fp32 = caches["float32"].encode(texts, progress=False)
    bf16 = caches["bfloat16"].encode(texts, progress=False)
    assert bf16.meta.get("cache_hits", 0) == 0  # not served from the fp32 entries
    assert np.allclose(fp32.layer, bf16.layer, atol=0.1)  # the same features, rounded


def test_stats_scored_in_another_precision_are_recomputed(tiny_artifacts):
    from daar_ops.ops.diversity_reward_filter import DiversityRewardFilter

    ck = tiny_artifacts["probe"]
    fp32 = DiversityRewardFilter(checkpoint=str(ck), dtype="float32", num_proc=1,
                                 feature_cache=False)
    bf16 = DiversityRewardFilter(checkpoint=str(ck), dtype="bfloat16", num_proc=1,
                                 feature_cache=False)
    assert fp32.dtype == "float32" and bf16.dtype == "bfloat16"
    assert fp32.checkpoint_sha != bf16.checkpoint_sha
    batch = {"instruction": ["a b c", "d e f"], "input": ["", ""], "output": ["x", "y"],
             "__dj__stats__": [{}, {}]}
    by_bf16 = bf16.compute_stats_batched(dict(batch))
    stale = {k: list(v) for k, v in by_bf16.items()}
    again = fp32.compute_stats_batched(stale)
    assert [s["daar_checkpoint_sha256"] for s in again["__dj__stats__"]] == \
        [fp32.checkpoint_sha] * 2  # recomputed by the fp32 op, not reused


def test_the_default_is_auto_unless_overridden():
    import subprocess
    import sys

    code = "from daar_ops.defaults import FEATURE_DTYPE; print(FEATURE_DTYPE)"
    env = {k: v for k, v in __import__("os").environ.items() if k != "DAAR_OPS_FEATURE_DTYPE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "auto"
    env["DAAR_OPS_FEATURE_DTYPE"] = "float32"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "float32"
