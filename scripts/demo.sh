#!/usr/bin/env bash
# The demo: a throwaway cluster with azure_cdc preloaded, sample data (pgbench scale 10 plus a table of
# many types), a mirror into ./demo-mirror, the status, the files, and how to read them.
#   bash scripts/demo.sh          run it and stop the cluster at the end (DEMO_KEEP=1 keeps it running)
#   bash scripts/demo.sh stop     stop a kept demo cluster
set -euo pipefail
cd "$(dirname "$0")/.."
TOP=$PWD
RUN_AS=${AZURE_CDC_RUN_AS:-pgrxtest}
PORT=${DEMO_PORT:-55440}
DATA=$TOP/.run/demo-data
MIRROR=$TOP/demo-mirror
PGBIN=/usr/lib/postgresql/15/bin
psql_demo() { scripts/cluster.sh psql "$PORT" -d demo "$@"; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if [ "${1:-}" = stop ]; then scripts/cluster.sh stop "$DATA" fast; echo "demo cluster stopped"; exit 0; fi

scripts/cluster.sh stop "$DATA" fast 2>/dev/null || true
rm -rf "$DATA" "$MIRROR"
mkdir -p "$TOP/.run" "$MIRROR"
chown "$RUN_AS" "$MIRROR"
trap '[ "${DEMO_KEEP:-0}" = 1 ] || scripts/cluster.sh stop "$DATA" fast' EXIT

say "starting a throwaway PostgreSQL 15 on port $PORT (data in .run/demo-data, running as $RUN_AS)"
scripts/cluster.sh start "$DATA" "$PORT"
scripts/cluster.sh psql "$PORT" -d postgres -qc "CREATE DATABASE demo"

say "loading sample data: pgbench -i -s 10 (1 million accounts) and a table of many types"
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -i -s 10 -q demo 2>&1 | tail -1
psql_demo -q <<'SQL'
CREATE TABLE public.type_showcase (
    id int PRIMARY KEY, amount numeric(12,2), exact numeric, ratio float8, flag bool, label varchar(20),
    code char(4), payload bytea, day date, at_time time, created timestamp, updated timestamptz,
    ref uuid, doc jsonb, addr inet, tags text[], span interval);
INSERT INTO public.type_showcase VALUES
 (1, 1234.56, 3.14159265358979323846264338327950288419716939937510, 1.5, true, 'first', 'ab', '\xdeadbeef',
  '2024-02-29', '12:34:56.789', '2024-01-01 10:00', '2024-01-01 10:00+01', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '{"k": [1, 2, {"x": null}]}', '192.168.1.0/24', '{a,b,NULL}', '1 day 02:03:04'),
 (2, NULL, 'NaN', '-Infinity', NULL, NULL, NULL, NULL, 'infinity', NULL, '-infinity', NULL, NULL, NULL, NULL, NULL, NULL),
 (3, -0.01, 1e40, 'NaN', false, 'ünïcödé ☃', 'wxyz', '', '0044-03-15 BC', '23:59:59.999999', '1999-12-31 23:59:59.999999',
  '2038-01-19 03:14:08+00', '00000000-0000-0000-0000-000000000000', '[]', '::1', '{}', '-3 years');
SQL

say "CREATE EXTENSION azure_cdc and check the prerequisites"
psql_demo -qc "CREATE EXTENSION azure_cdc"
psql_demo -c "SELECT code, status FROM azure_cdc.check_prerequisites()"

say "SELECT azure_cdc.start_mirror('demo', 'file://$MIRROR')"
psql_demo -c "SELECT azure_cdc.start_mirror('demo', 'file://$MIRROR')"

say "waiting for the snapshot (rows_replicated grows live while a table is copied)"
for _ in $(seq 1 600); do
    state=$(psql_demo -Atc "SELECT state FROM azure_cdc.mirrors WHERE mirror_name = 'demo'")
    psql_demo -Atc "SELECT string_agg(table_name || ' ' || state || ' ' || rows_replicated, ', ' ORDER BY table_name) FROM azure_cdc.get_all_tables_mirror_status()"
    [ "$state" = Running ] && break
    sleep 0.5
done

say "status of every mirrored table"
psql_demo -c "SELECT mirror_name, schema_name, table_name, state, status, rows_replicated, files_published, last_completed_at FROM azure_cdc.get_all_tables_mirror_status()"
psql_demo -c "SELECT mirror_name, state, target, slot_name, consistent_lsn, snapshot_completed_at FROM azure_cdc.mirrors"

say "the landing zone in ./demo-mirror"
(cd "$MIRROR" && find . -type f -printf '%10s  %p\n' | sort -k2)
echo; echo "public.schema/pgbench_accounts/_metadata.json: $(cat "$MIRROR/public.schema/pgbench_accounts/_metadata.json")"

say "replaying the landing zone and comparing it with the source, cell by cell"
python3 - "$PORT" "$MIRROR" <<'PY'
import sys
sys.path.insert(0, "tests/e2e")
import psycopg
from replay import assert_mirror_equals_source
port, root = sys.argv[1], sys.argv[2]
with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="demo", autocommit=True) as c:
    for (s, t) in c.execute("SELECT schema_name, table_name FROM azure_cdc.get_all_tables_mirror_status() ORDER BY 2").fetchall():
        rep = assert_mirror_equals_source(c, root, s, t)
        print(f"  {s}.{t}: {len(rep.rows)} rows in {rep.files} file(s), equal to the source")
PY

say "making changes: 1000 pgbench transactions"
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -t 1000 -c 2 -n demo 2>&1 | grep -E "^(number of transactions actually|tps)" || true
psql_demo -c "SELECT slot_name, confirmed_flush_lsn, pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)) AS changes_held_in_slot FROM pg_replication_slots"
echo "The mirror's slot holds every change made after the snapshot's consistent point. Shipping them as"
echo "Parquet change files (__rowMarker__ rows) is the change-capture stage of azure_cdc, not in this build yet."

say "how to read the files"
cat <<TXT
  Every table folder is <schema>.schema/<table>/ with _metadata.json (key columns) and Parquet files
  numbered 00000000000000000001.parquet, 00000000000000000002.parquet, ... applied in order.
  With Python:
    python3 -c "import pyarrow.parquet as pq; print(pq.read_table('demo-mirror/public.schema/type_showcase'))"
  (dates and timestamps at +-infinity are stored as the extreme int32 / int64 values; see README)
  With DuckDB:  SELECT * FROM 'demo-mirror/public.schema/pgbench_accounts/*.parquet' LIMIT 5;
  Point Fabric Open Mirroring (or any lakehouse) at the folder to ingest it.
TXT
if [ "${DEMO_KEEP:-0}" = 1 ]; then
    echo; echo "The demo cluster keeps running: psql -h 127.0.0.1 -p $PORT -U postgres demo ; stop it with: make demo-stop"
else
    say "stopping the demo cluster (DEMO_KEEP=1 keeps it running)"
fi
