"""Rendering records into the text a model sees. No Data-Juicer import."""

from __future__ import annotations

import json
import math
import string
from typing import Any, Mapping

ALPACA_TEMPLATE = "{instruction} {input} {output}"


def to_text(value: Any) -> str:
    """Any record value as clean text: None and NaN -> "", numbers -> str, lists/dicts -> JSON.

    Lone UTF-16 surrogates (which tokenizers reject) become U+FFFD.
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
    ``input`` still renders; the result is stripped of outer whitespace.
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

    def __repr__(self) -> str:
        return f"TextTemplate({self.template!r})"


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
