# qmamba -- `make help` lists the targets.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU machines install torch from local wheels; on your own machine install the torch you want first.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# The tools' exact versions (made by `make lock`, Python 3.11 on Linux x86-64): the versions the suite passed with,
# and nothing for pip's resolver to search. CONSTRAINTS= installs from pyproject.toml's ranges instead.
CONSTRAINTS ?= requirements/constraints.txt
PIP_INSTALL := $(PIP) install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
export NO_ALBUMENTATIONS_UPDATE := 1
# Material for MkDocs prints a banner about its successor on every build
export NO_MKDOCS_2_WARNING := 1

.PHONY: help install lock lock-lowest demo demo-data test test-fast test-cache-clear lint docs docs-serve bench-scan bench-cpu benchmark compare transfer clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# pip compiles what it installs to bytecode one file at a time: half of a new environment's install (torch and the
# extras: 185 s with, 95 s without on two Zen 3 cores). Where torch was missing (a new environment), both steps install
# without compiling and compileall then compiles the environment on every core (63 s there) to the same files; its
# failures are the ones pip ignores too (modules written for a newer Python). An existing environment is left to pip:
# walking one that is already compiled takes compileall 20 s.
install: ## install qmamba (editable) with its test, demo, export and docs dependencies at the locked versions; torch first if missing
	@start=$$(date +%s); new_environment=; \
	if ! $(PYTHON) -c "import torch, torchvision" 2>/dev/null; then \
		new_environment=1; $(PIP) install --no-compile $(TORCH_SPEC) || exit 1; \
	fi; \
	echo "$(PIP_INSTALL) $${new_environment:+--no-compile }-e \".[test,demo,export,docs,timm]\""; \
	$(PIP_INSTALL) $${new_environment:+--no-compile} -e ".[test,demo,export,docs,timm]" || exit 1; \
	if [ -n "$$new_environment" ]; then \
		$(PYTHON) -m compileall -q -q -j 0 "$$($(PYTHON) -c "import sysconfig; print(sysconfig.get_path('purelib'))")"; \
	fi; \
	echo "make install: $$(( $$(date +%s) - start )) s"

lock: ## regenerate requirements/constraints.txt in a fresh environment (then make test before committing it)
	TORCH_SPEC="$(TORCH_SPEC)" $(PYTHON) requirements/lock.py

lock-lowest: ## regenerate requirements/lowest.txt, the lowest versions the ranges allow (test: make test CONSTRAINTS=requirements/lowest.txt)
	TORCH_SPEC="$(TORCH_SPEC)" $(PYTHON) requirements/lock.py --lowest

DEMO_RUN := runs/demo
# The demo's numbers depend on how the work is split across threads: a fixed count makes them repeat exactly on any
# machine with the same CPU instruction set (DEMO_THREADS= uses every core, and the numbers move slightly).
DEMO_THREADS ?= 2
DEMO_ENV := $(if $(DEMO_THREADS),OMP_NUM_THREADS=$(DEMO_THREADS))

demo: install demo-data ## install, build the demo datasets, train the demo model, test it on held-out content
	$(DEMO_ENV) $(PYTHON) -m qmamba fit --config configs/demo.yaml
	$(DEMO_ENV) $(PYTHON) -m qmamba test --config $(DEMO_RUN)/config.yaml --ckpt_path $(DEMO_RUN)/checkpoints/best.ckpt

demo-data: ## build the two embedded demo datasets under data/demo (skipped when present)
	$(PYTHON) -m qmamba demo-data --out data/demo

# pytest-xdist's workers: one per core (auto), or a number; 0 runs the suite in this process
TEST_WORKERS ?= auto

test: install ## install, then run the whole test suite (slow tests included) on every core
	$(PYTHON) -m pytest -n $(TEST_WORKERS)

test-fast: ## run the tests not marked slow (no install), on every core
	$(PYTHON) -m pytest -n $(TEST_WORKERS) -m "not slow"

# where tests/conftest.py keeps the compile and JIT caches and the tests' durations
TEST_CACHE := $(or $(QMAMBA_TEST_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/qmamba-tests)

test-cache-clear: ## remove the compile and JIT caches the tests keep outside the clone (the next run starts cold)
	rm -rf "$(TEST_CACHE)"

docs: ## build the documentation site into site/ (strict: a broken link, anchor or API reference is an error)
	$(PYTHON) -m mkdocs build --strict

docs-serve: ## preview the documentation site at http://127.0.0.1:8000, rebuilt as the pages change
	$(PYTHON) -m mkdocs serve --strict

lint: ## ruff over the sources, tests and benchmarks
	$(PYTHON) -m ruff check src tests benchmarks

# benchmark's defaults are the paper's protocol on LIVEC; compare's the demo (any name that config_of knows, or a file)
BENCHMARK_DATASET := $(or $(DATASET),livec)
COMPARE_DATASET := $(or $(DATASET),demo_kadid)
MODELS ?= qmamba_test timm:test_vit

benchmark: ## the paper protocol on one dataset: make benchmark DATASET=livec SPLITS=10 (or DATASET=my_ratings.yaml)
	$(PYTHON) -m qmamba benchmark $(call config_of,$(BENCHMARK_DATASET)) --splits $(or $(SPLITS),10) \
		--out runs/benchmark/$(call canonical,$(BENCHMARK_DATASET))

compare: install $(if $(findstring demo_,$(COMPARE_DATASET)),demo-data) ## backbones side by side: make compare [DATASET=demo_kadid SPLITS=1 MODELS="qmamba_test timm:test_vit"]
	$(PYTHON) -m qmamba compare $(call config_of,$(COMPARE_DATASET)) --models $(MODELS) --splits $(or $(SPLITS),1) \
		--out runs/compare/$(call canonical,$(COMPARE_DATASET))

# make transfer SRC=koniq DST=livec [METHODS=none,styleprompt | all]: train the source model if its checkpoint is
# missing, then adapt it to DST with each method and test. Names: a configs/task/<name>.yaml over configs/recipe.yaml
# (koniq and kadid are short for koniq10k and kadid10k) or a configs/demo/<name>.yaml over configs/demo.yaml
# (demo_kadid, demo_koniq: runs on a CPU). A .yaml file (your own ratings, data/README.md) is layered over RECIPE and
# named by its file name: make transfer SRC=demo_kadid DST=my_ratings.yaml RECIPE=configs/demo.yaml.
SRC ?= demo_kadid
DST ?= demo_koniq
METHODS ?= none,styleprompt
TRANSFER_RUNS := runs/transfer
RECIPE ?= configs/recipe.yaml
is_file = $(filter %.yaml %.yml,$(1))
canonical = $(if $(call is_file,$(1)),$(basename $(notdir $(1))),$(if $(filter koniq,$(1)),koniq10k,$(if \
	$(filter kadid,$(1)),kadid10k,$(1))))
# the --config layers of a dataset name: its data file over the recipe it belongs to
config_for = $(if $(wildcard configs/task/$(1).yaml),--config configs/recipe.yaml --config configs/task/$(1).yaml,$(if \
	$(wildcard configs/demo/$(1).yaml),--config configs/demo.yaml --config configs/demo/$(1).yaml,$(error no config \
	for '$(1)': expected configs/task/$(1).yaml or configs/demo/$(1).yaml)))
# the --config layers of a dataset name or of a config file of one's own
config_of = $(if $(call is_file,$(1)),$(if $(wildcard $(1)),--config $(RECIPE) --config $(1),$(error no config file \
	$(1))),$(call config_for,$(call canonical,$(1))))
SRC_NAME := $(call canonical,$(SRC))
DST_NAME := $(call canonical,$(DST))
SOURCE_CKPT := $(TRANSFER_RUNS)/source_$(SRC_NAME)/checkpoints/best.ckpt

$(TRANSFER_RUNS)/source_%/checkpoints/best.ckpt:
	$(PYTHON) -m qmamba fit $(call config_of,$(SRC)) --trainer.logger.init_args.save_dir $(TRANSFER_RUNS) \
		--trainer.logger.init_args.name source_$*

transfer: install $(if $(findstring demo_,$(SRC_NAME) $(DST_NAME)),demo-data) $(SOURCE_CKPT) ## adapt a trained model to another dataset: make transfer SRC=koniq DST=livec [METHODS=all]
	$(PYTHON) -m qmamba transfer --source $(SOURCE_CKPT) $(call config_of,$(DST)) --methods $(METHODS) \
		--src-name $(SRC_NAME) --dst-name $(DST_NAME) --out $(TRANSFER_RUNS)/$(SRC_NAME)_to_$(DST_NAME)

bench-scan: ## selective-scan backends vs the sequential reference (CPU table)
	$(PYTHON) benchmarks/scan.py

bench-cpu: ## QMamba-T / LQMamba-T (fused and torch scan) vs Swin-T and ConvNeXt-T on the CPU, and the scan op alone
	$(PIP_INSTALL) -e ".[benchmark]"
	$(PYTHON) benchmarks/cpu_models.py

clean: ## remove caches and build artefacts
	rm -rf .pytest_cache build src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
