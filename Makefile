# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH := torch==2.13.0

.PHONY: demo test venv clean bench

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) install -q -e '.[dev]'
	touch $@

$(VENV)/.demo: $(VENV)/.base
	$(PIP) install -q -e '.[demo]'
	touch $@

venv: $(VENV)/.base

test: $(VENV)/.dev
	$(PY) -m pytest -q -ra

demo: $(VENV)/.demo
	$(PY) benchmarks/synthetic_recovery.py --quick

bench: $(VENV)/.dev
	$(PY) benchmarks/synthetic_recovery.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
