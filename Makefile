# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH := torch==2.13.0

.PHONY: demo test venv clean bench bench-frontier bench-peer interop

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

# The main job on the embedded default: JumpReLU on MiniLM's middle residual stream, built-in corpus.
demo: $(VENV)/.demo
	$(VENV)/bin/jumpscope train --resume

bench: $(VENV)/.dev
	$(PY) benchmarks/synthetic_recovery.py

# The paper's comparison on the real models in ../shared/data (about 40 min on 2 cores).
bench-frontier: $(VENV)/.dev
	$(PY) benchmarks/reproduce_frontier.py

# Our JumpReLU against SAELens's on the same cached activations (sae-lens in .venv-saelens).
bench-peer: $(VENV)/.dev
	$(PY) benchmarks/peer_saelens.py

# Two-way format checks against the real SAELens package, in its own venv (never our dependency).
interop:
	$(PYTHON) -m venv .venv-saelens
	.venv-saelens/bin/pip install -q $(TORCH)
	.venv-saelens/bin/pip install -q sae-lens pytest
	.venv-saelens/bin/pip install -q --no-deps -e .
	.venv-saelens/bin/python -m pytest -q tests/test_formats_saelens_interop.py

clean:
	rm -rf $(VENV) .venv-saelens build dist src/*.egg-info
