"""Change capture, end to end: a real cluster, the mirror's real decoder and slot, real files. Every
test ends by replaying the landing zone (replay.py: numbers contiguous from 1, no temporary file left,
no insert of an existing key, no update or delete of a missing one) and comparing it with the source
cell by cell."""

import os
import random
import signal
import subprocess
import threading
import time

import psycopg
import pyarrow.parquet as pq

from conftest import PGBIN
from replay import assert_mirror_equals_source, data_files, replay_table, table_folder

SCHEMA = """
CREATE TABLE a (id int PRIMARY KEY, n int, t text, f float8, ts timestamptz, j jsonb, num numeric(12,3));
CREATE TABLE b (k1 int, k2 text, v text, PRIMARY KEY (k1, k2));
CREATE TABLE c (id bigint PRIMARY KEY, small text, big text);
CREATE TABLE ignored (id int PRIMARY KEY, v text);
"""
TABLES = ["a", "b", "c"]


def big_value(rng, n=12000):
    """Text that stays large after compression, so that it is stored out of line (TOASTed)."""
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(n))


def seed(db, rng):
    db.sql(SCHEMA)
    db.sql("INSERT INTO a SELECT g, g, 'row ' || g, g / 7.0, '2024-01-01'::timestamptz + g * interval '1 hour', "
           "jsonb_build_object('g', g), g * 1.5 FROM generate_series(1, 500) g")
    db.sql("INSERT INTO b SELECT g % 50, 'k' || g, 'v' || g FROM generate_series(1, 300) g")
    for i in range(1, 21):
        db.sql("INSERT INTO c VALUES (%s, %s, %s)", (i, f"s{i}", big_value(rng)))
    db.sql("INSERT INTO ignored SELECT g, 'x' FROM generate_series(1, 100) g")


def one_transaction(cur, rng, next_id):
    """A random multi-statement transaction; about one in six is rolled back, one in five rolls back a savepoint."""
    cur.execute("BEGIN")
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        if op < 0.25:
            i = next_id()
            cur.execute("INSERT INTO a VALUES (%s, %s, %s, %s, now(), %s, %s)",
                        (i, rng.randint(0, 9), f"new {i}", rng.random(), '{"k": [1, 2]}', rng.randint(0, 99999) / 1000))
        elif op < 0.45:
            cur.execute("UPDATE a SET n = n + 1, t = t || '+', j = j || '{\"u\": true}' WHERE id %% 97 = %s", (rng.randint(0, 96),))
        elif op < 0.55:
            cur.execute("UPDATE a SET id = id + 100000 WHERE id = (SELECT min(id) FROM a WHERE id < 100000 AND id %% 13 = %s)",
                        (rng.randint(0, 12),))
        elif op < 0.65:
            cur.execute("DELETE FROM a WHERE id = (SELECT max(id) FROM a WHERE id %% 11 = %s)", (rng.randint(0, 10),))
        elif op < 0.72:
            cur.execute("INSERT INTO b VALUES (%s, %s, 'ins') ON CONFLICT (k1, k2) DO UPDATE SET v = b.v || '!'",
                        (rng.randint(0, 60), f"k{rng.randint(0, 400)}"))
        elif op < 0.78:
            cur.execute("UPDATE b SET k2 = k2 || 'x' WHERE k1 = %s", (rng.randint(0, 60),))
        elif op < 0.84:
            cur.execute("UPDATE c SET small = small || '.' WHERE id %% 5 = %s", (rng.randint(0, 4),))
        elif op < 0.88:
            cur.execute("UPDATE c SET big = %s WHERE id = (SELECT min(id) FROM c WHERE id %% 3 = %s)",
                        (big_value(rng, 9000), rng.randint(0, 2)))
        elif op < 0.91:
            i = next_id()
            cur.execute("INSERT INTO c VALUES (%s, 'n', %s)", (i, big_value(rng)))
        elif op < 0.94:
            cur.execute("DELETE FROM c WHERE id = (SELECT max(id) FROM c)")
        else:
            cur.execute("UPDATE ignored SET v = v || 'y' WHERE id = %s", (rng.randint(1, 100),))
        if rng.random() < 0.2:
            cur.execute("SAVEPOINT s")
            cur.execute("DELETE FROM a WHERE id % 3 = 0")
            cur.execute("UPDATE c SET big = 'lost' WHERE true")
            cur.execute("ROLLBACK TO SAVEPOINT s")
    cur.execute("ROLLBACK" if rng.random() < 0.16 else "COMMIT")


def workload(cluster, dbname, rng, transactions, stop=None):
    """Runs random transactions; survives the server restarting under it (the source is the truth)."""
    counter = [10_000_000 + rng.randint(0, 1000) * 10_000]

    def next_id():
        counter[0] += 1
        return counter[0]

    done = 0
    conn = None
    while done < transactions and not (stop and stop.is_set()):
        try:
            if conn is None:
                conn = cluster.connect(dbname)
            one_transaction(conn.cursor(), rng, next_id)
        except psycopg.Error:
            try:
                conn.close()
            except Exception:
                pass
            conn = None
            time.sleep(0.3)
        done += 1
    if conn is not None:
        conn.close()


def assert_all_equal(db, root, tables=TABLES):
    for t in tables:
        assert_mirror_equals_source(db.conn, root, "public", t)


def test_random_workload_replays_equal(cluster, db):
    rng = random.Random(3)
    seed(db, rng)
    root = db.start_mirror("m", ["a", "b", "c"])
    db.wait_snapshot("m")
    workload(cluster, db.name, rng, 400)
    db.wait_caught_up("m")
    assert_all_equal(db, root)
    assert not os.path.exists(table_folder(root, "public", "ignored"))
    # Change files end with the row marker and name the position of their last change.
    files = data_files(table_folder(root, "public", "a"))
    assert len(files) > 1
    meta = pq.read_metadata(files[-1])
    assert meta.schema.names[-1] == "__rowMarker__"
    assert b"azure_cdc.last_change" in meta.metadata
    # The decoder confirms the slot, then updates its figures: allow it that moment.
    end = time.time() + 30
    while True:
        status = db.sql("SELECT state, lag_seconds, buffered_bytes, changes_published FROM azure_cdc.get_mirror_status()")
        if status[0][2] == 0 or time.time() > end:
            break
        time.sleep(0.05)
    assert status[0][0] == "Running" and status[0][2] == 0 and status[0][3] > 0, status
    tables = db.status("m")
    assert all(t["state"] == "Replicating" and t["status"] == "OK" for t in tables.values()), tables


def test_toasted_values_survive_updates_that_leave_them_unchanged(cluster, db):
    rng = random.Random(5)
    db.sql("CREATE TABLE docs (id int PRIMARY KEY, title text, body text, blob bytea)")
    for i in range(1, 6):
        db.sql("INSERT INTO docs VALUES (%s, %s, %s, %s)", (i, f"t{i}", big_value(rng, 20000), os.urandom(30000)))
    assert db.one("SELECT pg_column_size(body) > 8000 FROM docs WHERE id = 1")
    root = db.start_mirror("m", ["docs"])
    assert db.one("SELECT relreplident FROM pg_class WHERE relname = 'docs'") == "f"
    db.wait_snapshot("m")
    db.sql("UPDATE docs SET title = title || ' (edited)'")              # body and blob unchanged, TOASTed
    db.sql("UPDATE docs SET id = id + 10 WHERE id = 2")                 # key change, TOASTed values kept
    db.sql("UPDATE docs SET body = %s WHERE id = 3", (big_value(rng, 15000),))
    db.sql("DELETE FROM docs WHERE id = 4")
    db.sql("INSERT INTO docs VALUES (7, 'new', %s, %s)", (big_value(rng, 20000), os.urandom(20000)))
    db.sql("UPDATE docs SET title = 'again' WHERE id = 7")
    db.wait_caught_up("m")
    rep = assert_mirror_equals_source(db.conn, root, "public", "docs")
    assert all(r["body"] and len(r["body"]) >= 15000 for r in rep.rows.values())

    # With the identity changed back, an unchanged TOASTed value is not in the stream: the table is
    # parked with the error instead of getting a NULL.
    db.sql("ALTER TABLE docs REPLICA IDENTITY DEFAULT")
    db.sql("UPDATE docs SET title = 'lost body?' WHERE id = 1")
    end = time.time() + 60
    while db.status("m")[("public", "docs")]["state"] != "Failed":
        assert time.time() < end, db.status("m")
        time.sleep(0.1)
    t = db.status("m")[("public", "docs")]
    assert t["status"] == "ERROR" and "unchanged TOASTed value" in t["error"], t
    rows = replay_table(table_folder(root, "public", "docs")).rows
    assert all(r["body"] is not None for r in rows.values())


def test_one_transaction_larger_than_the_buffer(cluster, db):
    db.sql("CREATE TABLE big (id int PRIMARY KEY, v text, n int)")
    db.sql("INSERT INTO big VALUES (0, 'before', 0)")
    root = db.start_mirror("m", ["big"])
    db.wait_snapshot("m")
    with db.server_setting("azure_cdc.change_batch_buffer_size", "4MB"):
        db.sql("BEGIN")
        db.sql("INSERT INTO big SELECT g, 'row ' || g, g FROM generate_series(1, 1000000) g")
        db.sql("UPDATE big SET n = -n WHERE id % 1000 = 0")
        db.sql("DELETE FROM big WHERE id % 777 = 0")
        db.sql("COMMIT")
        db.sql("BEGIN")
        db.sql("INSERT INTO big SELECT g, 'rolled back', g FROM generate_series(2000000, 2300000) g")
        db.sql("ROLLBACK")
        db.wait_caught_up("m")
    rep = assert_mirror_equals_source(db.conn, root, "public", "big")
    assert len(rep.rows) == db.one("SELECT count(*) FROM big")
    assert rep.files > 4, "a transaction larger than the buffer is published in several files"
    spilled = db.one("SELECT spill_bytes FROM pg_stat_replication_slots WHERE slot_name = 'azure_cdc_m'")
    assert spilled and spilled > 0, "the reorder buffer spilled the transaction to disk"


def test_killed_decoder_resumes_without_loss_or_duplicates(cluster, db):
    rng = random.Random(11)
    seed(db, rng)
    root = db.start_mirror("m", ["a", "b", "c"])
    db.wait_snapshot("m")
    stop = threading.Event()
    w = threading.Thread(target=workload, args=(cluster, db.name, random.Random(12), 700, stop))
    w.start()
    try:
        for delay in (0.5, 1.3, 0.8):
            time.sleep(delay)
            pid = db.decoder_pid("m")
            os.kill(pid, signal.SIGKILL)        # the whole server restarts: a crash at a random point
            time.sleep(1.0)
            db.reconnect_when_ready()
    finally:
        w.join()
    db.wait_caught_up("m")
    assert_all_equal(db, root)


def test_immediate_shutdown_and_restart_resume_exactly(cluster, db):
    rng = random.Random(21)
    seed(db, rng)
    root = db.start_mirror("m", ["a", "b", "c"])
    db.wait_snapshot("m")
    for round_ in range(2):
        stop = threading.Event()
        w = threading.Thread(target=workload, args=(cluster, db.name, random.Random(30 + round_), 10_000, stop))
        w.start()
        time.sleep(2.0 + round_)
        cluster.stop("immediate")
        stop.set()
        w.join()
        cluster.start()
        db.reconnect_when_ready()
    workload(cluster, db.name, random.Random(40), 50)
    db.wait_caught_up("m")
    assert_all_equal(db, root)


def pg_ctl_stop(cluster, mode):
    """pg_ctl stop, which fails if the server has not stopped within 60 s."""
    subprocess.run(
        ["sudo", "-u", os.environ.get("AZURE_CDC_RUN_AS", "pgrxtest"), os.path.join(PGBIN, "pg_ctl"),
         "-D", cluster.datadir, "-m", mode, "-w", "-t", "60", "stop"],
        check=True, stdout=subprocess.DEVNULL,
    )
    assert not os.path.exists(os.path.join(cluster.datadir, "postmaster.pid"))


def test_smart_shutdown_with_a_running_mirror(cluster, db):
    db.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    root = db.start_mirror("m", ["t"])
    db.wait_snapshot("m")
    db.decoder_pid("m")
    db.sql("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 50000) g")
    db.conn.close()  # a smart shutdown waits for client sessions, not for the mirror's workers
    pg_ctl_stop(cluster, "smart")
    cluster.start()
    db.reconnect_when_ready()
    db.wait_caught_up("m")
    assert_mirror_equals_source(db.conn, root, "public", "t")


def test_fast_shutdown_with_a_busy_mirror(cluster, db):
    db.sql("CREATE TABLE big (id int PRIMARY KEY, v text)")
    root = db.start_mirror("m", ["big"])
    db.wait_snapshot("m")
    db.sql("INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series(1, 600000) g")
    # The decoder is busy with the transaction; a fast shutdown must still complete (pg_ctl waits at
    # most 60 s and fails otherwise).
    pg_ctl_stop(cluster, "fast")
    cluster.start()
    db.reconnect_when_ready()
    db.wait_caught_up("m")
    assert_mirror_equals_source(db.conn, root, "public", "big")


def test_slot_follows_the_wal_while_mirrored_tables_are_idle(cluster, db):
    db.sql("CREATE TABLE quiet (id int PRIMARY KEY)")
    db.sql("CREATE TABLE busy (id int PRIMARY KEY, v text)")
    db.start_mirror("m", ["quiet"])
    db.wait_snapshot("m")
    db.decoder_pid("m")
    before = db.one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'azure_cdc_m'")
    for i in range(200):
        db.sql("INSERT INTO busy VALUES (%s, repeat('x', 1000))", (i,))
    db.wait_caught_up("m")
    moved = db.one("SELECT pg_wal_lsn_diff(confirmed_flush_lsn, %s::pg_lsn) FROM pg_replication_slots "
                   "WHERE slot_name = 'azure_cdc_m'", (before,))
    assert moved > 200 * 1000
    row = db.sql("SELECT lag_bytes, lag_seconds, buffered_bytes, changes_published FROM azure_cdc.get_mirror_status()")[0]
    assert row[1] == 0 and row[2] == 0 and row[3] == 0, row


def test_changes_this_build_cannot_mirror_park_only_their_table(cluster, db):
    db.sql("CREATE TABLE keyed (id int PRIMARY KEY, v text)")
    db.sql("CREATE TABLE keyless (v text)")
    db.sql("INSERT INTO keyless VALUES ('a'), ('b')")
    root = db.start_mirror("m", ["keyed", "keyless"])
    db.wait_snapshot("m")
    db.sql("INSERT INTO keyless VALUES ('c')")          # inserts into a table without keys are fine
    db.sql("INSERT INTO keyed VALUES (1, 'one')")
    db.wait_caught_up("m")
    assert_mirror_equals_source(db.conn, root, "public", "keyless")
    db.sql("UPDATE keyless SET v = 'changed' WHERE v = 'a'")
    db.sql("INSERT INTO keyed VALUES (2, 'two')")
    db.wait_caught_up("m")
    end = time.time() + 60
    while db.status("m")[("public", "keyless")]["state"] != "Failed":
        assert time.time() < end, db.status("m")
        time.sleep(0.1)
    status = db.status("m")
    assert status[("public", "keyless")]["state"] == "Failed", status
    assert "without key columns" in status[("public", "keyless")]["error"]
    assert status[("public", "keyed")]["state"] == "Replicating" and status[("public", "keyed")]["status"] == "OK"
    assert_mirror_equals_source(db.conn, root, "public", "keyed")


def test_an_unwritable_target_holds_the_changes_and_says_so(cluster, db):
    db.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    root = db.start_mirror("m", ["t"])
    db.wait_snapshot("m")
    folder = table_folder(root, "public", "t")
    os.chmod(folder, 0o555)   # the server's user can no longer create files there
    try:
        db.sql("INSERT INTO t SELECT g, 'held' FROM generate_series(1, 1000) g")
        end = time.time() + 60
        while True:
            err, lag = db.sql("SELECT last_error, lag_bytes FROM azure_cdc.get_mirror_status()")[0]
            if err:
                break
            assert time.time() < end, "the failing target was not reported"
            time.sleep(0.1)
        assert "Permission denied" in err or "permission denied" in err, err
        assert lag > 0
    finally:
        os.chmod(folder, 0o755)
    db.wait_caught_up("m")
    assert_mirror_equals_source(db.conn, root, "public", "t")
    end = time.time() + 30
    while db.one("SELECT last_error FROM azure_cdc.get_mirror_status()") is not None:
        assert time.time() < end, "the error stayed after the target recovered"
        time.sleep(0.1)


def test_killed_just_after_publishing_nothing_is_shipped_twice(cluster, db):
    """Kills the decoder the moment a new change file appears: the file is published but, most of
    the time, the slot is not yet confirmed past it. The restarted decoder must skip what the file
    holds (strict replay: an insert of an existing key fails it) and go on with the next number."""
    db.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    root = db.start_mirror("m", ["t"])
    db.wait_snapshot("m")
    folder = table_folder(root, "public", "t")
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            try:
                with cluster.connect(db.name) as c:
                    while not stop.is_set():
                        i += 1
                        c.execute("INSERT INTO t SELECT g, 'v' FROM generate_series(%s::int, %s::int) g "
                                  "ON CONFLICT DO NOTHING", (i * 100, i * 100 + 99))
                        c.execute("UPDATE t SET v = v || '+' WHERE id %% 7 = %s::int", (i % 7,))
            except psycopg.Error:
                time.sleep(0.2)

    w = threading.Thread(target=writer)
    w.start()
    try:
        for _ in range(3):
            pid = db.decoder_pid("m")
            published = lambda: sum(1 for f in os.listdir(folder) if f[0].isdigit())
            count = published()
            end = time.time() + 60
            while published() == count:
                assert time.time() < end, "no change file appeared"
                time.sleep(0.001)
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
            db.reconnect_when_ready()
    finally:
        stop.set()
        w.join()
    db.wait_caught_up("m")
    assert_mirror_equals_source(db.conn, root, "public", "t")
