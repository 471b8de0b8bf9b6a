# `make demo` and `make test` each set up a virtual environment and run.
# CONSTRAINTS keeps torch on the CPU wheel that lies on the development/CI machines;
# on another machine use `make test CONSTRAINTS=` (or pip install -e '.[dev]' yourself).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.qtune-installed

.PHONY: install test test-all test-engines demo bench clean

# DS_BUILD_OPS=0: DeepSpeed (in the dev extra) installs without compiling its ops; the one its
# CPU runs use is built on first use, once per environment (tests/test_engines.py).
$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev,plots]'
	touch $@

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

# The whole engine matrix of tests/test_engines.py (make test runs DDP, ZeRO-3 and FSDP2; this adds ZeRO-2).
test-engines: install
	$(BIN)/python -m pytest -q -m 'matrix or not matrix' tests/test_engines.py

demo: install
	$(BIN)/qtune demo

bench: install
	$(BIN)/python bench/step_cost.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
