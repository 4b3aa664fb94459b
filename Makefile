# `make demo` and `make test` each create .venv, install the pinned dependencies and run.
# The suite runs one pytest worker per core (pytest-xdist, a test file per worker), each
# worker's torch on one thread, so the cores are used without oversubscribing them.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint configs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/breastfusion demo -o runs/demo

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

configs: $(STAMP)  # configs/*.yaml are generated from presets.py (tests/test_config.py checks)
	$(BIN)/breastfusion config --write configs

clean:
	rm -rf $(VENV) runs .cache .pytest_cache
