# Quick start: `make demo` runs the main job on the default model; `make test` runs the suite.
# Both set up the pinned environment first (once; later runs reuse it in seconds).
PY := .venv/bin/python

.PHONY: setup demo test test-all bench clean

setup:
	@python3 tools/setup_env.py

demo: setup
	.venv/bin/ctk export --pruned

test: setup
	$(PY) -m pytest -q -n 2

test-all: setup
	$(PY) -m pytest -q -n 2 -m "slow or not slow"

bench: setup
	$(PY) tools/bench_demo.py

clean:
	rm -rf .venv ctk-out .pytest_cache
