# The README's two commands: `make report` (install, check data and weights, train both
# models, compare) and `make test` (install, run the offline test suite).
# DATA_DIR=... is passed to every script.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?=
DATA_FLAG := $(if $(DATA_DIR),--data_dir=$(DATA_DIR),)
LABEL := --data_label="CIFAR-10 (JPEG copy)"

.PHONY: install install-dev report results test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt

# Data and ImageNet weights are checked first: nothing trains if either is missing.
report: install
	$(BIN)/python data.py $(DATA_FLAG)
	$(BIN)/python transfer_mobilenetv2.py --dry_run $(DATA_FLAG)
	$(BIN)/python scratch_cnn.py $(DATA_FLAG)
	$(BIN)/python transfer_mobilenetv2.py $(DATA_FLAG)
	$(BIN)/python evaluate.py

# results/: the committed reference results (README, Results), remade from runs kept
# in runs/results/ (not committed). Many hours on a 2-core CPU; a rerun goes on where
# it stopped (finished runs are kept; --resume=last for the interrupted one).
R := runs/results
RUN = $(BIN)/python $(1) --out_dir=$(R) $(DATA_FLAG) $(2)
NEWEST = $$(ls -d $(R)/$(1)/*/ | sort | tail -1)
results: install
	$(call RUN,scratch_cnn.py,--seed=0)
	$(call RUN,scratch_cnn.py,--seed=1)
	$(call RUN,transfer_mobilenetv2.py,--seed=0)
	$(call RUN,transfer_mobilenetv2.py,--weights=none --seed=0)
	$(BIN)/python evaluate.py --out_dir=$(R) --runs=$$(ls -d $(R)/*/*/ | paste -sd, -) \
		--plots_dir=results $(LABEL)
	$(BIN)/python export.py --out_dir=$(R)

test: install-dev
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench.py

clean:
	rm -rf $(VENV) .pytest_cache
