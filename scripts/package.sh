#!/usr/bin/env bash
# Packages of azure_cdc, one per PostgreSQL version given by its pg_config:
#   target/<profile>/azure_cdc-pgNN/                        the `cargo pgrx package` tree
#   target/packages/postgresql-NN-azure-cdc_<v>_<arch>.deb   a Debian package in Debian's layout
#                                                            (/usr/lib/postgresql/NN/lib, /usr/share/postgresql/NN/extension)
# Usage: scripts/package.sh PG_CONFIG...      (PACKAGE_PROFILE=debug packages a debug build)
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${PACKAGE_PROFILE:-release}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
out=target/packages
mkdir -p "$out"

for pg_config in "$@"; do
    major=$("$pg_config" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
    args=(--pg-config "$pg_config" --no-default-features --features "pg$major")
    if [ "$profile" = debug ]; then args+=(--debug); fi
    cargo pgrx package "${args[@]}"
    tree="target/$profile/azure_cdc-pg$major"
    lib="$tree$("$pg_config" --pkglibdir)/azure_cdc.so"
    ext="$tree$("$pg_config" --sharedir)/extension"
    [ -f "$lib" ] && [ -f "$ext/azure_cdc.control" ] || { echo "package: $tree lacks the library or the control file" >&2; exit 1; }

    root=$(mktemp -d)
    install -D -m 0755 "$lib" "$root/usr/lib/postgresql/$major/lib/azure_cdc.so"
    install -d "$root/usr/share/postgresql/$major/extension"
    install -m 0644 "$ext"/azure_cdc.control "$ext"/azure_cdc--*.sql "$root/usr/share/postgresql/$major/extension/"
    install -D -m 0644 README.md "$root/usr/share/doc/postgresql-$major-azure-cdc/README.md"
    install -d "$root/DEBIAN"
    cat > "$root/DEBIAN/control" <<CONTROL
Package: postgresql-$major-azure-cdc
Version: $version
Architecture: $arch
Maintainer: azure_cdc developers <azure_cdc@localhost>
Depends: postgresql-$major, libc6
Section: database
Priority: optional
Homepage: https://localhost/azure_cdc
Description: continuous replication of PostgreSQL tables into a lakehouse landing zone
 azure_cdc keeps a read-only, continuously replicated copy of a database's tables in a
 lakehouse landing zone in Microsoft Fabric Open Mirroring's format (OneLake, Azure Blob /
 ADLS Gen2, S3, GCS or a local folder). Load it with shared_preload_libraries = 'azure_cdc'
 and wal_level = logical, then CREATE EXTENSION azure_cdc (see README.md).
CONTROL
    deb="$out/postgresql-$major-azure-cdc_${version}_$arch.deb"
    dpkg-deb --build --root-owner-group "$root" "$deb" >/dev/null
    rm -rf "$root"
    echo "package: $tree and $deb"
done
