# `make demo` creates its own small virtual environment .venv-demo (torch CPU, numpy, matplotlib and the
# build tools only), builds the library non-editable into it (build dir build/demo-*) and runs the demo.
# `make test` creates .venv with everything the tests need, builds (editable) and runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
DEMO_VENV ?= .venv-demo
DEMO_PY := $(DEMO_VENV)/bin/python
SOURCES := $(shell find csrc python tests/cuda_cpu -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.py' 2>/dev/null)
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
$(VENV)/.built: $(VENV)/.deps pyproject.toml CMakeLists.txt $(SOURCES)
	LESIONCOUNT_CUDA_ON_CPU=ON $(PY) -m pip install -q --no-build-isolation -e .
	touch $@

build: $(VENV)/.built

# The demo needs torch and numpy (matplotlib for its figure); nnU-Net, MONAI and the test tools stay out.
# No pip upgrade (the venv's own pip suffices) and no .pyc precompilation of torch's thousands of
# modules (Python compiles the few it imports); pip without -q, so that each step shows what it does.
$(DEMO_VENV)/.deps:
	@echo "== make demo [1/3]: virtual environment $(DEMO_VENV) with torch $(TORCH_VERSION) (CPU), numpy, matplotlib, scikit-build-core, ninja, cmake"
	test -x $(DEMO_PY) || $(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_PY) -m pip install --no-compile --progress-bar on torch==$(TORCH_VERSION) numpy matplotlib 'scikit-build-core>=0.10' ninja cmake
	touch $@

# Non-editable, in its own build folder (the editable .venv build uses build/{wheel_tag}); ninja's
# [n/N] lines show the compile's progress.
$(DEMO_VENV)/.built: $(DEMO_VENV)/.deps pyproject.toml CMakeLists.txt $(SOURCES)
	@echo "== make demo [2/3]: compiling the C++ ops into $(DEMO_VENV) (build/demo-*; about a minute on 2 cores)"
	@mkdir -p build
	set -o pipefail; $(DEMO_PY) -m pip install -v --no-deps --no-build-isolation \
	    --config-settings=build-dir='build/demo-{wheel_tag}' . 2>&1 | tee build/demo-install.log \
	  | grep --line-buffered -E '^ *\[[0-9]+/[0-9]+\]|^Successfully installed' \
	  || { tail -n 40 build/demo-install.log; echo "make demo: the build failed; full log: build/demo-install.log"; exit 1; }
	touch $@

demo: $(DEMO_VENV)/.built
	@echo "== make demo [3/3]: lesioncount demo"
	$(DEMO_VENV)/bin/lesioncount demo --figure out/demo.png

# LESIONCOUNT_REQUIRE_CUDA_ON_CPU=1: the CUDA tests fail (not skip) if _C_cuda_cpu is missing.
test: build
	LESIONCOUNT_REQUIRE_CUDA_ON_CPU=1 $(PY) -m pytest -q tests

# The integration environment .venv-integration: nnU-Net's own commands (nnUNetv2_train/_predict -tr
# nnUNetTrainerCount search nnU-Net's trainer package, which imports timm -> torchvision), lesioncount
# evaluate (torchmetrics -> torchvision) and MONAI need a torchvision that matches torch. PyPI's
# torchvision is a CUDA build, which cannot import beside the CPU torch of .venv; here a CUDA torch with
# its torchvision (they run on the CPU), installed as the README says, lesioncount built editable against
# it with LESIONCOUNT_CUDA=OFF (the CPU kernels; nvcc for the CUDA kernels took > 25 min on 2 cores) in its
# own build folder. About 5 minutes and 5.5 GB.
INTEGRATION_VENV ?= .venv-integration
INTEGRATION_PY := $(INTEGRATION_VENV)/bin/python
INTEGRATION_TORCH ?= torch==2.14.1 torchvision==0.29.1

$(INTEGRATION_VENV)/.deps: requirements-integration.txt
	@echo "== $(INTEGRATION_VENV): $(INTEGRATION_TORCH), then nnunetv2, monai, timm and the test tools"
	test -x $(INTEGRATION_PY) || $(PYTHON) -m venv $(INTEGRATION_VENV)
	$(INTEGRATION_PY) -m pip install -q --no-compile $(INTEGRATION_TORCH)
	$(INTEGRATION_PY) -m pip install -q -r requirements-integration.txt $(INTEGRATION_TORCH)
	$(INTEGRATION_PY) -c "import torchvision.ops, timm, nnunetv2, monai"
	touch $@

$(INTEGRATION_VENV)/.built: $(INTEGRATION_VENV)/.deps pyproject.toml CMakeLists.txt $(SOURCES)
	@echo "== $(INTEGRATION_VENV): building lesioncount (CPU kernels) with its extras [nnunet,monai]"
	LESIONCOUNT_CUDA=OFF $(INTEGRATION_PY) -m pip install -q --no-build-isolation \
	    --config-settings=build-dir=build/integration -e '.[nnunet,monai]' $(INTEGRATION_TORCH)
	touch $@

# nnU-Net v2 and MONAI integrations only, in .venv-integration: nnU-Net's planning, nnUNetv2_train and
# nnUNetv2_predict -tr nnUNetTrainerCount, lesioncount nnunet-train/-predict/count/evaluate, MONAI.
# LESIONCOUNT_REQUIRE_NNUNET_COMMANDS=1: the tests of nnU-Net's own commands fail (not skip) where they cannot run.
test-integration: $(INTEGRATION_VENV)/.built
	LESIONCOUNT_REQUIRE_NNUNET_COMMANDS=1 $(INTEGRATION_PY) -m pytest -q -m integration tests

bench: build
	$(PY) -m pytest -q benchmarks/bench_label.py benchmarks/bench_count.py --benchmark-json=out/bench.json

clean:
	rm -rf build $(VENV) $(DEMO_VENV) $(INTEGRATION_VENV) .pytest_cache .benchmarks .torchinductor_cache
