# `make demo` / `make test` create the virtual environment when it is missing, build, and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.torchinductor_cache

.PHONY: demo test test-integration bench env build clean

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -r requirements-dev.txt torch==$(TORCH_VERSION)
	# nnunetv2 -> dynamic-network-architectures -> timm pulls PyPI's torchvision, a CUDA build that
	# cannot even be imported next to a CPU torch; nnU-Net's default UNet needs neither.
	$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip uninstall -q -y torchvision timm
	touch $@

env: $(VENV)/.deps

# LESIONCOUNT_CUDA_ON_CPU=ON also builds _C_cuda_cpu: the CUDA kernels on the CPU test runtime of
# tests/cuda_cpu, so that `make test` runs the CUDA tests without a GPU.
$(VENV)/.built: $(VENV)/.deps pyproject.toml CMakeLists.txt $(shell find csrc python tests/cuda_cpu -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.py' 2>/dev/null)
	LESIONCOUNT_CUDA_ON_CPU=ON $(PY) -m pip install -q --no-build-isolation -e .
	touch $@

build: $(VENV)/.built

demo: build
	$(VENV)/bin/lesioncount demo

# LESIONCOUNT_REQUIRE_CUDA_ON_CPU=1: the CUDA tests fail (not skip) if _C_cuda_cpu is missing.
test: build
	LESIONCOUNT_REQUIRE_CUDA_ON_CPU=1 $(PY) -m pytest -q tests

# nnU-Net v2 and MONAI integrations only (real nnU-Net planning + CPU training; MONAI losses/metrics/transforms)
test-integration: build
	$(PY) -m pytest -q -m integration tests

bench: build
	$(PY) -m pytest -q benchmarks/bench_label.py benchmarks/bench_count.py --benchmark-json=out/bench.json

clean:
	rm -rf build $(VENV) .pytest_cache .benchmarks .torchinductor_cache
