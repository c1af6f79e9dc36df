# circuitfind: every target creates and fills the virtualenv first when it is missing.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: help install run test test-slow smoke sweep bench lint format clean

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

test: $(STAMP) ## the fast test suite (two workers, one thread each)
	$(BIN)/python -m pytest -q -n 2 $(ARGS)

test-slow: $(STAMP) ## the slow tests: real models and long runs
	$(BIN)/python -m pytest -q -m slow $(ARGS)

smoke: $(STAMP) ## a seconds-long run on the random tiny LLaMA
	$(BIN)/circuitfind train +desiderata=vd_oi experiment=smoke $(ARGS)

sweep: $(STAMP) ## a lambda sweep with its summary table and figure
	$(BIN)/circuitfind train +desiderata=vd_oi -m optimizer.lam=0.02,0.05,0.1,0.2 $(ARGS)

bench: $(STAMP) ## engine timings against the published script's style
	$(BIN)/python scripts/bench.py $(ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check circuitfind tests scripts
	$(BIN)/ruff format --check circuitfind tests scripts

format: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix circuitfind tests scripts
	$(BIN)/ruff format circuitfind tests scripts

clean: ## remove the virtualenv and all run outputs
	rm -rf $(VENV) outputs multirun
