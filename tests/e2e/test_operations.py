"""Operations, end to end: pause and resume, list_mirrors() with live figures, metrics(), the
events table, get_health_status() codes, and a slot invalidated by max_slot_wal_keep_size (created
again, every table reseeded). Each
status field is checked on a mirror where something provoked it; mirrors that go on end with the
replay comparison against the source."""

import time

import pytest

from conftest import wait_for
from replay import assert_mirror_equals_source


def mirrors(db):
    cur = db.conn.execute("SELECT * FROM azure_cdc.list_mirrors()")
    cols = [d.name for d in cur.description]
    return {r[0]: dict(zip(cols, r)) for r in cur.fetchall()}


def health(db, mirror=None):
    rows = db.sql("SELECT scope, object, status, code, message, hint FROM azure_cdc.get_health_status(%s)", (mirror,))
    return [dict(zip(("scope", "object", "status", "code", "message", "hint"), r)) for r in rows]


def events(db, mirror):
    return [r[0] for r in db.sql("SELECT event FROM azure_cdc.events WHERE mirror_name = %s ORDER BY event_id", (mirror,))]


def test_pause_and_resume_hold_and_then_deliver_everything(db):
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO a SELECT g, 'v' || g FROM generate_series(1, 1000) g")
    root = db.start_mirror("m")
    db.wait_snapshot("m")
    db.wait_caught_up("m")
    assert db.one("SELECT azure_cdc.pause_mirror('m')").startswith('mirror "m" paused')
    m = mirrors(db)["m"]
    assert m["state"] == "Paused" and m["worker_pid"] is None
    assert [h["code"] for h in health(db, "m")] == ["CDC_WARN_MIRROR_PAUSED"]
    # Changes while paused are held by the slot.
    db.sql("UPDATE a SET v = v || '!' WHERE id % 2 = 0")
    db.sql("DELETE FROM a WHERE id > 900")
    db.sql("INSERT INTO a SELECT g, 'late' FROM generate_series(2001, 2500) g")
    time.sleep(1)
    m = mirrors(db)["m"]
    assert m["lag_bytes"] > 0 and m["wal_retained_bytes"] >= m["lag_bytes"]
    with pytest.raises(Exception) as ei:
        db.sql("SELECT azure_cdc.pause_mirror('m')")
    assert ei.value.sqlstate == "55006"
    assert "Running" in db.one("SELECT azure_cdc.resume_mirror('m')")
    db.wait_caught_up("m")
    assert_mirror_equals_source(db.conn, root, "public", "a")
    assert mirrors(db)["m"]["state"] == "Running"
    assert health(db, "m") == []
    ev = events(db, "m")
    assert ev[:2] == ["Started", "SnapshotPublished"] and ev[-2:] == ["Paused", "Resumed"], ev


def test_list_mirrors_and_metrics_show_live_figures(db):
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text)")
    db.sql("CREATE TABLE nokey (v text)")
    db.sql("INSERT INTO nokey VALUES ('x')")
    root = db.start_mirror("m")
    db.wait_snapshot("m")
    # A steady stream of changes: rates over the last minute become positive.
    seen = {}

    def flowing():
        db.sql("INSERT INTO a SELECT g, 'v' FROM generate_series(coalesce((SELECT max(id) FROM a), 0) + 1, "
               "coalesce((SELECT max(id) FROM a), 0) + 200) g")
        m = mirrors(db)["m"]
        seen.update(m)
        return m["changes_per_second"] and m["changes_per_second"] > 0 and m["bytes_published"] > 0

    wait_for("positive change rate", flowing, deadline_s=180)
    db.wait_caught_up("m")
    m = mirrors(db)["m"]
    assert m["state"] == "Running with warning", "a table without keys is a warning"
    assert m["tables"] == 2 and m["tables_warning"] == 1 and m["tables_failed"] == 0
    assert m["target"] == "file://" + root and m["credential"] is None
    assert m["lag_bytes"] is not None and m["confirmed_lsn"] and m["wal_status"] == "reserved"
    assert m["safe_wal_bytes"] is None, "max_slot_wal_keep_size is unlimited"
    assert m["changes_published"] >= 200 and m["bytes_per_second"] > 0 and m["last_published_at"] is not None
    codes = {(h["scope"], h["code"]) for h in health(db, "m")}
    assert codes == {("table", "CDC_WARN_TABLE_WITHOUT_KEY")}
    rows = db.sql("SELECT metric, mirror_name, schema_name, table_name, value FROM azure_cdc.metrics()")
    by = {(r[0], r[2], r[3]): r[4] for r in rows if r[1] == "m"}
    assert by[("azure_cdc_mirror_up", None, None)] == 1
    assert by[("azure_cdc_tables", None, None)] == 2
    # Table counters reach the catalog at most a second after publication.
    wait_for("the table counters", lambda: [r[4] for r in db.sql(
        "SELECT * FROM azure_cdc.metrics() WHERE metric = 'azure_cdc_table_rows_replicated' AND table_name = 'a'")]
        == [db.one("SELECT count(*) FROM a")])
    assert ("azure_cdc_lag_bytes", None, None) in by and ("azure_cdc_changes_per_second", None, None) in by
    # The older, shorter status reads the same figures.
    assert db.one("SELECT decoder_pid FROM azure_cdc.get_mirror_status() WHERE mirror_name = 'm'") == m["worker_pid"]
    assert_mirror_equals_source(db.conn, root, "public", "a")


def test_invalidated_slot_is_reported_then_created_again_and_every_table_reseeded(db):
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text)")
    db.sql("CREATE TABLE b (id int PRIMARY KEY, v text)")
    db.sql("CREATE TABLE filler (v text)")
    db.sql("INSERT INTO a SELECT g, 'v' FROM generate_series(1, 100) g")
    db.sql("INSERT INTO b SELECT g, 'v' FROM generate_series(1, 100) g")
    root = db.start_mirror("m", ["a", "b"])
    db.wait_snapshot("m")
    db.wait_caught_up("m")
    with db.server_setting("max_slot_wal_keep_size", "32MB"):
        db.sql("SELECT azure_cdc.pause_mirror('m')")
        db.sql("INSERT INTO a VALUES (1000, 'in the WAL the slot loses')")
        db.sql("DELETE FROM b WHERE id <= 10")
        # The near-limit warning shows before the limit is reached.
        wait_for("the near-limit warning", lambda: (
            db.sql("INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 2000)") is None
            and "CDC_WARN_WAL_RETENTION_NEAR_LIMIT" in [h["code"] for h in health(db, "m")]))
        for _ in range(6):
            db.sql("INSERT INTO filler VALUES ('x')")
            db.sql("SELECT pg_switch_wal()")
        db.sql("CHECKPOINT")
        wait_for("the slot to be lost", lambda: mirrors(db)["m"]["wal_status"] == "lost")
        h = [x for x in health(db, "m") if x["code"] == "CDC_ERR_SLOT_INVALIDATED"]
        assert h and h[0]["status"] == "ERROR" and "reseeds every table" in h[0]["hint"], health(db, "m")
        db.sql("SELECT azure_cdc.resume_mirror('m')")
        for t in ("a", "b"):
            wait_for(f"reseed of {t}", lambda: (
                "Reseeded" in [r[0] for r in db.sql(
                    "SELECT event FROM azure_cdc.events WHERE mirror_name = 'm' AND table_name = %s", (t,))]
                and db.status("m")[("public", t)]["state"] == "Replicating"))
    db.sql("UPDATE a SET v = 'after' WHERE id = 1000")
    db.wait_caught_up("m")
    for t in ("a", "b"):
        assert_mirror_equals_source(db.conn, root, "public", t)
    lost = db.sql("SELECT detail FROM azure_cdc.events WHERE mirror_name = 'm' AND event = 'SlotLost'")
    assert lost and "invalidated" in lost[0][0] and "2 table(s) reseeded" in lost[0][0], lost
    m = mirrors(db)["m"]
    assert m["state"] == "Running" and m["wal_status"] != "lost" and m["last_error"] is None
    assert health(db, "m") == []


def test_events_are_kept_bounded(db):
    db.sql("CREATE TABLE a (id int PRIMARY KEY)")
    db.start_mirror("m")
    db.wait_snapshot("m")
    # (A superuser may write the events table; admins may not.) Another mirror's events stay: one
    # mirror's events never push out another's.
    db.sql("INSERT INTO azure_cdc.events (mirror_id, mirror_name, event) SELECT -1, 'gone', 'Filler' FROM generate_series(1, 20)")
    db.sql("INSERT INTO azure_cdc.events (mirror_id, mirror_name, event) "
           "SELECT (SELECT mirror_id FROM azure_cdc.mirrors WHERE mirror_name = 'm'), 'm', 'Filler' FROM generate_series(1, 10050)")
    db.sql("SELECT azure_cdc.pause_mirror('m')")
    assert db.one("SELECT count(*) FROM azure_cdc.events WHERE mirror_name = 'm'") == 10000
    assert db.one("SELECT count(*) FROM azure_cdc.events WHERE mirror_name = 'gone'") == 20
    assert db.one("SELECT event FROM azure_cdc.events ORDER BY event_id DESC LIMIT 1") == "Paused"


def test_health_of_the_server(db):
    assert [h for h in health(db) if h["scope"] == "system"] == []


def test_a_stop_in_progress_shows_stopping(db):
    import os
    import signal
    import threading
    db.sql("CREATE TABLE a (id int PRIMARY KEY)")
    db.start_mirror("m")
    db.wait_snapshot("m")
    pid = db.decoder_pid("m")
    # A decoder that cannot exit yet (stopped by a signal) keeps another session's stop_mirror waiting.
    os.kill(pid, signal.SIGSTOP)
    try:
        stopper = db.cluster.connect(db.name)
        t = threading.Thread(target=lambda: stopper.execute("SELECT azure_cdc.stop_mirror('m')"), daemon=True)
        t.start()
        wait_for("Stopping", lambda: mirrors(db)["m"]["state"] == "Stopping")
    finally:
        os.kill(pid, signal.SIGCONT)
    t.join(60)
    stopper.close()
    assert mirrors(db)["m"]["state"] == "Stopped"


def test_stop_mirror_is_refused_inside_a_transaction_block(db):
    """stop_mirror drops the mirror's slot, which no rollback brings back: inside a transaction block
    it is refused (25001) and nothing changes; the mirror goes on publishing."""
    import psycopg
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO a SELECT g, 'v' FROM generate_series(1, 100) g")
    root = db.start_mirror("m")
    db.wait_snapshot("m")
    with pytest.raises(psycopg.Error) as ei:
        with db.conn.transaction():
            db.conn.execute("SELECT azure_cdc.stop_mirror('m')")
    assert ei.value.sqlstate == "25001", ei.value
    assert mirrors(db)["m"]["state"] == "Running"
    assert db.one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'azure_cdc_m'") == 1
    db.sql("INSERT INTO a VALUES (1000, 'after')")
    db.wait_caught_up("m")
    assert_mirror_equals_source(db.conn, root, "public", "a")
    assert "stopped" in db.one("SELECT azure_cdc.stop_mirror('m')")
    assert db.one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'azure_cdc_m'") == 0


def test_the_decoders_own_catalog_writes_keep_its_plans(db):
    """The decoder records its counters in the catalog about once a second while changes flow. Its
    own cache resets around those writes change no mirrored table: they must not make it build its
    conversion plans again (nor look every table up again) after each batch. Counted in the server
    log, where the decoder notes each plan it builds (DEBUG1)."""
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v int)")
    db.sql("INSERT INTO a VALUES (1, 0)")
    db.start_mirror("m")
    db.wait_snapshot("m")
    relid = db.one("SELECT 'a'::regclass::oid")
    line = f"building the conversion plan of relation {relid}"
    with db.server_setting("log_min_messages", "debug1"):
        db.sql("UPDATE a SET v = v + 1")
        db.wait_caught_up("m")
        with open(db.cluster.log) as f:
            before = sum(1 for x in f if line in x)
        for _ in range(6):
            db.sql("UPDATE a SET v = v + 1")
            db.wait_caught_up("m")
            time.sleep(1.2)  # past the decoder's once-a-second catalog write
        with open(db.cluster.log) as f:
            after = sum(1 for x in f if line in x)
    assert before >= 1, "the plan was built for the first change"
    assert after - before == 0, f"the plan was built {after - before} more times"
    st = db.status("m")[("public", "a")]
    assert st["rows"] >= 7, st
