# meterhub: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint bench system-deps clean

$(BIN)/meterhub: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

## Install, then run the embedded server with a simulated fleet (Ctrl-C to stop).
demo: $(BIN)/meterhub
	$(BIN)/meterhub demo

## Install everything (system packages too), lint, and run the whole test suite.
test: system-deps $(BIN)/meterhub
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/pytest -q

lint: $(BIN)/meterhub
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

system-deps:
	@scripts/system-deps.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
