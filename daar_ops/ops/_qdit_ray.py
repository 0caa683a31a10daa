"""QDIT under Data-Juicer's Ray executor: exact on the driver when the embeddings fit it, else
partitioned (GreeDi, :mod:`daar_ops.algorithms.qdit.partitioned`) with the partitions' greedy on
the workers.

* **exact** (the default whenever it fits): the op's ``choose`` on the driver over the gathered
  text fields and quality (:func:`daar_ops.ops._ray.choose_on_driver`): the default executor's
  rows.
* **partitioned**: the quality alone is gathered and normalised over the whole set (so every
  partition ranks it alike) and sent back through the object store; each partition of
  about ``partition_size`` rows (contiguous blocks in input order) is embedded and runs the
  greedy picking the budget K on a worker, returning the row ids, embeddings and quality of its
  picks; the driver runs the greedy on the union of the picks (at most partitions x K rows) and
  keeps its K rows.

:func:`ray_plan` decides: partitioned when ``partition_size`` is set and below N (partitions of
that many rows), or when the N x d float32 embeddings exceed ``driver_memory_mb`` (partitions =
Ray's blocks); exact otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from loguru import logger

from daar_ops.algorithms.qdit.partitioned import greedi_round
from daar_ops.core import QDIT_GAIN_KEY, QDIT_RANK_KEY
from daar_ops.ops._ray import ROW_ID, _resolve, gather

EMBEDDING, QUALITY = "__qdit_embedding__", "__qdit_quality__"


def auto_driver_memory_mb() -> float:
    """``driver_memory_mb: null``: half of the memory available on the driver now."""
    import psutil

    return psutil.virtual_memory().available / 2**20 / 2


def ray_plan(n: int, embedding_mb: float, partition_size: int | None,
             driver_memory_mb: float) -> tuple[bool, int | None]:
    """(partitioned, rows per partition: None = Ray's blocks)."""
    if partition_size is not None:
        return n > partition_size, partition_size
    return embedding_mb > driver_memory_mb, None


def qdit_ray_choose(op: Any, dataset: Any) -> tuple[np.ndarray, dict[str, list]] | None:
    """The partitioned choice (kept row ids, sorted, and their stats), or None when the plan is
    the exact greedy on the driver."""
    n = dataset.count()
    if not n:
        return None
    if op.config.partition_size is None:
        memory = op.driver_memory_mb if op.driver_memory_mb is not None else \
            auto_driver_memory_mb()
        dim = op.embed(["x"]).shape[1]
        partitioned, part_rows = ray_plan(n, n * dim * 4 / 2**20, None, memory)
        logger.info(f"{op._name}: {n} x {dim} float32 embeddings = {n * dim * 4 / 2**20:.1f} MiB "
                    f"against driver_memory_mb={memory:.0f}: "
                    f"{'partitioned' if partitioned else 'exact on the driver'}")
    else:
        partitioned, part_rows = ray_plan(n, 0.0, op.config.partition_size, 0.0)
    return _greedi_on_ray(op, dataset, n, part_rows) if partitioned else None


def _greedi_on_ray(op: Any, dataset: Any, n: int, part_rows: int | None
                   ) -> tuple[np.ndarray, dict[str, list]]:
    import pyarrow as pa
    import ray

    k = op.config.budget(n)
    q_ref = ray.put(_global_quality(op, dataset, n)) if op.config.alpha > 0 else None
    if part_rows is not None:  # ceil(N / P) contiguous blocks of equal size (+-1), input order
        dataset = dataset.repartition(-(-n // part_rows))
    picks = dataset.map_batches(_partition_picks, batch_size=None, batch_format="pyarrow",
                                fn_kwargs=dict(op=op, q_ref=q_ref, k=k, n_total=n),
                                num_gpus=1 if op.use_cuda() else None)
    tables = ray.get(picks.to_arrow_refs())  # one table per partition (a block)
    union = pa.concat_tables(tables).sort_by(ROW_ID)  # input order: the same union every run
    ids = union.column(ROW_ID).to_numpy()
    column = union.column(EMBEDDING).combine_chunks()
    emb = column.flatten().to_numpy().reshape(len(column), column.type.list_size)
    q = union.column(QUALITY).to_numpy() if q_ref is not None else None
    logger.info(f"{op._name}: partitioned QDIT: {len(tables)} partitions "
                f"({f'about {part_rows} rows' if part_rows else 'the Ray blocks'}) each picked "
                f"up to {k}; gathered {len(ids)} rows of ['embedding', "
                f"'quality'] ({union.nbytes / 2**20:.2f} MiB) to the driver")
    final = greedi_round(emb, q, k, op.config, n, device=op.selection_device(), progress=True)
    chosen = ids[final.indices]
    order = np.argsort(chosen, kind="stable")  # kept ids sorted; rank = selection order
    logger.info(f"{op._name}: keeps {len(chosen)} of {n} samples (facility location over the "
                f"union {final.objective:.4f})")
    return chosen[order], {QDIT_RANK_KEY: order.tolist(),
                           QDIT_GAIN_KEY: [float(g) for g in final.gains[order]]}


def _global_quality(op: Any, dataset: Any, n: int) -> np.ndarray:
    """The quality of every row (by row id), normalised over the whole set."""
    from daar_ops.algorithms.qdit.selection import normalize_quality

    table = gather(dataset, [op.quality_key])
    if table.num_rows != n:
        raise RuntimeError(f"{op._name}: gathered {table.num_rows} quality values for {n} rows")
    records = table.drop_columns([ROW_ID]).to_pylist()
    q, invalid = normalize_quality(op.quality_values(records), op.config.quality_norm,
                                   op.config.quality_fill)
    if invalid.any():
        logger.warning(f"{op._name}: {int(invalid.sum())} of {n} quality values are missing, "
                       f"non-numeric, NaN or inf; they get the {op.config.quality_fill!r} quality")
    return q


def _partition_picks(table: Any, op: Any, q_ref: Any, k: int, n_total: int) -> Any:
    """One partition on a worker: embed it, pick up to K with the greedy; their row ids,
    embeddings and normalised quality."""
    import pyarrow as pa

    ids = table.column(ROW_ID).to_numpy()
    fields = {f.split(".")[0] for f in op.template.fields}
    present = [c for c in table.column_names if c in fields]
    records = table.select(present).to_pylist() if present else [{} for _ in ids]
    emb = np.asarray(op.embed(op.template.render_all(records, source=f"a partition of "
                                                                     f"{op._name}")),
                     dtype=np.float32)
    q = _resolve(q_ref)[ids] if q_ref is not None else None
    picked = greedi_round(emb, q, k, op.config, n_total, device=op.selection_device()).indices
    flat = pa.array(emb[picked].reshape(-1))
    return pa.table({ROW_ID: pa.array(ids[picked], pa.int64()),
                     EMBEDDING: pa.FixedSizeListArray.from_arrays(flat, emb.shape[1]),
                     QUALITY: pa.array(q[picked] if q is not None else np.zeros(len(picked)))})
