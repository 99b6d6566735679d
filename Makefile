# Two entry points for a fresh machine (README): `make demo` and `make test`.
# Each sets up .venv itself. torch: a CPU build is installed only when the venv has no torch
# (override TORCH_SPEC for another build). The venv does not see a system torch: inside a Gaudi image,
# install with `pip install -e .` into the image Python instead (the Dockerfile does), never via this venv.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?= -m "not slow" --durations=10
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check

.PHONY: demo test test-all lint docs sabotage setup setup-dev clean

demo: $(VENV)/.installed
	$(BIN)/gaudi-pretrain demo --out $(DEMO_OUT)

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Regenerates the reference block of docs/configuration.md from the config's field descriptions.
docs: $(VENV)/.installed
	$(BIN)/python -m gaudi_pretrain.config_docs

test-all: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

# By hand, not in CI (~10 min): disable one feature at a time in a copy and check its tests fail.
sabotage: $(VENV)/.installed-dev
	$(BIN)/python tests/sabotage.py

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) -e .
	touch $@

HPU_DOUBLE := $(shell find tests/hpu_double -name '*.py' -o -name pyproject.toml)

# Overlays put first on PYTHONPATH by the tests that need them: the library versions Gaudi images bring
# (tests/compat/) and the habana_frameworks test double, installed so torch's autoload finds it.
$(VENV)/.installed-dev: pyproject.toml tests/compat/transformers-4.55.txt tests/compat/deepspeed-0.16.txt $(HPU_DOUBLE) $(VENV)/.installed
	$(PIP) -e ".[dev,mpi]"
	rm -rf $(VENV)/compat/transformers-4.55 $(VENV)/compat/deepspeed-0.16 $(VENV)/compat/hpu-double
	$(PIP) --no-deps --target $(VENV)/compat/transformers-4.55 -r tests/compat/transformers-4.55.txt
	$(PIP) --no-deps --target $(VENV)/compat/deepspeed-0.16 -r tests/compat/deepspeed-0.16.txt
	$(PIP) --no-deps --target $(VENV)/compat/hpu-double ./tests/hpu_double
	touch $@

clean:
	rm -rf $(VENV) runs
