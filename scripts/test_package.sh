#!/usr/bin/env bash
# Installs the PostgreSQL 15 Debian package on a machine state without the build tree's install,
# runs the demo from it, removes it, and puts the build tree's install back.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
major=$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
deb=$(ls target/packages/postgresql-"$major"-azure-cdc_*.deb | tail -1)
lib="$("$PG_CONFIG" --pkglibdir)/azure_cdc.so"
ext="$("$PG_CONFIG" --sharedir)/extension"

echo "test-package: removing the build tree's install ($lib, $ext/azure_cdc*)"
dpkg -s "postgresql-$major-azure-cdc" >/dev/null 2>&1 && dpkg -r "postgresql-$major-azure-cdc" >/dev/null
rm -f "$lib" "$ext"/azure_cdc.control "$ext"/azure_cdc--*.sql
echo "test-package: installing $deb"
dpkg -i "$deb" >/dev/null
dpkg -L "postgresql-$major-azure-cdc" | grep -q "^$lib$"
test -f "$ext/azure_cdc.control"
echo "test-package: the demo, from the package"
PGBIN=$("$PG_CONFIG" --bindir) bash scripts/demo.sh
dpkg -r "postgresql-$major-azure-cdc" >/dev/null
test ! -e "$lib"
echo "test-package: removed; putting the build tree's install back"
cargo pgrx install --pg-config "$PG_CONFIG" >/dev/null
echo "test-package: passed"
