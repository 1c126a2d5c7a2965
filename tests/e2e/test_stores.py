"""S3 and Google Cloud Storage targets, end to end, with the tests Azurite runs (test_targets.py):
the snapshot and the changes replayed from the store equal to the source, an outage survived
exactly, and a credential the store refuses (start_mirror) or that may not write (a running
mirror) stopping the mirror until it is fixed and resumed. S3 runs against moto's server with IAM
enforced; GCS against gcs.GcsStandIn (see stores.py)."""

import itertools
import os
import random
import tempfile
import threading
import time

import psycopg
import pytest
from psycopg.types.json import Jsonb

from replay import assert_mirror_equals_source

_buckets = itertools.count(1)


def new_bucket(store):
    name = f"lake{os.getpid()}x{next(_buckets)}"
    store.create_bucket(name)
    return name


def make_credential(db, name, options):
    db.sql("SELECT azure_cdc.create_credential(%s, %s)", (name, Jsonb(options)))


def start(db, store, mirror, bucket, prefix="LandingZone", credential="lake"):
    db.sql("SELECT azure_cdc.start_mirror(%s, %s, NULL, %s)",
           (mirror, store.url(bucket, prefix), Jsonb({"credential": credential})))


def assert_all_equal(db, store, bucket, prefix, tables):
    root = store.download(bucket, prefix, tempfile.mkdtemp(prefix="azure_cdc_download_"))
    return {t: assert_mirror_equals_source(db.conn, root, "public", t) for t in tables}


def expect_error(db, sqlstate, query, params=None):
    with pytest.raises(psycopg.Error) as ei:
        db.sql(query, params)
    assert ei.value.sqlstate == sqlstate, f"{ei.value.sqlstate}: {ei.value}"
    return ei.value


def workload(db, stop, rng):
    conn = db.cluster.connect(db.name)
    i = 100000
    while not stop.is_set():
        with conn.transaction():
            i += 1
            conn.execute("INSERT INTO a VALUES (%s, %s, %s)", (i, rng.randint(0, 9), f"w{i}"))
            conn.execute("UPDATE a SET n = n + 1 WHERE id %% 50 = %s", (rng.randint(0, 49),))
            if rng.random() < 0.3:
                conn.execute("DELETE FROM a WHERE id = (SELECT min(id) FROM a)")
        time.sleep(0.02)
    conn.close()


def wait_state(db, mirror, state, deadline_s=300):
    end = time.time() + deadline_s
    while db.one("SELECT state FROM azure_cdc.mirrors WHERE mirror_name = %s", (mirror,)) != state:
        assert time.time() < end, db.sql("SELECT state, last_error FROM azure_cdc.mirrors")
        time.sleep(0.5)


def test_snapshot_and_changes(db, store):
    bucket = new_bucket(store)
    make_credential(db, "lake", store.credential_options())
    db.sql("CREATE TABLE a (id int PRIMARY KEY, n int, t text)")
    db.sql("CREATE TABLE \"Odd Name/..\" (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO a SELECT g, g % 10, 'r' || g FROM generate_series(1, 5000) g")
    db.sql("INSERT INTO \"Odd Name/..\" SELECT g, 'v' || g FROM generate_series(1, 100) g")
    start(db, store, "m", bucket, "sales/LandingZone")
    db.wait_snapshot("m")
    db.sql("UPDATE a SET t = t || '!' WHERE id % 3 = 0")
    db.sql("DELETE FROM a WHERE id % 7 = 0")
    db.sql("UPDATE a SET id = id + 100000 WHERE id < 50")
    db.sql("INSERT INTO \"Odd Name/..\" VALUES (1000, 'new')")
    db.wait_caught_up("m")
    names = store.object_names(bucket, "sales/LandingZone/")
    assert "sales/LandingZone/_partnerEvents.json" in names
    assert "sales/LandingZone/public.schema/Odd Name%2F.%2E/_metadata.json" in names, names
    assert not [n for n in names if n.rsplit("/", 1)[-1].startswith("_0")], "no temporary object is left"
    reps = assert_all_equal(db, store, bucket, "sales/LandingZone", ["a", "Odd Name/.."])
    assert reps["a"].files >= 2, "snapshot file and change files"
    assert db.status("m")[("public", "a")]["status"] == "OK"


def test_an_outage_is_survived(db, store):
    bucket = new_bucket(store)
    make_credential(db, "lake", store.credential_options())
    db.sql("CREATE TABLE a (id int PRIMARY KEY, n int, t text)")
    db.sql("INSERT INTO a SELECT g, g % 10, 'r' || g FROM generate_series(1, 2000) g")
    start(db, store, "m", bucket)
    db.wait_snapshot("m")
    stop = threading.Event()
    t = threading.Thread(target=workload, args=(db, stop, random.Random(7)))
    t.start()
    try:
        time.sleep(2)
        store.down()
        # While the store is down the table says WARNING with the error, and the slot holds WAL.
        end = time.time() + 180
        while True:
            st = db.status("m")[("public", "a")]
            if st["status"] == "WARNING" and st["error"]:
                break
            assert time.time() < end, f"no warning while the store is down: {st}"
            time.sleep(0.5)
        assert st["state"] == "Replicating"
        assert db.one("SELECT lag_bytes FROM azure_cdc.get_mirror_status() WHERE mirror_name = 'm'") > 0
        assert db.sql("SELECT last_error_code FROM azure_cdc.list_mirrors()") == [("CDC_ERR_TARGET_UNREACHABLE",)]
    finally:
        store.up()
    time.sleep(2)
    stop.set()
    t.join()
    db.wait_caught_up("m", deadline_s=600)
    assert_all_equal(db, store, bucket, "LandingZone", ["a"])
    # The warning clears once the decoder has published again.
    end = time.time() + 60
    while (st := db.status("m")[("public", "a")])["status"] != "OK" or st["error"] is not None:
        assert time.time() < end, st
        time.sleep(0.5)


def test_a_refused_credential_stops_the_mirror(db, store):
    bucket = new_bucket(store)
    db.sql("CREATE TABLE a (id int PRIMARY KEY, n int, t text)")
    db.sql("INSERT INTO a SELECT g, g, 'r' FROM generate_series(1, 1000) g")
    # A key the store does not accept is refused by start_mirror, and nothing is created.
    make_credential(db, "refused", store.refused_options())
    e = expect_error(db, "28P01", "SELECT azure_cdc.start_mirror('x', %s, NULL, %s)",
                     (store.url(bucket, "lz"), Jsonb({"credential": "refused"})))
    secret = next(iter(v for k, v in store.refused_options().items()
                       if k in ("secret_access_key", "service_account_key", "client_secret")))
    assert secret[:24] not in str(e) + str(e.diag.message_detail)
    assert db.one("SELECT count(*) FROM azure_cdc.mirrors") == 0
    assert store.object_names(bucket) == []
    # A running mirror whose credential may no longer write stops (Failed), holding WAL, until the
    # cause is fixed and it is resumed.
    make_credential(db, "lake", store.credential_options())
    start(db, store, "m", bucket)
    db.wait_snapshot("m")
    make_credential(db, "lake", store.read_only_options())
    db.sql("SELECT pg_terminate_backend(%s)", (db.decoder_pid("m"),))
    db.sql("INSERT INTO a SELECT g, g, 'later' FROM generate_series(1001, 1500) g")
    wait_state(db, "m", "Failed")
    assert db.sql("SELECT scope, status, code FROM azure_cdc.get_health_status('m')") == [
        ("mirror", "ERROR", "CDC_ERR_TARGET_PERMISSION_DENIED")]
    assert db.one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'azure_cdc_m'") == 1
    expect_error(db, "28000", "SELECT azure_cdc.resume_mirror('m')")
    make_credential(db, "lake", store.credential_options())
    assert "Running" in db.one("SELECT azure_cdc.resume_mirror('m')")
    db.wait_caught_up("m")
    assert_all_equal(db, store, bucket, "LandingZone", ["a"])
    assert db.status("m")[("public", "a")]["status"] == "OK"
