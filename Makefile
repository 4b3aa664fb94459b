# `make demo` and `make test` each create .venv, install the pinned dependencies and run.
# The suite runs one pytest worker per core (pytest-xdist, a test file per worker), each
# worker's torch on one thread, so the cores are used without oversubscribing them.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint configs clean

# pip would byte-compile every module of every wheel (about 45 s, most of it torch modules
# nothing here imports); instead Python writes the .pyc of what is imported, on first import.
# That needs bytecode writing on, so the recipes clear PYTHONDONTWRITEBYTECODE; without it,
# every process would compile torch's imported modules again (about 10 s each).
export PYTHONDONTWRITEBYTECODE :=

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile -e ".[dev]"
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
