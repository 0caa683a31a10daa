.PHONY: setup test test-fast select bench

setup:
	bash scripts/setup.sh

test:
	.venv/bin/python -m pytest -q

test-fast:
	.venv/bin/python -m pytest -q -m "not integration"

select:
	.venv/bin/daar-ops select

bench:
	.venv/bin/python tools/bench_features.py
