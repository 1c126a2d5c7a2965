#!/usr/bin/env bash
# Throwaway PostgreSQL clusters with azure_cdc preloaded, run as the unprivileged user.
# Usage: scripts/cluster.sh start DIR PORT [extra postgresql.conf lines...]
#        scripts/cluster.sh stop DIR [fast|immediate|smart]
#        scripts/cluster.sh psql PORT [psql args...]
set -euo pipefail

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
TOP=$(cd "$(dirname "$0")/.." && pwd)
RUN_AS=${AZURE_CDC_RUN_AS:-pgrxtest}

as_user() {
    if [ "$(id -un)" = "$RUN_AS" ]; then "$@"; else sudo -u "$RUN_AS" -H -- "$@"; fi
}

cmd=${1:?command}; shift
case "$cmd" in
start)
    dir=${1:?data directory}; port=${2:?port}; shift 2
    if [ ! -s "$dir/PG_VERSION" ]; then
        mkdir -p "$dir"
        chown "$RUN_AS" "$dir"
        as_user "$PGBIN/initdb" -D "$dir" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null
        known=$(as_user "$PGBIN/postgres" --describe-config 2>/dev/null | cut -f1)
        {
            echo "port = $port"
            echo "listen_addresses = '127.0.0.1'"
            echo "unix_socket_directories = '/tmp'"
            echo "logging_collector = off"
            # The settings every test cluster starts with (pg_test_config), then the caller's.
            while IFS= read -r line; do
                case "$line" in
                    ''|'#'*) ;;
                    '? '*) line=${line#? }
                           if printf '%s\n' "$known" | grep -qx "${line%%[ =]*}"; then echo "$line"; fi ;;
                    *) echo "$line" ;;
                esac
            done < "$TOP/pg_test_config"
            for line in "$@"; do echo "$line"; done
        } | as_user tee -a "$dir/postgresql.conf" >/dev/null
    fi
    as_user "$PGBIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start >/dev/null
    ;;
stop)
    dir=${1:?data directory}; mode=${2:-fast}
    if [ -f "$dir/postmaster.pid" ]; then
        as_user "$PGBIN/pg_ctl" -D "$dir" -m "$mode" -w -t 60 stop >/dev/null || true
    fi
    ;;
psql)
    port=${1:?port}; shift
    "$PGBIN/psql" -h 127.0.0.1 -p "$port" -U postgres -v ON_ERROR_STOP=1 -X "$@"
    ;;
*)
    echo "unknown command $cmd" >&2; exit 2;;
esac
