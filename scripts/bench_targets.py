#!/usr/bin/env python3
"""Target benchmarks: print figures, assert nothing. One throwaway cluster (pgbench -i -s 10: 1 M
accounts, 128 MB) and Azurite on 127.0.0.1, one run each:

1. snapshot: start_mirror of the pgbench tables and a table of 2 M random 32-byte values (Parquet
   that does not compress) into a local folder, then into Azurite (the default part size, then 5 MB
   parts); the time from start_mirror to the mirror Running, and MB/s of Parquet.
2. changes: 200,000 account updates in 200 transactions held in the slot (mirror paused), then the
   time from resume_mirror until all are published, local folder vs Azurite.
3. verify: verify_mirror() on the mirror in Azurite (1 M + rows read back and compared).
4. OneLake: the same snapshot and changes into the OneLake stand-in (tests/e2e/onelake.py, DFS API,
   a service principal's tokens) answering every request after 20 ms (a 20 ms round trip), with
   the requests per published data file counted by the stand-in.
5. wide: one transaction updating one row in each of 200 tables, from its commit until the slot is
   confirmed past it (every table's change file published), with azure_cdc.max_parallel_uploads 1
   16 and 32, into a local folder and into the OneLake stand-in at a 20 ms round trip. The batch timeout
   is 100 ms here, so each figure includes up to 100 ms of waiting for the batch to close.
Arguments choose parts: stores (1-3), onelake (4), wide (5); all by default.
"""

import os
import subprocess
import sys
import time

import psycopg
from psycopg.types.json import Jsonb

TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(TOP, "tests", "e2e"))
from stores import Azurite, OneLake  # noqa: E402

CLUSTER = os.path.join(TOP, "scripts", "cluster.sh")
PGBIN = "/usr/lib/postgresql/15/bin"
PORT = int(os.environ.get("BENCH_PORT", "55443"))
BASE = os.environ.get("BENCH_DIR", "/tmp/azure_cdc_bench_targets")
RUN_AS = os.environ.get("AZURE_CDC_RUN_AS", "pgrxtest")
DATA = os.path.join(BASE, "data")
TABLES = ["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "blobs"]


def sh(*args, **kw):
    return subprocess.run(list(args), check=True, **kw)


def one(conn, q, p=None):
    return conn.execute(q, p).fetchone()[0]


def wait_caught_up(conn, slot):
    upto = one(conn, "SELECT pg_current_wal_lsn()::text")
    while not one(conn, "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
                  (upto, slot)):
        time.sleep(0.01)


def snapshot(conn, name, url, options):
    t0 = time.time()
    conn.execute("SELECT azure_cdc.start_mirror(%s, %s, %s, %s)", (name, url, TABLES, Jsonb(options)))
    while one(conn, "SELECT state FROM azure_cdc.mirrors WHERE mirror_name = %s", (name,)) != "Running":
        time.sleep(0.02)
    took = time.time() - t0
    mb = float(one(conn, "SELECT sum(bytes_published) FROM azure_cdc.get_all_tables_mirror_status() WHERE mirror_name = %s",
             (name,))) / 2**20
    print(f"snapshot     {name:<14} {took:6.2f} s  {mb:6.1f} MB of Parquet  {mb / took:6.1f} MB/s   ({url})")


def changes(conn, name):
    while not one(conn, "SELECT decoder_pid FROM azure_cdc.get_mirror_status() WHERE mirror_name = %s", (name,)):
        time.sleep(0.02)
    conn.execute("SELECT azure_cdc.pause_mirror(%s)", (name,))
    conn.execute("""DO $$ BEGIN FOR i IN 0..199 LOOP
                      UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid > i * 1000 AND aid <= (i + 1) * 1000;
                      COMMIT; END LOOP; END $$""")
    t0 = time.time()
    conn.execute("SELECT azure_cdc.resume_mirror(%s)", (name,))
    wait_caught_up(conn, "azure_cdc_" + name)
    took = time.time() - t0
    print(f"changes      {name:<14} 200,000 updates held, published in {took:6.2f} s = {200_000 / took:,.0f} changes/s "
          "(includes the decoder's start)")


def main():
    sh(CLUSTER, "stop", DATA, "immediate")
    sh("rm", "-rf", BASE)
    os.makedirs(os.path.join(BASE, "mirrors"))
    sh("chown", RUN_AS, BASE, os.path.join(BASE, "mirrors"))
    az = Azurite()
    az.start()
    sh(CLUSTER, "start", DATA, str(PORT), "shared_buffers = 512MB", "max_wal_size = 4GB",
       "azure_cdc.change_batch_export_timeout = '100ms'")
    try:
        with psycopg.connect(host="127.0.0.1", port=PORT, user="postgres", dbname="postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE bench")
        sh(f"{PGBIN}/pgbench", "-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres", "-i", "-s", "10", "-q", "bench",
           capture_output=True)
        conn = psycopg.connect(host="127.0.0.1", port=PORT, user="postgres", dbname="bench", autocommit=True)
        # 2 M rows of 32 random bytes: Parquet that does not compress (about 70 MB), so that files
        # outgrow an upload part.
        conn.execute("CREATE TABLE blobs (id int PRIMARY KEY, b bytea)")
        conn.execute("INSERT INTO blobs SELECT g, decode(md5(random()::text) || md5(random()::text), 'hex') "
                     "FROM generate_series(1, 2000000) g")
        conn.execute("CREATE EXTENSION azure_cdc")
        conn.execute("VACUUM ANALYZE")
        which = sys.argv[1:] or ["stores", "onelake", "wide"]
        if "stores" in which:
            stores(conn, az)
        ol = OneLake(latency_s=0.020)
        ol.start()
        try:
            if "onelake" in which:
                onelake(conn, ol)
            if "wide" in which:
                wide(conn, ol)
        finally:
            ol.close()
    finally:
        sh(CLUSTER, "stop", DATA, "fast")
        az.close()


def stores(conn, az):
    conn.execute("SELECT azure_cdc.create_credential('azurite', %s)", (Jsonb(az.credential_options()),))
    az.create_container("bench")
    snapshot(conn, "local", "file://" + os.path.join(BASE, "mirrors", "local"), {})
    changes(conn, "local")
    conn.execute("SELECT azure_cdc.stop_mirror('local')")
    snapshot(conn, "azurite", "az://bench/default", {"credential": "azurite"})
    changes(conn, "azurite")
    t0 = time.time()
    rows = conn.execute("SELECT table_name, verdict, source_rows FROM azure_cdc.verify_mirror('azurite')").fetchall()
    took = time.time() - t0
    total = sum(r[2] for r in rows)
    print(f"verify       azurite        {took:6.2f} s for {total:,} rows: {', '.join(f'{r[0]} {r[1]}' for r in rows)}")
    conn.execute("SELECT azure_cdc.stop_mirror('azurite')")
    conn.execute("ALTER SYSTEM SET azure_cdc.onelake_buffer_size = '5MB'")
    conn.execute("SELECT pg_reload_conf()")
    time.sleep(0.5)
    snapshot(conn, "azurite_5mb", "az://bench/parts", {"credential": "azurite"})
    conn.execute("SELECT azure_cdc.stop_mirror('azurite_5mb')")
    conn.execute("ALTER SYSTEM RESET azure_cdc.onelake_buffer_size")
    conn.execute("SELECT pg_reload_conf()")


def data_files(ol, bucket):
    """Data files in the OneLake stand-in's landing zone (published, not temporary)."""
    return len([n for n in ol.emulator.names(bucket, ol.root + "/")
                if n.endswith(".parquet") and not n.rsplit("/", 1)[-1].startswith("_")])


def onelake(conn, ol):
    ol.create_bucket("bench")
    conn.execute("SELECT azure_cdc.create_credential('onelake', %s)", (Jsonb(ol.credential_options()),))
    ol.emulator.counts.clear()
    snapshot(conn, "onelake", ol.url("bench"), {"credential": "onelake"})
    files = data_files(ol, "bench")
    requests = sum(ol.emulator.counts.values())
    print(f"requests     onelake        snapshot: {requests} requests for {files} data files and "
          f"{len(TABLES)} _metadata.json (with the probe, folders and _partnerEvents.json)")
    ol.emulator.counts.clear()
    changes(conn, "onelake")
    new_files = data_files(ol, "bench") - files
    counts = dict(ol.emulator.counts)
    print(f"requests     onelake        changes: {sum(counts.values())} requests for {new_files} change files "
          "(with resume_mirror's probe and the decoder's start): "
          + ", ".join(f"{m} {k or 'path'} {n}" for (m, k), n in sorted(counts.items())))
    # A steady stream: one transaction every 0.3 s for 10 s, each its own batch and file.
    ol.emulator.counts.clear()
    before = data_files(ol, "bench")
    for i in range(30):
        conn.execute("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = %s", (i + 1,))
        time.sleep(0.3)
    wait_caught_up(conn, "azure_cdc_onelake")
    made = data_files(ol, "bench") - before
    counts = dict(ol.emulator.counts)
    print(f"requests     onelake        steady: {sum(counts.values())} requests for {made} change files = "
          f"{sum(counts.values()) / max(made, 1):.1f} per file: "
          + ", ".join(f"{m} {k or 'path'} {n}" for (m, k), n in sorted(counts.items())))
    conn.execute("SELECT azure_cdc.stop_mirror('onelake')")


WIDE = 200


def wide_round(conn, name, parallel, rounds=3):
    conn.execute("ALTER SYSTEM SET azure_cdc.max_parallel_uploads = %s" % int(parallel))
    conn.execute("SELECT pg_reload_conf()")
    time.sleep(1)
    took = []
    for r in range(rounds):
        conn.execute("BEGIN")
        for i in range(WIDE):
            conn.execute(f"UPDATE wide.t{i:03} SET v = v + 1")
        conn.execute("COMMIT")
        t0 = time.time()
        wait_caught_up(conn, "azure_cdc_" + name)
        took.append(time.time() - t0)
    print(f"wide         {name:<14} max_parallel_uploads {parallel:>2}: one transaction over {WIDE} tables published in "
          + ", ".join(f"{t:5.2f} s" for t in took))


def wide(conn, ol):
    conn.execute("CREATE SCHEMA wide")
    for i in range(WIDE):
        conn.execute(f"CREATE TABLE wide.t{i:03} (id int PRIMARY KEY, v int)")
        conn.execute(f"INSERT INTO wide.t{i:03} VALUES (1, 0)")
    tables = [f"wide.t{i:03}" for i in range(WIDE)]

    def start(name, url, options):
        conn.execute("SELECT azure_cdc.start_mirror(%s, %s, %s, %s)", (name, url, tables, Jsonb(options)))
        while one(conn, "SELECT state FROM azure_cdc.mirrors WHERE mirror_name = %s", (name,)) != "Running":
            time.sleep(0.05)
        while not one(conn, "SELECT decoder_pid FROM azure_cdc.get_mirror_status() WHERE mirror_name = %s", (name,)):
            time.sleep(0.05)
        wait_caught_up(conn, "azure_cdc_" + name)

    start("wide_local", "file://" + os.path.join(BASE, "mirrors", "wide"), {})
    for parallel in (1, 16, 32):
        wide_round(conn, "wide_local", parallel)
    conn.execute("SELECT azure_cdc.stop_mirror('wide_local')")
    ol.create_bucket("wide")
    conn.execute("SELECT azure_cdc.create_credential('onelake_wide', %s)", (Jsonb(ol.credential_options()),))
    start("wide_onelake", ol.url("wide"), {"credential": "onelake_wide"})
    for parallel in (1, 16, 32):
        wide_round(conn, "wide_onelake", parallel)
    conn.execute("SELECT azure_cdc.stop_mirror('wide_onelake')")
    conn.execute("ALTER SYSTEM RESET azure_cdc.max_parallel_uploads")
    conn.execute("SELECT pg_reload_conf()")


if __name__ == "__main__":
    main()
