"""What the global selection filters (``qdit_filter``, ``ds2_filter``) share around their math."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from data_juicer.ops.base_op import Filter
from data_juicer.utils.constant import Fields
from data_juicer.utils.ray_utils import is_ray_mode
from loguru import logger


def start_global_run(op: Any, dataset: Any, ray_message: str) -> Any:
    """Refuse Ray (a global selection needs the whole dataset in one process) and add the stats
    column through ``OP.run``; an empty dataset is logged and returned as it is then."""
    from datasets import Dataset

    if is_ray_mode() or not isinstance(dataset, Dataset):
        raise RuntimeError(ray_message)
    dataset = super(Filter, op).run(dataset)
    if len(dataset) == 0:
        logger.warning(f"{op._name}: empty dataset, nothing to select")
    return dataset


def write_stats_and_filter(op: Any, dataset: Any, columns: Mapping[str, Sequence[Any]],
                           exporter: Any = None, reduce: bool = True) -> Any:
    """Write one value per sample of every column into ``__dj__stats__``, export the stats when
    Data-Juicer asks for them, then keep the samples ``op.process`` accepts.

    The Analyzer sets ``op.process`` to None (stats only); ``reduce=False`` also skips filtering.
    """
    name = op._name

    def write_stats(sample, idx):
        stats = dict(sample[Fields.stats] or {})
        for key, values in columns.items():
            stats[key] = values[idx]
        sample[Fields.stats] = stats
        return sample

    dataset = dataset.map(write_stats, with_indices=True, desc=f"{name}_stats")
    if exporter and op.stats_export_path is not None:
        exporter.export_compute_stats(dataset, op.stats_export_path)
    if reduce and op.process is not None:
        # A cheap per-sample check of the stat written above: one process is fastest.
        dataset = dataset.filter(op.process, desc=f"{name}_process")
    return dataset
