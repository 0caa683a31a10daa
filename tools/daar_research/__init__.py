"""Research variants: methods and switches the benchmarks and the history of defaults use, kept
out of the product package.

Nothing under ``daar_ops/`` imports this package (``tests/test_layers.py`` checks it). The
harnesses in ``tools/`` import it (they put ``tools/`` on ``sys.path``); the tests find it through
pytest's ``pythonpath``. Each module extends one product algorithm with the variants that lost
to its default or that only reproduce an earlier result, built from the product's own kernels.
"""
