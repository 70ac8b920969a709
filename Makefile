# omni-rpc: every target sets up what it needs (`make install` is idempotent and fast when
# the cached environment is current).
PY := .venv/bin/python
# The demo's engine: vllm (real SmolLM2 on CPU, or the GPUs) or sim.
ENGINE ?= vllm
SEED ?= 42
REQUESTS ?= 5000
CONCURRENCY ?= 64

.PHONY: install proto proto-check lint test demo bench chaos clean

install:
	@bash scripts/install.sh

proto: install
	$(PY) scripts/gen_protos.py

proto-check: install
	$(PY) scripts/gen_protos.py --check

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: install lint
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: install
	$(PY) scripts/demo.py --engine $(ENGINE)

bench: install
	$(PY) scripts/bench.py

# A long chaos run: make chaos SEED=7 REQUESTS=20000
chaos: install
	$(PY) -m tests.chaos.harness --seed $(SEED) --requests $(REQUESTS) --concurrency $(CONCURRENCY)

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
