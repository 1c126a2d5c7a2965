#!/usr/bin/env bash
# Snapshot benchmark: prints figures, asserts nothing.
# pgbench -i -s $SCALE, then in the same run on the same server: COPY pgbench_accounts TO '/dev/null'
# (FORMAT binary) — the physical limit of reading the table — and a mirror of pgbench_accounts into a
# local folder with max_snapshot_workers 1, 2 and 3 (the table's block ranges shared between them).
# Reports wall time, rows/s, MB/s, the snapshot worker's peak memory and the ratio to COPY; then the
# same rows as four tables with 1 and 3 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
TOP=$PWD
SCALE=${SCALE:-100}
PORT=${BENCH_PORT:-55441}
RUN_AS=${AZURE_CDC_RUN_AS:-pgrxtest}
BASE=${BENCH_DIR:-/tmp/azure_cdc_bench}
DATA=$BASE/data
OUT=$BASE/mirror
PGBIN=/usr/lib/postgresql/15/bin
q() { scripts/cluster.sh psql "$PORT" -d bench -Atq "$@"; }

scripts/cluster.sh stop "$DATA" fast 2>/dev/null || true
rm -rf "$BASE"; mkdir -p "$BASE" "$OUT"; chown "$RUN_AS" "$BASE" "$OUT"
trap 'scripts/cluster.sh stop "$DATA" fast' EXIT
scripts/cluster.sh start "$DATA" "$PORT" "shared_buffers = 2GB" "max_wal_size = 8GB" "checkpoint_timeout = 30min"
scripts/cluster.sh psql "$PORT" -d postgres -qc "CREATE DATABASE bench"
echo "loading pgbench -i -s $SCALE ..."
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -i -s "$SCALE" -q bench 2>&1 | tail -1
q -c "VACUUM ANALYZE pgbench_accounts" -c "CHECKPOINT" -c "CREATE EXTENSION azure_cdc"
rows=$(q -c "SELECT count(*) FROM pgbench_accounts")
table_bytes=$(q -c "SELECT pg_relation_size('pgbench_accounts')")

copy_ms() {
    q -c "\\timing on" -c "COPY pgbench_accounts TO '/dev/null' (FORMAT binary)" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p'
}
copy_ms >/dev/null   # warm the cache the same way for both
copy1=$(copy_ms); copy2=$(copy_ms)
copy=$(python3 -c "print(min($copy1, $copy2))")

set_workers() {
    q -c "ALTER SYSTEM SET azure_cdc.max_snapshot_workers = $1" -c "SELECT pg_reload_conf()" >/dev/null
    sleep 1
}

# One table, copied by 1, 2 and 3 snapshot workers (2 and 3: its block ranges shared between them),
# then by 1 again: the first copy of a fresh table may also pay for what the cache holds.
run=0
for workers in 1 2 3 1; do
run=$((run + 1))
set_workers "$workers"
name=one${workers}_$run
start=$(date +%s.%N)
q -c "SELECT azure_cdc.start_mirror('$name', 'file://$OUT/$name', ARRAY['pgbench_accounts'])" >/dev/null
peak_rss=0; peak_anon=0; pid=""
while :; do
    state=$(q -c "SELECT state FROM azure_cdc.mirrors WHERE mirror_name = '$name'")
    [ "$state" = Running ] && break
    [ -n "$pid" ] || pid=$(q -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'azure_cdc snapshot'")
    if [ -n "$pid" ] && [ -r "/proc/$pid/status" ]; then
        hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        anon=$(awk '/^RssAnon/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        [ "${hwm:-0}" -gt "$peak_rss" ] && peak_rss=$hwm
        [ "${anon:-0}" -gt "$peak_anon" ] && peak_anon=$anon
    fi
    sleep 0.05
done
end=$(date +%s.%N)
worker_s=$(q -c "SELECT extract(epoch FROM snapshot_completed_at - created_at) FROM azure_cdc.mirrors WHERE mirror_name = '$name'")
out_bytes=$(du -sb "$OUT/$name" | cut -f1)
files=$(ls "$OUT/$name/public.schema/pgbench_accounts/" | grep -c '^[0-9].*\.parquet$')
compression=$(q -c "SHOW azure_cdc.parquet_compression")

python3 - "$rows" "$table_bytes" "$copy" "$worker_s" "$start" "$end" "$peak_rss" "$peak_anon" "$out_bytes" "$files" "$compression" "$workers" "$run" <<'PY'
import sys
rows, table_bytes, copy_ms, worker_s, start, end, peak_rss, peak_anon, out_bytes, files, comp, workers, run = sys.argv[1:]
header_done = run != "1"
rows, table_bytes, out_bytes = int(rows), int(table_bytes), int(out_bytes)
copy_s = float(copy_ms) / 1000
snap_s = float(worker_s)
wall_s = float(end) - float(start)
if workers == "1" and not header_done:
    print(f"table            pgbench_accounts: {rows:,} rows, {table_bytes / 2**20:,.0f} MB heap")
    print(f"COPY binary      {copy_s:8.2f} s  {rows / copy_s:12,.0f} rows/s  {table_bytes / 2**20 / copy_s:8.1f} MB/s")
print(f"snapshot, max_snapshot_workers = {workers}")
print(f"  time           {snap_s:8.2f} s  {rows / snap_s:12,.0f} rows/s  {table_bytes / 2**20 / snap_s:8.1f} MB/s"
      f"  (start_mirror commit -> published; {wall_s:.2f} s as seen by the polling client)")
print(f"  output         {out_bytes / 2**20:,.1f} MB Parquet ({comp}) in {files} file(s)")
print(f"  worker memory  peak RSS {int(peak_rss) / 1024:,.0f} MB, peak private (RssAnon) {int(peak_anon) / 1024:,.0f} MB (the snapshot worker; each helper has its own)")
print(f"  ratio          snapshot / COPY = {snap_s / copy_s:.2f}   (target <= 1.3)")
PY
q -c "SELECT azure_cdc.stop_mirror('$name')" -c "SELECT azure_cdc.drop_mirror('$name')" >/dev/null
done

# Parallel snapshot: the same rows as 4 tables, copied with max_snapshot_workers = 1 and then 3.
for i in 0 1 2 3; do
    q -c "CREATE TABLE part_$i AS SELECT * FROM pgbench_accounts WHERE aid % 4 = $i" -c "ALTER TABLE part_$i ADD PRIMARY KEY (aid)"
done
q -c "VACUUM ANALYZE" -c "CHECKPOINT"
for workers in 1 3; do
    set_workers "$workers"
    q -c "SELECT azure_cdc.start_mirror('par$workers', 'file://$BASE/par$workers', ARRAY['part_0','part_1','part_2','part_3'])" >/dev/null
    until [ "$(q -c "SELECT state FROM azure_cdc.mirrors WHERE mirror_name = 'par$workers'")" = Running ]; do sleep 0.05; done
    secs=$(q -c "SELECT extract(epoch FROM snapshot_completed_at - created_at) FROM azure_cdc.mirrors WHERE mirror_name = 'par$workers'")
    python3 -c "import sys; s=float(sys.argv[2]); print(f'4 tables, max_snapshot_workers = {sys.argv[1]}: {s:6.2f} s  {int(sys.argv[3]) / s:12,.0f} rows/s')" "$workers" "$secs" "$rows"
    q -c "SELECT azure_cdc.stop_mirror('par$workers')" >/dev/null
done
