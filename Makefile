# `make demo` and `make test` each create .venv, install the pinned dependencies and run.
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
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

configs: $(STAMP)  # configs/*.yaml are generated from presets.py (tests/test_config.py checks)
	$(BIN)/breastfusion config --write configs

clean:
	rm -rf $(VENV) runs .cache .pytest_cache
