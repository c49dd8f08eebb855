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

.PHONY: demo test test-integration bench env build clean wheel wheel-test

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

# ---- One wheel for every torch >= 2.10 (the LibTorch stable ABI; docs/BUILDING.md) ----
# `make wheel` builds dist/lesioncount-<version>-py3-none-linux_x86_64.whl with the CPU kernels (_C) and
# the CUDA kernels (_C_cuda; sm_80 and sm_90 machine code, compute_90 PTX that newer GPUs compile at
# load), in .venv-wheel-build with a CUDA build of torch (its libtorch_cuda is linked by soname) and
# nvcc from CUDA_HOME (/usr/local/cuda). It also builds dist/test/_C_cuda_cpu.so, the CUDA kernels on the
# CPU test runtime (not in the wheel), so that `make wheel-test` can run the CUDA tests without a GPU.
WHEEL_VENV ?= .venv-wheel-build
WHEEL_PY := $(WHEEL_VENV)/bin/python
WHEEL_TORCH ?= torch==2.14.1
CUDA_ARCHITECTURES ?= 80-real;90-real;90-virtual
DIST ?= dist

$(WHEEL_VENV)/.deps:
	test -x $(WHEEL_PY) || $(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_PY) -m pip install -q --no-compile $(WHEEL_TORCH) 'scikit-build-core>=0.10' ninja
	touch $@

wheel: $(WHEEL_VENV)/.deps
	rm -f $(DIST)/lesioncount-*.whl
	LESIONCOUNT_CUDA=ON LESIONCOUNT_CUDA_ON_CPU=OFF $(WHEEL_PY) -m pip wheel --no-build-isolation --no-deps -w $(DIST) \
	    -Cbuild-dir=build/wheel -Ccmake.define.CMAKE_CUDA_ARCHITECTURES='$(CUDA_ARCHITECTURES)' .
	cmake -S . -B build/wheel-cuda-on-cpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$(abspath $(WHEEL_PY)) \
	    -DLESIONCOUNT_CUDA=OFF -DLESIONCOUNT_CUDA_ON_CPU=ON -DCMAKE_INSTALL_PREFIX=$(abspath build/wheel-cuda-on-cpu/install)
	cmake --build build/wheel-cuda-on-cpu
	cmake --install build/wheel-cuda-on-cpu
	mkdir -p $(DIST)/test && cp build/wheel-cuda-on-cpu/install/lesioncount/_C_cuda_cpu.so $(DIST)/test/
	@ls -l $(DIST)/lesioncount-*.whl $(DIST)/test/_C_cuda_cpu.so

# `make wheel-test`: the same wheel file installed into fresh venvs, by default torch 2.13.0 (CPU) and
# torch 2.14.1 (a CUDA build, which runs on the CPU here), each running the op tests, the CUDA tests on
# the CPU test runtime (the same dist/test/_C_cuda_cpu.so) and tests/test_stable_abi.py.
# `make wheel-test WHEEL_TEST_TORCHES="2.10 2.13 2.14"` adds the stable-ABI floor, torch 2.10.0 (PyPI's
# build for CUDA 12.8, 7 GB: the CPU kernels load, the CUDA 13 kernels are refused with the reason).
WHEEL_TEST_DEPS := numpy scipy pytest hypothesis expecttest
WHEEL_TESTS := tests/test_stable_abi.py tests/test_label.py tests/test_region_max.py tests/test_region_topk.py \
    tests/test_poisson_binomial.py tests/test_count_distribution.py tests/test_autodiff.py tests/test_bad_input.py \
    tests/test_cuda_ops.py tests/test_cuda_label.py tests/test_cuda_cpu_runtime.py

WHEEL_TEST_TORCHES ?= 2.13 2.14
TORCH_RELEASE_2.10 := torch==2.10.0
TORCH_RELEASE_2.13 := torch==2.13.0
TORCH_RELEASE_2.14 := torch==2.14.1

.venv-wheel-torch%/.deps:
	test -x .venv-wheel-torch$*/bin/python || $(PYTHON) -m venv .venv-wheel-torch$*
	.venv-wheel-torch$*/bin/python -m pip install -q --no-compile $(TORCH_RELEASE_$*) $(WHEEL_TEST_DEPS)
	touch $@

wheel-test: $(foreach v,$(WHEEL_TEST_TORCHES),.venv-wheel-torch$(v)/.deps)
	@test -f $(DIST)/test/_C_cuda_cpu.so && ls $(DIST)/lesioncount-*.whl >/dev/null || { echo "run make wheel first"; exit 1; }
	set -e; for venv in $(foreach v,$(WHEEL_TEST_TORCHES),.venv-wheel-torch$(v)); do \
	  echo "== $$venv: installing $$(ls $(DIST)/lesioncount-*.whl)"; \
	  $$venv/bin/python -m pip install -q --force-reinstall --no-deps $(DIST)/lesioncount-*.whl; \
	  $$venv/bin/python -c "import lesioncount, torch; print('torch', torch.__version__, lesioncount.build_info())"; \
	  LESIONCOUNT_REQUIRE_CUDA_ON_CPU=1 LESIONCOUNT_CUDA_ON_CPU_LIBRARY=$(abspath $(DIST)/test/_C_cuda_cpu.so) \
	    $$venv/bin/python -m pytest -q -p no:cacheprovider $(WHEEL_TESTS); \
	done

bench: build
	$(PY) -m pytest -q benchmarks/bench_label.py benchmarks/bench_count.py --benchmark-json=out/bench.json

clean:
	rm -rf build dist $(VENV) $(DEMO_VENV) $(INTEGRATION_VENV) $(WHEEL_VENV) .venv-wheel-torch* \
	    .pytest_cache .benchmarks .torchinductor_cache
