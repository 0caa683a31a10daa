"""A few seconds of the seeded fuzz (tools/fuzz.py; longer runs: --seconds 600)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_seeded_fuzz_loses_nothing_and_never_crashes():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "fuzz.py"), "--seconds", "30",
                           "--max-cases", "3", "--seed", "1"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0, proc.stderr[-3000:]
    fields = dict(kv.split("=") for kv in last.split()[1:])
    assert fields["crashes"] == "0" and fields["unclear_errors"] == "0", last
    assert int(fields["cases"]) >= 1
    assert fields["records_in"] == fields["records_out_plus_dropped"] != "0"
