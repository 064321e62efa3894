# `make quickstart` runs the main job end to end; `make test` runs the tests.
# Both create .venv and install distdiff on first use, with torch 2.13.0 from pip's index: the
# CPU build where the index serves one (this project's CI), else whatever it serves; see README.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/quickstart
# Extra pip options for torch, e.g. the CPU-only index PyTorch's "Get Started" page shows.
TORCH_PIP_ARGS ?=

.PHONY: install quickstart test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) torch==2.13.0
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
