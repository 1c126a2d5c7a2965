#!/usr/bin/env bash
# The demo: a throwaway cluster with azure_cdc preloaded, sample data (pgbench scale 10 plus a table of
# many types), a mirror into ./demo-mirror, the snapshot, then changes streamed as change files, the
# status, the files, and how to read them.
#   bash scripts/demo.sh          run it and stop the cluster at the end (DEMO_KEEP=1 keeps it running)
#   bash scripts/demo.sh stop     stop a kept demo cluster
set -euo pipefail
cd "$(dirname "$0")/.."
TOP=$PWD
RUN_AS=${AZURE_CDC_RUN_AS:-pgrxtest}
PORT=${DEMO_PORT:-55440}
DATA=$TOP/.run/demo-data
MIRROR=$TOP/demo-mirror
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
psql_demo() { scripts/cluster.sh psql "$PORT" -d demo "$@"; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# Waits until the slot is confirmed past the current WAL position: everything committed is published.
wait_published() {
    local upto
    upto=$(psql_demo -Atc "SELECT pg_current_wal_lsn()")
    for _ in $(seq 1 600); do
        [ "$(psql_demo -Atc "SELECT confirmed_flush_lsn >= '$upto' FROM pg_replication_slots WHERE slot_name = 'azure_cdc_demo'")" = t ] && return
        sleep 0.2
    done
}

compare() {
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
}

if [ "${1:-}" = stop ]; then scripts/cluster.sh stop "$DATA" fast; echo "demo cluster stopped"; exit 0; fi

scripts/cluster.sh stop "$DATA" fast 2>/dev/null || true
rm -rf "$DATA" "$MIRROR"
mkdir -p "$TOP/.run" "$MIRROR"
chown "$RUN_AS" "$MIRROR"
trap '[ "${DEMO_KEEP:-0}" = 1 ] || scripts/cluster.sh stop "$DATA" fast' EXIT

say "starting a throwaway PostgreSQL 15 on port $PORT (data in .run/demo-data, running as $RUN_AS)"
scripts/cluster.sh start "$DATA" "$PORT" "azure_cdc.change_batch_export_timeout = '1s'"
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
compare

say "making changes: 2000 pgbench transactions, and an update, a key change, a delete and an insert"
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -t 1000 -c 2 -n demo 2>&1 | grep -E "^(number of transactions actually|tps)" || true
psql_demo -q <<'SQL'
UPDATE public.type_showcase SET label = 'edited', doc = doc || '{"edited": true}' WHERE id = 1;
UPDATE public.type_showcase SET id = 30 WHERE id = 3;
DELETE FROM public.type_showcase WHERE id = 2;
INSERT INTO public.type_showcase (id, amount, label) VALUES (4, 99.99, 'new row');
SQL

say "waiting until every change is published (the slot is confirmed only past published changes)"
wait_published
psql_demo -c "SELECT mirror_name, state, confirmed_lsn, lag_bytes, lag_seconds, buffered_bytes, changes_published, last_published_at FROM azure_cdc.get_mirror_status()"
psql_demo -c "SELECT table_name, state, status, rows_replicated, files_published, last_completed_at FROM azure_cdc.get_all_tables_mirror_status()"

say "change files of public.type_showcase (the last column is __rowMarker__: 0 insert, 1 update, 2 delete)"
python3 - "$MIRROR" <<'PY'
import sys, glob
import pyarrow.parquet as pq
for f in sorted(glob.glob(sys.argv[1] + "/public.schema/type_showcase/0*.parquet"))[1:]:
    t = pq.read_table(f, columns=["id", "label", "__rowMarker__"])
    print(" ", f.rsplit("/", 1)[1], t.to_pylist())
PY

say "replaying the landing zone again and comparing it with the source"
compare

say "a column added with a default, and a TRUNCATE: only those two tables are copied again (Reseeding)"
psql_demo -q <<'SQL'
ALTER TABLE public.type_showcase ADD COLUMN note text DEFAULT 'added later';
UPDATE public.type_showcase SET label = 'after the new column' WHERE id = 1;
TRUNCATE public.pgbench_history;
INSERT INTO public.pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 5, now());
SQL
wait_published
psql_demo -c "SELECT table_name, event, detail FROM azure_cdc.events WHERE event LIKE 'Reseed%' ORDER BY event_id"
psql_demo -c "SELECT table_name, state, status, rows_replicated, files_published FROM azure_cdc.get_all_tables_mirror_status()"
compare

say "the mirror at a glance: list_mirrors(), get_health_status(), the events table, metrics()"
psql_demo -x -c "SELECT mirror_name, state, target, tables, tables_warning, confirmed_lsn, lag_bytes, wal_retained_bytes, wal_status, changes_per_second, bytes_per_second, changes_published, bytes_published FROM azure_cdc.list_mirrors()"
psql_demo -c "SELECT scope, object, status, code, message FROM azure_cdc.get_health_status()"
psql_demo -c "SELECT occurred_at, event, detail FROM azure_cdc.events ORDER BY event_id"
psql_demo -c "SELECT metric, value FROM azure_cdc.metrics() WHERE schema_name IS NULL"

say "verify_mirror(): the landing zone read back, replayed and compared with the source in one snapshot"
psql_demo -c "SELECT table_name, verdict, source_rows, mirror_rows, missing, extra, differing, files, detail FROM azure_cdc.verify_mirror('demo')"

say "how to read the files"
cat <<TXT
  Every table folder is <schema>.schema/<table>/ with _metadata.json (key columns) and Parquet files
  numbered 00000000000000000001.parquet, 00000000000000000002.parquet, ... applied in order: first the
  snapshot files (all inserts), then change files whose __rowMarker__ says insert, update or delete.
  With Python:
    python3 -c "import pyarrow.parquet as pq; print(pq.read_table('demo-mirror/public.schema/type_showcase/00000000000000000002.parquet'))"
  (dates and timestamps at +-infinity are stored as the extreme int32 / int64 values; see README)
  With DuckDB:  SELECT * FROM 'demo-mirror/public.schema/pgbench_accounts/00000000000000000001.parquet' LIMIT 5;
  To apply the change files in order the way a replicator does, see tests/e2e/replay.py.
  Point Fabric Open Mirroring (or any lakehouse) at the folder to ingest it.
TXT
if [ "${DEMO_KEEP:-0}" = 1 ]; then
    echo; echo "The demo cluster keeps running: psql -h 127.0.0.1 -p $PORT -U postgres demo ; stop it with: make demo-stop"
else
    say "stopping the demo cluster (DEMO_KEEP=1 keeps it running)"
fi
