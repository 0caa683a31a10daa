"""Defaults shared by the operators, ``daar-ops select`` and the recipes, in a module that imports
neither Data-Juicer nor torch: ``daar-ops --help`` reads them without loading the operators."""

from __future__ import annotations

import os
from typing import Any, Dict

from daar_ops.algorithms.ds2 import DS2Config
from daar_ops.algorithms.pseudo_labels import Stage1Config
from daar_ops.algorithms.rating import RatingConfig
from daar_ops.algorithms.synthesis import SynthesisConfig

SYNTHESIS = SynthesisConfig()
# The one set of synthesis defaults: centroid_synthesis_mapper's, `daar-ops select`'s and the
# recipes'. The algorithm's settings are SynthesisConfig's defaults (its docstring says why each);
# the generator's are these two.
SYNTHESIS_DEFAULTS: Dict[str, Any] = dict(
    SYNTHESIS.to_dict(),
    # conversations per generate call: one call per round (4 domains x 4 candidates); decoding a
    # 135M model on CPU is bound by reading the weights, so 16 rows cost ~1.2x what 8 do
    # (tools/bench_select.py)
    model_batch_size=16,
    # float32: bfloat16 is ~2x faster only where the CPU has AMX / AVX512-BF16 (or on a GPU);
    # without them (e.g. AMD EPYC) torch emulates it and generation is ~3x slower.
    dtype="float32",
)

STAGE1 = Stage1Config()

# DS2: ds2_selector's and ds2_rating_filter's parameters default to these (the papers'
# procedure; docs/ds2.md)
DS2 = DS2Config()
DS2_RATING = RatingConfig()

# Precision of the LM features (pseudo-labels, probe training, scoring, QDIT's LM space): "auto"
# is bfloat16 where the device has it natively (CUDA with bf16, CPUs with AMX / AVX512-BF16),
# float32 elsewhere, so a CPU without native bf16 runs exactly as before (daar_ops.core.
# resolve_dtype). Adopted on tools/bench_select.py's ranking check (README "Speed and scale"):
# two slices of 4,000 pool records, a probe checkpoint trained on 5,000: bf16 against fp32 rewards
# rank correlation 0.99998, top-20% overlap 0.996 / 0.998, 3.0x less CPU on a Zen 4 core.
# $DAAR_OPS_FEATURE_DTYPE overrides it (the test suite pins float32, so tests behave the same on
# CPUs with and without native bf16).
FEATURE_DTYPE = os.environ.get("DAAR_OPS_FEATURE_DTYPE", "auto")

# Chosen on the worst of four evaluation pools over three synthesis seeds (docs/daar_stage1.md):
# cluster-then-label in the all-MiniLM-L6-v2 space, anchors = the synthetic samples plus
# paraphrased domain descriptions. The paper's procedure is Stage1Config.paper().
# The one set of pseudo-labelling defaults: domain_pseudo_label_mapper's, `daar-ops select`'s and
# the recipes'.
PSEUDO_LABEL_DEFAULTS: Dict[str, Any] = dict(
    feature=STAGE1.space,      # "sentence": MiniLM; "embedding"/"layer": the LM (the paper)
    method=STAGE1.method,      # "cluster": label k-means clusters of the dataset by prototype
    use_descriptions=STAGE1.use_descriptions,
)
