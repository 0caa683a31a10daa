"""QDIT: quality-diversity selection by greedy facility location. No Data-Juicer import.

Objective (Bukharin et al., arXiv 2311.14736): greedily pick, K times,

    argmax_a  (1 - alpha) * d(a | A) / diversity_scale  +  alpha * q(a)

with ``d(A) = sum_v max_{a in A} sim(a, v)`` the facility-location function over the cosine
similarity of L2-normalised embeddings, clipped at 0, so ``d(a | A) = sum_v max(0, sim(a, v) - m(v))``
with ``m(v)`` the current coverage of v. ``q`` is the quality normalised by
:func:`normalize_quality` (default: min-max to [0, 1]).

Scaling (the paper leaves it open; ``d(a|A)`` is a sum over the N rows, and a pick's gain is
about what the N / K rows it stands for gain, so it grows like N / K):

* ``"budget"`` (default): ``d(a|A) / (0.1 * N / K)``, i.e. the paper's raw gain at a 10% budget
  (where the scale is exactly 1), kept at that meaning for any N and K. Gains fall over the
  selection, so early picks are driven by coverage and later ones weigh quality more; on the
  shared pool's MiniLM embeddings alpha = 0.7 lands between the ends (about 0.84 of the
  quality gain and 0.67 of the coverage gain with uniform quality, stable for K = N/20 .. N/5
  and N = 4k .. 8k; ``tools/bench_qdit.py --alpha-sweep``).
* ``"running_max"``: divide by the best gain among the candidates of the step (the best
  diversity candidate has term 1 - alpha at every step): a constant per-step trade-off, which
  makes the sweep switch sharply from coverage to quality (alpha = 0.7 got 0.97 of the quality
  gain).
* a positive number: divide by that number (1.0 is the paper's unscaled objective, equal to
  ``budget`` at K = N / 10, drifting with K / N). The scalings under which alpha trades nothing
  (divide by N, by the best first gain) are research variants in ``tools/daar_research/qdit.py``.

Optimisers (all deterministic for a seed; ties broken by the lower index):

* ``lazy`` (default): exact lazy greedy (Minoux). Stale gains are upper bounds; the top stale
  candidates are re-evaluated *in batches* (one matmul for a batch of rows), and a candidate is
  taken when its exact score is at least every remaining bound. Same sequence as the plain greedy.
  When the whole matrix is held the greedy is one compiled binary-heap loop instead (the same
  argmax and tie rule, far less overhead per step).
* ``stochastic``: stochastic greedy (Mirzasoleiman et al. 2015): each step draws
  ``ceil(N / K * ln(1 / epsilon))`` unselected candidates with a seeded generator and takes the best
  of them, found lazily with the same bounds. Expected (1 - 1/e - epsilon) guarantee, far fewer
  evaluations for large N (but each sampled candidate still needs its whole similarity row once).

Similarity backends (``similarity=``, :mod:`daar_ops.algorithms.qdit.backends`): ``blocked``
(default; the whole clipped matrix held when it fits ``max_memory_mb``: N <= ~22k at the default
2048 MB, else rows on the fly with an LRU row cache) and ``knn`` (sparse facility location over the
``knn_k`` nearest neighbours: a different, truncated objective for very large N).

Modules: :mod:`~daar_ops.algorithms.qdit.config` (:class:`QditConfig`, no torch),
:mod:`~daar_ops.algorithms.qdit.kernels` (compiled gain kernels),
:mod:`~daar_ops.algorithms.qdit.backends` (similarity backends),
:mod:`~daar_ops.algorithms.qdit.selection` (:func:`qdit_select`, the greedy paths),
:mod:`~daar_ops.algorithms.qdit.partitioned` (``partition_size``).

The names below are re-exported lazily, so ``from daar_ops.algorithms.qdit import QditConfig``
(what the Data-Juicer op does when it is built) imports neither torch nor numba.
"""

from __future__ import annotations

import importlib
from typing import Any

from daar_ops.algorithms.qdit.config import (BF16_MARGIN, DIVERSITY_SCALES, METHODS,  # noqa: F401
                                             QUALITY_FILLS, QUALITY_NORMS, SIMILARITIES,
                                             QditConfig)

_LAZY = {"QditResult": "selection", "qdit_select": "selection",
         "normalize_quality": "selection", "prepare_embeddings": "selection"}

__all__ = ["BF16_MARGIN", "DIVERSITY_SCALES", "METHODS", "QUALITY_FILLS", "QUALITY_NORMS",
           "SIMILARITIES", "QditConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
