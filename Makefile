# The two commands README promises: `make train` and `make test`. Each does all the set-up it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup data browser train test lint clean bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e ".[dev,cluster]"
	@touch $(STAMP)

# Fashion-MNIST from Debian's package when we are root with apt, then decompressed for torchvision.
data: $(STAMP)
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] \
	    && command -v apt-get >/dev/null; then \
	  echo "Installing Debian's dataset-fashion-mnist ..."; \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	    || (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null) \
	    || echo "apt-get could not install dataset-fashion-mnist; trying torchvision's download next."; \
	fi
	$(BIN)/python -m vaelab.data fashion_mnist

train: data
	$(BIN)/vaelab-train $(ARGS)

# Debian's chromium, for the test that opens report.html in a real headless browser (installed as the data set is)
browser:
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing Debian's chromium (for the report page's browser test) ..."; \
	  apt-get install -y -q chromium >/dev/null 2>&1 \
	    || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null) \
	    || echo "apt-get could not install chromium; the report page's browser test will say so."; \
	fi

test: data browser
	$(BIN)/python -m pytest $(ARGS)

# Speed figures (each script prints a table and writes outputs/benchmarks/<name>.json)
bench: data
	$(BIN)/python scripts/benchmarks/train_throughput.py
	$(BIN)/python scripts/benchmarks/eval_throughput.py
	$(BIN)/python scripts/benchmarks/data_throughput.py
	$(BIN)/python scripts/benchmarks/scaling.py
	$(BIN)/python scripts/benchmarks/sweep_throughput.py

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts

clean:
	rm -rf outputs/train outputs/multirun .pytest_cache
