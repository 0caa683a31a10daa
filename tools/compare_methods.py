"""Run every available selection method on the same slice of the pool and compare what they pick.

A thin command line over :mod:`daar_ops.compare_methods` (the runner ships in the package, which
``daar-ops evaluate`` uses); see that module for the options and the RESULT line.
"""

from __future__ import annotations

import sys

from daar_ops.compare_methods import main

if __name__ == "__main__":
    sys.exit(main())
