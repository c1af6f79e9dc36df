# circuitfind: every target creates and fills the virtualenv first when it is missing.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
# Two workers, one thread each (tests/conftest.py); pyproject.toml's addopts choose the fast tier.
PYTEST := $(BIN)/python -m pytest -q -n 2

.PHONY: help install run test test-all test-slow smoke sweep bench gpu-check docs lint format clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install circuitfind with its dev tools

run: $(STAMP) ## the main job: circuitfind train +desiderata=vd_oi on the default model (ARGS=... for overrides)
	$(BIN)/circuitfind train +desiderata=vd_oi $(ARGS)

test: $(STAMP) ## the fast tier (under 3 minutes on 2 cores); prints the slowest tests
	$(PYTEST) $(ARGS)

test-all: $(STAMP) ## the fast tier plus golden runs, the CLI end to end, the browser report, launchers (CI)
	$(PYTEST) -m 'not slow and not gpu' $(ARGS)

test-slow: $(STAMP) ## the slow tests: real models (SmolLM2-135M), by hand
	$(BIN)/python -m pytest -q -m slow $(ARGS)

smoke: $(STAMP) ## a seconds-long run on the random tiny LLaMA
	$(BIN)/circuitfind train +desiderata=vd_oi experiment=smoke $(ARGS)

sweep: $(STAMP) ## a lambda sweep with its summary table and figure
	$(BIN)/circuitfind train +desiderata=vd_oi -m optimizer.lam=0.02,0.05,0.1,0.2 $(ARGS)

bench: $(STAMP) ## engine timings against the published script's style
	$(BIN)/python scripts/bench.py $(ARGS)

gpu-check: $(STAMP) ## on a CUDA GPU, in minutes: organism vs golden, IOI, 4bit, device_map, benches; one table
	$(BIN)/python scripts/gpu_check.py $(ARGS)

docs: $(STAMP) ## the documentation site (docs/ and an API reference from the docstrings) in site/
	$(BIN)/pip install -q -e '.[docs]'
	$(BIN)/mkdocs build --strict -d site

lint: $(STAMP) ## ruff lint and format check, and the import layers
	$(BIN)/ruff check circuitfind tests scripts
	$(BIN)/ruff format --check circuitfind tests scripts
	$(BIN)/lint-imports

format: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix circuitfind tests scripts
	$(BIN)/ruff format circuitfind tests scripts

clean: ## remove the virtualenv, all run outputs and the built site
	rm -rf $(VENV) outputs multirun site
