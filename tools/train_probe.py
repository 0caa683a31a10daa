"""Train DaaR's probes: a thin wrapper of ``daar-ops train-probe`` (same options)."""

import sys

from daar_ops.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-probe", *sys.argv[1:]]))
