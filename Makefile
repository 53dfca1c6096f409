# Quick start: `make demo` runs the main job on the default model; `make test` runs the suite.
# Both set up the pinned environment first (once; later runs reuse it in seconds).
PY := .venv/bin/python

.PHONY: setup demo test test-all bench fuzz clean

setup:
	@python3 tools/setup_env.py

demo: setup
	.venv/bin/ctk export --pruned

test: setup
	$(PY) -m pytest -q -n auto --dist worksteal

test-all: setup
	$(PY) -m pytest -q -n auto --dist worksteal -m "slow or not slow"

bench: setup
	$(PY) tools/bench_demo.py

# 10,000 random architectures through strip: exact, nothing zero or dead left, no crash.
fuzz: setup
	$(PY) tools/fuzz_strip.py --cases $(or $(CASES),10000) --minutes $(or $(MINUTES),120) --jobs $(or $(JOBS),2)

clean:
	rm -rf .venv ctk-out .pytest_cache
