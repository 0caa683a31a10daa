"""QDIT's option names and constants, without torch or numba: the Data-Juicer op validates its
parameters with them at import and construction time, and imports :mod:`daar_ops.algorithms.qdit`
(torch, numba) only when it selects."""

METHODS = ("lazy", "stochastic")
SIMILARITIES = ("blocked", "dense", "knn")
RUNNING_SCALE = "running_max"
ADAPTIVE_SCALES = (RUNNING_SCALE,)
DIVERSITY_SCALES = ("budget", RUNNING_SCALE, "mean", "max_singleton", "none")
DEFAULT_DIVERSITY_SCALE = "budget"
# "budget": d(a|A) / (REFERENCE_RATIO * N / K); see _resolve_scale and docs/qdit.md
REFERENCE_RATIO = 0.1
QUALITY_NORMS = ("minmax", "rank", "none")
QUALITY_FILLS = ("min", "median", "max")
# |bf16 dot - exact dot| for unit vectors: inputs rounded (2u), output rounded (u), u = 2^-8,
# plus float32 accumulation; rounded up.
BF16_MARGIN = 3 * 2.0**-8 + 2 * 2.0**-16 + 1e-4
COMPUTE_DTYPE_NAMES = ("float32", "bfloat16", "float64")
