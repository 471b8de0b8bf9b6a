# `make demo` and `make test` each set up a virtual environment and run.
# CONSTRAINTS keeps torch on the CPU wheel that lies on the development/CI machines;
# on another machine use `make test CONSTRAINTS=` (or pip install -e '.[dev]' yourself).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.qtune-installed

.PHONY: install test test-all demo bench clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev,plots]'
	touch $@

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/qtune demo

bench: install
	$(BIN)/python bench/step_cost.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
