# One command sets up the environment on first use and runs the job: `make demo`; the tests: `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)  ## create .venv and install the package with its pinned dependencies

demo: $(STAMP)  ## run the whole DAG on the built-in demo (toy world, small models, CPU)
	$(BIN)/python -m pipeline.run conf=demo $(ARGS)

test: $(STAMP)  ## the whole test suite (what CI runs)
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: $(STAMP)  ## skip the slow end-to-end tests (Ray cluster, training)
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check pipeline stages tests scripts

bench: $(STAMP)  ## benchmarks; results go to BENCHMARKS.md by hand
	$(BIN)/python scripts/bench_wordgrid.py

clean:
	rm -rf outputs .pytest_cache
