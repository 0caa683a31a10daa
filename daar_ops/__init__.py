"""daar-ops: diversity-aware SFT data selection operators for Data-Juicer (DaaR, QDIT, DS2).

The algorithms live in plain modules (no Data-Juicer import); :mod:`daar_ops.ops` holds the
Data-Juicer operators, registered through the ``data_juicer.ops`` entry point.
"""

__version__ = "0.1.0"
