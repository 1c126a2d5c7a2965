"""Reseeding one table while the mirror streams the others, end to end: resync_table under a
workload, TRUNCATE, column changes and a parked table taken back (a lost slot is in
test_operations.py). Each test ends with
the replay comparison against the source (and verify_mirror where the mirror goes on)."""

import os
import threading
import time

import psycopg
import pyarrow.parquet as pq
import pytest

from conftest import events, numbers, reseeded, verify_ok, wait_for
from replay import assert_mirror_equals_source, replay_table, table_folder


class Workload:
    """Inserts, updates and deletes on some tables from its own connection until stopped."""

    def __init__(self, db, tables):
        self.conn = db.cluster.connect(db.name)
        self.tables = tables
        self.stop = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        i = 0
        try:
            while not self.stop.is_set():
                i += 1
                for t in self.tables:
                    with self.conn.transaction():
                        self.conn.execute(f"INSERT INTO {t} SELECT coalesce(max(id), 0) + 1, 'w{i}' FROM {t}")
                        self.conn.execute(f"UPDATE {t} SET v = v || '+' WHERE id % 7 = {i % 7}")
                        self.conn.execute(f"DELETE FROM {t} WHERE id = (SELECT min(id) FROM {t}) AND {i} % 5 = 0")
                time.sleep(0.01)
        except Exception as e:  # reported by the test
            self.error = e

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.conn.close()
        assert self.error is None, self.error


def test_resync_table_rebuilds_one_table_while_the_others_go_on(db):
    for t in ("a", "b"):
        db.sql(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")
        db.sql(f"INSERT INTO {t} SELECT g, 'v' || g FROM generate_series(1, 20000) g")
    root = db.start_mirror("m")
    db.wait_snapshot("m")
    with Workload(db, ["a", "b"]):
        wait_for("changes of b", lambda: len(numbers(root, "b")) >= 3)
        b_before = numbers(root, "b")
        assert "copied again after commit" in db.one("SELECT azure_cdc.resync_table('m', 'a')")
        reseeded(db, "m", "a")
        time.sleep(1)
    db.wait_caught_up("m")
    # a's folder was rebuilt from 1; b's numbers went on without a gap.
    a, b = numbers(root, "a"), numbers(root, "b")
    assert a == list(range(1, len(a) + 1)) and b == list(range(1, len(b) + 1))
    assert b[: len(b_before)] == b_before and len(b) > len(b_before)
    ev = events(db, "m", "a")
    assert [e for e, _ in ev][-2:] == ["ReseedRequested", "Reseeded"], ev
    assert "requested by resync_table" in ev[-2][1]
    assert not [e for e, _ in events(db, "m", "b") if e.startswith("Reseed")]
    st = db.status("m")
    assert st[("public", "a")]["status"] == "OK" and st[("public", "a")]["rows"] > 0
    for t in ("a", "b"):
        assert_mirror_equals_source(db.conn, root, "public", t)
    verify_ok(db, "m")


def test_a_reseed_pending_when_the_decoder_starts_never_moves_the_slot_back(db):
    """resync_table on a paused mirror: the decoder that resume_mirror starts holds the slot before it
    has read a record. The hold starts at the slot's confirmed position, never behind it (where
    reading starts), and the confirmed position never goes back."""
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text)")
    db.sql("CREATE TABLE b (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO a SELECT g, 'v' || g FROM generate_series(1, 200000) g")
    root = db.start_mirror("m")
    db.wait_snapshot("m")
    # Enough WAL between where the slot must keep reading from and where it is confirmed.
    for i in range(20):
        db.sql("INSERT INTO b SELECT g, 'x' FROM generate_series(%s::int, %s::int) g", (i * 1000, i * 1000 + 999))
    db.wait_caught_up("m")
    db.sql("SELECT azure_cdc.pause_mirror('m')")
    before = db.one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'azure_cdc_m'")
    assert "copied again" in db.one("SELECT azure_cdc.resync_table('m', 'a')")
    seen, stop = [], threading.Event()

    def sample():
        with db.cluster.connect(db.name) as c:
            while not stop.is_set():
                seen.append(c.execute(
                    "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, %s::pg_lsn) FROM pg_replication_slots "
                    "WHERE slot_name = 'azure_cdc_m'", (before,)).fetchone()[0])
                time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        db.sql("SELECT azure_cdc.resume_mirror('m')")
        reseeded(db, "m", "a")
        db.sql("INSERT INTO b VALUES (-1, 'after')")
        db.wait_caught_up("m")
    finally:
        stop.set()
        sampler.join()
    assert seen and min(seen) >= 0, f"the slot went back by {-min(seen)} bytes"
    with open(db.cluster.log) as f:
        holds = [line.rsplit(" ", 1)[-1].strip() for line in f if "reseed holds the slot at" in line]
    assert holds, "the hold was logged"
    assert db.one("SELECT %s::pg_lsn >= %s::pg_lsn", (holds[-1], before)), (holds, before)
    for t in ("a", "b"):
        assert_mirror_equals_source(db.conn, root, "public", t)
    verify_ok(db, "m")


def test_resync_table_errors(db):
    db.sql("CREATE TABLE a (id int PRIMARY KEY)")
    db.sql("CREATE TABLE other (id int PRIMARY KEY)")
    db.start_mirror("m", ["a"])
    cases = [
        (("nosuch", "a"), "42704"),
        (("m", "nosuch"), "42P01"),
        (("m", "other"), "42P01"),
    ]
    db.wait_snapshot("m")
    for args, code in cases:
        with pytest.raises(psycopg.Error) as ei:
            db.sql("SELECT azure_cdc.resync_table(%s, %s)", args)
        assert ei.value.sqlstate == code, (args, ei.value)
    db.sql("CREATE ROLE plain_user LOGIN")
    with db.cluster.connect(db.name, ) as c:
        c.execute("SET ROLE plain_user")
        with pytest.raises(psycopg.Error) as ei:
            c.execute("SELECT azure_cdc.resync_table('m', 'a')")
        assert ei.value.sqlstate == "42501"
    db.sql("DROP ROLE plain_user")
    db.sql("SELECT azure_cdc.stop_mirror('m')")
    with pytest.raises(psycopg.Error) as ei:
        db.sql("SELECT azure_cdc.resync_table('m', 'a')")
    assert ei.value.sqlstate in ("55000", "42704"), ei.value


def test_truncate_empties_the_mirror_in_order(db):
    db.sql("CREATE TABLE a (id serial PRIMARY KEY, v text)")
    db.sql("CREATE TABLE b (id int PRIMARY KEY, v text)")
    db.sql("CREATE TABLE c (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO a (v) SELECT 'v' || g FROM generate_series(1, 5000) g")
    db.sql("INSERT INTO b SELECT g, 'b' FROM generate_series(1, 5000) g")
    db.sql("INSERT INTO c SELECT g, 'c' FROM generate_series(1, 100) g")
    root = db.start_mirror("m")
    db.wait_snapshot("m")
    # Changes before, in and after the TRUNCATE's transaction; two tables at once; RESTART IDENTITY.
    db.sql("UPDATE a SET v = 'before' WHERE id <= 10")
    with db.conn.transaction():
        db.sql("INSERT INTO a (v) VALUES ('gone with the truncate')")
        db.sql("TRUNCATE a, b RESTART IDENTITY")
        db.sql("INSERT INTO a (v) SELECT 'after' FROM generate_series(1, 3)")
    db.sql("INSERT INTO b VALUES (1, 'new')")
    db.sql("UPDATE c SET v = 'untouched' WHERE id = 1")
    reseeded(db, "m", "a")
    reseeded(db, "m", "b")
    db.sql("UPDATE a SET v = 'later' WHERE id = 2")
    db.wait_caught_up("m")
    assert db.one("SELECT count(*) FROM a") == 3
    for t in ("a", "b", "c"):
        assert_mirror_equals_source(db.conn, root, "public", t)
    assert "the table was truncated" in [d for e, d in events(db, "m", "a") if e == "ReseedRequested"]
    assert not [e for e, _ in events(db, "m", "c") if e.startswith("Reseed")]
    assert numbers(root, "c")[0] == 1 and len(numbers(root, "c")) >= 2, "c kept its files and went on"
    verify_ok(db, "m")


@pytest.mark.parametrize("ddl", [
    "ALTER TABLE a ADD COLUMN extra int DEFAULT 7",
    "ALTER TABLE a ADD COLUMN stamp timestamptz DEFAULT clock_timestamp()",
    "ALTER TABLE a ADD COLUMN serial_no serial",
    "ALTER TABLE a RENAME COLUMN v TO w",
    "ALTER TABLE a RENAME COLUMN n TO m",
    "ALTER TABLE a ALTER COLUMN n TYPE numeric(20,2)",
    "ALTER TABLE a DROP CONSTRAINT a_pkey, ADD PRIMARY KEY (n)",
])
def test_column_changes_reseed_only_that_table(db, ddl):
    # What later files cannot express: values existing rows got without WAL (a default, a rewrite),
    # a rename (also of the last column, which looks like a drop and an add by name), a type, a key.
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text, n int)")
    db.sql("CREATE TABLE b (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO a SELECT g, 'v' || g, g FROM generate_series(1, 3000) g")
    db.sql("INSERT INTO b SELECT g, 'b' FROM generate_series(1, 100) g")
    root = db.start_mirror("m")
    db.wait_snapshot("m")
    db.sql("UPDATE a SET n = -n WHERE id <= 5")
    db.sql(ddl)
    db.sql("UPDATE a SET id = id + 10000 WHERE id = 1")
    db.sql("INSERT INTO b VALUES (1000, 'x')")
    reseeded(db, "m", "a")
    db.sql("DELETE FROM a WHERE id = 2")
    db.wait_caught_up("m")
    for t in ("a", "b"):
        assert_mirror_equals_source(db.conn, root, "public", t)
    assert "the table's columns changed" in [d for e, d in events(db, "m", "a") if e == "ReseedRequested"]
    if "PRIMARY KEY" in ddl:
        assert replay_table(table_folder(root, "public", "a")).keys == ["n"]
    assert not [e for e, _ in events(db, "m", "b") if e.startswith("Reseed")]
    verify_ok(db, "m")


def last_file_columns(root, table):
    folder = table_folder(root, "public", table)
    return pq.read_schema(os.path.join(folder, "%020d.parquet" % numbers(root, table)[-1])).names


def test_columns_added_and_dropped_are_followed_without_a_reseed(db):
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text, n int)")
    db.sql("INSERT INTO a SELECT g, 'v' || g, g FROM generate_series(1, 3000) g")
    root = db.start_mirror("m")
    db.wait_snapshot("m")
    db.sql("UPDATE a SET n = -n WHERE id <= 5")
    # A nullable column without a default: NULL in every existing row, so later files just carry it.
    db.sql("ALTER TABLE a ADD COLUMN extra text")
    db.sql("UPDATE a SET extra = 'x' || id WHERE id <= 10")
    db.sql("INSERT INTO a VALUES (5000, 'new', 1, 'e')")
    db.wait_caught_up("m")
    assert last_file_columns(root, "a") == ["id", "v", "n", "extra", "__rowMarker__"]
    # A dropped column: absent from later files (NULL in their rows).
    db.sql("ALTER TABLE a DROP COLUMN v")
    db.sql("UPDATE a SET n = 0 WHERE id BETWEEN 11 AND 20")
    db.sql("DELETE FROM a WHERE id = 3")
    # Added and used in one transaction.
    with db.conn.transaction():
        db.sql("ALTER TABLE a ADD COLUMN late int")
        db.sql("UPDATE a SET late = 1 WHERE id = 30")
    db.wait_caught_up("m")
    assert last_file_columns(root, "a") == ["id", "n", "extra", "late", "__rowMarker__"]
    assert_mirror_equals_source(db.conn, root, "public", "a")
    assert not [e for e, _ in events(db, "m", "a") if e.startswith("Reseed")], events(db, "m", "a")
    changed = [d for e, d in events(db, "m", "a") if e == "ColumnsChanged"]
    assert changed == ["added: extra; dropped: none", "added: none; dropped: v", "added: late; dropped: none"], changed
    verify_ok(db, "m")
    # A column added with a default while the decoder is not running: the decoder compares with
    # the columns recorded for the files, not with the catalog it starts with, so it reseeds.
    db.sql("SELECT azure_cdc.pause_mirror('m')")
    db.sql("ALTER TABLE a ADD COLUMN d int DEFAULT 5")
    db.sql("SELECT azure_cdc.resume_mirror('m')")
    db.sql("UPDATE a SET n = 7 WHERE id = 40")
    reseeded(db, "m", "a")
    db.wait_caught_up("m")
    assert_mirror_equals_source(db.conn, root, "public", "a")
    verify_ok(db, "m")


def test_resync_table_takes_a_failed_table_back(db):
    db.sql("CREATE TABLE k (id int, v text)")
    db.sql("INSERT INTO k SELECT g, 'v' FROM generate_series(1, 100) g")
    root = db.start_mirror("m")
    db.wait_snapshot("m")
    db.sql("UPDATE k SET v = 'parks it' WHERE id = 1")
    wait_for("the table to fail", lambda: db.status("m")[("public", "k")]["state"] == "Failed")
    db.sql("ALTER TABLE k ADD PRIMARY KEY (id)")
    db.sql("SELECT azure_cdc.resync_table('m', 'k')")
    reseeded(db, "m", "k")
    db.sql("UPDATE k SET v = 'followed' WHERE id = 3")
    db.sql("DELETE FROM k WHERE id = 4")
    db.wait_caught_up("m")
    rep = assert_mirror_equals_source(db.conn, root, "public", "k")
    assert rep.keys == ["id"], "the reseed took the new primary key"
    st = db.status("m")[("public", "k")]
    assert st["status"] == "OK" and st["error"] is None


def test_add_and_remove_tables_on_a_running_mirror(db):
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text)")
    db.sql("CREATE TABLE b (id int PRIMARY KEY, v text)")
    db.sql("CREATE TABLE c (id int PRIMARY KEY, v text)")
    for t in ("a", "b", "c"):
        db.sql(f"INSERT INTO {t} SELECT g, '{t}' || g FROM generate_series(1, 2000) g")
    root = db.start_mirror("m", ["a"])
    db.wait_snapshot("m")
    with Workload(db, ["a", "b"]):
        assert "2 tables added" in db.one("SELECT azure_cdc.add_tables('m', ARRAY['b', 'public.c'])")
        reseeded(db, "m", "b")
        reseeded(db, "m", "c")
    db.sql("UPDATE c SET v = 'after' WHERE id <= 3")
    db.wait_caught_up("m")
    for t in ("a", "b", "c"):
        assert_mirror_equals_source(db.conn, root, "public", t)
    # Removing: the table's files stay as they are; later changes are not published.
    assert "public.b" in db.one("SELECT azure_cdc.remove_tables('m', ARRAY['b'])")
    db.wait_caught_up("m")
    before = numbers(root, "b")
    db.sql("INSERT INTO b VALUES (99999, 'not published')")
    db.sql("INSERT INTO a VALUES (99999, 'published')")
    db.wait_caught_up("m")
    assert numbers(root, "b") == before
    assert db.status("m")[("public", "b")]["state"] == "Stopped"
    assert_mirror_equals_source(db.conn, root, "public", "a")
    # Errors: a table not in the mirror, a view, an unknown mirror.
    db.sql("CREATE VIEW v AS SELECT 1 AS x")
    for q, code in [
        ("SELECT azure_cdc.remove_tables('m', ARRAY['b'])", "42P01"),
        ("SELECT azure_cdc.add_tables('m', ARRAY['v'])", "42809"),
        ("SELECT azure_cdc.add_tables('nosuch', ARRAY['b'])", "42704"),
        ("SELECT azure_cdc.add_tables('m', ARRAY['nosuch'])", "42P01"),
    ]:
        with pytest.raises(psycopg.Error) as ei:
            db.sql(q)
        assert ei.value.sqlstate == code, (q, ei.value)
    # Taken back: copied again from 1.
    db.sql("SELECT azure_cdc.add_tables('m', ARRAY['b'])")
    reseeded(db, "m", "b", count=2)
    db.wait_caught_up("m")
    assert_mirror_equals_source(db.conn, root, "public", "b")
    verify_ok(db, "m")


def test_mirror_of_all_tables_takes_new_tables_and_marks_dropped_ones(db):
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text)")
    db.sql("CREATE TABLE doomed (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO doomed SELECT g, 'd' FROM generate_series(1, 50) g")
    db.sql("CREATE VIEW a_view AS SELECT * FROM a")
    db.sql("CREATE MATERIALIZED VIEW a_mat AS SELECT * FROM a")
    db.sql("CREATE UNLOGGED TABLE scratch0 (id int)")
    notices = []
    db.conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    root = db.start_mirror("m")
    skipped = [n for n in notices if "cannot be mirrored" in n]
    assert skipped and all(s in skipped[0] for s in (
        "public.a_view (a view)", "public.a_mat (a materialized view)", "public.scratch0 (an unlogged table)")), notices
    db.wait_snapshot("m")
    db.sql("CREATE TABLE later (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO later SELECT g, 'l' || g FROM generate_series(1, 500) g")
    db.sql("CREATE UNLOGGED TABLE scratch (id int)")
    db.sql("INSERT INTO scratch VALUES (1)")
    db.sql("INSERT INTO a VALUES (1, 'a')")
    reseeded(db, "m", "later")
    db.sql("UPDATE later SET v = 'changed' WHERE id <= 10")
    db.sql("DELETE FROM doomed WHERE id <= 5")
    db.wait_caught_up("m")
    kept = numbers(root, "doomed")
    db.sql("DROP TABLE doomed")
    db.sql("INSERT INTO a VALUES (2, 'after the drop')")
    wait_for("doomed Dropped", lambda: db.status("m")[("public", "doomed")]["state"] == "Dropped")
    db.wait_caught_up("m")
    for t in ("a", "later"):
        assert_mirror_equals_source(db.conn, root, "public", t)
    assert numbers(root, "doomed") == kept, "a dropped table's files are kept"
    st = db.status("m")
    assert ("public", "scratch") not in st, "unlogged tables are not mirrored"
    assert st[("public", "doomed")]["status"] == "OK"
    ev = events(db, "m", "later")
    assert ("ReseedRequested", "a new table of a mirror of all tables") in ev
    assert "Dropped" in [e for e, _ in events(db, "m", "doomed")]
    verify_ok(db, "m")


def test_tables_without_a_primary_key(db):
    # A unique index of NOT NULL columns is the key (made the replica identity, with a NOTICE).
    db.sql("CREATE TABLE u (code int NOT NULL, region int NOT NULL, v int, UNIQUE (code, region))")
    db.sql("CREATE UNIQUE INDEX u_nullable ON u (v)")
    # REPLICA IDENTITY FULL set by the user: every column is the key.
    db.sql("CREATE TABLE f (a int, b text)")
    db.sql("ALTER TABLE f REPLICA IDENTITY FULL")
    # Neither: inserts only, a warning that says how to get more.
    db.sql("CREATE TABLE n (a int, b text)")
    db.sql("INSERT INTO u SELECT g, g % 3, g FROM generate_series(1, 300) g")
    db.sql("INSERT INTO f SELECT g, 'b' || g FROM generate_series(1, 300) g")
    db.sql("INSERT INTO n VALUES (1, 'x')")
    notices = []
    db.conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    root = db.start_mirror("m", ["u", "f", "n"])
    assert any("USING INDEX" in n and "public.u" in n for n in notices), notices
    assert db.one("SELECT relreplident FROM pg_class WHERE oid = 'u'::regclass") == "i"
    assert db.one("SELECT relreplident FROM pg_class WHERE oid = 'n'::regclass") == "d", "a keyless table is left alone"
    db.wait_snapshot("m")
    db.sql("UPDATE u SET v = -v WHERE region = 1")
    db.sql("UPDATE u SET code = 1000 WHERE code = 2")
    db.sql("DELETE FROM u WHERE region = 2")
    db.sql("UPDATE f SET b = 'changed' WHERE a <= 10")
    db.sql("DELETE FROM f WHERE a > 290")
    db.sql("INSERT INTO n VALUES (2, 'y')")
    db.wait_caught_up("m")
    for t, keys in (("u", ["code", "region"]), ("f", ["a", "b"]), ("n", [])):
        rep = assert_mirror_equals_source(db.conn, root, "public", t)
        assert rep.keys == keys, (t, rep.keys)
    st = db.status("m")
    assert st[("public", "u")]["status"] == "OK" and st[("public", "f")]["status"] == "OK"
    assert st[("public", "n")]["status"] == "WARNING"
    h = db.sql("SELECT object, code, hint FROM azure_cdc.get_health_status('m') WHERE scope = 'table'")
    assert [r[:2] for r in h] == [("m: public.n", "CDC_WARN_TABLE_WITHOUT_KEY")] and "REPLICA IDENTITY FULL" in h[0][2], h
    verify_ok(db, "m")
