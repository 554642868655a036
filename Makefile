# Two commands for a new user:
#   make demo   installs into .venv and runs the demo (offline)
#   make test   installs into .venv and runs the tests on jax, tensorflow, torch
#   make lint   ruff check + ruff format --check (keras-hub style, 80 columns)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BACKENDS ?= jax tensorflow torch
PYTEST_ARGS ?=

.PHONY: setup demo test lint benchmark clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch==2.13.0 (in the extras) is the CPU wheel; see pyproject.toml.
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	KERAS_BACKEND=jax $(BIN)/python training/demo.py

# The backends' pytest sessions run at once, one thread each, JAX's as two
# pytest-xdist workers (TEST_JOBS=1:
# in turn); pytest exits 5 when it collects nothing: any non-zero status
# fails. See scripts/run_tests.sh.
TEST_JOBS ?= 3
test: setup
	@PYTHON=$(BIN)/python BACKENDS="$(BACKENDS)" TEST_JOBS=$(TEST_JOBS) \
		scripts/run_tests.sh $(PYTEST_ARGS)

# keras-hub's style (pyproject.toml [tool.ruff]); `ruff format` and
# `ruff check --fix` apply the fixable part.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

benchmark: setup
	@for backend in $(BACKENDS); do \
		KERAS_BACKEND=$$backend $(BIN)/python benchmarks/moe_overhead.py || exit 1; \
	done

clean:
	rm -rf $(VENV) build dist *.egg-info
