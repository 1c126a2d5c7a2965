"""verify_table() / verify_mirror(), end to end: OK on a correct mirror while a workload keeps
changing the tables, MISMATCH when a landing-zone file is altered or removed, and clear errors."""

import glob
import os
import random
import threading
import time

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from replay import table_folder

SCHEMA = """
CREATE TABLE a (id int PRIMARY KEY, n int, t text, f float8);
CREATE TABLE b (k1 int, k2 text, v numeric(12,2), PRIMARY KEY (k1, k2));
CREATE TABLE k (v text);
"""


def verify(db, mirror, table=None):
    if table:
        cur = db.conn.execute("SELECT * FROM azure_cdc.verify_table(%s, %s)", (mirror, table))
    else:
        cur = db.conn.execute("SELECT * FROM azure_cdc.verify_mirror(%s)", (mirror,))
    cols = [d.name for d in cur.description]
    return {r[2]: dict(zip(cols, r)) for r in cur.fetchall()}


def workload(cluster, dbname, stop, seed):
    rng = random.Random(seed)
    conn = psycopg.connect(host="127.0.0.1", port=cluster.port, user="postgres", dbname=dbname, autocommit=True)
    i = 10000
    while not stop.is_set():
        with conn.transaction():
            i += 1
            conn.execute("INSERT INTO a VALUES (%s, %s, %s, %s)", (i, rng.randint(0, 9), f"w{i}", rng.random()))
            conn.execute("UPDATE a SET n = n + 1, f = -0.0 WHERE id %% 37 = %s", (rng.randint(0, 36),))
            if rng.random() < 0.3:
                conn.execute("DELETE FROM a WHERE id = (SELECT min(id) FROM a)")
            if rng.random() < 0.2:
                conn.execute("UPDATE a SET id = id + 1000000 WHERE id = (SELECT min(id) FROM a WHERE id < 1000000)")
            conn.execute("INSERT INTO b VALUES (%s, %s, %s) ON CONFLICT (k1, k2) DO UPDATE SET v = b.v + 1",
                         (rng.randint(0, 30), f"k{rng.randint(0, 30)}", rng.randint(0, 9999) / 100))
            conn.execute("INSERT INTO k VALUES (%s)", (f"k{i}",))
        time.sleep(0.005)
    conn.close()


def seed(db):
    db.sql(SCHEMA)
    db.sql("INSERT INTO a SELECT g, g % 10, 'r' || g, g / 3.0 FROM generate_series(1, 3000) g")
    db.sql("INSERT INTO b SELECT g % 30, 'k' || (g % 31), g FROM generate_series(1, 500) g ON CONFLICT DO NOTHING")
    db.sql("INSERT INTO k SELECT 'x' || g FROM generate_series(1, 100) g")


def test_verify_passes_on_a_correct_mirror_under_load(db, cluster):
    seed(db)
    db.start_mirror("m")
    db.wait_snapshot("m")
    stop = threading.Event()
    t = threading.Thread(target=workload, args=(cluster, db.name, stop, 11))
    t.start()
    try:
        for _ in range(3):
            time.sleep(1)
            res = verify(db, "m")
            assert set(res) == {"a", "b", "k"}
            for name, r in res.items():
                assert r["verdict"] == "OK", r
                assert r["source_rows"] == r["mirror_rows"] and r["files"] >= 1, r
            assert res["a"]["source_rows"] > 2000
    finally:
        stop.set()
        t.join()
    # The same on the quiet mirror, table by table.
    assert verify(db, "m", "public.a")["a"]["verdict"] == "OK"
    assert verify(db, "m", "b")["b"]["verdict"] == "OK"


def rewrite(path, change):
    """Rewrites a Parquet file in place with `change` applied to its rows (metadata kept)."""
    t = pq.read_table(path)
    rows = t.to_pylist()
    change(rows)
    new = pa.Table.from_pylist(rows, schema=t.schema)
    st = os.stat(path)
    pq.write_table(new, path)
    os.chown(path, st.st_uid, st.st_gid)


def test_verify_detects_an_altered_and_a_removed_file(db):
    seed(db)
    root = db.start_mirror("m", ["a"])
    db.wait_snapshot("m")
    for i in range(3):
        db.sql("UPDATE a SET t = t || '+' WHERE id %% 10 = %s", (i,))
        db.wait_caught_up("m")
    assert verify(db, "m", "a")["a"]["verdict"] == "OK"
    files = sorted(glob.glob(os.path.join(table_folder(root, "public", "a"), "0*.parquet")))
    assert len(files) >= 4, files

    def alter(rows):
        rows[0]["t"] = "tampered"
    rewrite(files[-1], alter)
    r = verify(db, "m", "a")["a"]
    assert r["verdict"] == "MISMATCH" and r["differing"] == 1 and r["missing"] == 0 and r["extra"] == 0, r
    assert len(r["sample"]) == 1 and r["sample"][0].startswith("differs: id="), r

    os.remove(files[-2])
    r = verify(db, "m", "a")["a"]
    assert r["verdict"] == "MISMATCH" and "gap" in r["detail"], r
    assert r["differing"] > 0, r


def test_verify_errors(db):
    db.sql("CREATE TABLE a (id int PRIMARY KEY)")
    db.sql("CREATE TABLE other (id int PRIMARY KEY)")
    db.start_mirror("m", ["a"])
    db.wait_snapshot("m")
    for call, args, state in [
        ("SELECT * FROM azure_cdc.verify_mirror(%s)", ("nosuch",), "42704"),
        ("SELECT * FROM azure_cdc.verify_table(%s, %s)", ("m", "other"), "42704"),
        ("SELECT * FROM azure_cdc.verify_table(%s, %s)", ("m", "nosuch"), "42P01"),
    ]:
        with pytest.raises(psycopg.Error) as e:
            db.sql(call, args)
        assert e.value.sqlstate == state, (call, args, e.value)
    db.sql("SELECT azure_cdc.pause_mirror('m')")
    with pytest.raises(psycopg.Error) as e:
        db.sql("SELECT * FROM azure_cdc.verify_mirror('m')")
    assert e.value.sqlstate == "55000" and "only a Running mirror" in str(e.value)
