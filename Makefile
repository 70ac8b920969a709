# omni-rpc: every target sets up what it needs (`make install` is idempotent and fast when
# the cached environment is current).
PY := .venv/bin/python
ENGINE ?= sim

.PHONY: install proto proto-check lint test demo bench clean

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

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
