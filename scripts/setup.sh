#!/usr/bin/env bash
# Idempotent set-up from nothing: apt packages, cargo-pgrx (pinned), `cargo pgrx init` against the
# system PostgreSQL 15, and the unprivileged OS user that test and demo clusters run as.
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

if ! grep -qs "pg15" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    cargo pgrx init --pg15="$PG_CONFIG"
fi

if ! id "$RUN_AS" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash "$RUN_AS"
fi
# Azurite, the Azure Blob Storage emulator the object-store tests run against (on 127.0.0.1 only).
if ! command -v azurite-blob >/dev/null 2>&1; then
    echo "setup: installing azurite"
    npm install -g --no-fund --no-audit azurite
fi

echo "setup: ready (cargo-pgrx $PGRX_VERSION, $("$PG_CONFIG" --version), run-as user $RUN_AS)"
