# `make quickstart` runs the main job end to end; `make test` runs the tests.
# Both create .venv and install distdiff on first use, with torch 2.13.0 from pip's index: the
# CPU build where the index serves one (this project's CI), else whatever it serves; see README.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/quickstart
# Extra pip options for torch, e.g. the CPU-only index PyTorch's "Get Started" page shows.
TORCH_PIP_ARGS ?=
# The torch==X pin of pyproject.toml (as docker/install.sh reads it): one place to change it.
TORCH_PIN := $(shell sed -n 's/^[[:space:]]*"\(torch==[^";]*\)".*/\1/p' pyproject.toml | head -n 1)
$(if $(TORCH_PIN),,$(error no torch==VERSION pin found in pyproject.toml))

.PHONY: install quickstart test bench clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: $(PYTHON) is Python " + sys.version.split()[0] + ", and distdiff needs 3.11 or newer (minari 0.5.4 and mujoco 4.0.1 ask for it): make PYTHON=python3.12 ...")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) '$(TORCH_PIN)'
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(PY) launch/train.py --config configs/smoke.yaml --run-dir $(RUN_DIR) --overwrite

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/planner.py

# Not runs/: it holds the experiments.
clean:
	rm -rf $(VENV) .pytest_cache
