"""Parameter types whose range Data-Juicer's preflight checks when a recipe is loaded.

Data-Juicer 1.6.1's ``pre_instantiation_check`` (``data_juicer/core/preflight.py``) runs before the
dataset is loaded and, for a parameter annotated with a plain class, tests the recipe's value with
``isinstance``. These classes answer that test by range, so ``qdit_selector: {select_ratio: 1.5}``
fails at load time with ``[qdit_selector] Parameter 'select_ratio' expects type 'a number in
[0, 1]', got 'float' (value: 1.5)`` instead of a traceback after the data was read. (Its own
``Annotated[float, Field(ge=0, le=1)]`` types are not range-checked there.) The ops receive plain
Python numbers; their ``__init__`` still validates, for callers that build them directly
(:func:`check_range`, or the parameter object of the method).

The op modules use ``from __future__ import annotations``, so their annotations are strings;
:func:`resolve_range_annotations` (run once when the ops are registered) puts the classes back.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Iterator


class _Range(type):
    def __instancecheck__(cls, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if cls.integer and not (isinstance(value, int) or float(value).is_integer()):
            return False
        if not math.isfinite(value):
            return False
        return (value > cls.lo if cls.open_lo else value >= cls.lo) and value <= cls.hi


def _range(name: str, lo: float, hi: float = math.inf, integer: bool = False,
           open_lo: bool = False) -> type:
    base = int if integer else float
    return _Range(name, (base,), {"lo": lo, "hi": hi, "integer": integer, "open_lo": open_lo,
                                  "__module__": __name__})


Ratio = _range("a number in [0, 1]", 0.0, 1.0)
OpenRatio = _range("a number in (0, 1]", 0.0, 1.0, open_lo=True)
Percentile = _range("a number in [0, 100]", 0.0, 100.0)
NonNegativeFloat = _range("a number >= 0", 0.0)
NonNegativeInt = _range("an integer >= 0", 0, integer=True)
PositiveInt = _range("an integer >= 1", 1, integer=True)


_BY_NAME = {"Ratio": Ratio, "OpenRatio": OpenRatio, "Percentile": Percentile,
            "NonNegativeFloat": NonNegativeFloat, "NonNegativeInt": NonNegativeInt,
            "PositiveInt": PositiveInt}


def resolve_range_annotations(package: str) -> None:
    """In every class of the modules under ``package``, replace an ``__init__`` annotation that
    names one of the range types (a string under PEP 563) with the type itself."""
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith(package + ".") or module is None:
            continue
        for value in list(vars(module).values()):
            init = getattr(value, "__dict__", {}).get("__init__") if isinstance(value, type) \
                else None
            annotations = getattr(init, "__annotations__", None)
            if not annotations:
                continue
            for name, ann in list(annotations.items()):
                if isinstance(ann, str) and ann in _BY_NAME:
                    annotations[name] = _BY_NAME[ann]



def check_range(name: str, value: object, kind: type) -> None:
    """The preflight's range test for a caller that builds an op in Python (the preflight only
    runs on recipes): a ValueError naming the parameter. ``None`` passes."""
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"{name} must be {kind.__name__}, got {value!r}")


def alias(name: str, value: object, alias_name: str, alias_value: object) -> object:
    """A parameter given under its name or under a documented alias (e.g. the DaaR design card's
    ``top_ratio`` for ``select_ratio``): the one given, or None; both is a ValueError. The alias
    stays in the op's signature with the same range type, so the preflight checks it too."""
    if value is not None and alias_value is not None:
        raise ValueError(f"give {name} or its alias {alias_name}, not both")
    return alias_value if value is None else value


@contextlib.contextmanager
def op_errors(op_name: str) -> Iterator[None]:
    """A ValueError raised inside (the checks of a parameter object, :func:`check_range`,
    :func:`alias`) is raised again with the op's name in front."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"{op_name}: {err}") from err
