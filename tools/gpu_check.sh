#!/usr/bin/env bash
# The prepared accelerator check (issue 25; tools/gpu_check.py says what it runs). On a GPU:
#   bash tools/gpu_check.sh                  # --device cuda, under 10 minutes on one GPU
# On a CPU (CI runs this as a smoke test, tiny model, so the script cannot rot):
#   bash tools/gpu_check.sh --device cpu --smoke
# Last line: RESULT gpu=<name> select_s=<> parity_qdit=<> parity_ds2=<> reward_rank_corr_vs_cpu=<> eval_s=<>
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" tools/gpu_check.py "$@"
