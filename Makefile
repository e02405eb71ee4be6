# The README's two commands: `make report` (install, check data and weights, train both
# models, compare) and `make test` (install, run the offline test suite).
# DATA_DIR=... is passed to every script.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?=
DATA_FLAG := $(if $(DATA_DIR),--data_dir=$(DATA_DIR),)
LABEL := --data_label="CIFAR-10 (JPEG copy)"

.PHONY: install install-dev report results study test bench clean

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

# results/: the committed reference results (README, Results), remade from the runs in
# runs/results/ (not committed): the same scripts, settings and seeds. Many hours on a
# 2-core CPU. Each finished run leaves a stamp; after an interruption, `make results`
# resumes the interrupted run and skips the finished ones.
R := runs/results
RESULTS := scratch transfer transfer_035 random_035
scratch := scratch_cnn.py --seed=0
transfer := transfer_mobilenetv2.py --seed=0
transfer_035 := transfer_mobilenetv2.py --alpha=0.35 --seed=0
random_035 := transfer_mobilenetv2.py --alpha=0.35 --weights=none --seed=0
EXPORTED := scratch transfer_035  # the two a phone would run, as TensorFlow Lite
# The four runs again with each of SEEDS: results/seeds.{md,csv}, every seed's
# evaluation and each model's mean and 95% interval. SEEDS= skips them.
SEEDS ?= 1 2
SEEDED := $(RESULTS)
$(foreach s,$(SEEDS),$(foreach r,$(SEEDED),$(eval $(r)_s$(s) := $(subst --seed=0,--seed=$(s),$($(r))))))
SEED_RUNS := $(SEEDED) $(foreach s,$(SEEDS),$(SEEDED:%=%_s$(s)))
runs = $$(for r in $(1); do ls -d $(R)/$$r/*/*/; done | paste -sd, -)

$(R)/%.done:
	if [ -d $(R)/$* ]; then $(BIN)/python $(word 1,$($*)) --out_dir=$(R)/$* --resume=last; \
	else $(BIN)/python $($*) --out_dir=$(R)/$* $(DATA_FLAG); fi
	touch $@

results: install $(RESULTS:%=$(R)/%.done) $(if $(SEEDS),$(SEED_RUNS:%=$(R)/%.done))
	$(BIN)/python evaluate.py --runs=$(call runs,$(RESULTS)) --plots_dir=results $(LABEL)
	for r in $(EXPORTED); do run=$$(ls -d $(R)/$$r/*/*/ | tail -1); \
		$(BIN)/python export.py --run=$$run && cp $$run/export/export.md results/export_$$r.md; \
	done
	$(if $(SEEDS),$(BIN)/python evaluate.py --runs=$(call runs,$(SEED_RUNS)) \
		--plots_dir=$(R)/seeds $(LABEL) && for f in md csv; do \
		cp $(R)/seeds/comparison.$$f results/seeds.$$f; done)

# results/study_<STUDY>.*: a study's figure, table and CSV, its points in runs/study/
# (days on a 2-core CPU; rerun to resume; points other processes finished count too).
STUDY ?= data_efficiency
study: install
	$(BIN)/python study.py $(STUDY) $(DATA_FLAG) --plots_dir=results $(LABEL)

test: install-dev
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench.py

clean:
	rm -rf $(VENV) .pytest_cache
