"""DaaR probe checkpoints: an artifact of kind ``daar_probe`` (safetensors + checksummed manifest).

Tensors: ``dom.<param>`` and ``div.<param>`` (the state dicts of psi_dom and psi_div, including
the standardisation buffers). The manifest records everything needed to reuse the probes safely:
the extractor's ``describe()`` (model, model_path, model_fingerprint, layer, feature_dim,
max_length, pooling, layer_definition), ``feature`` ("layer"), ``template``, ``domains``,
``hidden``, ``label_key``, the training config, metrics, and library versions (added by
:func:`daar_ops.artifacts.save_artifact`). The manifest carries its own checksum
(``manifest_sha256``): a checkpoint whose ``layer``, ``template`` or order of ``domains`` was edited
by hand refuses to load instead of silently changing every reward. Training curves go next to it as
``curves.json`` and ``curves.png``, the run's timings and feature-cache hits as ``run.json`` (outside
the manifest, so identical trainings give identical checkpoint digests). No Data-Juicer import.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from daar_ops.artifacts import (ArtifactError, check_compatible, load_artifact, recorded_model,
                                save_artifact)
from daar_ops.defaults import FEATURE_DTYPE
from daar_ops.models import DEFAULT_LAYER, SMOLLM2

if TYPE_CHECKING:  # torch and the probes are imported where used (the ops import this module)
    import torch

    from daar_ops.algorithms.probes import DaarProbes, ProbeTrainingResult

KIND = "daar_probe"
RUN_INFO = "run.json"  # timings and cache hits of the training run: not part of the digest
COMPAT_KEYS = ("model_fingerprint", "layer", "feature_dim")


def save_probe_checkpoint(directory: str | os.PathLike, result: ProbeTrainingResult,
                          extractor_description: Mapping[str, Any], template: str,
                          extra: Mapping[str, Any] | None = None, plot: bool = True) -> Path:
    """Write the probes, manifest, ``curves.json`` and (optionally) ``curves.png``."""
    tensors = {f"dom.{k}": v for k, v in result.dom.state_dict().items()}
    tensors.update({f"div.{k}": v for k, v in result.div.state_dict().items()})
    manifest = dict(extractor_description)
    manifest.update(
        feature="layer", template=template, domains=list(result.domains),
        hidden=list(result.dom.hidden), metrics=_json_safe(result.metrics),
        entropy_max=math.log(len(result.domains)),
    )
    if extra:
        manifest.update(_json_safe(dict(extra)))
    directory = save_artifact(directory, tensors, manifest, KIND, tensor_file="probes.safetensors")
    (directory / "curves.json").write_text(json.dumps(_json_safe(result.history), indent=2))
    if plot:
        plot_curves(result.history, directory / "curves.png")
    return directory


def load_probe_checkpoint(directory: str | os.PathLike) -> tuple[DaarProbes, dict[str, Any]]:
    """Load and verify (checksum, kind, shapes) a checkpoint: (probes on CPU, manifest).

    The shapes the manifest claims (``feature_dim``, ``hidden``, the domains) are checked against
    the tensors before the probes are built, so a manifest cannot make the loader allocate more
    than the tensor file holds."""
    import torch

    from daar_ops.algorithms.probes import DaarProbes, ProbeMLP

    tensors, manifest = load_artifact(directory, kind=KIND)
    for key in ("domains", "feature_dim", "hidden", "layer", "model_fingerprint", "template"):
        if key not in manifest:
            raise ArtifactError(f"{directory}: probe manifest lacks '{key}'")
    domains, d, hidden = manifest["domains"], manifest["feature_dim"], manifest["hidden"]
    if not (isinstance(domains, list) and all(isinstance(x, str) for x in domains)
            and isinstance(d, int) and d >= 1 and isinstance(hidden, list)
            and all(isinstance(h, int) and h >= 1 for h in hidden)):
        raise ArtifactError(f"{directory}: probe manifest has malformed domains / feature_dim / "
                            f"hidden ({domains!r}, {d!r}, {hidden!r})")
    models = {"dom.": len(domains), "div.": 1}
    for prefix, n_out in models.items():
        expected = _probe_shapes(d, n_out, hidden)
        actual = {k[len(prefix):]: list(v.shape) for k, v in tensors.items()
                  if k.startswith(prefix)}
        if actual != expected:
            raise ArtifactError(f"{directory}: probe tensors do not match the manifest "
                                f"(feature_dim={d}, hidden={hidden}, {len(domains)} domains)")
    dom, div = ProbeMLP(d, len(domains), hidden), ProbeMLP(d, 1, hidden)
    for prefix, model in (("dom.", dom), ("div.", div)):
        state = {k[len(prefix):]: torch.from_numpy(np.array(v)) for k, v in tensors.items()
                 if k.startswith(prefix)}
        model.load_state_dict(state, strict=True)
    return DaarProbes(dom, div, list(domains)), manifest


def _probe_shapes(d: int, n_out: int, hidden: list[int]) -> dict[str, list[int]]:
    """The state-dict shapes of ``ProbeMLP(d, n_out, hidden)``, computed without allocating."""
    import torch

    from daar_ops.algorithms.probes import ProbeMLP

    with torch.device("meta"):
        model = ProbeMLP(d, n_out, hidden)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def check_checkpoint_compatible(manifest: Mapping[str, Any], features: Mapping[str, Any]) -> None:
    """Raise :class:`ArtifactError` if the checkpoint was trained on other features."""
    check_compatible(manifest, features, keys=COMPAT_KEYS, source="probe checkpoint")


def plot_curves(history: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Training loss (per logged step) and validation loss/accuracy (per epoch) of both probes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, color in (("dom", "tab:blue"), ("div", "tab:orange")):
        h = history.get(name)
        if not h:
            continue
        label = "psi_dom (CE)" if name == "dom" else "psi_div (MSE)"
        spe = max(int(h.get("steps_per_epoch", 1)), 1)
        axes[0].plot(np.array(h["step"]) / spe, h["train_loss"], color=color, label=label)
        axes[1].plot(h["epoch"], h["val_loss"], "o-", color=color, label=label)
        if name == "dom":
            axes[2].plot(h["epoch"], h["val_accuracy"], "o-", color=color, label=label)
    axes[0].set(title="training loss", xlabel="epoch", yscale="log")
    axes[1].set(title="validation loss", xlabel="epoch", yscale="log")
    axes[2].set(title="psi_dom validation accuracy", xlabel="epoch", ylim=(0, 1))
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so the JSON is strict."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


class DaarScorer:
    """A checkpoint's probes plus the feature extractor they were trained on: text -> scores.

    :param checkpoint: a ``daar_probe`` artifact directory.
    :param model: the LM to extract features with (default: the checkpoint's ``model_path``, else
        its ``model`` name). Refused if its config hash, layer or feature dim differ from the
        checkpoint's.
    :param device: ``cpu``, ``cuda[:N]`` or ``auto``.
    :param dtype: extractor dtype; float32 reproduces training features exactly.
    :param feature_cache: read and write layer features through the on-disk feature cache
        (:class:`daar_ops.feature_cache.FeatureCache`, keyed by model, layer, dtype, template
        and text), so the pipeline, the recipes and a resumed run share one set of features.
    :param cache_dir: the cache directory (default ``$DAAR_OPS_HOME/feature_cache``).
    """

    def __init__(self, checkpoint: str | os.PathLike, model: str | None = None,
                 device: str | None = "cpu", dtype: str = FEATURE_DTYPE, batch_size: int = 32,
                 max_batch_tokens: int = 2048, feature_cache: bool = False,
                 cache_dir: str | os.PathLike | None = None):
        from daar_ops.features import LayerFeatureExtractor

        self.probes, self.manifest = load_probe_checkpoint(checkpoint)
        self.template = self.manifest["template"]
        model = model or checkpoint_model(self.manifest)
        self.extractor = LayerFeatureExtractor(
            model, layer=int(self.manifest["layer"]),
            max_length=int(self.manifest.get("max_length", 512)), batch_size=batch_size,
            max_batch_tokens=max_batch_tokens, dtype=dtype, device=device)
        check_checkpoint_compatible(self.manifest, self.extractor.describe())
        self.probes.to(self.extractor.device)
        self.cache = None
        if feature_cache:
            from daar_ops.feature_cache import FeatureCache

            self.cache = FeatureCache(self.extractor, cache_dir, template=self.template)

    @property
    def domains(self) -> list[str]:
        return self.probes.domains

    def to(self, device: str | torch.device) -> "DaarScorer":
        self.extractor.model.to(device)
        self.extractor.device = str(device)
        self.probes.to(device)
        return self

    def score_texts(self, texts: list[str], progress: bool = False):
        """(reward [N], domain probabilities [N, K], LayerFeatures) for already rendered texts."""
        if self.cache is not None:
            feats = self.cache.encode(texts, progress=progress)
        else:
            feats = self.extractor.encode(texts, progress=progress, desc="daar features")
        reward, probs = self.probes.score(feats.layer)
        return reward, probs, feats


def checkpoint_model(manifest: Mapping[str, Any]) -> str:
    """The model a checkpoint was trained on (:func:`daar_ops.artifacts.recorded_model`: a local
    folder or a prepared short name, never a hub id)."""
    return recorded_model(manifest, "probe checkpoint")


def read_label(record: Mapping[str, Any], label_key: str) -> str | None:
    """The label at a dotted key (``__dj__meta__.daar_pseudo_domain``); None if missing/empty."""
    from daar_ops.text import lookup

    value = lookup(record, label_key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def train_probe_checkpoint(records: list[Mapping[str, Any]], output: str | os.PathLike, *,
                           model: str = SMOLLM2, layer: int = DEFAULT_LAYER,
                           max_length: int = 512, template: str = "{instruction} {input} {output}",
                           label_key: str = "__dj__meta__.daar_pseudo_domain",
                           domains: list[str] | None = None, config: Any = None,
                           cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                           model_batch_size: int = 32, dtype: str = FEATURE_DTYPE,
                           device: str | None = "cpu", progress: bool = True,
                           extra: Mapping[str, Any] | None = None
                           ) -> tuple[Path, dict[str, Any]]:
    """Pseudo-labelled records -> trained probe checkpoint at ``output``: (directory, manifest).

    Records without a label are skipped (counted in the manifest); with ``domains`` given, records
    whose label is not one of them are skipped too. Features come from the resumable feature cache
    unless ``use_cache`` is False.
    """
    import time

    from loguru import logger

    from daar_ops.algorithms.probes import TrainConfig, train_daar_probes
    from daar_ops.feature_cache import FeatureCache
    from daar_ops.features import LayerFeatureExtractor
    from daar_ops.text import TextTemplate

    cfg = config or TrainConfig()
    cfg.validate()
    tpl = TextTemplate(template)
    labels = [read_label(r, label_key) for r in records]
    n_unlabelled = sum(lab is None for lab in labels)
    if domains:
        if len(set(domains)) != len(domains):
            raise ValueError(f"duplicate names in domains {domains}")
        known = set(domains)
        n_unknown = sum(lab is not None and lab not in known for lab in labels)
    else:
        domains = sorted({lab for lab in labels if lab is not None})
        n_unknown = 0
    keep = [i for i, lab in enumerate(labels) if lab is not None and lab in set(domains)]
    if n_unlabelled == len(records):
        raise ValueError(
            f"none of the {len(records)} records has a label at '{label_key}'. Export the "
            "pseudo-labelled data with `keep_stats_in_res_ds: true` (Data-Juicer drops "
            "__dj__meta__ from the main export otherwise) or choose the field with --label-key")
    if n_unlabelled or n_unknown:
        logger.warning(f"skipping {n_unlabelled} records without a label at '{label_key}' and "
                       f"{n_unknown} with a label outside {domains}")
    if len(domains) < 2:
        raise ValueError(f"need at least 2 domains to train psi_dom, found {domains}")
    index = {name: i for i, name in enumerate(domains)}
    y = np.array([index[labels[i]] for i in keep], dtype=np.int64)
    texts = tpl.render_all([records[i] for i in keep], source="the labelled records")

    timings: dict[str, float] = {}
    start = time.perf_counter()
    extractor = LayerFeatureExtractor(model, layer=layer, max_length=max_length,
                                      batch_size=model_batch_size, dtype=dtype, device=device)
    if use_cache:
        feats = FeatureCache(extractor, cache_dir, template=tpl.template).encode(texts, progress)
    else:
        feats = extractor.encode(texts, progress=progress)
    timings["features_s"] = time.perf_counter() - start
    start = time.perf_counter()
    result = train_daar_probes(feats.layer, y, domains, cfg, progress=progress)
    timings["training_s"] = time.perf_counter() - start
    # The manifest holds only what determines the probes, so two identical trainings have the
    # same digest (stats keyed by it stay valid); how this run went goes to run.json beside it.
    info = {
        "label_key": label_key, "training": cfg.to_dict(),
        "data": {"n_records": len(records), "n_used": len(keep), "n_unlabelled": n_unlabelled,
                 "n_label_not_in_domains": n_unknown, "n_truncated": feats.n_truncated,
                 "n_empty_text": feats.n_empty},
    }
    info.update(extra or {})
    directory = save_probe_checkpoint(output, result, extractor.describe(), tpl.template, info)
    (directory / RUN_INFO).write_text(json.dumps(
        {"timings": timings, "feature_cache_hits": feats.meta.get("cache_hits", 0)}, indent=2))
    _, manifest = load_probe_checkpoint(directory)  # round-trip check of what was written
    return directory, manifest
