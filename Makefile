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

# results/: the committed reference results (README, Results). Runs go to runs/ (not
# committed). Hours on a 2-core CPU: report.md compares the two full-data runs (the
# newest finished run of each script); the study adds the little-data runs.
STUDY := $(BIN)/python study.py scratch_cnn.py transfer_mobilenetv2.py \
	--sweep=train_images:1000,2500 --seeds=0,1 --study=data_efficiency --weights=none \
	--fine_tune_epochs=5 --plots_dir=results --data_label="CIFAR-10 (JPEG copy)" $(DATA_FLAG)
results: install
	$(BIN)/python scratch_cnn.py $(DATA_FLAG)
	$(BIN)/python transfer_mobilenetv2.py --weights=none $(DATA_FLAG)
	$(BIN)/python export.py
	cp $$(ls -td runs/scratch_cnn/*/ | head -1)export/export.md results/export_scratch_cnn.md
	cp $$(ls -td runs/transfer_mobilenetv2/*/ | head -1)export/export.md \
		results/export_transfer_mobilenetv2.md
	$(STUDY)
	$(BIN)/python evaluate.py --plots_dir=results --data_label="CIFAR-10 (JPEG copy)"

test: install-dev
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench.py

clean:
	rm -rf $(VENV) .pytest_cache
