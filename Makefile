# The README's two commands: `make report` (install, train both models, compare) and
# `make test` (install, run the offline test suite). DATA_DIR=... is passed through.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?=
DATA_FLAG := $(if $(DATA_DIR),--data_dir=$(DATA_DIR),)

.PHONY: install install-dev report results test bench clean

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

# results/: the committed reference report. Runs go to runs/results/ (not committed);
# the study's runs to runs/study/. Hours on a 2-core CPU: see README, Results.
RESULTS_RUNS := runs/results
results: install
	$(BIN)/python scratch_cnn.py $(DATA_FLAG) --out_dir=$(RESULTS_RUNS)
	$(BIN)/python scratch_cnn.py $(DATA_FLAG) --out_dir=$(RESULTS_RUNS)/subset --train_images=5000
	$(BIN)/python transfer_mobilenetv2.py $(DATA_FLAG) --out_dir=$(RESULTS_RUNS)/subset \
		--weights=none --train_images=5000 --fine_tune_epochs=5
	$(BIN)/python evaluate.py --out_dir=$(RESULTS_RUNS)/subset --plots_dir=results \
		--data_label="CIFAR-10 (JPEG copy)"

test: install-dev
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench.py

clean:
	rm -rf $(VENV) .pytest_cache
