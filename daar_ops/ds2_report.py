"""DS2's report files: the estimated transition matrix and the score distributions of a
:class:`daar_ops.algorithms.ds2.DS2Result`. No Data-Juicer import; written by ``ds2_selector``
(``report_dir``) and ``tools/bench_ds2.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from daar_ops.algorithms.ds2 import DS2Result


def write_ds2_report(directory: str | os.PathLike, result: DS2Result,
                     extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Write ``transition.json`` (T, p, eta, counts before/after, settings), ``transition.png``
    (T heatmap) and ``score_distribution.png`` (raw vs curated histogram). Returns the paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    k = result.transition.shape[0]
    before = np.bincount(result.raw, minlength=k)
    after = np.bincount(result.curated, minlength=k)
    payload = dict(transition=result.transition.tolist(), prior=result.prior.tolist(),
                   noise_rates=result.eta.tolist(), counts_raw=before.tolist(),
                   counts_curated=after.tolist(), n_corrupted=int(result.corrupted.sum()),
                   n_selected=None if result.selected is None else int(len(result.selected)),
                   info=dict(result.info), **(extra or {}))
    paths = dict(json=str(out / "transition.json"), heatmap=str(out / "transition.png"),
                 distribution=str(out / "score_distribution.png"))
    Path(paths["json"]).write_text(json.dumps(payload, indent=2, default=float))
    _plot_transition(result.transition, paths["heatmap"])
    _plot_distribution(before, after, paths["distribution"])
    return paths


def _plot_transition(transition: np.ndarray, path: str) -> None:
    import matplotlib.pyplot as plt

    k = transition.shape[0]
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(transition, vmin=0, vmax=1, cmap="viridis")
    for i in range(k):
        for j in range(k):
            v = transition[i, j]
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if v > 0.5 else "white")
    ax.set_xlabel("observed score")
    ax.set_ylabel("true score")
    ax.set_title("DS2 estimated transition matrix T")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_distribution(before: np.ndarray, after: np.ndarray, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    x = np.arange(len(before))
    ax.bar(x - 0.2, before, width=0.4, label="raw")
    ax.bar(x + 0.2, after, width=0.4, label="curated")
    ax.set_xlabel("score class")
    ax.set_ylabel("samples")
    ax.set_title("Score distribution before / after curation")
    ax.set_xticks(x)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
