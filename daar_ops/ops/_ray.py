"""Whole-dataset choices under Data-Juicer's Ray executor (``executor_type: ray``).

Data-Juicer 1.6.1 runs no Selector under Ray; it hands a ``Pipeline`` op the whole
``ray.data.Dataset`` (``op.run(dataset)``). A :class:`~daar_ops.ops._selector.StatsSelector` is
also a ``Pipeline``, and under Ray it runs :func:`run_on_ray`:

1. ``op.ray_prepare(dataset)``: the per-sample work, distributed (e.g. the reward scoring of
   ``diversity_reward_selector``, run as Data-Juicer runs the Filter's stats pass);
2. a stable global row id: the input order (the order the default executor sees), kept by
   running the plan with ``preserve_order`` and zipping a ``range`` column onto it;
3. only the fields ``op.choose_fields()`` names (for a stats/meta struct: only the named keys) and
   the row id are gathered to the driver, sorted by row id, and ``op.choose`` runs there on them
   exactly as on the default executor (same code, same input order, so the same ties);
4. the row ids kept (and the stats ``choose`` writes, for those rows only) go back to the
   workers through the object store, and every block keeps its chosen rows.

Steps 3-4 are :func:`choose_on_driver`, the default of ``StatsSelector.ray_choose``; an op may
choose otherwise (``qdit_selector``'s partitioned mode, :mod:`daar_ops.ops._qdit_ray`, runs its
partitions on the workers and gathers only their picks).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from data_juicer.utils.constant import Fields
from loguru import logger

from daar_ops.core import as_dict, uniform_dicts

ROW_ID = "__daar_row_id__"


def is_ray_dataset(dataset: Any) -> bool:
    """Whether ``dataset`` is a ``ray.data.Dataset`` (without importing ray for other data)."""
    return type(dataset).__module__.startswith("ray.data")


def with_row_ids(dataset: Any) -> Any:
    """The dataset materialized in input order, with an int64 ``ROW_ID`` column 0..N-1 (None
    for a dataset without blocks).

    Ray Data streams blocks in completion order unless ``preserve_order`` is set on the plan's
    context; without it the blocks (and any "earlier sample" rule) would follow the workers'
    timing. The ids are then the blocks' offsets in that order plus the row in the block."""
    import ray

    num_rows, add_row_ids = ray.remote(_num_rows_fn), ray.remote(_add_row_ids_fn)
    dataset.context.execution_options.preserve_order = True
    refs = dataset.materialize().to_arrow_refs()
    if not refs:
        return None
    counts = ray.get([num_rows.remote(ref) for ref in refs])
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return ray.data.from_arrow_refs([add_row_ids.remote(ref, int(offset))
                                     for ref, offset in zip(refs, offsets)])


def _num_rows_fn(table: Any) -> int:
    return table.num_rows


def _add_row_ids_fn(table: Any, offset: int) -> Any:
    import pyarrow as pa

    ids = pa.array(np.arange(offset, offset + table.num_rows, dtype=np.int64))
    return table.append_column(ROW_ID, ids)


def project_batch(table: Any, fields: Sequence[str]) -> Any:
    """The row id and the named fields of one Arrow block: a dotted ``top.key`` keeps only
    ``key`` of a struct column ``top`` (its nulls kept); a plain name keeps the whole column."""
    import pyarrow as pa

    wanted: dict[str, set | None] = {}
    for f in fields:
        if not f:
            continue
        top, _, rest = f.partition(".")
        child = rest.split(".")[0] if rest else None
        if child is None or wanted.get(top, set()) is None:
            wanted[top] = None  # the whole column
        else:
            wanted.setdefault(top, set()).add(child)
    names, arrays = [ROW_ID], [table.column(ROW_ID)]
    for top, children in wanted.items():
        if top not in table.column_names or top == ROW_ID:
            continue
        col = table.column(top).combine_chunks()
        if children is not None and pa.types.is_struct(col.type):
            present = [c for c in sorted(children) if col.type.get_field_index(c) >= 0]
            if not present:
                continue
            col = pa.StructArray.from_arrays([col.field(c) for c in present], names=present,
                                             mask=col.is_null())
        names.append(top)
        arrays.append(col)
    return pa.Table.from_arrays(arrays, names=names)


def gather(dataset: Any, fields: Sequence[str]) -> Any:
    """The projected fields of every row (see :func:`project_batch`) as one Arrow table on the
    driver, sorted by row id."""
    import pyarrow as pa
    import ray

    projected = dataset.map_batches(project_batch, fn_kwargs={"fields": list(fields)},
                                    batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    tables = [t for t in ray.get(projected.to_arrow_refs()) if t.num_rows]
    if not tables:
        return pa.table({ROW_ID: pa.array([], pa.int64())})
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.sort_by(ROW_ID)


def _resolve(value: Any) -> Any:
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _keep_rows(table: Any, kept_ref: Any, columns_ref: Any) -> Any:
    """One block's chosen rows, with the chooser's stats written into ``__dj__stats__``."""
    import pyarrow as pa

    kept = _resolve(kept_ref)
    ids = table.column(ROW_ID).to_numpy()
    pos = np.searchsorted(kept, ids)
    pos_c = np.minimum(pos, max(len(kept) - 1, 0))
    mask = (pos < len(kept)) & (kept[pos_c] == ids) if len(kept) else np.zeros(len(ids), bool)
    table = table.filter(pa.array(mask)).drop_columns([ROW_ID])
    columns = _resolve(columns_ref) or {}
    if columns and table.num_rows:
        where = pos[mask]
        cells = (table.column(Fields.stats).to_pylist() if Fields.stats in table.column_names
                 else [{} for _ in range(table.num_rows)])
        cells = [as_dict(c) for c in cells]
        for key, values in columns.items():
            for cell, j in zip(cells, where):
                cell[key] = values[j]
        stats = pa.array(uniform_dicts(cells))
        if Fields.stats in table.column_names:
            table = table.set_column(table.column_names.index(Fields.stats), Fields.stats, stats)
        else:
            table = table.append_column(Fields.stats, stats)
    return table


def run_on_ray(op: Any, dataset: Any) -> Any:
    """A :class:`StatsSelector`'s choice over a ``ray.data.Dataset`` (module docstring): the op's
    ``ray_choose`` (by default :func:`choose_on_driver`) picks the row ids to keep."""
    import ray

    dataset = op.ray_prepare(dataset)
    with_ids = with_row_ids(dataset)
    if with_ids is None:
        logger.warning(f"{op._name}: empty dataset, nothing to select")
        return dataset
    kept, kept_columns = op.ray_choose(with_ids)
    kept_ref = ray.put(np.ascontiguousarray(kept, dtype=np.int64))
    columns_ref = ray.put(dict(kept_columns)) if kept_columns else None
    return with_ids.map_batches(_keep_rows, fn_kwargs={"kept_ref": kept_ref,
                                                       "columns_ref": columns_ref},
                                batch_format="pyarrow", batch_size=None)


def choose_on_driver(op: Any, dataset: Any) -> tuple[np.ndarray, dict[str, list]]:
    """Steps 3-4 of the module docstring: ``op.choose_fields()`` of every row gathered to the
    driver, ``op.choose`` run there; the kept row ids (sorted) and their stats columns."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    table = gather(dataset, list(op.choose_fields()))
    n = table.num_rows
    if n == 0:
        logger.warning(f"{op._name}: empty dataset, nothing to select")
        return np.zeros(0, dtype=np.int64), {}
    row_ids = table.column(ROW_ID).to_numpy()
    local = Dataset(InMemoryTable(table.drop_columns([ROW_ID])))
    logger.info(f"{op._name}: gathered {n} rows of {sorted(local.column_names)} "
                f"({table.nbytes / 2**20:.2f} MiB) to the driver")
    columns, keep = op.choose(local)
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (n,):
        raise RuntimeError(f"{op._name}: keep mask of shape {keep.shape} for {n} samples")
    logger.info(f"{op._name}: keeps {int(keep.sum())} of {n} samples")
    kept_columns = {k: [v for v, k_ in zip(values, keep) if k_] for k, values in
                    (columns or {}).items()}
    return row_ids[keep], kept_columns  # sorted: the table is
