"""Rendering records into the text a model sees. No Data-Juicer import."""

from __future__ import annotations

import json
import math
import string
from typing import Any, Mapping, Sequence

from loguru import logger

ALPACA_TEMPLATE = "{instruction} {input} {output}"


def to_text(value: Any) -> str:
    """Any record value as clean text: None and NaN -> "", numbers -> str, lists/dicts -> JSON.

    Lone UTF-16 surrogates (which tokenizers reject) become "?" (UTF-8 ``errors="replace"``).
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bytes):
        text = value.decode("utf-8", errors="replace")
    elif isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, ensure_ascii=False, default=str)
    else:
        text = str(value)
    return text.encode("utf-8", errors="replace").decode("utf-8")


class TextTemplate:
    """A ``str.format``-style template over record fields, e.g. ``"{instruction} {input} {output}"``.

    A template without braces names a single field. Missing fields render as "" so a record lacking
    ``input`` still renders; the result is stripped of outer whitespace. Render a whole dataset with
    :meth:`render_all`, which refuses a field that no record has (a typo would otherwise give
    every record an empty text and a meaningless selection).
    """

    def __init__(self, template: str = ALPACA_TEMPLATE):
        if not isinstance(template, str) or not template.strip():
            raise ValueError("text template must be a non-empty string")
        if "{" not in template:
            template = "{" + template.strip() + "}"
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as err:
            raise ValueError(f"invalid text template {template!r}: {err}") from err
        if not fields or not all(f and all(p.isidentifier() for p in f.split(".")) for f in fields):
            raise ValueError(
                f"invalid text template {template!r}: use named fields such as '{{instruction}}'"
            )
        self.template = template
        self.fields = list(dict.fromkeys(fields))

    def render(self, record: Mapping[str, Any]) -> str:
        values = {f: to_text(lookup(record, f)) for f in self.fields}
        return self.template.format_map(_DottedValues(values)).strip()

    def render_all(self, records: Sequence[Mapping[str, Any]], on_missing: str = "raise",
                   source: str = "the records") -> list[str]:
        """Render every record, checking the template against the whole set.

        A field that no record has (missing or null in all of them) is either a typo such as
        ``{instrution}`` or a field this dataset lacks (``{input}`` in the default template):
        :class:`TemplateFieldError` names the field(s) and the fields the records do have, so a
        typo never runs to a quietly wrong result (with ``on_missing="warn"``, for a batch that may
        legitimately lack them, a warning instead, and the field renders as "").

        Fields missing from only some records render as "" (logged at INFO with record counts).
        A pool too large for memory renders one record at a time through :class:`TemplateCheck`,
        which makes the same checks.
        """
        check = TemplateCheck(self, on_missing)
        texts = [check.render(r) for r in records]
        check.finish(source)
        return texts

    def __repr__(self) -> str:
        return f"TextTemplate({self.template!r})"


class TemplateCheck:
    """Renders records one at a time and, at :meth:`finish`, makes :meth:`TextTemplate.render_all`'s
    checks over all of them, so a pool can be streamed without holding its records or texts."""

    def __init__(self, template: TextTemplate, on_missing: str = "raise"):
        if on_missing not in ("raise", "warn"):
            raise ValueError(f"on_missing must be 'raise' or 'warn', got {on_missing!r}")
        self.template, self.on_missing = template, on_missing
        self.n = 0
        self.any_text = False
        self.absent = {f: 0 for f in template.fields}
        self.sample: list[Mapping[str, Any]] = []  # the first records, to name present fields

    def render(self, record: Mapping[str, Any]) -> str:
        text = self.template.render(record)
        self.n += 1
        self.any_text = self.any_text or bool(text)
        for f in self.template.fields:
            self.absent[f] += lookup(record, f) is None
        if len(self.sample) < 1000:
            self.sample.append(record)
        return text

    def finish(self, source: str = "the records") -> None:
        n = self.n
        if not n:
            return
        nowhere = [f for f, k in self.absent.items() if k == n]
        if nowhere:
            message = (f"text template {self.template.template!r}: field(s) {', '.join(nowhere)} "
                       f"missing or null in all {n} of {source}"
                       + (", so every text is empty" if not self.any_text else "")
                       + f"; fields present: {', '.join(present_fields(self.sample)) or 'none'} "
                       f"(a typo, or a field this data lacks: remove it from the template)")
            if self.on_missing == "raise":
                raise TemplateFieldError(message)
            logger.warning(message + " (rendered as '')")
        partial = {f: k for f, k in self.absent.items() if 0 < k < n}
        if partial:
            logger.info("text template: " + ", ".join(
                f"'{f}' missing in {k}/{n} records" for f, k in partial.items())
                + " (rendered as '')")


class TemplateFieldError(ValueError):
    """A text template names a field that none of the records has."""


def present_fields(records: Sequence[Mapping[str, Any]], limit: int = 1000) -> list[str]:
    """Sorted top-level keys with a non-null value in the first ``limit`` records."""
    keys: set[str] = set()
    for record in records[:limit]:
        if isinstance(record, Mapping):
            keys.update(str(k) for k, v in record.items() if v is not None)
    return sorted(keys)


def lookup(record: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted key (``__dj__stats__.score``); None when any part is missing."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


class _DottedValues(dict):
    # format_map would read "{meta.source}" as attribute access on "meta"; the values dict is
    # keyed by the full dotted name, so resolve through a tiny proxy.
    def __missing__(self, key: str) -> Any:
        return _Prefix(self, key)


class _Prefix:
    def __init__(self, values: dict, prefix: str):
        self.values, self.prefix = values, prefix

    def __getattr__(self, name: str) -> Any:
        key = f"{self.prefix}.{name}"
        return self.values[key] if key in self.values else _Prefix(self.values, key)

    def __format__(self, spec: str) -> str:
        return ""
