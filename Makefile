# Set-up and everyday commands. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
export STRANKER_DATA_DIR ?= $(abspath ../shared/data/her2st)

.PHONY: demo test install install-test install-docs bench bench-ablations docs lint pre-commit clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) install --quiet $(TORCH_PIN)
	$(PIP) install --quiet $(TORCH_PIN) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet $(TORCH_PIN) -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

$(VENV)/.installed-docs: $(VENV)/.installed
	$(PIP) install --quiet $(TORCH_PIN) -e ".[docs]"
	touch $@

install-docs: $(VENV)/.installed-docs

demo: install
	$(VENV)/bin/stranker demo

# every test under pytest-timeout (pyproject: `timeout`); `-m "not slow"` for a quick pass
test: install-test
	$(PY) -m pytest -q

# Never run in CI (tests/test_benchmarks.py runs seconds-long smoke versions). Each prints its table.
bench: install
	$(PY) benchmarks/accuracy.py
	$(PY) benchmarks/speed.py
	$(PY) benchmarks/scaling.py
	$(PY) benchmarks/train_scaling.py

# What each part of the default adds: one seed of the ablation rows over the same folds (hours on 2 cores)
bench-ablations: install
	$(PY) benchmarks/accuracy.py --ablations --seeds 0

# API pages from the docstrings, tutorials rendered from tutorials/*.py without running them; warnings fail
docs: install-docs
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

$(VENV)/.installed-dev: $(VENV)/.installed-test
	$(PIP) install --quiet $(TORCH_PIN) -e ".[test,dev]"
	touch $@

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests benchmarks tutorials

# ruff on every commit (.pre-commit-config.yaml)
pre-commit: $(VENV)/.installed-dev
	$(VENV)/bin/pre-commit install

clean:
	rm -rf $(VENV) build dist .pytest_cache docs/_build docs/generated docs/tutorials
