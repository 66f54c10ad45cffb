# Set-up and everyday commands. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
export STRANKER_DATA_DIR ?= $(abspath ../shared/data/her2st)

.PHONY: demo test install install-test bench docs lint clean

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

demo: install
	$(VENV)/bin/stranker demo

test: install-test
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/accuracy.py
	$(PY) benchmarks/speed.py

lint: install-test
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) build dist .pytest_cache
