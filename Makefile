# benchharness — the two main commands are `make bench` and `make test`.
# Every target installs what it needs first; installing again is a no-op.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
BH := $(VENV)/bin/benchharness
CONFIG ?= configs/experiments/default.yaml
# The CPU build of torch that the reference run used; a GPU machine keeps whatever torch it has.
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.installed
# CMMLU is not in any registry: tests, CI and the suites run read it from ../shared/data beside the checkout.
ifneq ($(wildcard ../shared/data/cmmlu/test),)
export BENCHHARNESS_CMMLU_DIR ?= $(abspath ../shared/data/cmmlu)
endif

.PHONY: install bench report leaderboard test test-fast prepare models suites clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt requirements/packs.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# torch first, so that `pip install -e .` never pulls a multi-GB CUDA build on a CPU machine.
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA machine: installing the default torch build (bring your own to choose)"; \
		$(PIP) install -q torch; \
	else \
		$(PIP) install -q $(TORCH_CPU); \
	fi
	$(PIP) install -q -c requirements/constraints.txt -e '.[test]'
	$(PIP) install -q --no-deps --require-hashes -r requirements/packs.txt
	touch $(STAMP)

bench: install
	$(BH) run $(CONFIG)

report: install
	$(BH) report $(RUN)

# Every run folder under results/ into results/runs.sqlite, then the page over it.
leaderboard: install
	$(BH) index $(wildcard results/2*/)
	$(BH) leaderboard --store results/runs.sqlite

prepare: install
	$(BH) prepare all

models: install
	$(BH) models

suites: install
	$(BH) suites

test: install
	@# The HTML report test renders report.html in headless Chromium (Debian's package).
	sh scripts/install-chromium.sh
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not integration"

clean-venv:
	rm -rf $(VENV)
