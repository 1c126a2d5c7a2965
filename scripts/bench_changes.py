#!/usr/bin/env python3
"""Change-capture benchmarks: print figures, assert nothing. One throwaway cluster, one run:

1. throughput: 1 M row changes (pgbench_accounts updated in 1,000 transactions of 1,000 rows) held in
   the slot while the decoder is paused, then the time from resuming it until every change is in
   published files; compared with pg_logical_slot_get_binary_changes() + pgoutput over the same WAL.
2. primary overhead: pgbench TPS (the default TPC-B-like script) without a mirror and with a mirror
   of all pgbench tables, alternated, at the default batch timeout (30 s) and at 100 ms.
3. lag: pgbench at about half its maximum TPS, batch timeout 200 ms; a probe row committed every
   50 ms; a watcher polls the landing zone and notes when each probe row's file is visible.
4. reseed: a probe row committed every 50 ms into another table while a 10 M-row table is copied
   again by resync_table: the probes' commit -> file visible during the copy, and the copy's time.
5. memory: peak RSS of the decoder while one ~1 GB transaction is mirrored.
Arguments choose parts: throughput, overhead, lag, reseed, memory (all by default).
"""

import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import psycopg
import pyarrow.parquet as pq

TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CLUSTER = os.path.join(TOP, "scripts", "cluster.sh")
PGBIN = "/usr/lib/postgresql/15/bin"
PORT = int(os.environ.get("BENCH_PORT", "55442"))
BASE = os.environ.get("BENCH_DIR", "/tmp/azure_cdc_bench_changes")
RUN_AS = os.environ.get("AZURE_CDC_RUN_AS", "pgrxtest")
DATA = os.path.join(BASE, "data")


def sh(*args, **kw):
    return subprocess.run(list(args), check=True, **kw)


def connect(db="bench"):
    return psycopg.connect(host="127.0.0.1", port=PORT, user="postgres", dbname=db, autocommit=True)


def one(conn, q, p=None):
    return conn.execute(q, p).fetchone()[0]


def pgbench(*args):
    out = subprocess.run([f"{PGBIN}/pgbench", "-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres", *args, "bench"],
                         check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    return None


def wait_caught_up(conn, slot, deadline=600):
    upto = one(conn, "SELECT pg_current_wal_lsn()::text")
    end = time.time() + deadline
    while not one(conn, "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s", (upto, slot)):
        if time.time() > end:
            raise SystemExit(f"{slot} did not catch up")
        time.sleep(0.01)


def start_mirror(conn, name, tables):
    root = os.path.join(BASE, "mirrors", name)
    sh("rm", "-rf", root)
    conn.execute("SELECT azure_cdc.start_mirror(%s, %s, %s)", (name, "file://" + root, tables))
    while one(conn, "SELECT state FROM azure_cdc.mirrors WHERE mirror_name = %s", (name,)) != "Running":
        time.sleep(0.05)
    while not one(conn, "SELECT decoder_pid FROM azure_cdc.get_mirror_status() WHERE mirror_name = %s", (name,)):
        time.sleep(0.05)
    return root, one(conn, "SELECT decoder_pid FROM azure_cdc.get_mirror_status() WHERE mirror_name = %s", (name,))


def stop_mirror(conn, name):
    conn.execute("SELECT azure_cdc.stop_mirror(%s)", (name,))
    conn.execute("SELECT azure_cdc.drop_mirror(%s)", (name,))


def set_timeout(conn, value):
    conn.execute(f"ALTER SYSTEM SET azure_cdc.change_batch_export_timeout = '{value}'")
    conn.execute("SELECT pg_reload_conf()")
    time.sleep(0.5)


def throughput(conn):
    # The shortest batch timeout, so that the last, partly filled batch does not wait.
    set_timeout(conn, "100ms")
    root, pid = start_mirror(conn, "tput", ["pgbench_accounts"])
    conn.execute("CREATE PUBLICATION bench_pub FOR TABLE pgbench_accounts")
    conn.execute("SELECT pg_create_logical_replication_slot('bench_pgoutput', 'pgoutput')")
    os.kill(pid, signal.SIGSTOP)
    try:
        conn.execute("""DO $$ BEGIN FOR i IN 0..999 LOOP
                          UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid > i * 1000 AND aid <= (i + 1) * 1000;
                          COMMIT; END LOOP; END $$""")
        wal = one(conn, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) FROM pg_replication_slots WHERE slot_name = 'azure_cdc_tput'")
    finally:
        t0 = time.time()
        os.kill(pid, signal.SIGCONT)
    wait_caught_up(conn, "azure_cdc_tput")
    ours = time.time() - t0
    shipped = one(conn, "SELECT changes_published FROM azure_cdc.get_mirror_status() WHERE mirror_name = 'tput'")
    t0 = time.time()
    n = one(conn, "SELECT count(*) FROM pg_logical_slot_get_binary_changes('bench_pgoutput', NULL, NULL, "
                  "'proto_version', '1', 'publication_names', 'bench_pub')")
    theirs = time.time() - t0
    conn.execute("SELECT pg_drop_replication_slot('bench_pgoutput')")
    conn.execute("DROP PUBLICATION bench_pub")
    files = len([f for f in os.listdir(os.path.join(root, "public.schema", "pgbench_accounts")) if f[0].isdigit()])
    stop_mirror(conn, "tput")
    print(f"throughput   {shipped:,} changes ({wal / 2**20:,.0f} MB of WAL) held in the slot, then published in "
          f"{ours:.2f} s = {shipped / ours:,.0f} changes/s ({files - 1} change files)")
    print(f"             pg_logical_slot_get_binary_changes + pgoutput over the same WAL: {theirs:.2f} s = "
          f"{1_000_000 / theirs:,.0f} changes/s ({n:,} messages)")
    print(f"             ratio azure_cdc / pgoutput = {(shipped / ours) / (1_000_000 / theirs):.2f}   (target >= 0.7)")


def overhead(conn, timeout):
    set_timeout(conn, timeout)
    runs = {"without": [], "with": []}
    for mode in ["without", "with", "without", "with"]:
        if mode == "with":
            start_mirror(conn, "ovh", None)
        runs[mode].append(pgbench("-c", "4", "-j", "2", "-T", "20"))
        if mode == "with":
            wait_caught_up(conn, "azure_cdc_ovh")
            stop_mirror(conn, "ovh")
    a, b = statistics.mean(runs["without"]), statistics.mean(runs["with"])
    print(f"overhead     batch timeout {timeout}: pgbench -c 4 -T 20, TPS without a mirror "
          f"{[round(x) for x in runs['without']]}, with {[round(x) for x in runs['with']]}")
    print(f"             ratio with / without = {b / a:.3f}   (target >= 0.95)")
    return a


class Probes:
    """A probe row committed into `table` every 50 ms from its own connection, and a watcher that
    polls the table's landing-zone folder and notes when each probe row's file is visible."""

    def __init__(self, root, table):
        self.table = table
        self.folder = os.path.join(root, "public.schema", table)
        self.seen, self.visible, self.committed = set(), {}, {}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.watch), threading.Thread(target=self.probe)]

    def watch(self):
        while not self.stop.is_set():
            now = time.time()
            if os.path.isdir(self.folder):
                for f in sorted(os.listdir(self.folder)):
                    if f[0].isdigit() and f not in self.seen:
                        self.seen.add(f)
                        for i in pq.read_table(os.path.join(self.folder, f), columns=["id"]).column("id").to_pylist():
                            self.visible[i] = now
            time.sleep(0.005)

    def probe(self):
        c = connect()
        while not self.stop.is_set():
            i = one(c, f"INSERT INTO {self.table} (at) VALUES (clock_timestamp()) RETURNING id")
            self.committed[i] = time.time()
            time.sleep(0.05)
        c.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        time.sleep(1.5)
        self.stop.set()
        for t in self.threads:
            t.join()

    def report(self, since=0.0, until=float("inf")):
        """Percentiles of commit -> visible over the probes committed in [since, until]."""
        ids = [i for i, t in self.committed.items() if since <= t <= until]
        lags = sorted(self.visible[i] - self.committed[i] for i in ids if i in self.visible)
        missing = [i for i in ids if i not in self.visible]
        p = lambda q: lags[min(len(lags) - 1, int(q * len(lags)))] * 1000
        return (f"{len(lags)} probe commits, commit -> file visible: p50 {p(0.5):.0f} ms, p90 {p(0.9):.0f} ms, "
                f"p99 {p(0.99):.0f} ms, max {lags[-1] * 1000:.0f} ms; not yet visible at the end: {len(missing)}")


def lag(conn, max_tps):
    conn.execute("CREATE TABLE probe (id serial PRIMARY KEY, at timestamptz NOT NULL)")
    set_timeout(conn, "200ms")
    root, _ = start_mirror(conn, "lag", None)
    rate = int(max_tps / 2)
    with Probes(root, "probe") as probes:
        tps = pgbench("-c", "4", "-j", "2", "-T", "30", "-R", str(rate))
    stop_mirror(conn, "lag")
    print(f"lag          pgbench -R {rate} (half of {max_tps:,.0f}) for 30 s -> {tps:,.0f} TPS; batch timeout 200 ms")
    print(f"             {probes.report()} (target p99 < 1000 ms)")


def reseed(conn):
    """Another table's lag while a 10 M-row table is copied again (resync_table), and the copy's time."""
    conn.execute("CREATE TABLE big (id int PRIMARY KEY, v int NOT NULL)")
    conn.execute("INSERT INTO big SELECT g, g FROM generate_series(1, 10000000) g")
    conn.execute("VACUUM ANALYZE big")
    conn.execute("CREATE TABLE probe2 (id serial PRIMARY KEY, at timestamptz NOT NULL)")
    set_timeout(conn, "200ms")
    root, _ = start_mirror(conn, "reseed", ["big", "probe2"])
    with Probes(root, "probe2") as probes:
        time.sleep(3)
        t0 = time.time()
        conn.execute("SELECT azure_cdc.resync_table('reseed', 'big')")
        while not one(conn, "SELECT count(*) FROM azure_cdc.events WHERE mirror_name = 'reseed' AND event = 'Reseeded'"):
            time.sleep(0.05)
        copied = time.time() - t0
        time.sleep(3)
    stop_mirror(conn, "reseed")
    print(f"reseed       resync_table of 10,000,000 rows: requested -> Reseeded in {copied:.2f} s")
    print(f"             another table meanwhile: {probes.report(t0, t0 + copied)} (target p99 < 1000 ms)")
    print(f"             before and after: {probes.report(0, t0 - 0.001)}")


def memory(conn, decoding_work_mem=None):
    if decoding_work_mem:
        conn.execute(f"ALTER SYSTEM SET logical_decoding_work_mem = '{decoding_work_mem}'")
        conn.execute("SELECT pg_reload_conf()")
    conn.execute("DROP TABLE IF EXISTS wide")
    conn.execute("CREATE TABLE wide (id bigint PRIMARY KEY, payload text)")
    root, pid = start_mirror(conn, "mem", ["wide"])
    budget = one(conn, "SELECT setting::int FROM pg_settings WHERE name = 'azure_cdc.change_batch_buffer_size'")
    work_mem = one(conn, "SELECT setting::int / 1024 FROM pg_settings WHERE name = 'logical_decoding_work_mem'")
    peak, stop = {"VmHWM": 0, "RssAnon": 0, "RssShmem": 0}, threading.Event()

    def read_status():
        out = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k = line.split(":")[0]
                if k in peak:
                    out[k] = int(line.split()[1])
        return out

    idle = read_status()

    def sample():
        while not stop.is_set():
            try:
                for k, v in read_status().items():
                    peak[k] = max(peak[k], v)
            except OSError:
                pass
            time.sleep(0.02)

    t = threading.Thread(target=sample)
    t.start()
    t0 = time.time()
    conn.execute("INSERT INTO wide SELECT g, repeat(md5(g::text), 6) FROM generate_series(1, 4000000) g")
    size = one(conn, "SELECT pg_total_relation_size('wide')")
    wait_caught_up(conn, "azure_cdc_mem")
    took = time.time() - t0
    stop.set()
    t.join()
    spilled = one(conn, "SELECT spill_bytes FROM pg_stat_replication_slots WHERE slot_name = 'azure_cdc_mem'")
    stop_mirror(conn, "mem")
    print(f"memory       one transaction of 4,000,000 rows ({size / 2**30:.2f} GB of table) mirrored in {took:.1f} s; "
          f"reorder buffer spilled {spilled / 2**30:.2f} GB")
    mb = lambda kb: f"{kb / 1024:,.0f} MB"
    print(f"             decoder peak RSS {mb(peak['VmHWM'])} = private {mb(peak['RssAnon'])} + shared memory touched "
          f"{mb(peak['RssShmem'])} (idle before: RSS {mb(idle['VmHWM'])}, private {mb(idle['RssAnon'])})")
    print(f"             budget = change_batch_buffer_size {budget} MB + 64 MB = {budget + 64} MB; the server's reorder "
          f"buffer alone may hold logical_decoding_work_mem = {work_mem} MB of it before spilling")


def main():
    sh(CLUSTER, "stop", DATA, "immediate")
    sh("rm", "-rf", BASE)
    os.makedirs(os.path.join(BASE, "mirrors"))
    sh("chown", RUN_AS, BASE, os.path.join(BASE, "mirrors"))
    sh(CLUSTER, "start", DATA, str(PORT), "shared_buffers = 1GB", "max_wal_size = 8GB",
       "checkpoint_timeout = 30min", "azure_cdc.change_batch_export_timeout = '1s'")
    try:
        with connect("postgres") as c:
            c.execute("CREATE DATABASE bench")
        subprocess.run([f"{PGBIN}/pgbench", "-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres", "-i", "-s", "10", "-q", "bench"],
                       check=True, capture_output=True)
        conn = connect()
        conn.execute("CREATE EXTENSION azure_cdc")
        conn.execute("VACUUM ANALYZE")
        which = sys.argv[1:] or ["throughput", "overhead", "lag", "reseed", "memory"]
        max_tps = None
        if "throughput" in which:
            throughput(conn)
        if "overhead" in which or "lag" in which:
            max_tps = overhead(conn, "30s")
        if "overhead" in which:
            overhead(conn, "100ms")
        if "lag" in which:
            lag(conn, max_tps)
        if "reseed" in which:
            reseed(conn)
        if "memory" in which:
            memory(conn)
            # The same with a smaller reorder buffer, to tell its share from azure_cdc's.
            memory(conn, "8MB")
    finally:
        sh(CLUSTER, "stop", DATA, "fast")


if __name__ == "__main__":
    main()
