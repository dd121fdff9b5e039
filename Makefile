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
## The PostgreSQL pass reruns the storage-heavy suites on a fresh database each (METERHUB_TEST_PG).
PG_SUITES := tests/test_protocol_e2e.py tests/test_api.py tests/test_energy.py tests/test_alarms.py \
	tests/test_openhub.py tests/test_conformance.py tests/test_storage_writer.py tests/test_backpressure.py \
	tests/test_cluster_claims.py \
	tests/test_ownership.py tests/test_mqtt_flow.py tests/test_login_throttle.py tests/test_openhub_devices.py \
	tests/test_homeassistant.py tests/test_pm_api.py tests/test_prepaid.py tests/test_scoped_tokens.py \
	tests/test_alarm_rules.py tests/test_notify.py tests/test_drain.py tests/test_mqtt_proxy.py \
	tests/test_fleet_api.py tests/test_timeseries.py tests/test_stop_leaks.py

test: system-deps $(BIN)/meterhub
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	scripts/check-deploy.sh
	bench/smoke.sh
	@# Three processes: paho's select() loop cannot use descriptors above 1024, and one process
	@# running the whole suite (over 1,000 tests) accumulates more than that.
	$(BIN)/pytest -q tests/test_[a-l]*.py
	$(BIN)/pytest -q tests/test_[m-o]*.py
	$(BIN)/pytest -q tests/test_[p-z]*.py
	@if $(BIN)/python scripts/pg-available.py; then \
		METERHUB_TEST_DB=postgresql $(BIN)/pytest -q $(PG_SUITES); \
	else \
		echo "PostgreSQL is not reachable: the PostgreSQL pass was NOT run"; \
		test -z "$$CI"; \
	fi

lint: $(BIN)/meterhub
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

system-deps:
	@scripts/system-deps.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
