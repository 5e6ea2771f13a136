# dpo_kernels — `make demo` and `make test` work on a fresh machine by themselves.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Extras installed with the package; CI adds trl so the TRL drop-in tests run.
EXTRAS ?= dev
PYTEST_ARGS ?=
STAMP := build/.installed-$(subst $(comma),_,$(EXTRAS))
comma := ,
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: install test demo bench gpu-check lint clean

install: $(STAMP)

# Idempotent: torch is installed only when none is importable (the CPU wheel on a CPU machine), the build tools
# that --no-build-isolation takes from the environment next, then the package with its C++ extension.
$(STAMP): $(SOURCES)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -q "setuptools>=70" wheel ninja pybind11
	$(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]"
	@mkdir -p build && touch $@

test: install
	$(PYTHON) -m pytest tests -q --durations=15 $(PYTEST_ARGS)

demo: install
	$(PYTHON) python/demo/run_demo.py

bench: install
	$(PYTHON) -m pytest benchmarks -q -o python_files='bench_*.py' --benchmark-only --benchmark-columns=median,min,max,rounds --benchmark-sort=name

gpu-check: install
	bash benchmarks/gpu_check.sh

lint:
	$(PYTHON) -m ruff check dpo_kernels tests benchmarks python

clean:
	rm -rf build dist *.egg-info dpo_kernels/*.so .pytest_cache .benchmarks
