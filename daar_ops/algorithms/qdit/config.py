"""QDIT's parameters: one frozen :class:`QditConfig`, validated once when it is built.

No torch and no numba here: the Data-Juicer op builds its config when it is constructed, and
imports the greedy (:mod:`daar_ops.algorithms.qdit.selection`) only when it selects.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from daar_ops.core import budget

METHODS = ("lazy", "stochastic")
SIMILARITIES = ("blocked", "knn")
RUNNING_SCALE = "running_max"
BUDGET_SCALE = "budget"
DIVERSITY_SCALES = (BUDGET_SCALE, RUNNING_SCALE)
# "budget": d(a|A) / (REFERENCE_RATIO * N / K), the paper's raw gain at a 10% budget (docs/qdit.md)
REFERENCE_RATIO = 0.1
QUALITY_NORMS = ("minmax", "rank", "none")
QUALITY_FILLS = ("min", "median", "max")
COMPUTE_DTYPES = ("float32", "bfloat16", "float64")
# |bf16 dot - exact dot| for unit vectors: inputs rounded (2u), output rounded (u), u = 2^-8,
# plus float32 accumulation; rounded up.
BF16_MARGIN = 3 * 2.0**-8 + 2 * 2.0**-16 + 1e-4


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fail(name: str, expected: str, value: Any) -> None:
    raise ValueError(f"QditConfig.{name} must be {expected}, got {value!r}")


@dataclass(frozen=True)
class QditConfig:
    """Every parameter of a QDIT selection (module docstring of :mod:`daar_ops.algorithms.qdit`).

    :param select_ratio: fraction of the rows to keep, in [0, 1] (``floor(ratio * N)``, the
        package's one budget rule, :func:`daar_ops.core.budget`); or give ``select_num``.
    :param select_num: number of rows to keep (all when N is smaller).
    :param alpha: weight of quality in [0, 1]; 0 = pure diversity (facility location).
    :param diversity_scale: how d(a|A) is scaled against quality: ``budget`` (d / (0.1 N / K),
        default), ``running_max`` (the step's best gain) or a positive number (d / that number;
        1.0 is the paper's unscaled objective).
    :param quality_norm: ``minmax`` (to [0, 1]), ``rank`` (percentile) or ``none``.
    :param quality_fill: value for a missing / non-numeric / NaN / inf quality: ``min``,
        ``median``, ``max`` of the valid values, or a finite number.
    :param method: ``lazy`` (exact lazy greedy) or ``stochastic`` (stochastic greedy).
    :param epsilon: stochastic greedy's epsilon in (0, 1).
    :param seed: seed of the stochastic greedy's sampling and of the partitions.
    :param similarity: ``blocked`` (clipped cosine, memory bounded) or ``knn`` (sparse).
    :param knn_k: neighbours per row with ``similarity: knn`` (>= 1).
    :param max_memory_mb: memory for the similarity (> 0): the whole matrix when it fits, else
        matmul blocks and a row cache.
    :param compute_dtype: similarity precision: ``float32``, ``bfloat16`` or ``float64``.
    :param partition_size: GreeDi partitions of about this many rows (>= 1); None = exact.
    :param fast_bounds: the lazy greedy's first upper bounds from a bfloat16 matmul plus a
        rigorous margin (the selection is unchanged); None = where bfloat16 is fast.
    :param batch: candidates a lazy step re-evaluates in its first round (>= 1).
    """

    select_ratio: float | None = None
    select_num: int | None = None
    alpha: float = 0.0
    diversity_scale: str | float = BUDGET_SCALE
    quality_norm: str = "minmax"
    quality_fill: str | float = "min"
    method: str = "lazy"
    epsilon: float = 0.01
    seed: int = 0
    similarity: str = "blocked"
    knn_k: int = 50
    max_memory_mb: float = 2048.0
    compute_dtype: str = "float32"
    partition_size: int | None = None
    fast_bounds: bool | None = None
    batch: int = 16

    def __post_init__(self) -> None:
        self._check_budget()
        self._check_choices()
        self._check_numbers()

    @classmethod
    def of(cls, config: "QditConfig | None" = None, **params: Any) -> "QditConfig":
        """``config`` with ``params`` replaced (a new config from ``params`` when None)."""
        if config is None:
            return cls(**params)
        return dataclasses.replace(config, **params) if params else config

    def budget(self, n: int) -> int:
        """How many of ``n`` rows this selection keeps (:func:`daar_ops.core.budget`)."""
        return budget(n, ratio=self.select_ratio, num=self.select_num)

    def with_budget(self, k: int, **params: Any) -> "QditConfig":
        """This config selecting ``k`` rows (and ``params`` replaced)."""
        return dataclasses.replace(self, select_ratio=None, select_num=int(k), **params)

    # -- validation --------------------------------------------------------------------------------
    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _check_budget(self) -> None:
        ratio, num = self.select_ratio, self.select_num
        if (ratio is None) == (num is None):
            raise ValueError("QditConfig: give exactly one of select_ratio and select_num")
        name = "select_ratio" if ratio is not None else "select_num"
        if isinstance(ratio if ratio is not None else num, bool):
            _fail(name, "a number", ratio if ratio is not None else num)
        try:
            budget(0, ratio=ratio, num=num)
        except (TypeError, ValueError) as err:
            raise ValueError(f"QditConfig.{name}: {err}") from None
        self._set(name, float(ratio) if ratio is not None else int(num))

    def _check_choices(self) -> None:
        for name, allowed in (("method", METHODS), ("similarity", SIMILARITIES),
                              ("quality_norm", QUALITY_NORMS),
                              ("compute_dtype", COMPUTE_DTYPES)):
            if getattr(self, name) not in allowed:
                _fail(name, f"one of {allowed}", getattr(self, name))
        scale = self.diversity_scale
        if isinstance(scale, str):
            if scale not in DIVERSITY_SCALES:
                _fail("diversity_scale", f"one of {DIVERSITY_SCALES} or a positive number", scale)
        elif not (_is_number(scale) and math.isfinite(scale) and scale > 0):
            _fail("diversity_scale", f"one of {DIVERSITY_SCALES} or a positive number", scale)
        else:
            self._set("diversity_scale", float(scale))
        fill = self.quality_fill
        if isinstance(fill, str):
            if fill not in QUALITY_FILLS:
                _fail("quality_fill", f"one of {QUALITY_FILLS} or a finite number", fill)
        elif not (_is_number(fill) and math.isfinite(fill)):
            _fail("quality_fill", f"one of {QUALITY_FILLS} or a finite number", fill)
        if self.fast_bounds is not None and not isinstance(self.fast_bounds, bool):
            _fail("fast_bounds", "True, False or None", self.fast_bounds)

    def _check_numbers(self) -> None:
        alpha, eps, mem = self.alpha, self.epsilon, self.max_memory_mb
        if not (_is_number(alpha) and 0.0 <= alpha <= 1.0):
            _fail("alpha", "in [0, 1]", alpha)
        if not (_is_number(eps) and 0.0 < eps < 1.0):
            _fail("epsilon", "in (0, 1)", eps)
        if not (_is_number(mem) and math.isfinite(mem) and mem > 0):
            _fail("max_memory_mb", "a finite number > 0", mem)
        for name in ("knn_k", "batch", "seed", "partition_size"):
            value = getattr(self, name)
            if name == "partition_size" and value is None:
                continue
            low = 0 if name == "seed" else 1
            if not (_is_number(value) and float(value).is_integer() and value >= low):
                _fail(name, f"an integer >= {low}", value)
            self._set(name, int(value))
        self._set("alpha", float(alpha))
        self._set("epsilon", float(eps))
        self._set("max_memory_mb", float(mem))
