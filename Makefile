# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH := torch==2.13.0
# The exact versions the suite last passed with; every install here is held to them.
LOCK := constraints.txt
LATEST := .venv-latest

.PHONY: demo test test-latest lock venv clean bench bench-frontier bench-peer interop gpu-check

$(VENV)/.base: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(LOCK) $(TORCH)
	$(PIP) install -q -c $(LOCK) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) install -q -c $(LOCK) -e '.[dev]'
	touch $@

$(VENV)/.demo: $(VENV)/.base
	$(PIP) install -q -c $(LOCK) -e '.[demo]'
	touch $@

venv: $(VENV)/.base

test: $(VENV)/.dev
	$(PY) -m pytest -q -ra

# The newest versions pyproject allows (torch stays pinned: newer wheels are CUDA builds of
# several GB), in a venv of their own, and the whole suite on them: catches a break before a
# user meets it. `make lock` then records them in constraints.txt.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q $(TORCH)
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]' $(TORCH)
	$(LATEST)/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|tokenizers|safetensors|numpy|huggingface.hub|tqdm|matplotlib)=='
	$(LATEST)/bin/python -m pytest -q -ra

lock: test-latest
	{ sed -n '1,3p' $(LOCK); $(LATEST)/bin/python -m pip freeze --exclude-editable | grep -v '^-e' \
	  | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	@echo "constraints.txt now holds the versions the suite just passed with; commit it."

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

# On a machine with a CUDA GPU: every CUDA path against the CPU's, resume and harvest (exit 1 on a failure).
gpu-check: $(VENV)/.dev
	$(PY) benchmarks/gpu_check.py

# Two-way format checks against the real SAELens package, in its own venv (never our dependency).
interop:
	$(PYTHON) -m venv .venv-saelens
	.venv-saelens/bin/pip install -q $(TORCH)
	.venv-saelens/bin/pip install -q sae-lens pytest
	.venv-saelens/bin/pip install -q --no-deps -e .
	.venv-saelens/bin/python -m pytest -q tests/formats/test_saelens_interop.py

clean:
	rm -rf $(VENV) $(LATEST) .venv-saelens build dist src/*.egg-info
