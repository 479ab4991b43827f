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

.PHONY: install install-llamacpp bench report leaderboard test test-fast gpu-check prepare models suites clean-venv

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

# engine: llamacpp. llama-cpp-python is built from its registry source (a few minutes on 2 cores),
# portable x86-64 (AVX2/FMA/F16C, no AVX-512 or AMX: a -march=native build can die with SIGILL in a
# VM that lists instructions it does not run); set LLAMACPP_CMAKE_ARGS to build otherwise. The wheel
# is kept in the user cache, named by version and flags, so later installs reuse it.
LLAMACPP_VERSION ?= 0.3.36
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF -DGGML_AVX_VNNI=OFF
LLAMACPP_WHEELS ?= $(HOME)/.cache/benchharness/wheels/llama-cpp-python-$(LLAMACPP_VERSION)-$(shell printf '%s' "$(LLAMACPP_CMAKE_ARGS)" | sha256sum | cut -c1-12)

install-llamacpp: install
	@if $(PY) -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$(LLAMACPP_VERSION)')" 2>/dev/null; then \
		echo "llama-cpp-python $(LLAMACPP_VERSION) already installed"; \
	else \
		if ! ls $(LLAMACPP_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
			echo "building llama-cpp-python $(LLAMACPP_VERSION) from source (a few minutes)"; \
			mkdir -p $(LLAMACPP_WHEELS) && \
			CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(PIP) wheel -q --no-cache-dir --no-deps -w $(LLAMACPP_WHEELS) llama-cpp-python==$(LLAMACPP_VERSION); \
		fi; \
		$(PIP) install -q $(LLAMACPP_WHEELS)/llama_cpp_python-*.whl; \
	fi

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

test: install install-llamacpp
	@# The HTML report test renders report.html in headless Chromium (Debian's package).
	sh scripts/install-chromium.sh
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not integration"

# On a machine with a CUDA GPU: the three packs through benchharness (bf16), hf (bf16) and vllm
# on MMLU and GSM8K subsets; writes a parity and speed table under results/.
gpu-check: install
	$(PIP) install -q -e '.[vllm]'
	$(PY) benchmarks/gpu_check.py --output results

clean-venv:
	rm -rf $(VENV)
