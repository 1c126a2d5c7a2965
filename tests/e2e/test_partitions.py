"""Partitioned tables, end to end: a partitioned table is mirrored as one table (one folder) with the
rows of every partition, at any level, whatever each partition's column order; rows that move between
partitions; partitions attached, detached, created and truncated later (each reseeds that table
only); and a mirror of all tables, which takes partitioned tables and leaves their partitions to
them. Each test ends with the replay comparison against the source and verify_mirror."""

from replay import assert_mirror_equals_source, table_folder
from conftest import events, numbers, reseeded, verify_ok
import os


def reasons(db, mirror, table):
    return [d for e, d in events(db, mirror, table) if e == "ReseedRequested"]


def test_partitioned_table_is_one_table_through_attach_detach_create_and_truncate(db):
    db.sql("CREATE TABLE orders (id int, region text, v text, amount numeric(10,2), PRIMARY KEY (id, region)) "
           "PARTITION BY LIST (region)")
    db.sql("CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu')")
    # Two levels: a partition that is itself partitioned.
    db.sql("CREATE TABLE orders_us PARTITION OF orders FOR VALUES IN ('us') PARTITION BY RANGE (id)")
    db.sql("CREATE TABLE orders_us_low PARTITION OF orders_us FOR VALUES FROM (MINVALUE) TO (1000)")
    db.sql("CREATE TABLE orders_us_high PARTITION OF orders_us FOR VALUES FROM (1000) TO (MAXVALUE)")
    # A partition with its columns in another order and a dropped column.
    db.sql("CREATE TABLE orders_asia (junk int, amount numeric(10,2), v text, region text NOT NULL, id int NOT NULL)")
    db.sql("ALTER TABLE orders_asia DROP COLUMN junk")
    db.sql("ALTER TABLE orders ATTACH PARTITION orders_asia FOR VALUES IN ('asia')")
    for i, region in enumerate(("eu", "us", "asia")):
        db.sql("INSERT INTO orders SELECT g, %s, 'v' || g, g * 1.5 FROM generate_series(1, 2000) g", (region,))
    db.sql("CREATE TABLE other (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO other SELECT g, 'o' FROM generate_series(1, 100) g")
    root = db.start_mirror("m", ["orders", "other"])
    db.wait_snapshot("m")
    st = db.status("m")
    assert set(st) == {("public", "orders"), ("public", "other")}, st
    assert st[("public", "orders")]["rows"] == 6000

    # Changes in every partition, and rows that move from one partition to another.
    db.sql("INSERT INTO orders VALUES (5000, 'us', 'high', 1), (5001, 'asia', 'a', 2), (5002, 'eu', 'e', 3)")
    db.sql("UPDATE orders SET amount = -amount WHERE id % 100 = 0")
    db.sql("UPDATE orders SET region = 'asia', id = id + 3000 WHERE region = 'eu' AND id <= 20")
    db.sql("UPDATE orders SET id = id + 2000 WHERE region = 'us' AND id BETWEEN 990 AND 999")
    db.sql("DELETE FROM orders WHERE id % 250 = 0")
    db.wait_caught_up("m")
    assert_mirror_equals_source(db.conn, root, "public", "orders")
    assert not reasons(db, "m", "orders"), "row changes in partitions reseed nothing"

    # A table with rows attached as a partition: its rows join the mirror (the table is reseeded).
    db.sql("CREATE TABLE orders_af (LIKE orders)")
    db.sql("INSERT INTO orders_af SELECT g, 'af', 'af' || g, g FROM generate_series(1, 500) g")
    db.sql("ALTER TABLE orders ATTACH PARTITION orders_af FOR VALUES IN ('af')")
    reseeded(db, "m", "orders", 1)
    db.sql("UPDATE orders SET v = 'after attach' WHERE region = 'af' AND id <= 10")
    db.wait_caught_up("m")
    assert_mirror_equals_source(db.conn, root, "public", "orders")

    # Detached: its rows leave the mirror, and its later changes are not the mirror's.
    db.sql("ALTER TABLE orders DETACH PARTITION orders_eu")
    reseeded(db, "m", "orders", 2)
    db.sql("INSERT INTO orders_eu VALUES (9999, 'eu', 'not mirrored', 0)")
    db.sql("UPDATE orders SET v = 'after detach' WHERE id = 7")
    db.wait_caught_up("m")
    assert_mirror_equals_source(db.conn, root, "public", "orders")

    # A partition created later, filled in the same transaction and after.
    with db.conn.transaction():
        db.sql("CREATE TABLE orders_sa PARTITION OF orders FOR VALUES IN ('sa')")
        db.sql("INSERT INTO orders SELECT g, 'sa', 'sa', 0 FROM generate_series(1, 50) g")
    reseeded(db, "m", "orders", 3)
    db.sql("INSERT INTO orders VALUES (51, 'sa', 'later', 0)")
    # One partition truncated: its rows leave the mirror, the others stay.
    db.sql("TRUNCATE orders_us_low")
    reseeded(db, "m", "orders", 4)
    db.sql("INSERT INTO orders VALUES (1, 'us', 'again', 1)")
    db.sql("UPDATE other SET v = 'untouched' WHERE id = 1")
    db.wait_caught_up("m")

    for t in ("orders", "other"):
        assert_mirror_equals_source(db.conn, root, "public", t)
    r = reasons(db, "m", "orders")
    assert r.count("its partitions changed") == 3 and r[-1] == "the table was truncated", r
    assert not reasons(db, "m", "other")
    assert numbers(root, "other")[0] == 1 and len(numbers(root, "other")) >= 2
    assert not os.path.exists(table_folder(root, "public", "orders_eu")), "a partition has no folder of its own"
    verify_ok(db, "m")


def test_mirror_of_all_tables_takes_partitioned_tables_not_their_partitions(db):
    db.sql("CREATE TABLE plain (id int PRIMARY KEY, v text)")
    db.sql("CREATE TABLE events (id int PRIMARY KEY, v text) PARTITION BY RANGE (id)")
    db.sql("CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM (0) TO (1000)")
    db.sql("CREATE TABLE events_2 PARTITION OF events FOR VALUES FROM (1000) TO (2000)")
    db.sql("INSERT INTO events SELECT g, 'e' || g FROM generate_series(1, 1999) g")
    notices = []
    db.conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    root = db.start_mirror("m")
    skipped = [n for n in notices if "cannot be mirrored" in n]
    assert skipped and "public.events_1 (a partition (mirrored with its partitioned table))" in skipped[0], notices
    db.wait_snapshot("m")
    assert set(db.status("m")) == {("public", "plain"), ("public", "events")}
    db.sql("UPDATE events SET v = 'changed' WHERE id % 10 = 0")
    # A partition detached is a table of its own: it joins the mirror when it changes.
    db.sql("ALTER TABLE events DETACH PARTITION events_2")
    reseeded(db, "m", "events", 1)
    db.sql("INSERT INTO events_2 VALUES (5000, 'standalone')")
    reseeded(db, "m", "events_2", 1)
    # A partitioned table created later joins the mirror with its first change.
    db.sql("CREATE TABLE later (id int PRIMARY KEY, v text) PARTITION BY HASH (id)")
    db.sql("CREATE TABLE later_0 PARTITION OF later FOR VALUES WITH (MODULUS 2, REMAINDER 0)")
    db.sql("CREATE TABLE later_1 PARTITION OF later FOR VALUES WITH (MODULUS 2, REMAINDER 1)")
    db.sql("INSERT INTO later SELECT g, 'l' FROM generate_series(1, 300) g")
    reseeded(db, "m", "later", 1)
    db.sql("DELETE FROM later WHERE id <= 10")
    db.sql("INSERT INTO plain VALUES (1, 'p')")
    db.wait_caught_up("m")
    for t in ("plain", "events", "events_2", "later"):
        assert_mirror_equals_source(db.conn, root, "public", t)
    assert ("public", "later_0") not in db.status("m")
    verify_ok(db, "m")
