# Two commands do all the set-up: `make bench` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.adahessian-installed
BENCH_ARGS ?=

.PHONY: setup test bench cuda-build test-frameworks gpu-check clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when the build inputs change (the compiled sources included).
$(STAMP): $(PY) setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
	$(PY) -m pip install --quiet --upgrade "setuptools>=64" wheel
	$(PY) -m pip install --quiet "$(TORCH)" ninja pybind11 pytest
	$(PY) -m pip install --quiet --no-build-isolation -e ".[bench,test]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m benchmarks.bench $(BENCH_ARGS)

# Compile the CUDA kernels without a GPU (CI runs this): a second venv with a CUDA build
# of torch, cached outside the clone and keyed by the torch version, then the bare
# `FORCE_CUDA=1 pip install --no-build-isolation --no-deps -e .` in a copy of the
# tracked sources (an in-place build would overwrite the CPU venv's extensions), then an
# import that proves every op has a CUDA kernel.
CUDA_TORCH ?= torch==2.14.1
CUDA_CACHE ?= $(HOME)/.cache/adahessian
CUDA_VENV := $(CUDA_CACHE)/venv-$(subst ==,-,$(CUDA_TORCH))
CUDA_SRC := $(CUDA_CACHE)/src-$(subst ==,-,$(CUDA_TORCH))

cuda-build:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install --quiet "$(CUDA_TORCH)" ninja "setuptools>=64" wheel
	rm -rf $(CUDA_SRC)/adahessian $(CUDA_SRC)/csrc && mkdir -p $(CUDA_SRC)
	git ls-files --cached --others --exclude-standard -z | tar --null --ignore-failed-read -cf - -T - | tar -xf - -C $(CUDA_SRC)
	cd $(CUDA_SRC) && FORCE_CUDA=1 $(CUDA_VENV)/bin/python -m pip install --quiet --no-build-isolation --no-deps -e .
	cd $(CUDA_SRC) && $(CUDA_VENV)/bin/python -c "from adahessian import _ops; \
	assert _ops._has_kernels('CUDA') and _ops._has_kernels('CPU'), 'CUDA kernels not registered'; \
	print('every adahessian op has a CUDA kernel:', ', '.join(_ops.OPS))"

# The framework integrations' tests (timm, Lightning, transformers + accelerate) against
# the real packages. timm imports torchvision, whose registry builds pair with torch
# 2.14.1 only, so they run in cuda-build's venv, from its copy of the sources: the
# compiled CPU kernels there are built against that torch (torch's CUDA build runs on a
# CPU). The frameworks are the `frameworks` extra of pyproject.toml (not added to .venv,
# whose torch 2.13 torchvision would replace); nothing downloads at run time. Also the
# packaging tests that build a wheel from the sdist in a clean venv (it compiles the CPU
# kernels) and run it in a venv that has only torch.
# cuda-build is a prerequisite because it copies today's sources to where this runs:
# `make cuda-build test-frameworks` does both once.
FRAMEWORKS_TORCHVISION ?= torchvision==0.29.1
CUDA_PY := $(CUDA_VENV)/bin/python

test-frameworks: cuda-build
	$(CUDA_PY) -m pip install --quiet "$(CUDA_TORCH)" "$(FRAMEWORKS_TORCHVISION)" pytest numpy build \
		$$($(CUDA_PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['frameworks']))")
	cd $(CUDA_SRC) && ADAHESSIAN_TEST_FRAMEWORKS=1 ADAHESSIAN_TEST_SDIST=1 HF_HUB_OFFLINE=1 \
		$(CUDA_PY) -m pytest -q tests/test_integrations_*.py tests/test_packaging.py

# On a machine with a GPU and torch preinstalled (no network): build in place, run the
# CUDA tests and the GPU benchmark, write OUT/results.json and OUT/table.md.
OUT ?= gpu-check-out
gpu-check:
	$(PYTHON) tools/gpu_check.py --out $(OUT)

clean:
	rm -rf build *.egg-info adahessian/*.so adahessian/_built_with.py
