"""Object-store targets, end to end against Azurite (the Azure Blob Storage emulator, on 127.0.0.1):
snapshot and changes replayed from the container, large files uploaded in parts, an outage survived,
clear errors at start_mirror, a permission error that stops the mirror until resume_mirror, and
credentials that no one but a superuser can read and that never reach the server log."""

import itertools
import os
import random
import tempfile
import threading
import time

import psycopg
import pytest
from psycopg.types.json import Jsonb

from replay import assert_mirror_equals_source, data_files, table_folder

_containers = itertools.count(1)


def new_container(azurite):
    name = f"lake{os.getpid()}x{next(_containers)}"
    azurite.create_container(name)
    return name


def make_credential(db, name, options):
    db.sql("SELECT azure_cdc.create_credential(%s, %s)", (name, Jsonb(options)))


def start(db, azurite, mirror, container, prefix="LandingZone", credential="azurite", tables=None):
    url = f"az://{container}/{prefix}"
    db.sql("SELECT azure_cdc.start_mirror(%s, %s, %s, %s)", (mirror, url, tables, Jsonb({"credential": credential})))
    return url


def assert_all_equal(db, azurite, container, prefix, tables):
    """Downloads the landing zone and replays every table (contiguous numbers, no temporary object,
    no insert of an existing key, no update/delete of a missing key), comparing with the source."""
    root = azurite.download(container, prefix, tempfile.mkdtemp(prefix="azure_cdc_download_"))
    reps = {}
    for t in tables:
        reps[t] = assert_mirror_equals_source(db.conn, root, "public", t)
    return root, reps


def workload(db, stop, rng):
    """Inserts, updates and deletes on table a until `stop` is set."""
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


def test_snapshot_and_changes_on_azurite(db, azurite):
    container = new_container(azurite)
    make_credential(db, "azurite", azurite.credential_options())
    db.sql("CREATE TABLE a (id int PRIMARY KEY, n int, t text)")
    db.sql("CREATE TABLE \"Odd Name/..\" (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO a SELECT g, g % 10, 'r' || g FROM generate_series(1, 5000) g")
    db.sql("INSERT INTO \"Odd Name/..\" SELECT g, 'v' || g FROM generate_series(1, 100) g")
    msg = db.one("SELECT azure_cdc.start_mirror('m', %s, NULL, %s)",
                 (f"az://{container}/sales/LandingZone", Jsonb({"credential": "azurite"})))
    assert f"az://{container}/sales/LandingZone" in msg
    db.wait_snapshot("m")
    db.sql("UPDATE a SET t = t || '!' WHERE id % 3 = 0")
    db.sql("DELETE FROM a WHERE id % 7 = 0")
    db.sql("UPDATE a SET id = id + 100000 WHERE id < 50")
    db.sql("INSERT INTO \"Odd Name/..\" VALUES (1000, 'new')")
    db.wait_caught_up("m")
    names = azurite.blob_names(container, "sales/LandingZone/")
    assert "sales/LandingZone/_partnerEvents.json" in names
    assert "sales/LandingZone/public.schema/Odd Name%2F.%2E/_metadata.json" in names, names
    assert not [n for n in names if n.rsplit("/", 1)[-1].startswith("_0")], "no temporary object is left"
    root, reps = assert_all_equal(db, azurite, container, "sales/LandingZone", ["a", "Odd Name/.."])
    assert reps["a"].files >= 2, "snapshot file and change files"
    st = db.status("m")
    assert st[("public", "a")]["status"] == "OK"


def test_large_files_upload_in_parts(db, azurite):
    """A file larger than azurite.onelake_buffer_size goes up as a multipart upload, part by part."""
    container = new_container(azurite)
    make_credential(db, "azurite", azurite.credential_options())
    db.sql("CREATE TABLE a (id int PRIMARY KEY, n int, t text, b bytea)")
    # 32 random bytes per row do not compress: about 10 MB of Parquet.
    db.sql("INSERT INTO a SELECT g, g, 'x', decode(md5(random()::text) || md5(random()::text), 'hex') "
           "FROM generate_series(1, 300000) g")
    # one snapshot worker: the table is written by one writer, into files larger than a part
    with db.server_setting("azure_cdc.onelake_buffer_size", "5MB"), \
            db.server_setting("azure_cdc.max_snapshot_workers", "1"):
        start(db, azurite, "m", container)
        db.wait_snapshot("m")
        db.sql("UPDATE a SET b = decode(md5(random()::text), 'hex') WHERE id <= 200000")
        db.wait_caught_up("m")
    root, reps = assert_all_equal(db, azurite, container, "LandingZone", ["a"])
    sizes = [os.path.getsize(p) for p in data_files(table_folder(root, "public", "a"))]
    assert max(sizes) > 5 * 1024 * 1024, f"a file larger than one part was published: {sizes}"


def test_outage_of_the_target_is_survived(db, azurite):
    container = new_container(azurite)
    make_credential(db, "azurite", azurite.credential_options())
    db.sql("CREATE TABLE a (id int PRIMARY KEY, n int, t text)")
    db.sql("INSERT INTO a SELECT g, g % 10, 'r' || g FROM generate_series(1, 2000) g")
    start(db, azurite, "m", container)
    db.wait_snapshot("m")
    stop = threading.Event()
    t = threading.Thread(target=workload, args=(db, stop, random.Random(5)))
    t.start()
    try:
        time.sleep(3)
        azurite.stop()
        down_at = time.time()
        # While the target is down, the table says WARNING with the error, and WAL is held.
        end = time.time() + 120
        while True:
            st = db.status("m")[("public", "a")]
            if st["status"] == "WARNING" and st["error"]:
                break
            assert time.time() < end, f"no warning while the target is down: {st}"
            time.sleep(0.5)
        assert st["state"] == "Replicating"
        lag = db.one("SELECT lag_bytes FROM azure_cdc.get_mirror_status() WHERE mirror_name = 'm'")
        assert lag > 0
        m = db.sql("SELECT state, last_error_code FROM azure_cdc.list_mirrors() WHERE mirror_name = 'm'")[0]
        assert m == ("Running with warning", "CDC_ERR_TARGET_UNREACHABLE"), m
        assert ("mirror", "WARNING", "CDC_ERR_TARGET_UNREACHABLE") in db.sql(
            "SELECT scope, status, code FROM azure_cdc.get_health_status('m')")
        time.sleep(max(0, 60 - (time.time() - down_at)))
    finally:
        azurite.start()
    time.sleep(3)
    stop.set()
    t.join()
    db.wait_caught_up("m", deadline_s=600)
    assert_all_equal(db, azurite, container, "LandingZone", ["a"])
    st = db.status("m")[("public", "a")]
    assert st["status"] == "OK" and st["error"] is None, st
    assert db.one("SELECT state FROM azure_cdc.mirrors WHERE mirror_name = 'm'") == "Running"


def expect_error(db, sqlstate, query, params=None, contains=None):
    with pytest.raises(psycopg.Error) as ei:
        db.sql(query, params)
    assert ei.value.sqlstate == sqlstate, f"{ei.value.sqlstate}: {ei.value}"
    if contains:
        assert contains in str(ei.value) + str(ei.value.diag.message_hint), str(ei.value)
    return ei.value


def test_start_mirror_proves_the_target(db, azurite):
    container = new_container(azurite)
    db.sql("CREATE TABLE a (id int PRIMARY KEY)")
    make_credential(db, "wrongkey", azurite.credential_options(account_key="V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3Jvbmc="))
    make_credential(db, "azurite", azurite.credential_options())
    make_credential(db, "nowhere", azurite.credential_options(endpoint="http://127.0.0.1:9/devstoreaccount1"))
    q = "SELECT azure_cdc.start_mirror('m', %s, NULL, %s)"
    e = expect_error(db, "28P01", q, (f"az://{container}/lz", Jsonb({"credential": "wrongkey"})))
    assert "V3Jvbmd" not in str(e) and "V3Jvbmd" not in str(e.diag.message_detail)
    expect_error(db, "58P01", q, ("az://no-such-container/lz", Jsonb({"credential": "azurite"})), contains="container")
    expect_error(db, "58030", q, (f"az://{container}/lz", Jsonb({"credential": "nowhere"})))
    expect_error(db, "42704", q, (f"az://{container}/lz", Jsonb({"credential": "missing"})))
    expect_error(db, "22023", q, (f"https://acct.blob.core.windows.net/{container}/lz?sv=1&sig=abc", Jsonb({})),
                 contains="credential")
    expect_error(db, "22023", q, ("ftp://somewhere/x", Jsonb({})), contains="s3://<bucket>")
    expect_error(db, "22023", q, (f"az://{container}/lz", Jsonb({"credential": "azurite", "other": 1})))
    # Nothing was created by any of them.
    assert db.one("SELECT count(*) FROM azure_cdc.mirrors") == 0
    assert db.one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'azure_cdc_m'") == 0
    assert azurite.blob_names(container) == []
    # A non-empty target is refused.
    azurite.service().get_container_client(container).upload_blob("lz/x.txt", b"x")
    expect_error(db, "55000", q, (f"az://{container}/lz", Jsonb({"credential": "azurite"})), contains="not empty")


def test_permission_error_stops_the_mirror_until_resumed(db, azurite):
    from datetime import datetime, timedelta, timezone
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    container = new_container(azurite)
    make_credential(db, "azurite", azurite.credential_options())
    db.sql("CREATE TABLE a (id int PRIMARY KEY, n int, t text)")
    db.sql("INSERT INTO a SELECT g, g, 'r' FROM generate_series(1, 1000) g")
    start(db, azurite, "m", container)
    db.wait_snapshot("m")
    # The credential is replaced by a read-only SAS; the next decoder can list and read, not write.
    sas = generate_container_sas("devstoreaccount1", container, account_key=azurite.credential_options()["account_key"],
                                 permission=ContainerSasPermissions(read=True, list=True),
                                 expiry=datetime.now(timezone.utc) + timedelta(hours=1))
    make_credential(db, "azurite", azurite.credential_options(account_key=None, sas_token=sas))
    pid = db.decoder_pid("m")
    db.sql("SELECT pg_terminate_backend(%s)", (pid,))
    db.sql("INSERT INTO a SELECT g, g, 'later' FROM generate_series(1001, 1500) g")
    end = time.time() + 300
    while db.one("SELECT state FROM azure_cdc.mirrors WHERE mirror_name = 'm'") != "Failed":
        assert time.time() < end, db.sql("SELECT state, last_error FROM azure_cdc.mirrors")
        time.sleep(0.5)
    st = db.status("m")[("public", "a")]
    assert st["status"] == "ERROR" and "Grant" in st["error"], st
    assert db.sql("SELECT scope, status, code FROM azure_cdc.get_health_status('m')") == [
        ("mirror", "ERROR", "CDC_ERR_TARGET_PERMISSION_DENIED")]
    assert db.one("SELECT state FROM azure_cdc.list_mirrors() WHERE mirror_name = 'm'") == "Failed"
    assert sas.split("sig=")[1][:10] not in st["error"]
    # No decoder runs while Failed, and the slot holds the WAL of the new rows.
    time.sleep(2)
    assert db.one("SELECT decoder_pid FROM azure_cdc.get_mirror_status() WHERE mirror_name = 'm'") is None
    assert db.one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'azure_cdc_m'") == 1
    # Resuming with the cause still there is refused, with the same kind of error.
    expect_error(db, "28000", "SELECT azure_cdc.resume_mirror('m')")
    make_credential(db, "azurite", azurite.credential_options())
    assert "Running" in db.one("SELECT azure_cdc.resume_mirror('m')")
    db.wait_caught_up("m")
    assert_all_equal(db, azurite, container, "LandingZone", ["a"])
    assert db.status("m")[("public", "a")]["status"] == "OK"
    ev = [r[0] for r in db.sql("SELECT event FROM azure_cdc.events WHERE mirror_name = 'm' ORDER BY event_id")]
    assert ev[-2:] == ["Resumed", "Recovered"] or ev[-1] == "Resumed", ev
    assert "Failed" in ev


def test_credentials_stay_secret(db, azurite, cluster):
    container = new_container(azurite)
    secret_key = azurite.credential_options()["account_key"]
    make_credential(db, "azurite", azurite.credential_options())
    db.sql("CREATE TABLE a (id int PRIMARY KEY)")
    db.sql("INSERT INTO a SELECT generate_series(1, 10)")
    start(db, azurite, "m", container)
    db.wait_snapshot("m")
    db.sql("DROP ROLE IF EXISTS cdc_alice; DROP ROLE IF EXISTS cdc_bob")
    db.sql("CREATE ROLE cdc_alice LOGIN; CREATE ROLE cdc_bob LOGIN IN ROLE azure_cdc_admin")
    try:
        for role in ("cdc_alice", "cdc_bob"):
            with psycopg.connect(host="127.0.0.1", port=cluster.port, user=role, dbname=db.name, autocommit=True) as c:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    c.execute("SELECT * FROM azure_cdc.credentials")
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    c.execute("SELECT azure_cdc.create_credential('x', %s)",
                              (Jsonb({"account_key": "QWxpY2VTZWNyZXRLZXlEb05vdExvZw=="}),))
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    c.execute("SELECT azure_cdc.drop_credential('azurite')")
                if role == "cdc_bob":
                    # An admin sees what a credential is for, never its secrets.
                    seen = c.execute("SELECT * FROM azure_cdc.list_credentials()").fetchall()
                    seen += c.execute("SELECT * FROM azure_cdc.get_all_tables_mirror_status()").fetchall()
                    seen += c.execute("SELECT * FROM azure_cdc.get_mirror_status()").fetchall()
                    seen += c.execute("SELECT * FROM azure_cdc.mirrors").fetchall()
                    text = repr(seen)
                    assert "azurite" in text and "account_key" in text
                    assert secret_key not in text and secret_key[:12] not in text
                else:
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        c.execute("SELECT * FROM azure_cdc.list_credentials()")
    finally:
        db.sql("DROP ROLE cdc_alice; DROP ROLE cdc_bob")
    # Replacing an in-use credential is allowed; dropping it is not.
    expect_error(db, "55006", "SELECT azure_cdc.drop_credential('azurite')")
    db.sql("SELECT azure_cdc.stop_mirror('m')")
    assert "dropped" in db.one("SELECT azure_cdc.drop_credential('azurite')")
    # Nothing secret ever reached the server log, including from the failed calls above.
    with open(cluster.log, encoding="utf-8", errors="replace") as f:
        log = f.read()
    for secret in (secret_key, secret_key[:16], "QWxpY2VTZWNyZXRLZXlEb05vdExvZw==", "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3Jvbmc="):
        assert secret not in log, f"a secret is in the server log: {secret[:6]}…"
