"""Test fixtures: a real PostgreSQL cluster with azure_cdc preloaded, run as the unprivileged user,
started once per test session by scripts/cluster.sh; each test gets its own database and target folder."""

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time

import psycopg
import psycopg.sql
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CLUSTER = os.path.join(ROOT, "scripts", "cluster.sh")
RUN_AS = os.environ.get("AZURE_CDC_RUN_AS", "pgrxtest")
# The server the tests run against (scripts/cluster.sh reads the same variable): PostgreSQL 15 from
# Debian by default; `make test-e2e18` points it at PostgreSQL 18.
PGBIN = os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin")
PORT = int(os.environ.get("AZURE_CDC_TEST_PORT", "55439"))
_counter = itertools.count(1)


class Cluster:
    def __init__(self, base):
        self.base = base
        self.datadir = os.path.join(base, "data")
        self.port = PORT
        self.log = os.path.join(self.datadir, "server.log")

    def start(self):
        subprocess.run(
            [CLUSTER, "start", self.datadir, str(self.port), "azure_cdc.max_fabric_mirrors = 6",
             "max_worker_processes = 24", "max_replication_slots = 12",
             "azure_cdc.change_batch_export_timeout = '200ms'", "logical_decoding_work_mem = '4MB'"],
            check=True,
        )

    def stop(self, mode="fast"):
        subprocess.run([CLUSTER, "stop", self.datadir, mode], check=True)

    def restart(self, mode="fast"):
        self.stop(mode)
        self.start()

    def connect(self, dbname="postgres", user="postgres", **kw):
        return psycopg.connect(host="127.0.0.1", port=self.port, user=user, dbname=dbname, autocommit=True, **kw)

    def postmaster_pid(self):
        with open(os.path.join(self.datadir, "postmaster.pid")) as f:
            return int(f.readline())

    def new_folder(self, name):
        """An empty folder the server may write to (it does not exist yet; its parent does)."""
        parent = os.path.join(self.base, "targets")
        os.makedirs(parent, exist_ok=True)
        u = pwd.getpwnam(RUN_AS)
        os.chown(parent, u.pw_uid, u.pw_gid)
        return os.path.join(parent, name)


@pytest.fixture(scope="session")
def cluster():
    base = tempfile.mkdtemp(prefix="azure_cdc_e2e_")
    os.chmod(base, 0o755)
    c = Cluster(base)
    c.start()
    yield c
    c.stop("fast")
    if os.environ.get("AZURE_CDC_KEEP_TEST_DATA") != "1":
        shutil.rmtree(base, ignore_errors=True)


class Db:
    """One test's database with azure_cdc installed, and helpers to drive and watch mirrors."""

    def __init__(self, cluster, name):
        self.cluster = cluster
        self.name = name
        self.conn = cluster.connect(name)

    def reconnect(self):
        try:
            self.conn.close()
        except Exception:
            pass
        self.conn = self.cluster.connect(self.name)

    def reconnect_when_ready(self, deadline_s=120):
        """Reconnects after a server restart (waits out crash recovery)."""
        end = time.time() + deadline_s
        while True:
            try:
                self.reconnect()
                self.one("SELECT 1")
                return
            except psycopg.OperationalError:
                assert time.time() < end, "server did not come back"
                time.sleep(0.2)

    def sql(self, query, params=None):
        with self.conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else None

    def one(self, query, params=None):
        rows = self.sql(query, params)
        return rows[0][0] if rows else None

    @contextlib.contextmanager
    def server_setting(self, name, value):
        """Sets a server parameter with ALTER SYSTEM for the duration of a block. Waits until the
        postmaster has reloaded it (a new connection shows it), so that new workers see it."""
        def apply(value):
            if value is None:
                self.sql(f"ALTER SYSTEM RESET {name}")
            else:
                self.sql(psycopg.sql.SQL("ALTER SYSTEM SET {} = {}").format(
                    psycopg.sql.SQL(name), psycopg.sql.Literal(value)))
            self.sql("SELECT pg_reload_conf()")
            expected = value
            end = time.time() + 30
            while True:
                with self.cluster.connect(self.name) as c:
                    shown = c.execute(f"SHOW {name}").fetchone()[0]
                if expected is None or shown == expected:
                    return
                assert time.time() < end, f"{name} still {shown}"
                time.sleep(0.05)
        apply(value)
        try:
            yield
        finally:
            apply(None)

    def start_mirror(self, mirror, tables=None):
        """Starts a mirror of this database into a new folder; returns the folder."""
        root = self.cluster.new_folder(f"{self.name}_{mirror}")
        if tables is None:
            self.sql("SELECT azure_cdc.start_mirror(%s, %s)", (mirror, "file://" + root))
        else:
            self.sql("SELECT azure_cdc.start_mirror(%s, %s, %s)", (mirror, "file://" + root, tables))
        return root

    def status(self, mirror):
        rows = self.sql(
            "SELECT schema_name, table_name, state, status, rows_replicated, files_published, last_error "
            "FROM azure_cdc.get_all_tables_mirror_status() WHERE mirror_name = %s",
            (mirror,),
        )
        return {(r[0], r[1]): dict(state=r[2], status=r[3], rows=r[4], files=r[5], error=r[6]) for r in rows}

    def wait_snapshot(self, mirror, deadline_s=300):
        """Waits until the mirror's snapshot is published (a deadline for failing, not a timing check)."""
        end = time.time() + deadline_s
        while True:
            state = self.one("SELECT state FROM azure_cdc.mirrors WHERE mirror_name = %s", (mirror,))
            if state == "Running":
                return self.status(mirror)
            if time.time() > end:
                raise AssertionError(f"mirror {mirror} still {state} after {deadline_s}s: {self.status(mirror)}")
            time.sleep(0.2)


    def wait_caught_up(self, mirror, deadline_s=300):
        """Waits until every change committed so far is published: the mirror's slot is confirmed past
        the current WAL position (the decoder confirms only what is durably in the target). A deadline
        for failing, not a timing check."""
        upto = self.one("SELECT pg_catalog.pg_current_wal_lsn()::text")
        end = time.time() + deadline_s
        while True:
            try:
                done = self.one(
                    "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_catalog.pg_replication_slots WHERE slot_name = %s",
                    (upto, "azure_cdc_" + mirror),
                )
            except psycopg.OperationalError:
                time.sleep(0.5)
                self.reconnect()
                continue
            if done:
                return
            if time.time() > end:
                raise AssertionError(f"mirror {mirror} not caught up with {upto}: {self.sql('SELECT * FROM azure_cdc.get_mirror_status()')}")
            time.sleep(0.1)

    def decoder_pid(self, mirror, deadline_s=120):
        end = time.time() + deadline_s
        while True:
            pid = self.one("SELECT decoder_pid FROM azure_cdc.get_mirror_status() WHERE mirror_name = %s", (mirror,))
            if pid:
                return pid
            assert time.time() < end, f"no decoder for mirror {mirror}"
            time.sleep(0.1)


def _store(kind):
    s = kind()
    s.start()
    return s


@pytest.fixture(scope="session")
def azurite():
    from stores import Azurite
    s = _store(Azurite)
    yield s
    s.close()


@pytest.fixture(scope="session")
def s3():
    from stores import MotoS3
    s = _store(MotoS3)
    yield s
    s.close()


@pytest.fixture(scope="session")
def gcs():
    from stores import Gcs
    s = _store(Gcs)
    yield s
    s.close()


@pytest.fixture(scope="session")
def onelake():
    from stores import OneLake
    s = _store(OneLake)
    yield s
    s.close()


@pytest.fixture(params=["s3", "gcs", "onelake"])
def store(request):
    """Each object store but Azure Blob (Azurite has its own tests in test_targets.py)."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def db(cluster):
    name = "t%d" % next(_counter)
    with cluster.connect() as c:
        c.execute(f'CREATE DATABASE "{name}"')
    d = Db(cluster, name)
    d.sql("CREATE EXTENSION azure_cdc")
    yield d
    d.reconnect()
    for (m,) in d.sql("SELECT mirror_name FROM azure_cdc.mirrors WHERE state <> 'Stopped'"):
        d.sql("SELECT azure_cdc.stop_mirror(%s)", (m,))
    d.conn.close()
    with cluster.connect() as c:
        c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


# ---- helpers shared by the test modules ----------------------------------------------------------

def wait_for(what, check, deadline_s=120):
    """Polls `check` until it returns something true (returned); a deadline for failing, not a timing check."""
    end = time.time() + deadline_s
    while True:
        v = check()
        if v:
            return v
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def events(db, mirror, table=None):
    """(event, detail) of a mirror's events, oldest first; of one table if `table` is given."""
    rows = db.sql(
        "SELECT event, table_name, detail FROM azure_cdc.events WHERE mirror_name = %s ORDER BY event_id", (mirror,))
    return [(e, d) for e, t, d in rows if table is None or t == table]


def numbers(root, table):
    """Numbers of the published data files of a table in a local landing zone (while the mirror may
    be writing the next one)."""
    from replay import table_folder
    folder = table_folder(root, "public", table)
    if not os.path.isdir(folder):
        return []
    return sorted(int(n.split(".")[0]) for n in os.listdir(folder) if n.endswith(".parquet") and n[0].isdigit())


def reseeded(db, mirror, table, count=1):
    """Waits until `table` has been reseeded `count` times and is Replicating again."""
    def done():
        return (sum(1 for e, _ in events(db, mirror, table) if e == "Reseeded") >= count
                and db.status(mirror)[("public", table)]["state"] == "Replicating")
    try:
        wait_for(f"reseed of {table}", done)
    except AssertionError:
        raise AssertionError(f"no reseed of {table}: {db.status(mirror)}; {events(db, mirror)}")


def verify_ok(db, mirror):
    """verify_mirror says OK for every table of the mirror."""
    rows = db.sql("SELECT table_name, verdict, detail FROM azure_cdc.verify_mirror(%s)", (mirror,))
    assert rows and all(r[1] == "OK" for r in rows), rows
