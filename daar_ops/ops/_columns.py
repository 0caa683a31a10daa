"""Typed stats/meta fields before an op writes them.

Data-Juicer maps a batched op batch by batch; the datasets writer keeps the input column's type
when the output fits it (``try_original_type``) and otherwise infers each batch's type. A batch in
which a key is None in every row (a row whose stats were null, next to rows carrying another
op's stats) is then typed ``null`` and the next batch with a real value fails to cast. Adding the
op's own keys to the column type first, with their real types, makes every batch fit the
original type: no inference, no failure, nothing lost."""

from __future__ import annotations

from typing import Any, Mapping


def with_fields(dataset: Any, column: str, fields: Mapping[str, Any]) -> Any:
    """``dataset`` with ``column``'s struct type extended by ``fields`` ({key: datasets
    feature}) where missing; a column of only nulls becomes that struct. Non-HF datasets (Ray)
    and absent columns are returned as they are."""
    from datasets import Dataset, Value

    if not isinstance(dataset, Dataset) or column not in dataset.features:
        return dataset
    current = dataset.features[column]
    if isinstance(current, dict):
        merged = dict(current)
    elif isinstance(current, Value) and current.dtype == "null":
        merged = {}
    else:
        return dataset  # not a struct: the op reports the cells it cannot read as empty
    missing = {k: v for k, v in fields.items() if k not in merged or _is_null(merged[k])}
    if not missing:
        return dataset
    merged.update(missing)
    return dataset.cast_column(column, merged)


def check_template_columns(template: Any, columns: Any, op_name: str) -> None:
    """Raise :class:`~daar_ops.text.TemplateFieldError` when the template names a field that is not
    a column of the dataset (a typo such as ``{instrution}``): every sample's text would lack it.

    Called from the per-sample ops' ``run()``, before any batch: an exception inside a batch would
    only drop that batch under ``dj-process`` (``skip_op_error`` is on by default there)."""
    from daar_ops.text import TemplateFieldError

    columns = set(columns)
    missing = [f for f in template.fields if f.split(".")[0] not in columns]
    if missing:
        raise TemplateFieldError(
            f"{op_name}: text template {template.template!r} names field(s) "
            f"{', '.join(missing)} that the dataset does not have (columns: "
            f"{', '.join(sorted(c for c in columns if not c.startswith('__dj__'))) or 'none'})")


def render_rows(template: Any, samples: Mapping[str, Any], rows: Any, op_name: str) -> list:
    """The texts of the batch rows ``rows`` (indices into ``samples``, a Data-Juicer batch).

    A row that cannot be rendered becomes "" with a warning: one bad sample never costs the
    other samples of its batch (Data-Juicer's ``skip_op_error`` would drop the whole batch)."""
    from loguru import logger

    from daar_ops.core import STATS_FIELD

    fields = [f for f in samples.keys() if f != STATS_FIELD]
    texts = []
    for i in rows:
        try:
            texts.append(template.render({f: samples[f][i] for f in fields}))
        except Exception as err:  # noqa: BLE001 - the warning names it; the batch goes on
            logger.warning(f"{op_name}: sample text could not be rendered ({err}); used as "
                           f"empty text")
            texts.append("")
    return texts


def _is_null(feature: Any) -> bool:
    from datasets import Value

    return isinstance(feature, Value) and feature.dtype == "null"


def float_feature():
    from datasets import Value

    return Value("float64")


def string_feature():
    from datasets import Value

    return Value("string")


def float_list_feature():
    from datasets import List, Value

    return List(Value("float64"))


def feature_of(values: Any) -> Any:
    """The datasets feature of a column of plain values (first non-None value decides)."""
    from datasets import List, Value

    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            return Value("bool")
        if isinstance(v, int):
            return Value("int64")
        if isinstance(v, float):
            return Value("float64")
        if isinstance(v, str):
            return Value("string")
        if isinstance(v, (list, tuple)):
            return List(Value("float64"))
        break
    return None
