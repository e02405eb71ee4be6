# The README's two commands: `make report` (install, train both models, compare) and
# `make test` (install, run the offline test suite). DATA_DIR=... is passed through.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?=
DATA_FLAG := $(if $(DATA_DIR),--data_dir=$(DATA_DIR),)

.PHONY: install install-dev report test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt

report: install
	$(BIN)/python data.py $(DATA_FLAG)
	$(BIN)/python scratch_cnn.py $(DATA_FLAG)
	$(BIN)/python transfer_mobilenetv2.py $(DATA_FLAG)
	$(BIN)/python evaluate.py

test: install-dev
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench.py

clean:
	rm -rf $(VENV) .pytest_cache
