"""Start-up cost (issue 22 item 14): ``daar-ops --help`` and plugin discovery import no heavy module.

Times are never asserted (they depend on the machine); what makes start-up slow is: torch, numba,
faiss, transformers, sentence-transformers or scikit-learn imported before any work is asked for.
Each check runs in a fresh interpreter so that modules imported by other tests do not count.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "numba", "faiss", "transformers", "sentence_transformers", "sklearn")


def _loaded_after(code: str) -> list[str]:
    probe = (f"{code}\nimport sys, json\n"
             "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_of_every_command_imports_neither_data_juicer_nor_heavy_modules():
    code = """
from daar_ops.cli import build_parser
parser = build_parser()
commands = list(parser._subparsers._group_actions[0].choices)
assert len(commands) >= 7, commands
import contextlib, io
for argv in [["--help"]] + [[c, "--help"] for c in commands]:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit:
            pass
"""
    loaded = _loaded_after(code)
    assert not [m for m in (*HEAVY, "data_juicer") if m in loaded]


def test_operator_discovery_registers_every_op_without_heavy_imports():
    code = """
from data_juicer.ops import OPERATORS
names = {"centroid_synthesis_mapper", "domain_pseudo_label_mapper", "diversity_reward_filter",
         "domain_contrastive_selector", "ds2_rating_filter", "ds2_selector", "qdit_selector"}
missing = names - set(OPERATORS.modules)
assert not missing, missing
"""
    loaded = _loaded_after(code)
    assert "daar_ops" in loaded  # discovered through the data_juicer.ops entry point
    assert not [m for m in HEAVY if m in loaded]
