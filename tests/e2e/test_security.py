"""Security, end to end: what a member of azure_cdc_admin who is not a superuser (an "operator", as
on a managed server) can do, and everything it must not. Each attack runs as that role or as a plain
user against a real server with real workers, and each test checks both the refusal (SQLSTATE) and
that nothing happened: no role changed, no file written, the slot still there, no row read.

README "Security model" is the contract these tests hold the product to."""

import os
import re
import shutil
import subprocess

import psycopg
import pyarrow.parquet as pq
import pytest

from conftest import wait_for
from replay import assert_mirror_equals_source, data_files, table_folder

ADMIN_GRANTS = "GRANT azure_cdc_admin TO {role}; GRANT CREATE ON DATABASE {db} TO {role}"


def operator(db, name, write_files=True):
    """A login role set up as README "Security model" says (server-wide name, unique per test): no
    superuser, no REPLICATION."""
    role = f"{db.name}_{name}"
    db.sql(f'CREATE ROLE "{role}" LOGIN')
    db.sql(ADMIN_GRANTS.format(role=f'"{role}"', db=f'"{db.name}"'))
    if write_files:
        db.sql(f'GRANT pg_write_server_files TO "{role}"')
    return role


def plain_user(db, name):
    role = f"{db.name}_{name}"
    db.sql(f'CREATE ROLE "{role}" LOGIN')
    return role


def connect_as(db, role, search_path=None):
    opts = {} if search_path is None else {"options": f"-c search_path={search_path}"}
    return db.cluster.connect(db.name, user=role, **opts)


def refused(conn, sql, params=None, sqlstate="42501"):
    """Runs `sql` and returns the error it must raise with `sqlstate`."""
    with pytest.raises(psycopg.Error) as e:
        conn.execute(sql, params)
    assert e.value.sqlstate == sqlstate, f"{sql}: {e.value}"
    return e.value


def is_superuser(db, role):
    return db.one("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = %s", (role,))


def log_since(cluster, offset):
    with open(cluster.log, errors="replace") as f:
        f.seek(offset)
        return f.read()


def log_offset(cluster):
    return os.path.getsize(cluster.log)


def catalog_state(db):
    return (
        db.sql("SELECT mirror_id, mirror_name, target, state, slot_name, owner FROM azure_cdc.mirrors ORDER BY 1"),
        db.sql("SELECT mirror_id, relid, state, key_columns FROM azure_cdc.mirror_tables ORDER BY 1, 2"),
        db.one("SELECT count(*) FROM azure_cdc.events"),
        db.sql("SELECT slot_name, slot_type, database FROM pg_catalog.pg_replication_slots ORDER BY 1"),
    )


# Operators an attacker's schema shadows, first in search_path: every operator the extension's queries
# (or the pg_catalog functions they call) could resolve by name, for the types they use.
SHADOWED = [
    ("=", "text", "text", "boolean"),
    ("=", "name", "name", "boolean"),
    ("=", "name", "text", "boolean"),
    ("=", "text", "name", "boolean"),
    ("=", "bigint", "bigint", "boolean"),
    ("=", "integer", "integer", "boolean"),
    ("=", "oid", "oid", "boolean"),
    ("=", "boolean", "boolean", "boolean"),
    ("=", "\"char\"", "\"char\"", "boolean"),
    ("=", "jsonb", "jsonb", "boolean"),
    ("<>", "text", "text", "boolean"),
    ("<>", "bigint", "bigint", "boolean"),
    ("<>", "\"char\"", "\"char\"", "boolean"),
    ("<", "bigint", "bigint", "boolean"),
    ("<=", "bigint", "bigint", "boolean"),
    (">", "bigint", "bigint", "boolean"),
    (">=", "pg_lsn", "pg_lsn", "boolean"),
    ("-", "bigint", "bigint", "bigint"),
    ("+", "bigint", "bigint", "bigint"),
    ("||", "text", "text", "text"),
]


def hostile_schema(conn, role, tag, marker):
    """Creates schema `evil` (as `role`) with a function that, whoever runs it, says so in the server
    log and tries to make `role` a superuser and to run a shell command; then shadows every operator of
    SHADOWED and a few functions with ones that call it."""
    conn.execute("CREATE SCHEMA evil")
    conn.execute(f"""
        CREATE FUNCTION evil.pwn() RETURNS void LANGUAGE plpgsql AS $f$
        BEGIN
            RAISE WARNING 'HIJACK-{tag} ran as % (superuser %)', current_user,
                (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) current_user);
            BEGIN EXECUTE 'ALTER ROLE "{role}" SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
            BEGIN EXECUTE 'COPY (SELECT 1) TO PROGRAM ''touch {marker}'''; EXCEPTION WHEN OTHERS THEN NULL; END;
        END $f$""")
    for i, (op, left, right, ret) in enumerate(SHADOWED):
        conn.execute(f"""
            CREATE FUNCTION evil.op_{i}(a {left}, b {right}) RETURNS {ret} LANGUAGE plpgsql AS $f$
            BEGIN PERFORM evil.pwn(); RETURN a OPERATOR(pg_catalog.{op}) b; END $f$""")
        conn.execute(f"CREATE OPERATOR evil.{op} (LEFTARG = {left}, RIGHTARG = {right}, FUNCTION = evil.op_{i})")
    for name, args, ret, body in [
        ("now", "", "timestamptz", "pg_catalog.now()"),
        ("clock_timestamp", "", "timestamptz", "pg_catalog.clock_timestamp()"),
        ("current_setting", "text", "text", "pg_catalog.current_setting($1)"),
        ("current_database", "", "name", "pg_catalog.current_database()"),
        ("to_regclass", "text", "regclass", "pg_catalog.to_regclass($1)"),
        ("format", "text, text, text", "text", "pg_catalog.format($1, $2, $3)"),
        ("cardinality", "anyarray", "integer", "pg_catalog.cardinality($1)"),
    ]:
        conn.execute(f"""
            CREATE FUNCTION evil.{name}({args}) RETURNS {ret} LANGUAGE plpgsql AS $f$
            BEGIN PERFORM evil.pwn(); RETURN {body}; END $f$""")


def test_a_hostile_search_path_reaches_nothing_with_raised_rights(db, cluster):
    """Attack 1 (and the workers' search path): operators and functions of the caller's own schema,
    first in search_path, in the caller's session and in the database's settings (what a database
    owner can set), while an operator drives every function of the extension. None of them may run
    with any rights but the caller's own."""
    alice = operator(db, "alice")
    marker = os.path.join(cluster.base, f"pwned_{db.name}")
    tag = db.name
    db.sql("SELECT azure_cdc.create_credential('cred', %s)",
           ('{"account_name": "devstoreaccount1", "account_key": "c2VjcmV0", '
            '"endpoint": "http://127.0.0.1:9/devstoreaccount1", "allow_http": "true"}',))
    setup = connect_as(db, alice)
    hostile_schema(setup, alice, tag, marker)
    setup.execute("CREATE TABLE evil.t (id int PRIMARY KEY, v text)")
    setup.execute("CREATE TABLE evil.t2 (id int PRIMARY KEY, v text)")
    setup.execute("INSERT INTO evil.t SELECT g, 'v' || g FROM generate_series(1, 100) g")
    setup.execute("INSERT INTO evil.t2 SELECT g, 'w' || g FROM generate_series(1, 50) g")
    setup.close()
    offset = log_offset(cluster)
    # What a database owner can do: every new session of the database, the workers' included, starts
    # with the hostile schema first.
    db.sql(f'ALTER DATABASE "{db.name}" SET search_path = evil, pg_catalog, public')
    root = cluster.new_folder(f"{db.name}_m")
    try:
        a = connect_as(db, alice, search_path="evil,pg_catalog,public")
        assert a.execute("SHOW search_path").fetchone()[0].startswith("evil")
        a.execute("SELECT * FROM azure_cdc.check_prerequisites()")
        a.execute("SELECT azure_cdc.start_mirror('m', %s, ARRAY['evil.t'])", ("file://" + root,))
        # The credential is read with raised rights; the store behind it does not answer.
        e = refused(a, "SELECT azure_cdc.start_mirror('c', 'az://cont/x', NULL, '{\"credential\": \"cred\"}')",
                    sqlstate="58030")
        assert "c2VjcmV0" not in str(e)
        a.execute("SELECT * FROM azure_cdc.list_credentials()")
        db.wait_snapshot("m")
        for call in [
            "SELECT * FROM azure_cdc.get_all_tables_mirror_status()",
            "SELECT * FROM azure_cdc.list_mirrors()",
            "SELECT * FROM azure_cdc.get_mirror_status()",
            "SELECT * FROM azure_cdc.get_health_status()",
            "SELECT * FROM azure_cdc.get_health_status('m')",
            "SELECT * FROM azure_cdc.metrics()",
            "SELECT azure_cdc.add_tables('m', ARRAY['evil.t2'])",
        ]:
            a.execute(call).fetchall()
        # (The session's own SQL qualifies its operators: the hostile ones are for the extension.)
        a.execute("INSERT INTO evil.t SELECT g, pg_catalog.concat('n', g) FROM pg_catalog.generate_series(101, 150) g")
        a.execute("UPDATE evil.t SET v = pg_catalog.concat(v, '!') WHERE id OPERATOR(pg_catalog.%) 7 OPERATOR(pg_catalog.=) 0")
        wait_for("t2 copied", lambda: db.one(
            "SELECT state FROM azure_cdc.mirror_tables WHERE table_name = 't2'") == "Replicating")
        a.execute("SELECT azure_cdc.resync_table('m', 'evil.t')")
        wait_for("t reseeded", lambda: db.one(
            "SELECT count(*) FROM azure_cdc.events WHERE event = 'Reseeded' AND table_name = 't'") >= 1)
        rows = a.execute("SELECT table_name, verdict FROM azure_cdc.verify_mirror('m', 120)").fetchall()
        assert sorted(rows) == [("t", "OK"), ("t2", "OK")], rows
        a.execute("SELECT * FROM azure_cdc.verify_table('m', 'evil.t', 120)").fetchall()
        a.execute("SELECT azure_cdc.remove_tables('m', ARRAY['evil.t2'])")
        a.execute("SELECT azure_cdc.pause_mirror('m')")
        a.execute("SELECT azure_cdc.resume_mirror('m')")
        db.wait_caught_up("m")
        a.execute("SELECT azure_cdc.stop_mirror('m')")
        a.execute("SELECT azure_cdc.drop_mirror('m')")
        a.close()
    finally:
        db.sql(f'ALTER DATABASE "{db.name}" RESET search_path')
    log = log_since(cluster, offset)
    ran = re.findall(rf"HIJACK-{tag} ran as (\S+) \(superuser (\w)\)", log)
    assert not ran, f"the hostile schema's code ran: {ran[:5]}"
    assert not is_superuser(db, alice)
    assert not os.path.exists(marker)


def test_the_catalog_is_read_only_to_admins(db, cluster):
    """Attack 2 and the audit trail: every way of writing the catalog directly, as an operator; the
    catalog and the slots are unchanged afterwards (the mirror of this test included)."""
    alice = operator(db, "alice")
    db.sql("CREATE TABLE t (id int PRIMARY KEY)")
    db.sql(f'ALTER TABLE t OWNER TO "{alice}"')
    a = connect_as(db, alice)
    root = cluster.new_folder(f"{db.name}_m")
    a.execute("SELECT azure_cdc.start_mirror('m', %s, ARRAY['public.t'])", ("file://" + root,))
    db.wait_snapshot("m")
    before = catalog_state(db)
    mid = db.one("SELECT mirror_id FROM azure_cdc.mirrors")
    for sql in [
        # a forged mirror that would drop a slot, or write elsewhere
        "INSERT INTO azure_cdc.mirrors (mirror_name, target, all_tables, slot_name, owner) "
        "VALUES ('x', 'file:///tmp/x', true, 'some_standby', 10)",
        f"UPDATE azure_cdc.mirrors SET slot_name = 'some_standby' WHERE mirror_id = {mid}",
        f"UPDATE azure_cdc.mirrors SET target = 'file:///var/lib/postgresql' WHERE mirror_id = {mid}",
        f"UPDATE azure_cdc.mirrors SET owner = 10 WHERE mirror_id = {mid}",
        "DELETE FROM azure_cdc.mirrors",
        # a forged table: pg_authid's password hashes as "key columns"
        f"INSERT INTO azure_cdc.mirror_tables (mirror_id, relid, schema_name, table_name, key_columns, state) "
        f"VALUES ({mid}, 'pg_catalog.pg_authid'::regclass, 'pg_catalog', 'pg_authid', '{{rolname,rolpassword}}', 'Replicating')",
        "UPDATE azure_cdc.mirror_tables SET relid = 'pg_catalog.pg_authid'::regclass",
        "UPDATE azure_cdc.mirror_tables SET next_file_number = 1",
        "DELETE FROM azure_cdc.mirror_tables",
        # the audit trail
        "INSERT INTO azure_cdc.events (mirror_name, event, detail) VALUES ('m', 'Stopped', 'forged')",
        "UPDATE azure_cdc.events SET detail = 'rewritten'",
        "DELETE FROM azure_cdc.events",
        "TRUNCATE azure_cdc.events",
        # the secrets
        "SELECT * FROM azure_cdc.credentials",
        "INSERT INTO azure_cdc.credentials (credential_name, options, created_by) VALUES ('x', '{}', 'x')",
        # the catalog's shape
        "ALTER TABLE azure_cdc.mirrors ADD COLUMN x int",
        "CREATE TRIGGER x BEFORE INSERT ON azure_cdc.events FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()",
        "CREATE TABLE azure_cdc.mirrors2 (x int)",
    ]:
        refused(a, sql)
    # What admins are granted: reading.
    assert a.execute("SELECT count(*) FROM azure_cdc.events").fetchone()[0] >= 2
    assert catalog_state(db) == before
    db.wait_caught_up("m")
    a.execute("INSERT INTO t SELECT g FROM generate_series(1, 10) g")
    db.wait_caught_up("m")
    assert_mirror_equals_source(db.conn, root, "public", "t")
    a.close()


def test_a_plain_user_gets_nothing(db, cluster):
    """A role without azure_cdc_admin: every function but check_prerequisites is refused with the
    hint naming the role, and nothing is created."""
    bob = plain_user(db, "bob")
    db.sql("CREATE TABLE t (id int PRIMARY KEY)")
    db.sql(f'GRANT ALL ON t TO "{bob}"')
    root = cluster.new_folder(f"{db.name}_m")
    db.sql("SELECT azure_cdc.start_mirror('m', %s)", ("file://" + root,))
    db.wait_snapshot("m")
    before = catalog_state(db)
    b = connect_as(db, bob)
    for sql in [
        "SELECT azure_cdc.start_mirror('x', 'file:///tmp/x_by_a_plain_user')",
        "SELECT azure_cdc.stop_mirror('m')",
        "SELECT azure_cdc.drop_mirror('m')",
        "SELECT azure_cdc.pause_mirror('m')",
        "SELECT azure_cdc.resume_mirror('m')",
        "SELECT azure_cdc.resync_table('m', 't')",
        "SELECT azure_cdc.add_tables('m', ARRAY['t'])",
        "SELECT azure_cdc.remove_tables('m', ARRAY['t'])",
        "SELECT * FROM azure_cdc.get_all_tables_mirror_status()",
        "SELECT * FROM azure_cdc.list_mirrors()",
        "SELECT * FROM azure_cdc.get_mirror_status()",
        "SELECT * FROM azure_cdc.get_health_status()",
        "SELECT * FROM azure_cdc.metrics()",
        "SELECT * FROM azure_cdc.verify_mirror('m')",
        "SELECT * FROM azure_cdc.verify_table('m', 't')",
        "SELECT * FROM azure_cdc.list_credentials()",
        "SELECT azure_cdc.create_credential('x', '{}')",
        "SELECT azure_cdc.drop_credential('x')",
        "SELECT * FROM azure_cdc.mirrors",
        "SELECT * FROM azure_cdc.events",
    ]:
        e = refused(b, sql)
        if "azure_cdc." in sql and "FROM azure_cdc.m" not in sql and "FROM azure_cdc.e" not in sql \
                and "credential" not in sql:
            assert "azure_cdc_admin" in (e.diag.message_hint or ""), sql
    assert b.execute("SELECT count(*) FROM azure_cdc.check_prerequisites()").fetchone()[0] > 0
    assert catalog_state(db) == before
    assert not os.path.exists("/tmp/x_by_a_plain_user")
    b.close()


def test_tables_the_operator_may_not_read_are_never_copied(db, cluster):
    """Attacks 3 and the verify leak: another role's table, named or in a mirror of all tables; a table
    the operator lost; a superuser's mirror verified by an operator; a table created later."""
    alice = operator(db, "alice")
    bob = plain_user(db, "bob")
    db.sql("CREATE TABLE theirs (id int PRIMARY KEY, secret text)")
    db.sql("INSERT INTO theirs SELECT g, 'secret-' || g FROM generate_series(1, 20) g")
    db.sql(f'ALTER TABLE theirs OWNER TO "{bob}"')
    db.sql("CREATE TABLE mine (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO mine SELECT g, 'v' || g FROM generate_series(1, 20) g")
    db.sql(f'ALTER TABLE mine OWNER TO "{alice}"')
    db.sql("CREATE TABLE lost (id int PRIMARY KEY, v text)")
    db.sql(f'ALTER TABLE lost OWNER TO "{alice}"')
    # A superuser's own mirror of a table only superusers read.
    db.sql("CREATE TABLE admin_only (id int PRIMARY KEY, pw text)")
    db.sql("INSERT INTO admin_only VALUES (1, 'hunter2')")
    sup_root = cluster.new_folder(f"{db.name}_sup")
    db.sql("SELECT azure_cdc.start_mirror('sup', %s, ARRAY['admin_only'])", ("file://" + sup_root,))
    a = connect_as(db, alice)
    named_root = cluster.new_folder(f"{db.name}_named")
    e = refused(a, "SELECT azure_cdc.start_mirror('named', %s, ARRAY['mine', 'theirs'])", ("file://" + named_root,))
    assert "does not own it" in str(e) and "OWNER TO" in (e.diag.message_hint or "")
    assert not os.path.exists(named_root)
    notices = []
    a.add_notice_handler(lambda d: notices.append(d.message_primary))
    root = cluster.new_folder(f"{db.name}_all")
    a.execute("SELECT azure_cdc.start_mirror('all', %s)", ("file://" + root,))
    skipped = [n for n in notices if "cannot be mirrored" in n]
    assert skipped and "public.theirs" in skipped[0] and "does not own it" in skipped[0], notices
    assert "public.admin_only" in skipped[0]
    db.wait_snapshot("all")
    db.wait_snapshot("sup")
    assert sorted(os.listdir(os.path.join(root, "public.schema"))) == ["lost", "mine"]
    e = refused(a, "SELECT azure_cdc.add_tables('all', ARRAY['theirs'])")
    assert "does not own it" in str(e)
    # A table created later by someone else does not join; the event says why.
    db.sql("CREATE TABLE later (id int PRIMARY KEY)")
    db.sql("INSERT INTO later VALUES (1)")
    wait_for("later skipped", lambda: db.one(
        "SELECT count(*) FROM azure_cdc.events WHERE event = 'TableSkipped' AND table_name = 'later'"))
    # A table the operator no longer owns is parked; its later changes are not published.
    a.execute("INSERT INTO lost VALUES (1, 'before')")
    db.wait_caught_up("all")
    db.sql(f'ALTER TABLE lost OWNER TO "{bob}"')
    db.sql("INSERT INTO lost VALUES (2, 'after')")
    wait_for("lost parked", lambda: db.one(
        "SELECT t.state FROM azure_cdc.mirror_tables t JOIN azure_cdc.mirrors m USING (mirror_id) "
        "WHERE m.mirror_name = 'all' AND t.table_name = 'lost'") == "Failed")
    err = db.one("SELECT last_error FROM azure_cdc.get_all_tables_mirror_status() WHERE table_name = 'lost'")
    assert "no longer mirror" in err and "does not own it" in err, err
    db.sql("INSERT INTO mine VALUES (21, 'w21')")
    db.wait_caught_up("all")
    assert_mirror_equals_source(db.conn, root, "public", "mine")
    lost_ids = set()
    for f in data_files(table_folder(root, "public", "lost")):
        lost_ids |= set(pq.read_table(f).column("id").to_pylist())
    assert lost_ids == {1}, lost_ids
    assert not os.path.exists(table_folder(root, "public", "later"))
    # verify reads only what the caller may read.
    e = refused(a, "SELECT * FROM azure_cdc.verify_table('sup', 'admin_only')")
    rows = a.execute("SELECT table_name, verdict, source_rows, mirror_rows, sample, detail "
                     "FROM azure_cdc.verify_mirror('sup')").fetchall()
    assert rows == [("admin_only", "SKIPPED", 0, 0, [], rows[0][5])], rows
    assert "hunter2" not in str(rows) and "permission denied" in rows[0][5]
    # Other operators' and a superuser's mirrors are not theirs to control.
    for sql in ["SELECT azure_cdc.stop_mirror('sup')", "SELECT azure_cdc.pause_mirror('sup')",
                "SELECT azure_cdc.drop_mirror('sup')", "SELECT azure_cdc.resync_table('sup', 'admin_only')"]:
        assert "must be owner of mirror" in str(refused(a, sql))
    assert db.one("SELECT state FROM azure_cdc.mirrors WHERE mirror_name = 'sup'") == "Running"
    assert db.one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'azure_cdc_sup'") == 1
    a.close()


def test_slots_the_extension_did_not_create_are_never_taken_or_dropped(db, cluster):
    """Attack 4: a standby's physical slot and another database's mirror slot named like a mirror's."""
    alice = operator(db, "alice")
    db.sql("CREATE TABLE t (id int PRIMARY KEY)")
    db.sql(f'ALTER TABLE t OWNER TO "{alice}"')
    phys = f"azure_cdc_{db.name}_standby"
    db.sql("SELECT pg_create_physical_replication_slot(%s)", (phys,))
    other_db = f"{db.name}_other"
    with cluster.connect() as c:
        c.execute(f'CREATE DATABASE "{other_db}"')
    try:
        with cluster.connect(other_db) as o:
            o.execute("CREATE EXTENSION azure_cdc")
            o.execute("CREATE TABLE x (id int PRIMARY KEY)")
            o.execute("SELECT azure_cdc.start_mirror('twin', %s)", ("file://" + cluster.new_folder(f"{other_db}_twin"),))
            wait_for("twin's snapshot", lambda: o.execute(
                "SELECT state FROM azure_cdc.mirrors WHERE mirror_name = 'twin'").fetchone()[0] == "Running")
        before = db.sql("SELECT slot_name, slot_type, database FROM pg_replication_slots ORDER BY 1")
        a = connect_as(db, alice)
        for name in [f"{db.name}_standby", "twin"]:
            root = cluster.new_folder(f"{db.name}_{name}")
            e = refused(a, "SELECT azure_cdc.start_mirror(%s, %s, ARRAY['t'])", (name, "file://" + root), sqlstate="42710")
            assert "replication slot" in str(e)
            assert not os.path.exists(root)
        assert db.sql("SELECT slot_name, slot_type, database FROM pg_replication_slots ORDER BY 1") == before
        # Stopping a mirror drops only its own slot.
        root = cluster.new_folder(f"{db.name}_own")
        a.execute("SELECT azure_cdc.start_mirror('own', %s, ARRAY['t'])", ("file://" + root,))
        db.wait_snapshot("own")
        a.execute("SELECT azure_cdc.stop_mirror('own')")
        after = db.sql("SELECT slot_name FROM pg_replication_slots ORDER BY 1")
        assert (phys,) in after and ("azure_cdc_twin",) in after and ("azure_cdc_own",) not in after
        a.close()
    finally:
        with cluster.connect(other_db) as o:
            o.execute("SELECT azure_cdc.stop_mirror('twin')")
        with cluster.connect() as c:
            c.execute(f'DROP DATABASE "{other_db}" WITH (FORCE)')
        db.sql("SELECT pg_drop_replication_slot(%s)", (phys,))


def test_local_folders_need_server_file_rights_and_stay_out_of_the_server(db, cluster, tmp_path):
    """Attack 5: the data directory, its pg_wal, a tablespace, a link into the data directory, and an
    operator without pg_write_server_files. Nothing is written in any of them."""
    alice = operator(db, "alice")
    carol = operator(db, "carol", write_files=False)
    db.sql("CREATE TABLE t (id int PRIMARY KEY)")
    db.sql(f'ALTER TABLE t OWNER TO "{alice}"')
    datadir = db.one("SELECT current_setting('data_directory')")
    space = os.path.join(cluster.base, f"space_{db.name}")
    os.makedirs(space)
    subprocess.run(["chown", os.environ.get("AZURE_CDC_RUN_AS", "pgrxtest"), space], check=True)
    db.sql(f"CREATE TABLESPACE \"{db.name}_ts\" LOCATION '{space}'")
    link = os.path.join(cluster.base, f"link_{db.name}")
    os.symlink(datadir, link)

    def listing():
        out = {}
        for top in [datadir, space]:
            for d, _, files in os.walk(top):
                out[d] = sorted(f for f in files if not f.startswith("pg_") and "." not in f[:1])
        return sorted(out)

    before = listing()
    a = connect_as(db, alice)
    for path, says in [
        (os.path.join(datadir, "pg_replslot", "m"), "data directory"),
        (os.path.join(datadir, "pg_wal", "m"), "of the server"),
        (os.path.join(datadir, "base"), "data directory"),
        (datadir, "data directory"),
        (os.path.dirname(datadir), "contains"),
        (os.path.join(space, "m"), "tablespace"),
        (os.path.join(link, "global", "m"), "data directory"),
    ]:
        e = refused(a, "SELECT azure_cdc.start_mirror('m', %s, ARRAY['t'])", ("file://" + path,))
        assert says in str(e), (path, str(e))
    a.close()
    c = connect_as(db, carol)
    db.sql(f'ALTER TABLE t OWNER TO "{carol}"')
    root = cluster.new_folder(f"{db.name}_carol")
    e = refused(c, "SELECT azure_cdc.start_mirror('m', %s, ARRAY['t'])", ("file://" + root,))
    assert "pg_write_server_files" in (e.diag.message_hint or "")
    assert not os.path.exists(root)
    c.close()
    assert listing() == before
    assert db.one("SELECT count(*) FROM azure_cdc.mirrors") == 0
    assert db.one("SELECT count(*) FROM pg_replication_slots") == 0
    db.sql(f"DROP TABLESPACE \"{db.name}_ts\"")
    os.unlink(link)
    shutil.rmtree(space, ignore_errors=True)


def test_code_a_types_owner_wrote_never_runs_in_a_mirror(db, cluster):
    """User code in values: arrays and composites land as JSON through array_to_json / row_to_json,
    which call a type's cast to json. An operator's cast written in PL/pgSQL, there when the mirror
    starts or created while it streams, in the operator's mirror and in a superuser's mirror of all
    tables: the table is parked (what it would need cannot run inside logical decoding, and must not
    run with a mirror's rights), the other tables go on, and the cast never runs."""
    alice = operator(db, "alice")
    carol = operator(db, "carol")
    tag = db.name
    marker = os.path.join(cluster.base, f"pwned_cast_{db.name}")
    a = connect_as(db, alice)
    a.execute("CREATE SCHEMA s")
    for t in ["mood", "mood2"]:
        a.execute(f"CREATE TYPE s.{t} AS ENUM ('ok', 'sad')")
        a.execute(
            f"CREATE FUNCTION s.{t}_json(x s.{t}) RETURNS json LANGUAGE plpgsql AS $f$ BEGIN "
            f"RAISE WARNING 'CAST-{tag} ran as %', current_user; "
            f"BEGIN EXECUTE 'ALTER ROLE \"{alice}\" SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END; "
            f"BEGIN EXECUTE 'COPY (SELECT 1) TO PROGRAM ''touch {marker}'''; EXCEPTION WHEN OTHERS THEN NULL; END; "
            f"RETURN pg_catalog.to_json(x::text); END $f$")
    a.execute("CREATE TYPE s.pair AS (m s.mood, n int)")
    a.execute("CREATE CAST (s.mood AS json) WITH FUNCTION s.mood_json(s.mood)")
    a.execute("CREATE TABLE s.t (id int PRIMARY KEY, moods s.mood[])")
    a.execute("CREATE TABLE s.p (id int PRIMARY KEY, p s.pair)")
    a.execute("CREATE TABLE s.w (id int PRIMARY KEY, moods s.mood2[])")
    a.execute("CREATE TABLE s.u (id int PRIMARY KEY, v text)")
    for t in ["t", "p", "w", "u"]:
        a.execute(f"INSERT INTO s.{t} (id) SELECT g FROM generate_series(1, 5) g")
    a.execute("UPDATE s.t SET moods = ARRAY['ok', 'sad']::s.mood[]")
    a.execute("UPDATE s.p SET p = ROW('ok', id)::s.pair")
    a.execute("UPDATE s.w SET moods = ARRAY['sad']::s.mood2[]")
    offset = log_offset(cluster)
    root = cluster.new_folder(f"{db.name}_m")
    a.execute("SELECT azure_cdc.start_mirror('m', %s, ARRAY['s.t', 's.p', 's.w', 's.u'])", ("file://" + root,))
    db.wait_snapshot("m")

    def status(mirror):
        return {r[0]: (r[1], r[2]) for r in db.sql(
            "SELECT table_name, state, last_error FROM azure_cdc.get_all_tables_mirror_status() WHERE mirror_name = %s",
            (mirror,))}

    st = status("m")
    for t in ["t", "p"]:
        assert st[t][0] == "Failed" and "written in SQL or a procedural language" in st[t][1], st
        assert "s.mood" in st[t][1] and "mood_json" in st[t][1], st[t]
    assert st["w"][0] == "Replicating" and st["u"][0] == "Replicating", st
    # A cast created while the mirror streams: the table is parked at its next change.
    a.execute("CREATE CAST (s.mood2 AS json) WITH FUNCTION s.mood2_json(s.mood2)")
    a.execute("INSERT INTO s.w VALUES (6, ARRAY['ok']::s.mood2[])")
    a.execute("INSERT INTO s.u VALUES (6, 'after')")
    wait_for("w parked", lambda: status("m")["w"][0] == "Failed")
    db.wait_caught_up("m")
    assert_mirror_equals_source(db.conn, root, "s", "u")
    for f in data_files(table_folder(root, "s", "w")):
        assert max(pq.read_table(f).column("id").to_pylist()) <= 5, f
    # A superuser's mirror of all tables takes the operator's tables and runs none of its code.
    all_root = cluster.new_folder(f"{db.name}_all")
    db.sql("SELECT azure_cdc.start_mirror('everything', %s)", ("file://" + all_root,))
    db.wait_snapshot("everything")
    st = status("everything")
    assert {t: v[0] for t, v in st.items()} == {"t": "Failed", "p": "Failed", "w": "Failed", "u": "Replicating"}, st
    assert sorted(r[0] for r in a.execute("SELECT verdict FROM azure_cdc.verify_mirror('m', 120)")) == ["OK"]
    c = connect_as(db, carol)
    assert 'column "moods"' in str(c.execute("SELECT * FROM azure_cdc.get_all_tables_mirror_status()").fetchall())
    c.close()
    assert "CAST-" + tag not in log_since(cluster, offset), "the operator's cast ran"
    assert not is_superuser(db, alice) and not os.path.exists(marker)
    a.execute("SELECT azure_cdc.stop_mirror('m')")
    db.sql("SELECT azure_cdc.stop_mirror('everything')")
    a.close()


def test_an_encoding_error_quoting_a_value_parks_the_table_and_stays_in_the_log(db, cluster):
    """In a database that is not UTF-8, a value with no UTF-8 form: the server's error quotes its
    bytes. In the snapshot and in the stream, the table is parked with its column named, the other
    tables go on, and an admin who may not read the table never sees the bytes."""
    alice = operator(db, "alice")
    name = f"{db.name}_ascii"
    bad = "convert_from('\\x50494e3dc328'::bytea, 'SQL_ASCII')"
    with cluster.connect() as c:
        c.execute(f"CREATE DATABASE \"{name}\" ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
        c.execute(f'GRANT CREATE ON DATABASE "{name}" TO "{alice}"')
    try:
        # (psycopg returns bytes from a SQL_ASCII database unless the client encoding says otherwise.)
        with cluster.connect(name, client_encoding="utf8") as s:
            s.execute("CREATE EXTENSION azure_cdc")
            s.execute("CREATE TABLE secret (id int PRIMARY KEY, pin text)")
            s.execute("CREATE TABLE later (id int PRIMARY KEY, pin text)")
            s.execute("CREATE TABLE fine (id int PRIMARY KEY, v text)")
            s.execute(f"INSERT INTO secret VALUES (1, 'ok'), (2, {bad})")
            s.execute("INSERT INTO later VALUES (1, 'ok')")
            s.execute("INSERT INTO fine SELECT g, 'v' FROM generate_series(1, 10) g")
            offset = log_offset(cluster)
            root = cluster.new_folder(f"{name}_m")
            s.execute("SELECT azure_cdc.start_mirror('m', %s)", ("file://" + root,))
            wait_for("snapshot", lambda: s.execute(
                "SELECT state FROM azure_cdc.mirrors WHERE mirror_name = 'm'").fetchone()[0] == "Running")
            s.execute(f"INSERT INTO later VALUES (2, {bad})")
            s.execute("INSERT INTO fine VALUES (11, 'after')")

            def states():
                return dict(s.execute("SELECT table_name, state FROM azure_cdc.get_all_tables_mirror_status()").fetchall())

            wait_for("later parked", lambda: states().get("later") == "Failed")
            assert states() == {"secret": "Failed", "later": "Failed", "fine": "Replicating"}, states()
            wait_for("fine published", lambda: s.execute(
                "SELECT rows_replicated FROM azure_cdc.get_all_tables_mirror_status() WHERE table_name = 'fine'"
            ).fetchone()[0] == 11)
        a = cluster.connect(name, user=alice, client_encoding="utf8")
        seen = str(a.execute("SELECT * FROM azure_cdc.get_all_tables_mirror_status()").fetchall()) \
            + str(a.execute("SELECT * FROM azure_cdc.list_mirrors()").fetchall()) \
            + str(a.execute("SELECT * FROM azure_cdc.events").fetchall())
        a.close()
        assert "0xc3" not in seen and "PIN" not in seen, seen
        assert 'column "pin" of table "public.secret"' in seen and 'column "pin" of table "public.later"' in seen, seen
        assert "0xc3 0x28" in log_since(cluster, offset), "the server log keeps the error's text"
    finally:
        with cluster.connect(name) as s:
            s.execute("SELECT azure_cdc.stop_mirror('m')")
        with cluster.connect() as c:
            c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_installation_refuses_a_schema_or_role_someone_prepared(db, cluster):
    """The catalog's schema and the admin role must be what the extension would create: a schema
    owned by someone else, open to others' objects or already holding some, and an admin role with
    attributes or roles its members would take on, are refused, and nothing is created."""
    alice = operator(db, "alice")
    name = f"{db.name}_prep"
    with cluster.connect() as c:
        c.execute(f'CREATE DATABASE "{name}"')
        c.execute(f'GRANT CREATE ON DATABASE "{name}" TO "{alice}"')
    try:
        with cluster.connect(name) as s, cluster.connect(name, user=alice) as a:
            def refused_install(sqlstate, says):
                e = refused(s, "CREATE EXTENSION azure_cdc", sqlstate=sqlstate)
                assert says in str(e), e
                assert s.execute("SELECT count(*) FROM pg_extension WHERE extname = 'azure_cdc'").fetchone()[0] == 0
            a.execute("CREATE SCHEMA azure_cdc")
            refused_install("42501", f"belongs to role {alice}")
            a.execute("DROP SCHEMA azure_cdc")
            s.execute("CREATE SCHEMA azure_cdc")
            s.execute(f'GRANT CREATE ON SCHEMA azure_cdc TO "{alice}"')
            refused_install("42501", "may create objects in schema azure_cdc")
            s.execute(f'REVOKE CREATE ON SCHEMA azure_cdc FROM "{alice}"')
            s.execute("CREATE FUNCTION azure_cdc.start_mirror(text, text, varchar[]) RETURNS text LANGUAGE sql AS 'SELECT 1::text'")
            refused_install("42P06", "not empty")
            s.execute("DROP FUNCTION azure_cdc.start_mirror(text, text, varchar[])")
            # The admin role (server-wide: changed inside a transaction that is rolled back).
            for change, says in [("ALTER ROLE azure_cdc_admin LOGIN", "attributes"),
                                 ("GRANT pg_read_all_data TO azure_cdc_admin", "member of other roles"),
                                 (f'GRANT azure_cdc_admin TO "{alice}" WITH ADMIN OPTION', "may grant azure_cdc_admin")]:
                s.execute("BEGIN")
                s.execute(change)
                e = refused(s, "CREATE EXTENSION azure_cdc", sqlstate="42501")
                assert says in str(e), (change, e)
                s.execute("ROLLBACK")
            s.execute("CREATE EXTENSION azure_cdc")
            assert s.execute("SELECT count(*) FROM pg_extension WHERE extname = 'azure_cdc'").fetchone()[0] == 1
    finally:
        with cluster.connect() as c:
            c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_a_copy_holds_off_new_casts_and_a_table_a_cast_blocks_is_parked_at_start(db, cluster):
    """A cast created while a table is copied would be called by array_to_json in the middle of the
    copy: CREATE CAST waits until the copy ends. And a cast created while the decoder is down parks
    its table when the decoder starts again, while the other tables go on."""
    alice = operator(db, "alice")
    a = connect_as(db, alice)
    a.execute("CREATE SCHEMA s")
    for t in ["mood", "mood3"]:
        a.execute(f"CREATE TYPE s.{t} AS ENUM ('ok', 'sad')")
        a.execute(f"CREATE FUNCTION s.{t}_json(x s.{t}) RETURNS json LANGUAGE sql AS $f$ SELECT pg_catalog.to_json(x::text) $f$")
    a.execute("CREATE TABLE s.big (id int PRIMARY KEY, moods s.mood[])")
    a.execute("INSERT INTO s.big SELECT g, ARRAY['ok', 'sad', 'ok']::s.mood[] FROM generate_series(1, 400000) g")
    a.execute("CREATE TABLE s.x (id int PRIMARY KEY, moods s.mood3[])")
    a.execute("INSERT INTO s.x VALUES (1, ARRAY['ok']::s.mood3[])")
    a.execute("CREATE TABLE s.u (id int PRIMARY KEY, v text)")
    root = cluster.new_folder(f"{db.name}_m")
    a.execute("SELECT azure_cdc.start_mirror('m', %s, ARRAY['s.big', 's.x', 's.u'])", ("file://" + root,))
    db.wait_snapshot("m")
    a.execute("SELECT azure_cdc.resync_table('m', 's.big')")
    # The copy has begun once it holds pg_cast (its rows counted so far are a live figure).
    wait_for("the copy", lambda: db.one(
        "SELECT count(*) FROM pg_locks WHERE relation = 'pg_catalog.pg_cast'::regclass AND mode = 'ShareLock' AND granted"))
    a.execute("SET lock_timeout = '300ms'")
    refused(a, "CREATE CAST (s.mood AS json) WITH FUNCTION s.mood_json(s.mood)", sqlstate="55P03")
    a.execute("RESET lock_timeout")
    wait_for("the copy's end", lambda: db.one(
        "SELECT state FROM azure_cdc.mirror_tables WHERE table_name = 'big'") == "Replicating", deadline_s=300)
    # While the decoder is down, a cast appears for x: at its start the decoder parks x.
    a.execute("SELECT azure_cdc.pause_mirror('m')")
    a.execute("CREATE CAST (s.mood3 AS json) WITH FUNCTION s.mood3_json(s.mood3)")
    a.execute("SELECT azure_cdc.resume_mirror('m')")
    a.execute("INSERT INTO s.u VALUES (1, 'after')")
    wait_for("x parked", lambda: db.one("SELECT state FROM azure_cdc.mirror_tables WHERE table_name = 'x'") == "Failed")
    db.wait_caught_up("m")
    assert_mirror_equals_source(db.conn, root, "s", "u")
    assert db.one("SELECT state FROM azure_cdc.mirrors WHERE mirror_name = 'm'") == "Running"
    a.execute("SELECT azure_cdc.stop_mirror('m')")
    a.close()


def readme_operator_grants():
    """The statements README "Security model" tells a superuser to run for an operator."""
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")) as f:
        text = f.read()
    m = re.search(r"```sql\n(-- Setting up an operator role.*?)```", text, re.S)
    assert m, "README lost its operator set-up block"
    return m.group(1)


def test_readme_quick_start_as_an_operator(db, cluster):
    """The README's quick start, end to end, as a role that is not a superuser and holds exactly the
    grants README "Security model" gives."""
    role = f"{db.name}_op"
    db.sql("CREATE TABLE orders (id bigint PRIMARY KEY, customer text, amount numeric(12,2), note text)")
    db.sql("CREATE TABLE customers (id int PRIMARY KEY, name text)")
    db.sql("INSERT INTO orders SELECT g, 'c' || (g % 10), g * 1.25, repeat('x', g % 50) FROM generate_series(1, 1000) g")
    db.sql("INSERT INTO customers SELECT g, 'name ' || g FROM generate_series(1, 10) g")
    grants = readme_operator_grants().replace("mirror_admin", f'"{role}"').replace(" sales ", f' "{db.name}" ')
    statements = [s.strip() for s in re.sub(r"--[^\n]*", "", grants).split(";") if s.strip()]
    for s in statements:
        if "ALTER TABLE" in s:
            for t in ["orders", "customers"]:
                db.sql(re.sub(r"ALTER TABLE \S+", f"ALTER TABLE public.{t}", s))
        else:
            db.sql(s)
    assert not is_superuser(db, role)
    op = connect_as(db, role)
    bad = op.execute("SELECT code FROM azure_cdc.check_prerequisites() WHERE status = 'ERROR'").fetchall()
    assert bad == [], bad
    root = cluster.new_folder(f"{db.name}_sales")
    op.execute("SELECT azure_cdc.start_mirror('sales', %s)", ("file://" + root,))
    db.wait_snapshot("sales")
    states = op.execute("SELECT table_name, state, status FROM azure_cdc.get_all_tables_mirror_status()").fetchall()
    assert sorted(states) == [("customers", "Replicating", "OK"), ("orders", "Replicating", "OK")], states
    op.execute("UPDATE orders SET amount = amount + 1 WHERE id % 10 = 0")
    op.execute("DELETE FROM orders WHERE id % 17 = 0")
    op.execute("INSERT INTO customers VALUES (11, 'eleven')")
    assert op.execute("SELECT owner FROM azure_cdc.list_mirrors()").fetchone()[0] == role
    assert [r[0] for r in op.execute("SELECT verdict FROM azure_cdc.verify_mirror('sales', 120)")] == ["OK", "OK"]
    assert op.execute("SELECT count(*) FROM azure_cdc.get_health_status('sales')").fetchone()[0] == 0
    op.execute("SELECT azure_cdc.pause_mirror('sales')")
    op.execute("INSERT INTO customers VALUES (12, 'twelve')")
    op.execute("SELECT azure_cdc.resume_mirror('sales')")
    db.wait_caught_up("sales")
    for t in ["orders", "customers"]:
        assert_mirror_equals_source(db.conn, root, "public", t)
    op.execute("SELECT azure_cdc.stop_mirror('sales')")
    op.execute("SELECT azure_cdc.drop_mirror('sales')")
    assert db.one("SELECT count(*) FROM pg_replication_slots") == 0
    op.close()
