"""Every model an operator uses goes through Data-Juicer's model management.

``model_key(kind, **params)`` is a value-hashable key for ``data_juicer.utils.model_utils.get_model``:
``get_model(key, rank, use_cuda)`` loads the model once per process (also after the op is pickled
into a worker: equal keys hit the same ``MODEL_ZOO`` entry), picks ``cuda:{rank % device_count}``,
limits a worker process's threads, and ``free_models()`` (which every Filter/Selector run ends with)
releases it. The loaders are also registered in Data-Juicer's ``MODEL_FUNCTION_MAPPING`` under
``daar_<kind>``, so ``prepare_model(model_type="daar_layer_features", model=..., layer=3)`` works
as for native model types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from daar_ops.models import DEFAULT_LAYER, MINILM, SENTENCE_MAX_TOKENS, SMOLLM2


def _layer_features(model: str, layer: int = DEFAULT_LAYER, max_length: int = 512, batch_size: int = 32,
                    dtype: str = "float32", device: str = "cpu"):
    from daar_ops.features import LayerFeatureExtractor

    return LayerFeatureExtractor(model, layer=layer, max_length=max_length,
                                 batch_size=batch_size, dtype=dtype, device=device)


def _generator(backend: str = "hf", model: str = SMOLLM2, dtype: str = "float32",
               batch_size: int = 8, backend_kwargs: tuple = (), device: str = "cpu"):
    from daar_ops.generation import load_generator

    kwargs = dict(backend_kwargs)
    if backend == "api":
        return load_generator("api", model, **kwargs)
    return load_generator(backend, model, device=device, dtype=dtype, batch_size=batch_size,
                          **kwargs)


def _sentence_encoder(model: str = MINILM, max_seq_length: int | None = SENTENCE_MAX_TOKENS,
                      device: str = "cpu"):
    from daar_ops.encoders import load_sentence_encoder

    return load_sentence_encoder(model, device, max_seq_length)


def _score_rater(model: str, dtype: str = "float32", batch_size: int = 8, max_length: int = 2048,
                 device: str = "cpu"):
    from daar_ops.raters import ScoreTokenRater

    return ScoreTokenRater(model, device=device, dtype=dtype, batch_size=batch_size,
                           max_length=max_length)


def _probe_scorer(checkpoint: str, model: str, dtype: str = "float32", batch_size: int = 32,
                  max_batch_tokens: int = 2048, feature_cache: bool = False,
                  cache_dir: str | None = None, device: str = "cpu"):
    from daar_ops.probe_checkpoint import DaarScorer

    return DaarScorer(checkpoint, model, device=device, dtype=dtype, batch_size=batch_size,
                      max_batch_tokens=max_batch_tokens, feature_cache=feature_cache,
                      cache_dir=cache_dir)


LOADERS: dict[str, Callable[..., Any]] = {
    "probe_scorer": _probe_scorer,
    "layer_features": _layer_features,
    "generator": _generator,
    "sentence_encoder": _sentence_encoder,
    "score_rater": _score_rater,
}


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class ModelKey:
    """A model of kind ``kind`` with loader arguments ``params`` (sorted, frozen)."""

    kind: str
    params: tuple

    def __call__(self, device: str = "cpu") -> Any:
        return LOADERS[self.kind](device=device, **dict(self.params))


def model_key(kind: str, **params: Any) -> ModelKey:
    if kind not in LOADERS:
        raise ValueError(f"unknown model kind {kind!r}; one of {sorted(LOADERS)}")
    return ModelKey(kind, tuple(sorted((k, _freeze(v)) for k, v in params.items())))


def load(key: ModelKey, rank: int | None = None, use_cuda: bool = False) -> Any:
    """``get_model`` for a key (the one call the ops make)."""
    from data_juicer.utils.model_utils import get_model

    return get_model(key, rank=rank, use_cuda=use_cuda)


def register_with_data_juicer() -> None:
    """Add the loaders to Data-Juicer's ``MODEL_FUNCTION_MAPPING`` as ``daar_<kind>``."""
    from data_juicer.utils import model_utils

    for kind, loader in LOADERS.items():
        model_utils.MODEL_FUNCTION_MAPPING.setdefault(f"daar_{kind}", loader)
