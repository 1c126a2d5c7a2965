# azure_cdc — the two commands README.md gives, and their parts.
#   make demo   set up, build, install, run the demo (throwaway cluster, sample data, mirror to ./demo-mirror)
#   make test   set up, build and run every tier of tests (what CI runs)

PG_CONFIG      ?= /usr/lib/postgresql/15/bin/pg_config
RUN_AS         ?= pgrxtest
PGRX_TEST_DATA ?= /tmp/azure_cdc_pgrx_test_data
PYTHON         ?= python3
CARGO_PGRX      = cargo pgrx

.PHONY: setup install test test-unit test-pg test-e2e demo demo-stop bench-snapshot bench-changes bench-targets

setup:
	bash scripts/setup.sh
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r tests/requirements.txt

install: setup
	$(CARGO_PGRX) install --pg-config $(PG_CONFIG)

# Tier 1: pure logic, plain cargo test, no PostgreSQL.
test-unit:
	cargo test -p azure_cdc_core

# Tier 2: #[pg_test] inside pgrx's test cluster (azure_cdc preloaded, run as $(RUN_AS)).
test-pg:
	rm -rf $(PGRX_TEST_DATA)
	install -d -o $(RUN_AS) $(PGRX_TEST_DATA)
	$(CARGO_PGRX) test pg15 --runas $(RUN_AS) --pgdata $(PGRX_TEST_DATA)

# Tier 3: end to end against real clusters started by the tests (reinstalls the non-test build first).
test-e2e:
	$(CARGO_PGRX) install --pg-config $(PG_CONFIG)
	$(PYTHON) -m pytest -q tests/e2e

test: setup test-unit test-pg test-e2e

demo: install
	bash scripts/demo.sh

demo-stop:
	bash scripts/demo.sh stop

bench-snapshot: setup
	$(CARGO_PGRX) install --release --pg-config $(PG_CONFIG)
	bash scripts/bench_snapshot.sh

bench-changes: setup
	$(CARGO_PGRX) install --release --pg-config $(PG_CONFIG)
	$(PYTHON) scripts/bench_changes.py

bench-targets: setup
	$(CARGO_PGRX) install --release --pg-config $(PG_CONFIG)
	$(PYTHON) scripts/bench_targets.py
