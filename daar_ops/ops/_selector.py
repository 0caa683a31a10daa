"""The one shape of every whole-dataset choice of this package (QDIT, DS2, DaaR top ratio /
quotas, the contrastive bands): a Data-Juicer :class:`Selector` that scores, writes its stats and
keeps a subset.

Being a Selector (not a Filter with a replaced ``run()``) is what makes the ops behave natively:

* ``dj-analyze`` runs only Filters and tagging ops; a selector declares ``_contains_tagging_ops``
  so the Analyzer runs it, and when called by the Analyzer it writes its stats for every sample
  and drops none (:func:`called_by_analyzer`), so an analysis gets every selector's stats and
  never loses rows to a selection;
* ``op_fusion`` only fuses and reorders consecutive Filters, and a Selector ends such a group, so a
  Filter placed before a selection still runs before it;
* it is also a Data-Juicer ``Pipeline`` and declares ``_supported_exec_modes = ("default",
  "ray")``: under ``executor_type: ray`` Data-Juicer hands it the whole ``ray.data.Dataset``
  (``op.run(dataset)``), and :func:`daar_ops.ops._ray.run_on_ray` scores per sample on the
  workers, gathers only :meth:`StatsSelector.choose_fields` with a global row id, runs the same
  :meth:`StatsSelector.choose` on the driver and keeps the chosen rows on the workers (the same
  selection as the default executor). ``ray_partitioned`` is not declared (its partitions would
  each choose alone), so Data-Juicer's preflight refuses that mode;
* ``open_tracer``: Data-Juicer 1.6.1's Selector traces nothing; :meth:`run` here records the
  dropped samples through the tracer's sample-level filter API (``filter-<op>.jsonl``).
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence

import numpy as np
from data_juicer.ops.base_op import OP, Pipeline, Selector
from data_juicer.utils.constant import Fields
from data_juicer.utils.model_utils import free_models
from loguru import logger

from daar_ops.core import as_dict, uniform_dicts
from daar_ops.ops._columns import feature_of, with_fields


class StatsSelector(Selector, Pipeline):
    """Base class: subclasses implement :meth:`choose` (stats columns + keep mask) and
    :meth:`choose_fields` (what ``choose`` reads, the only data gathered under Ray)."""

    # Data-Juicer's Analyzer runs an op only if it is a Filter or declares tagging ops
    _contains_tagging_ops = True
    # a Pipeline under Ray (RayDataset runs ``op.run(ray_dataset)``); not "ray_partitioned"
    _supported_exec_modes = ("default", "ray")

    def prepare(self, dataset: Any) -> Any:
        """Per-sample work the choice needs (e.g. scores a Filter would write); default none."""
        return dataset

    def choose(self, dataset: Any) -> tuple[Mapping[str, Sequence[Any]], np.ndarray]:
        """``({stats key: one value per sample}, keep mask)`` over the dataset's order."""
        raise NotImplementedError

    def choose_fields(self) -> Sequence[str]:
        """The fields :meth:`choose` reads (dotted ``top.key`` for one key of a struct column
        such as ``__dj__stats__``): under Ray only these and a row id reach the driver."""
        raise NotImplementedError

    def ray_prepare(self, dataset: Any) -> Any:
        """:meth:`prepare` for a ``ray.data.Dataset``: the per-sample work on the workers."""
        return dataset

    def ray_choose(self, dataset: Any) -> tuple[np.ndarray, Mapping[str, Sequence[Any]]]:
        """The choice under Ray over a dataset with global row ids: the kept row ids (sorted)
        and the stats of the kept rows. Default: :meth:`choose` on the driver over the gathered
        :meth:`choose_fields` (:func:`daar_ops.ops._ray.choose_on_driver`)."""
        from daar_ops.ops._ray import choose_on_driver

        return choose_on_driver(self, dataset)

    def process(self, dataset: Any) -> Any:
        dataset, keep = self._scored(dataset)
        return dataset.select(np.flatnonzero(keep).tolist())

    def run(self, dataset, *, exporter=None, tracer=None):
        from daar_ops.ops._ray import is_ray_dataset, run_on_ray

        if is_ray_dataset(dataset):  # Data-Juicer's Ray executor: a Pipeline op
            selected = run_on_ray(self, dataset)
            free_models()
            return selected
        dataset = OP.run(self, dataset)
        dataset, keep = self._scored(dataset)
        if called_by_analyzer():
            logger.info(f"{self._name}: analysis: stats written for all {len(keep)} samples, "
                        f"none dropped (the selection keeps {int(keep.sum())})")
            free_models()
            return dataset
        if tracer is not None:
            self._trace_dropped(tracer, dataset, keep)
        selected = dataset.select(np.flatnonzero(keep).tolist())
        free_models()
        return selected

    # -- pieces ------------------------------------------------------------------------------------
    def _scored(self, dataset: Any) -> tuple[Any, np.ndarray]:
        n = len(dataset)
        if n == 0:
            logger.warning(f"{self._name}: empty dataset, nothing to select")
            return dataset, np.zeros(0, dtype=bool)
        dataset = self.prepare(dataset)
        columns, keep = self.choose(dataset)
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (n,):
            raise RuntimeError(f"{self._name}: keep mask of shape {keep.shape} for {n} samples")
        if columns:
            dataset = write_stats(dataset, columns, desc=f"{self._name}_stats")
        logger.info(f"{self._name}: keeps {int(keep.sum())} of {n} samples")
        return dataset, keep

    def _trace_dropped(self, tracer: Any, dataset: Any, keep: np.ndarray) -> None:
        from data_juicer.core.tracer import (check_tracer_collect_complete, collect_for_filter,
                                             should_trace_op)

        if not should_trace_op(tracer, self._name):
            return
        for i in np.flatnonzero(~keep).tolist():
            if check_tracer_collect_complete(tracer, self._name):
                break
            collect_for_filter(tracer, self._name, dataset[int(i)], False)


def called_by_analyzer() -> bool:
    """Whether Data-Juicer's Analyzer (``dj-analyze``) is running this op. Data-Juicer 1.6.1 calls
    ``op.run`` the same way from its executor and its Analyzer (it only sets ``process = None``
    on Filters), so the caller's frame is the one thing that tells them apart."""
    from data_juicer.core.analyzer import Analyzer

    frame = sys._getframe(1)
    while frame is not None:
        if isinstance(frame.f_locals.get("self"), Analyzer):
            return True
        frame = frame.f_back
    return False


def write_stats(dataset: Any, columns: Mapping[str, Sequence[Any]], desc: str = "stats") -> Any:
    """Write one value per sample of every column into ``__dj__stats__`` (a null or non-dict
    stats cell counts as empty)."""
    if Fields.stats not in dataset.column_names:
        dataset = dataset.add_column(Fields.stats, [{} for _ in range(len(dataset))])
    typed = {k: feature_of(v) for k, v in columns.items()}
    dataset = with_fields(dataset, Fields.stats, {k: f for k, f in typed.items() if f is not None})

    def write(batch, indices):
        stats = [as_dict(s) for s in batch[Fields.stats]]
        for row, idx in zip(stats, indices):
            for key, values in columns.items():
                row[key] = values[idx]
        batch[Fields.stats] = uniform_dicts(stats)
        return batch

    return dataset.map(write, with_indices=True, batched=True, desc=desc)


def stats_values(dataset: Any, keys: Sequence[str]) -> dict[str, list[Any]]:
    """One list per stats key, one value per sample (None where the cell or the key is absent).

    A Hugging Face dataset is read as Arrow columns in one pass, not as a dict per sample:
    iterating the stats cells of 200k samples (after a ``select``) took 7x longer
    (tests/test_reward_filter.py checks both paths agree)."""
    import pyarrow as pa
    from datasets import Dataset

    if isinstance(dataset, Dataset) and Fields.stats in dataset.column_names:
        column = dataset.with_format("arrow")[Fields.stats]
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if pa.types.is_struct(column.type):
            # flatten() applies the struct's own nulls to its children
            children = dict(zip([f.name for f in column.type], column.flatten()))
            return {k: children[k].to_pylist() if k in children else [None] * len(column)
                    for k in keys}
    cells = [as_dict(s) for s in dataset[Fields.stats]] if Fields.stats in \
        dataset.column_names else [{} for _ in range(len(dataset))]
    return {k: [c.get(k) for c in cells] for k in keys}


def column_records(dataset: Any, fields: Sequence[str]) -> list[dict[str, Any]]:
    """The dataset's rows restricted to the top-level columns named in ``fields`` (dotted names
    count by their first part); absent columns are logged by the caller's op name."""
    top = {f.split(".")[0] for f in fields if f}
    present = [c for c in dataset.column_names if c in top]
    if not present:
        return [{} for _ in range(len(dataset))]
    return dataset.select_columns(present).to_list()
