# Two commands do all the set-up: `make bench` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.adahessian-installed
BENCH_ARGS ?=

.PHONY: setup test bench clean

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
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info adahessian/*.so
