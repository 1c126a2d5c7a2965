"""OneLake end to end: a mirror writing to the OneLake stand-in (onelake.py) through its DFS API with a
service principal's Entra tokens, while Fabric's replicator stand-in consumes the landing zone by the
documented rules. Through snapshot, changes, TRUNCATE, column changes, resync_table, add_tables, a
killed decoder and an immediate shutdown, every table the replicator built must equal the source,
the replicator must see no breach of the landing-zone contract, and verify_mirror must be right
although the replicator moved (or deleted) the files it processed. The stand-in's own strictness
is tested first (test_the_stand_in_is_strict)."""

import base64
import hashlib
import os
import random
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import psycopg
import pytest
from psycopg.types.json import Jsonb

from replay import assert_rows_equal_source, encode_component
from conftest import events, reseeded, verify_ok, wait_for

_workspaces = iter(range(1, 10_000))


def new_workspace(onelake):
    ws = f"ws{os.getpid()}n{next(_workspaces)}"
    onelake.create_bucket(ws)
    return ws


def start(db, onelake, ws, mirror="m", tables=None, user="writer"):
    db.sql("SELECT azure_cdc.create_credential(%s, %s)", (f"lake_{mirror}", Jsonb(onelake.credential_options(user))))
    db.sql("SELECT azure_cdc.start_mirror(%s, %s, %s, %s)",
           (mirror, onelake.url(ws), tables, Jsonb({"credential": f"lake_{mirror}"})))


def applied_everything(onelake, ws, rep):
    """Whether the replicator has applied every data file published in each table folder."""
    em = onelake.emulator
    with em.lock:
        root = onelake.root
        for s in em.children(ws, root):
            if not s.endswith(".schema"):
                continue
            for t in em.children(ws, f"{root}/{s}"):
                folder = f"{root}/{s}/{t}"
                if em.get(ws, f"{folder}/_metadata.json") is None:
                    return False
                numbers = [int(n[:20]) for n in em.children(ws, folder) if n.endswith(".parquet") and n[0].isdigit()]
                table = rep.tables.get((s, t))
                if table is None or (numbers and max(numbers) >= table.next):
                    return False
    return True


def assert_replicated(db, onelake, ws, rep, tables, schema="public"):
    """Waits until everything is published and applied; every table equals its source."""
    db.wait_caught_up("m")
    wait_for("the replicator to apply every file", lambda: applied_everything(onelake, ws, rep))
    assert rep.violations == [], rep.violations
    for t in tables:
        table = rep.table(f"{schema}.schema", encode_component(t))
        assert table is not None, f"the mirrored database has no table {t}"
        assert_rows_equal_source(db.conn, table, schema, t)


def stall_files_of(em, ws, table):
    """The store holds back every file created in `table`'s folder of workspace `ws` (its copy waits)
    until em.release()."""
    em.stall(lambda m, p, q, h: m == "PUT" and q.get("resource") == "file" and p.startswith(f"/{ws}/")
             and f"/public.schema/{table}/" in p)


# ---- the stand-in itself ------------------------------------------------------------------------

def request(onelake, method, path, token=None, headers=None, body=b"", query=""):
    url = f"http://127.0.0.1:{onelake.port}/{path}" + (f"?{query}" if query else "")
    h = {"x-ms-version": "2023-11-03", **(headers or {})}
    if token:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body if method in ("PUT", "PATCH", "POST") else None, method=method, headers=h)
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.headers.get("x-ms-error-code"), r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("x-ms-error-code"), e.read(), e.headers


def test_the_stand_in_is_strict(onelake):
    ws = new_workspace(onelake)
    em = onelake.emulator
    writer = em.token(onelake.principals["writer"]["client_id"])
    reader = em.token(onelake.principals["reader"]["client_id"])
    lz = f"{onelake.ITEM}/Files/LandingZone"
    # Entra tokens for the storage audience only, valid and signed; no shared key.
    assert request(onelake, "HEAD", f"{ws}/{lz}")[0] == 401
    assert request(onelake, "HEAD", f"{ws}/{lz}", headers={"Authorization": "SharedKey onelake:c2ln"})[:2] == (401, "InvalidAuthenticationInfo")
    assert request(onelake, "HEAD", f"{ws}/{lz}", em.token(onelake.principals["writer"]["client_id"], audience="https://api.fabric.microsoft.com"))[0] == 401
    assert request(onelake, "HEAD", f"{ws}/{lz}", em.token(onelake.principals["writer"]["client_id"], lifetime_s=-10))[0] == 401
    assert request(onelake, "HEAD", f"{ws}/{lz}", em.token(onelake.principals["writer"]["client_id"], key=b"k" * 32))[0] == 401
    assert request(onelake, "HEAD", f"{ws}/{lz}", writer)[0] == 200
    # A viewer reads and does not write.
    assert request(onelake, "PUT", f"{ws}/{lz}/x", reader, query="resource=file")[:2] == (403, "AuthorizationPermissionMismatch")
    # Blob Batch is refused as OneLake refuses it (arrow-rs-object-store issue 701), Put Block too.
    status, code, body, _ = request(onelake, "POST", ws, writer, query="restype=container&comp=batch", body=b"--batch--")
    assert (status, code) == (400, "BadRequest") and b"Either WorkspaceId or ArtifactId are missing" in body
    assert request(onelake, "PUT", f"{ws}/{lz}/b", writer, query="comp=block&blockid=AA", body=b"x")[0] == 409
    # Workspace level: HEAD and listing only. Item, Files and Tables are protected; so is writing
    # anywhere but inside Files.
    assert request(onelake, "PUT", ws, writer, query="resource=directory")[:2] == (400, "OperationNotAllowedOnThePath")
    for p in (onelake.ITEM, f"{onelake.ITEM}/Files", f"{onelake.ITEM}/Tables", f"{onelake.ITEM}/x", f"{onelake.ITEM}/Tables/t"):
        assert request(onelake, "PUT", f"{ws}/{p}", writer, query="resource=directory")[:2] == (400, "OperationNotAllowedOnThePath"), p
    assert request(onelake, "DELETE", f"{ws}/{onelake.ITEM}/Files", writer, query="recursive=true")[0] == 400
    # A file needs its folder; publication by rename refuses to overwrite with If-None-Match: *.
    assert request(onelake, "PUT", f"{ws}/{lz}/d/f", writer, query="resource=file")[:2] == (404, "PathNotFound")
    assert request(onelake, "PUT", f"{ws}/{lz}/d", writer, query="resource=directory")[0] == 201
    first_etag = request(onelake, "HEAD", f"{ws}/{lz}/d", writer)[3]["ETag"]
    for name in ("_t", "f"):
        assert request(onelake, "PUT", f"{ws}/{lz}/d/{name}", writer, query="resource=file")[0] == 201
    data = b"hello"
    assert request(onelake, "PATCH", f"{ws}/{lz}/d/_t", writer, query="action=append&position=1", body=data)[0] == 400
    assert request(onelake, "PATCH", f"{ws}/{lz}/d/_t", writer, query="action=append&position=0", body=data)[0] == 202
    assert request(onelake, "PATCH", f"{ws}/{lz}/d/_t", writer, query="action=flush&position=4")[:2] == (400, "InvalidFlushPosition")
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    assert request(onelake, "PATCH", f"{ws}/{lz}/d/_t", writer, headers={"x-ms-content-md5": md5}, query="action=flush&position=5")[0] == 200
    rename = {"x-ms-rename-source": f"/{ws}/{lz}/d/_t", "If-None-Match": "*"}
    assert request(onelake, "PUT", f"{ws}/{lz}/d/f", writer, headers=rename)[:2] == (409, "PathAlreadyExists")
    assert request(onelake, "PUT", f"{ws}/{lz}/nowhere/g", writer, headers=rename)[:2] == (404, "RenameDestinationParentPathNotFound")
    assert request(onelake, "PUT", f"{ws}/{lz}/d/g", writer, headers=rename)[0] == 201
    assert request(onelake, "PUT", f"{ws}/{lz}/d/h", writer, headers=rename)[:2] == (404, "SourcePathNotFound")
    assert request(onelake, "HEAD", f"{ws}/{lz}/d/g", writer)[3]["Content-MD5"] == md5
    # A folder with files goes only recursively, in pages; recreated, it has a new ETag.
    for i in range(250):
        em.nodes[(ws, f"{lz}/d/n{i}")] = type(em.get(ws, f"{lz}/d/g"))(False)
    assert request(onelake, "DELETE", f"{ws}/{lz}/d", writer)[:2] == (409, "DirectoryNotEmpty")
    status, _, _, h = request(onelake, "GET", ws, writer, query=f"resource=filesystem&recursive=false&directory={lz}/d")
    assert status == 200 and h["x-ms-continuation"], "listings come in pages"
    pages = 0
    while True:
        pages += 1
        status, _, _, h = request(onelake, "DELETE", f"{ws}/{lz}/d", writer, query="recursive=true")
        assert status == 200
        if not h.get("x-ms-continuation"):
            break
    assert pages == 3
    assert request(onelake, "HEAD", f"{ws}/{lz}/d", writer)[0] == 404
    assert request(onelake, "PUT", f"{ws}/{lz}/d", writer, query="resource=directory")[0] == 201
    assert request(onelake, "HEAD", f"{ws}/{lz}/d", writer)[3]["ETag"] != first_etag


# ---- a mirror on OneLake ------------------------------------------------------------------------

def test_onelake_credentials(db, onelake):
    ws = new_workspace(onelake)
    em = onelake.emulator
    db.sql("CREATE TABLE a (id int PRIMARY KEY)")
    endpoint = {"endpoint": f"http://127.0.0.1:{onelake.port}", "allow_http": "true"}
    # Each kind of Entra identity: a service principal (the other tests), a user-assigned managed
    # identity, a workload identity's federated token file, and a token given as it is.
    mi = em.add_managed_identity({ws: "Contributor"})
    wi, federated = em.add_workload_identity({ws: "Contributor"})
    token_file = os.path.join(db.cluster.base, f"federated_{ws}.jwt")
    with open(token_file, "w") as f:
        f.write(federated)
    os.chmod(token_file, 0o644)
    identities = {
        "managed": {"msi_endpoint": f"{em.endpoint}/metadata/identity/oauth2/token", "client_id": mi, **endpoint},
        "workload": {**wi, "federated_token_file": token_file, **endpoint},
        "given": {"bearer_token": em.token(onelake.principals["writer"]["client_id"]), **endpoint},
    }
    for kind, options in identities.items():
        db.sql("SELECT azure_cdc.create_credential(%s, %s)", (kind, Jsonb(options)))
        db.sql("SELECT azure_cdc.start_mirror(%s, %s, NULL, %s)", (kind, onelake.url(ws), Jsonb({"credential": kind})))
        db.wait_snapshot(kind)
        db.sql("SELECT azure_cdc.stop_mirror(%s)", (kind,))
        db.sql("SELECT azure_cdc.drop_mirror(%s)", (kind,))
        with em.lock:
            for p in em.descendants(ws, onelake.root):
                del em.nodes[(ws, p)]
    # A workload identity whose token names another subject is refused by Entra.
    other, _ = em.add_workload_identity({ws: "Contributor"}, subject="system:serviceaccount:x:y")
    db.sql("SELECT azure_cdc.create_credential('other', %s)", (Jsonb({**other, "federated_token_file": token_file, **endpoint}),))
    with pytest.raises(psycopg.Error) as e:
        db.sql("SELECT azure_cdc.start_mirror('w', %s, NULL, %s)", (onelake.url(ws), Jsonb({"credential": "other"})))
    assert e.value.sqlstate == "28P01", str(e.value)
    # OneLake takes Entra tokens only: an account key or SAS token never reaches it.
    db.sql("SELECT azure_cdc.create_credential('key', %s)", (Jsonb({"account_key": "a2V5"}),))
    with pytest.raises(psycopg.Error) as e:
        db.sql("SELECT azure_cdc.start_mirror('k', %s, NULL, %s)", (onelake.url(ws), Jsonb({"credential": "key"})))
    assert e.value.sqlstate == "22023" and "OneLake" in str(e.value), str(e.value)
    # An expired token given as bearer_token is refused by the service: nothing is created.
    expired = onelake.emulator.token(onelake.principals["writer"]["client_id"], lifetime_s=-60)
    db.sql("SELECT azure_cdc.create_credential('old', %s)", (Jsonb(
        {"bearer_token": expired, "endpoint": f"http://127.0.0.1:{onelake.port}", "allow_http": "true"}),))
    with pytest.raises(psycopg.Error) as e:
        db.sql("SELECT azure_cdc.start_mirror('o', %s, NULL, %s)", (onelake.url(ws), Jsonb({"credential": "old"})))
    assert e.value.sqlstate == "28P01", str(e.value)
    assert expired[-20:] not in str(e.value) + str(e.value.diag.message_detail)
    # A URL that is not the landing zone of a mirrored database.
    with pytest.raises(psycopg.Error) as e:
        db.sql("SELECT azure_cdc.start_mirror('x', %s)", (f"abfss://{ws}@onelake.dfs.fabric.microsoft.com/{onelake.ITEM}/Files",))
    assert e.value.sqlstate == "22023"
    assert db.one("SELECT count(*) FROM azure_cdc.mirrors") == 0


def test_replicator_follows_truncate_columns_resync_and_new_tables(db, onelake):
    ws = new_workspace(onelake)
    rep = onelake.replicator(ws, drop_delay_s=1.5, ready_after_s=2.0)
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text, n int)")
    db.sql('CREATE TABLE "Order Lines" (id int PRIMARY KEY, qty int)')
    db.sql("CREATE TABLE k (v text)")  # no key: inserts only
    db.sql("INSERT INTO a SELECT g, 'v' || g, g FROM generate_series(1, 3000) g")
    db.sql('INSERT INTO "Order Lines" SELECT g, g FROM generate_series(1, 500) g')
    db.sql("INSERT INTO k SELECT 'k' || g FROM generate_series(1, 50) g")
    start(db, onelake, ws, tables=["a", '"Order Lines"', "k"])
    db.wait_snapshot("m")
    db.sql("UPDATE a SET v = v || '!' WHERE id % 3 = 0")
    db.sql("DELETE FROM a WHERE id % 7 = 0")
    db.sql('UPDATE "Order Lines" SET qty = qty * 2 WHERE id < 100')
    db.sql("INSERT INTO k VALUES ('more')")
    assert_replicated(db, onelake, ws, rep, ["a", "Order Lines", "k"])
    # The folder is the table's name; Fabric's table has the same name.
    assert onelake.emulator.get(ws, f"{onelake.ITEM}/Tables/public/Order Lines") is not None
    # TRUNCATE: the folder is deleted, Fabric drops the table, then it is published again.
    db.sql('TRUNCATE "Order Lines"')
    db.sql('INSERT INTO "Order Lines" VALUES (1, 1), (2, 2)')
    reseeded(db, "m", "Order Lines")
    # A column changed in a way change files cannot express, and one added with a default.
    db.sql("ALTER TABLE a ALTER COLUMN n TYPE bigint")
    db.sql("UPDATE a SET n = n * 1000000000 WHERE id < 20")
    reseeded(db, "m", "a", 1)
    db.sql("ALTER TABLE a ADD COLUMN d int DEFAULT 5")
    db.sql("UPDATE a SET d = 6 WHERE id = 1")
    reseeded(db, "m", "a", 2)
    # resync_table, and a table added to the running mirror.
    db.sql("SELECT azure_cdc.resync_table('m', 'k')")
    reseeded(db, "m", "k")
    db.sql("CREATE TABLE c (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO c SELECT g, 'c' FROM generate_series(1, 200) g")
    db.sql("SELECT azure_cdc.add_tables('m', ARRAY['c'])")
    reseeded(db, "m", "c")
    db.sql("UPDATE c SET v = 'changed' WHERE id < 10")
    assert_replicated(db, onelake, ws, rep, ["a", "Order Lines", "k", "c"])
    # The replicator moved what it processed; verify reads the files where they are.
    moved = [n for n in onelake.emulator.names(ws, onelake.root) if "/_ProcessedFiles/" in n or "/_FilesReadyToDelete/" in n]
    assert moved, "the replicator moved processed files"
    verify_ok(db, "m")
    assert db.status("m")[("public", "a")]["status"] == "OK"


def test_a_reset_waits_until_fabric_has_dropped_the_table(db, onelake):
    ws = new_workspace(onelake)
    rep = onelake.replicator(ws, drop_delay_s=8.0)
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text)")
    db.sql("CREATE TABLE b (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO a SELECT g, 'v' FROM generate_series(1, 100) g")
    db.sql("INSERT INTO b SELECT g, 'v' FROM generate_series(1, 100) g")
    start(db, onelake, ws)
    db.wait_snapshot("m")
    assert_replicated(db, onelake, ws, rep, ["a", "b"])
    db.sql("TRUNCATE a")
    db.sql("INSERT INTO a VALUES (7, 'after')")
    # While Fabric still holds the table, its folder stays deleted and the status says since when;
    # the other table goes on.
    def waiting():
        row = db.sql("SELECT state, folder_deleted_at FROM azure_cdc.get_all_tables_mirror_status() WHERE table_name = 'a'")[0]
        return row[0] == "Reseeding" and row[1] is not None
    wait_for("the reset of a to wait for Fabric", waiting)
    assert onelake.emulator.get(ws, f"{onelake.root}/public.schema/a") is None
    db.sql("INSERT INTO b VALUES (1000, 'meanwhile')")
    wait_for("b to go on", lambda: ("1000",) in rep.table("public.schema", "b").rows)
    reseeded(db, "m", "a")
    assert db.one("SELECT folder_deleted_at FROM azure_cdc.get_all_tables_mirror_status() WHERE table_name = 'a'") is None
    assert_replicated(db, onelake, ws, rep, ["a", "b"])
    # A table Fabric does not drop within azure_cdc.table_reset_timeout is parked with the reason;
    # resync_table takes it back once Fabric has dropped it.
    rep.drop_delay_s = 10**6
    with db.server_setting("azure_cdc.table_reset_timeout", "2s"):
        db.sql("SELECT azure_cdc.resync_table('m', 'b')")
        wait_for("b to be parked", lambda: db.status("m")[("public", "b")]["state"] == "Failed")
        error = db.status("m")[("public", "b")]["error"]
        assert "still holds the table" in error and "table_reset_timeout" in error, error
        assert db.status("m")[("public", "a")]["state"] == "Replicating"
    rep.drop_delay_s = 1.0
    db.sql("INSERT INTO b VALUES (2000, 'later')")
    db.sql("SELECT azure_cdc.resync_table('m', 'b')")
    reseeded(db, "m", "b")
    assert_replicated(db, onelake, ws, rep, ["a", "b"])
    verify_ok(db, "m")


def test_a_reset_waits_for_a_table_fabric_was_still_loading(db, onelake):
    # The replicator applies the files but has not shown the table in Tables/ yet (a long first
    # load): a reset cannot see it held, so it waits the settle time (here the timeout, 5 s) before
    # it creates the folder again, and the replicator has dropped what it was building by then.
    ws = new_workspace(onelake)
    rep = onelake.replicator(ws, drop_delay_s=1.0, create_delay_s=10**6)
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO a SELECT g, 'v' FROM generate_series(1, 100) g")
    with db.server_setting("azure_cdc.table_reset_timeout", "5s"):
        start(db, onelake, ws)
        db.wait_snapshot("m")
        wait_for("the replicator to load a", lambda: applied_everything(onelake, ws, rep))
        assert onelake.emulator.get(ws, f"{onelake.ITEM}/Tables/public/a") is None
        db.sql("TRUNCATE a")
        db.sql("INSERT INTO a VALUES (1, 'after')")
        reseeded(db, "m", "a")
        assert_replicated(db, onelake, ws, rep, ["a"])


class Workload:
    def __init__(self, db, seed):
        self.conn = db.cluster.connect(db.name)
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.error = None

    def run(self):
        i = 100_000
        try:
            while not self.stop.is_set():
                i += 1
                try:
                    with self.conn.transaction():
                        self.conn.execute("INSERT INTO a VALUES (%s, %s)", (i, f"w{i}"))
                        self.conn.execute("UPDATE a SET v = v || '+' WHERE id %% 50 = %s", (self.rng.randint(0, 49),))
                        if self.rng.random() < 0.3:
                            self.conn.execute("DELETE FROM a WHERE id = (SELECT min(id) FROM a)")
                except psycopg.OperationalError:
                    # The server restarted under us: connect again.
                    time.sleep(0.5)
                    try:
                        self.conn = psycopg.connect(self.conn.info.dsn, autocommit=True)
                    except psycopg.OperationalError:
                        pass
                time.sleep(0.01)
        except Exception as e:
            self.error = e

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.conn.close()


def test_killed_decoder_and_immediate_shutdown(cluster, db, onelake):
    ws = new_workspace(onelake)
    rep = onelake.replicator(ws, drop_delay_s=1.0, ready_after_s=1.0)
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO a SELECT g, 'v' || g FROM generate_series(1, 2000) g")
    start(db, onelake, ws)
    db.wait_snapshot("m")
    with Workload(db, 5):
        for delay in (0.7, 1.5):
            time.sleep(delay)
            os.kill(db.decoder_pid("m"), signal.SIGKILL)
            time.sleep(1.0)
            db.reconnect_when_ready()
        time.sleep(1.5)
        cluster.stop("immediate")
        cluster.start()
        db.reconnect_when_ready()
        time.sleep(1.5)
    assert_replicated(db, onelake, ws, rep, ["a"])
    verify_ok(db, "m")


def test_publication_retries_and_never_overwrites(db, onelake):
    ws = new_workspace(onelake)
    rep = onelake.replicator(ws)
    em = onelake.emulator
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO a SELECT g, 'v' FROM generate_series(1, 100) g")
    start(db, onelake, ws)
    db.wait_snapshot("m")
    folder = f"{onelake.root}/public.schema/a"
    # A rename whose reply is lost: the retry finds the file published with this very content and
    # moves on (no second file, no gap). A flush answered 503 is retried.
    em.fail_next(lambda m, p, q, h: m == "PUT" and "x-ms-rename-source" in h and p.endswith(".parquet"), "lost")
    em.fail_next(lambda m, p, q, h: q.get("action") == "flush", "503")
    db.sql("INSERT INTO a VALUES (1000, 'x')")
    assert_replicated(db, onelake, ws, rep, ["a"])
    assert not em.faults, "both faults happened"
    # Another file already holds the next number: publication stops with an error and the file is
    # left as it is; once it is gone, the same changes are published under that number.
    with em.lock:
        taken = max(int(n[:20]) for n in em.children(ws, folder) if n[0].isdigit()) + 1
        parent = em.get(ws, folder)
        node = type(parent)(False)
        node.data = b"someone else's file"
        em.put_internal(ws, f"{folder}/{taken:020d}.parquet", node)
        rep.paused = True  # the replicator must not read it
    db.sql("INSERT INTO a VALUES (1001, 'y')")
    try:
        wait_for("the publication error", lambda: "already published with other content" in (
            db.one("SELECT last_error FROM azure_cdc.mirrors WHERE mirror_name = 'm'") or ""), deadline_s=60)
    except AssertionError:
        raise AssertionError(f"{db.sql('SELECT state, last_error FROM azure_cdc.mirrors')} {em.children(ws, folder)} {taken}")
    assert em.get(ws, f"{folder}/{taken:020d}.parquet").data == b"someone else's file"
    with em.lock:
        del em.nodes[(ws, f"{folder}/{taken:020d}.parquet")]
        rep.paused = False
    assert_replicated(db, onelake, ws, rep, ["a"])


def test_verify_after_the_replicator_purged_files(db, onelake):
    ws = new_workspace(onelake)
    rep = onelake.replicator(ws, ready_after_s=0.5, purge_after_s=1.0)
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO a SELECT g, 'v' FROM generate_series(1, 100) g")
    start(db, onelake, ws)
    db.wait_snapshot("m")
    for i in range(3):
        db.sql("INSERT INTO a VALUES (%s, 'x')", (1000 + i,))
        db.wait_caught_up("m")
    assert_replicated(db, onelake, ws, rep, ["a"])
    wait_for("file 1 to be purged", lambda: not [
        n for n in onelake.emulator.names(ws, onelake.root) if n.endswith("00000000000000000001.parquet")])
    rows = db.sql("SELECT verdict, detail FROM azure_cdc.verify_table('m', 'a')")
    assert rows[0][0] == "UNVERIFIABLE" and "data files 1" in rows[0][1] and "_FilesReadyToDelete" in rows[0][1], rows
    # The decoder restarts from the newest file, which the replicator leaves in place.
    db.sql("SELECT pg_terminate_backend(%s)", (db.decoder_pid("m"),))
    db.sql("INSERT INTO a VALUES (2000, 'after')")
    assert_replicated(db, onelake, ws, rep, ["a"])


def test_files_deleted_behind_the_mirrors_back_park_the_table(db, onelake):
    ws = new_workspace(onelake)
    em = onelake.emulator
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text)")
    db.sql("CREATE TABLE b (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO a SELECT g, 'v' FROM generate_series(1, 100) g")
    db.sql("INSERT INTO b SELECT g, 'v' FROM generate_series(1, 100) g")
    start(db, onelake, ws)
    db.wait_snapshot("m")
    db.sql("UPDATE a SET v = 'w'")
    db.wait_caught_up("m")
    wait_for("a's change file to be recorded", lambda: db.status("m")[("public", "a")]["files"] >= 2)
    # Someone deletes a's files while the decoder is down: numbering again from 1 would publish
    # numbers the reader has already applied, so the table is parked instead.
    db.sql("SELECT azure_cdc.pause_mirror('m')")
    with em.lock:
        for p in em.descendants(ws, f"{onelake.root}/public.schema/a"):
            if p.endswith(".parquet"):
                del em.nodes[(ws, p)]
    db.sql("SELECT azure_cdc.resume_mirror('m')")
    db.sql("INSERT INTO b VALUES (1000, 'x')")
    wait_for("a to be parked", lambda: db.status("m")[("public", "a")]["state"] == "Failed")
    assert "missing from the landing zone" in db.status("m")[("public", "a")]["error"]
    db.wait_caught_up("m")
    assert not [n for n in em.names(ws, f"{onelake.root}/public.schema/a/") if n.endswith(".parquet")]
    # No replicator reads this landing zone: the reset waits only the settle time (the timeout, 3 s).
    with db.server_setting("azure_cdc.table_reset_timeout", "3s"):
        db.sql("SELECT azure_cdc.resync_table('m', 'a')")
        reseeded(db, "m", "a")
    db.wait_caught_up("m")
    rows = db.sql("SELECT table_name, verdict FROM azure_cdc.verify_mirror('m')")
    assert sorted(rows) == [("a", "OK"), ("b", "OK")], rows


def test_a_refusal_met_inside_a_large_transaction_stops_the_mirror(db, onelake):
    """A transaction larger than the change buffer closes batches from inside the decoding callbacks.
    When the store refuses one of them for good (the mirror's identity may no longer write), the
    error keeps its kind through PostgreSQL's code: the mirror stops with it instead of retrying."""
    ws = new_workspace(onelake)
    writer = onelake.principals["writer"]["client_id"]
    db.sql("CREATE TABLE big (id int PRIMARY KEY, t text)")
    with db.server_setting("azure_cdc.change_batch_buffer_size", "1MB"):
        start(db, onelake, ws)
        db.wait_snapshot("m")
        onelake.emulator.grant(ws, writer, "Viewer")
        db.sql("INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 60000) g")
        wait_for("the mirror to stop", lambda: db.one("SELECT state FROM azure_cdc.mirrors") == "Failed")
        assert db.sql("SELECT scope, status, code FROM azure_cdc.get_health_status('m')") == [
            ("mirror", "ERROR", "CDC_ERR_TARGET_PERMISSION_DENIED")]
        onelake.emulator.grant(ws, writer, "Contributor")
        assert "Running" in db.one("SELECT azure_cdc.resume_mirror('m')")
        db.wait_caught_up("m")
    assert db.sql("SELECT table_name, verdict FROM azure_cdc.verify_mirror('m')") == [("big", "OK")]


def test_a_snapshot_attempt_that_fails_after_a_helper_copied_its_table_is_retried(db, onelake):
    """The snapshot worker copies the first table (a) while a helper copies the other (b) and commits
    it Replicating. Publishing a's file fails (every retry answered 503), so the attempt fails; the
    next attempt copies both again and the mirror runs."""
    ws = new_workspace(onelake)
    rep = onelake.replicator(ws)
    em = onelake.emulator
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text)")
    db.sql("CREATE TABLE b (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO a SELECT g, 'a' FROM generate_series(1, 1000) g")
    db.sql("INSERT INTO b VALUES (1, 'b')")
    for _ in range(7):  # the first attempt and every retry of the client (6)
        em.fail_next(lambda m, p, q, h: m == "PUT" and "x-ms-rename-source" in h and "/public.schema/a/" in p)
    with db.server_setting("azure_cdc.max_snapshot_workers", "2"), \
            db.server_setting("azure_cdc.table_reset_timeout", "5s"):
        start(db, onelake, ws)
        wait_for("b copied by the helper", lambda: db.one(
            "SELECT state FROM azure_cdc.mirror_tables WHERE table_name = 'b'") == "Replicating", deadline_s=60)
        # (the failure's event, not last_error: the retry may already have cleared that)
        wait_for("the first attempt to fail", lambda: [e for e, _ in events(db, "m") if e == "Error"], deadline_s=120)
        assert not em.faults
        db.wait_snapshot("m")
    db.sql("INSERT INTO a VALUES (5000, 'later')")
    assert_replicated(db, onelake, ws, rep, ["a", "b"])
    verify_ok(db, "m")


def test_the_workers_end_with_the_postmaster(cluster, db, onelake):
    """PostgreSQL's processes end as soon as the postmaster dies (WL_EXIT_ON_PM_DEATH), so that a new
    server can start on the same data directory. The mirror's workers must too, even when the decoder
    waits for a store that does not answer (a request may hang for minutes): nothing it has not
    confirmed is lost, the next server's decoder publishes it."""
    ws = new_workspace(onelake)
    rep = onelake.replicator(ws)
    em = onelake.emulator
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO a SELECT g, 'v' FROM generate_series(1, 100) g")
    start(db, onelake, ws)
    db.wait_snapshot("m")
    db.wait_caught_up("m")
    decoder = db.decoder_pid("m")
    postmaster = cluster.postmaster_pid()
    children = [int(p) for p in subprocess.run(["ps", "-o", "pid=", "--ppid", str(postmaster)],
                                               capture_output=True, text=True, check=True).stdout.split()]
    assert decoder in children
    hanging = em.hanging
    em.partitioned = True
    try:
        db.sql("INSERT INTO a VALUES (1000, 'while the store does not answer')")
        wait_for("the change file's upload to hang", lambda: em.hanging > hanging)
        os.kill(postmaster, signal.SIGKILL)

        def alive(pid):
            try:
                os.kill(pid, 0)
                return True
            except ProcessLookupError:
                return False

        # A deadline for failing, far beyond the second PostgreSQL's processes take, far below the
        # minutes a hanging request could keep the decoder.
        try:
            wait_for("every process of the server to end", lambda: not [p for p in children if alive(p)], deadline_s=60)
        except AssertionError:
            left = subprocess.run(["ps", "-o", "pid=,cmd="] + [f"-p{p}" for p in children if alive(p)],
                                  capture_output=True, text=True).stdout
            raise AssertionError(f"still running: {left}")
    finally:
        em.partitioned = False
    cluster.start()
    db.reconnect_when_ready()
    db.sql("INSERT INTO a VALUES (1001, 'after')")
    assert_replicated(db, onelake, ws, rep, ["a"])
    verify_ok(db, "m")


def test_other_tables_flow_while_a_table_is_copied(db, onelake):
    """A reseed's copy runs in the mirror's copier, beside the decoder: while table a is copied (the
    store holds back its data file), table b's changes go on being published, and when the copy
    ends both tables are exact."""
    ws = new_workspace(onelake)
    rep = onelake.replicator(ws)
    em = onelake.emulator
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text)")
    db.sql("CREATE TABLE b (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO a SELECT g, 'a' FROM generate_series(1, 2000) g")
    db.sql("INSERT INTO b VALUES (1, 'b')")
    start(db, onelake, ws)
    db.wait_snapshot("m")
    assert_replicated(db, onelake, ws, rep, ["a", "b"])
    hanging = em.hanging
    stall_files_of(em, ws, "a")
    try:
        db.sql("SELECT azure_cdc.resync_table('m', 'a')")
        wait_for("a's copy to wait for the store", lambda: em.hanging > hanging, deadline_s=300)
        assert db.one("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'azure_cdc copier'") == 1
        files = db.status("m")[("public", "b")]["files"]
        db.sql("INSERT INTO b VALUES (2, 'while a is copied')")
        wait_for("b's change file", lambda: db.status("m")[("public", "b")]["files"] > files, deadline_s=60)
        assert db.status("m")[("public", "a")]["state"] == "Reseeding"
        db.sql("UPDATE a SET v = 'changed during the copy' WHERE id <= 10")
    finally:
        em.release()
    reseeded(db, "m", "a")
    db.sql("INSERT INTO a VALUES (5000, 'after')")
    db.sql("INSERT INTO b VALUES (3, 'after')")
    assert_replicated(db, onelake, ws, rep, ["a", "b"])
    verify_ok(db, "m")


def test_a_table_removed_during_its_copy_stays_removed(db, onelake):
    """remove_tables of a table the copier is copying: the copy is not recorded (here the removal
    commits after the copy's snapshot, so the copier's transaction fails on the concurrent update and
    the next pass no longer copies the table), the table stays Stopped, and the other table goes on."""
    ws = new_workspace(onelake)
    em = onelake.emulator
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text)")
    db.sql("CREATE TABLE b (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO a SELECT g, 'a' FROM generate_series(1, 100) g")
    db.sql("INSERT INTO b VALUES (1, 'b')")
    start(db, onelake, ws)
    db.wait_snapshot("m")
    hanging = em.hanging
    stall_files_of(em, ws, "a")
    try:
        db.sql("SELECT azure_cdc.resync_table('m', 'a')")
        wait_for("a's copy to wait for the store", lambda: em.hanging > hanging, deadline_s=300)
        db.sql("SELECT azure_cdc.remove_tables('m', ARRAY['public.a'])")
        assert db.status("m")[("public", "a")]["state"] == "Stopped"
    finally:
        em.release()
    wait_for("the copier to end", lambda: db.one(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'azure_cdc copier'") == 0)
    db.sql("INSERT INTO b VALUES (2, 'after')")
    db.sql("INSERT INTO a VALUES (1000, 'not mirrored')")
    db.wait_caught_up("m")
    assert db.status("m")[("public", "a")]["state"] == "Stopped"
    assert db.sql("SELECT table_name, verdict FROM azure_cdc.verify_mirror('m')") == [("b", "OK")]
