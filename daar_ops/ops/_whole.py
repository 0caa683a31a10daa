"""Mappers whose output needs every input row first, run by Data-Juicer as Pipeline ops.

Data-Juicer runs a Mapper batch by batch (under ``executor_type: ray``, on the workers), but hands
a ``Pipeline`` op the whole dataset (``op.run(dataset)``, under Ray the ``ray.data.Dataset``). A
Mapper that must see every row first (``centroid_synthesis_mapper``: the prompts name the other
domains; ``domain_pseudo_label_mapper`` fitting stage 1 on its dataset) mixes in
:class:`BuiltWhole`: when :meth:`BuiltWhole.needs_whole` says so, constructing it builds its
:class:`WholeDatasetOp` instead, which wraps a Mapper instance (``inner``) under the same name,
parameters and attributes. The default executor runs the Mapper's own ``run``; under Ray the
subclass's :meth:`WholeDatasetOp.run_on_ray` decides what is gathered to the driver.

The switch is an inherited ``__new__``, so Data-Juicer's config parser (jsonargparse, which reads
a class's own ``__new__`` in place of its ``__init__``) still sees the Mapper's parameters for
``--op.param`` command-line overrides.
"""

from __future__ import annotations

from typing import Any, Dict

from data_juicer.ops.base_op import Pipeline


class BuiltWhole:
    """Mixin (before ``Mapper`` in the bases) that builds ``whole_dataset_op`` in place of the
    Mapper when :meth:`needs_whole` is true for the keyword arguments."""

    whole_dataset_op: type = None  # set once the wrapper class exists

    @staticmethod
    def needs_whole(kwargs: Dict[str, Any]) -> bool:
        return True

    def __new__(cls, *args, **kwargs):
        if cls.whole_dataset_op is not None and cls.needs_whole(kwargs):
            return cls.whole_dataset_op(*args, **kwargs)
        return super().__new__(cls)


class WholeDatasetOp(Pipeline):
    """A Pipeline op around an instance of ``mapper_class`` built with the same arguments."""

    _supported_exec_modes = ("default", "ray")
    mapper_class: type = None

    def __init__(self, *args, **kwargs):
        inner = object.__new__(self.mapper_class)  # the Mapper itself, not this wrapper again
        self.mapper_class.__init__(inner, *args, **kwargs)
        super().__init__(*args, **kwargs)
        self.inner = inner
        self._name = inner._name  # traced, logged and checkpointed under the recipe's name

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    def run(self, dataset, *, exporter=None, tracer=None):
        from daar_ops.ops._ray import is_ray_dataset

        if is_ray_dataset(dataset):
            return self.run_on_ray(dataset)
        return self.inner.run(dataset, exporter=exporter, tracer=tracer)

    def run_on_ray(self, dataset):
        raise NotImplementedError
