# omni-rpc: every target sets up what it needs (`make install` is idempotent and fast when
# the cached environment is current).
PY := .venv/bin/python
# The demo's engine: vllm (real SmolLM2 on CPU, or the GPUs) or sim.
ENGINE ?= vllm
SEED ?= 42
REQUESTS ?= 5000
CONCURRENCY ?= 64

.PHONY: install proto proto-check lint go-toolchain netns-tools test demo bench bench-peers bench-ha bench-cache chaos fuzz buf-lint buf-breaking clean

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

# Go, protoc and the Go gRPC libraries from Debian's packages, for tests/test_go_client.py
# (installed when missing and root with apt-get; otherwise it says why and that test skips).
go-toolchain:
	@bash scripts/install_go.sh

# iproute2 and iptables for tests/test_partitions.py (installed when missing and root with
# apt-get; otherwise it says why and those tests skip).
netns-tools:
	@bash scripts/install_netns_tools.sh

test: install lint go-toolchain netns-tools
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: install
	$(PY) scripts/demo.py --engine $(ENGINE)

bench: install
	$(PY) scripts/bench.py

# omni-rpc and vllm-router (installed once from PyPI into its own cached environment) side by
# side on the same simulated engines, vllm-router over HTTP and omni over its HTTP front door and
# over gRPC; writes its section of docs/benchmarks.md (~8.5 minutes).
# A smoke run: make bench-peers BENCH_PEERS_ARGS=--quick
bench-peers: install
	$(PY) scripts/bench_peers.py $(BENCH_PEERS_ARGS)

# Two coordinators over four simulated agents: how evenly least_loaded (and round_robin,
# power_of_two, and least_loaded behind one coordinator) spreads 200 mixed-length requests,
# 3 rounds; writes its section of docs/benchmarks.md (~2 minutes).
# A smoke run: make bench-ha BENCH_HA_ARGS=--quick
bench-ha: install
	$(PY) scripts/bench_ha.py $(BENCH_HA_ARGS)

# Cache-aware routing: a multi-tenant chat workload per strategy on 8, 16 and 32 simulated
# agents with prefix caches (hit rate against the ideal, TTFT, balance), and with --vllm on two
# real CPU vLLM agents (SmolLM2); writes its section of docs/benchmarks.md (~25 minutes).
# A smoke run: make bench-cache BENCH_CACHE_ARGS=--quick
BENCH_CACHE_ARGS ?= --vllm
bench-cache: install
	$(PY) scripts/bench_cache.py $(BENCH_CACHE_ARGS)

# A long chaos run: make chaos SEED=7 REQUESTS=20000
# Then the same with two coordinators, killed, frozen and restarted too (one at a time);
# then 120 s outages: a coordinator killed and restarted, an agent frozen and thawed (~5 min;
# make test skips tests/chaos/test_long_outages.py without OMNI_LONG_CHAOS=1).
chaos: install
	$(PY) -m tests.chaos.harness --seed $(SEED) --requests $(REQUESTS) --concurrency $(CONCURRENCY)
	$(PY) -m tests.chaos.harness --seed $(SEED) --requests $(REQUESTS) --concurrency $(CONCURRENCY) --coordinators 2
	OMNI_LONG_CHAOS=1 $(PY) -m pytest -q -p no:cacheprovider -s tests/chaos/test_long_outages.py

# A long fuzz run against live servers (make test runs a short seeded one).
FUZZ_EXAMPLES ?= 2000
fuzz: install
	OMNI_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py

# Proto lint, and a breaking-change check against main (buf from the npm registry).
BUF := npx --yes @bufbuild/buf@1.75.0
buf-lint:
	$(BUF) lint

buf-breaking:
	$(BUF) breaking protos --against '.git#branch=main,subdir=protos'

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
