# dpo_kernels — `make demo` and `make test` work on a fresh machine by themselves.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Extras installed with the package; CI adds trl so the TRL drop-in tests run.
EXTRAS ?= dev
PYTEST_ARGS ?=
comma := ,
STAMP := build/.installed-$(subst $(comma),_,$(EXTRAS))
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
# What --no-build-isolation takes from the environment besides torch.
BUILD_TOOLS := "setuptools>=70" wheel ninja pybind11
# Where `make wheel` and `make sdist` write.
DIST ?= dist

.PHONY: install test demo bench gpu-check gpu-wheels wheel sdist lint clean

install: $(STAMP)

# Idempotent: torch is installed only when none is importable (the CPU wheel on a CPU machine), the build tools
# that --no-build-isolation takes from the environment next, then the package with its C++ extension.
$(STAMP): $(SOURCES)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -q $(BUILD_TOOLS)
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

# The wheels that benchmarks/gpu_check.sh installs on the GPU machine, which reaches no registry: the peers and what
# they need beyond the GPU image, pinned in dpo_kernels/bench/peers.py (read as a file: it needs only the standard
# library). Without their own needs (--no-deps), so that the set stays one version of each and small: the working tree
# that travels to the machine, these wheels included, is limited to 64 MiB.
GPU_WHEELS = $(shell $(PYTHON) dpo_kernels/bench/peers.py --wheels)
GPU_WHEEL_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64
GPU_WHEELS_MAX_BYTES := 62914560

gpu-wheels:
	@test -n "$(GPU_WHEELS)" || { echo "$(PYTHON) dpo_kernels/bench/peers.py --wheels listed no wheels"; exit 1; }
	@mkdir -p .whl && rm -f .whl/*.whl
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(addprefix --platform ,$(GPU_WHEEL_PLATFORMS)) -d .whl $(GPU_WHEELS)
	@ls -l .whl/*.whl | awk '{ printf "%12d  %s\n", $$5, $$9; total += $$5 } \
		END { printf "%12d  total (%.2f MiB) in %d wheels; carry .whl\n", total, total / 1048576, NR; \
		      if (total > $(GPU_WHEELS_MAX_BYTES)) { print "over 60 MiB: the working tree would not travel"; exit 1 } }'

# A wheel of the package with dpo_kernels._C: the CPU kernels always, and the CUDA kernels for TORCH_CUDA_ARCH_LIST
# when torch has CUDA and nvcc is found (setup.py). It is built against the installed torch, in the checkout: a
# second build, or one after `make install`, reuses the compiled objects in build/ and recompiles only what changed.
wheel:
	@$(PIP) install -q $(BUILD_TOOLS)
	$(PIP) wheel --no-build-isolation --no-deps -w $(DIST) .

# The source distribution: `pip install --no-build-isolation dpo_kernels-<version>.tar.gz` builds it against the
# installed torch (MANIFEST.in brings csrc/ whole, the CUDA sources included).
sdist:
	@$(PIP) install -q $(BUILD_TOOLS)
	$(PYTHON) -c "from setuptools import build_meta; print('$(DIST)/' + build_meta.build_sdist('$(DIST)'))"

lint:
	$(PYTHON) -m ruff check dpo_kernels tests benchmarks python

clean:
	rm -rf build dist *.egg-info dpo_kernels/*.so .pytest_cache .benchmarks
