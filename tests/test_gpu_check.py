"""The prepared GPU check (tools/gpu_check.sh) runs on the CPU with a tiny model, so it cannot rot
before a GPU is lent (issue 25)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_on_cpu():
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--device", "cpu",
                           "--smoke"], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split()[1:])
    assert last.startswith("RESULT ") and fields["gpu"] == "none", last
    assert float(fields["parity_qdit"]) == 1.0 and float(fields["parity_ds2"]) == 1.0, last
    assert float(fields["reward_rank_corr_vs_cpu"]) > 0.99, last
    assert float(fields["select_s"]) > 0 and float(fields["eval_s"]) > 0
