# qmamba -- `make help` lists the targets.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU machines install torch from local wheels; on your own machine install the torch you want first.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: help install demo demo-data test test-fast lint bench-scan clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

install: ## install qmamba (editable) with its test and demo dependencies; torch first if missing
	@$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	$(PIP) install -q -e ".[test,demo]"

DEMO_RUN := runs/demo

demo: install demo-data ## install, build the demo datasets, train the demo model, test it on held-out content
	$(PYTHON) -m qmamba fit --config configs/demo.yaml
	$(PYTHON) -m qmamba test --config $(DEMO_RUN)/config.yaml --ckpt_path $(DEMO_RUN)/checkpoints/best.ckpt

demo-data: ## build the two embedded demo datasets under data/demo (skipped when present)
	$(PYTHON) -m qmamba demo-data --out data/demo

test: install ## install, then run the whole test suite (slow tests included)
	$(PYTHON) -m pytest

test-fast: ## run the tests not marked slow (no install)
	$(PYTHON) -m pytest -m "not slow"

lint: ## ruff over the sources, tests and benchmarks
	$(PYTHON) -m ruff check src tests benchmarks

bench-scan: ## selective-scan backends vs the sequential reference (CPU table)
	$(PYTHON) benchmarks/scan.py

clean: ## remove caches and build artefacts
	rm -rf .pytest_cache build src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
