"""Data-Juicer operators of daar-ops.

This package is the target of the ``data_juicer.ops`` entry point: importing it imports every
operator module below, whose ``@OPERATORS.register_module`` decorators register the ops.
"""

import importlib
import pkgutil

from daar_ops.model_keys import register_with_data_juicer
from daar_ops.ops._types import resolve_range_annotations

# the package's model loaders become Data-Juicer model types (prepare_model("daar_<kind>", ...))
register_with_data_juicer()

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")

resolve_range_annotations(__name__)  # Data-Juicer's preflight then range-checks recipe values
