"""End to end checks of the SQL API seen from a client: SQLSTATEs, hints, and nothing created by a
refused call. (The same rules are unit tested inside the server by the #[pg_test] tier.)"""

import os

import psycopg
import pytest


def state(db):
    return (
        db.one("SELECT count(*) FROM azure_cdc.mirrors"),
        db.one("SELECT count(*) FROM pg_replication_slots"),
    )


@pytest.mark.parametrize(
    "args, sqlstate, words",
    [
        (("Bad-Name", "file:///tmp/x"), "42602", "invalid mirror name"),
        (("m", "ftp://bucket/x"), "22023", "s3://<bucket>/<path>"),
        (("m", "az://Upper/x"), "22023", "not a container name"),
        (("m", "file://relative/x"), "22023", "absolute path"),
        (("m", "file:///a/../b"), "22023", ".."),
        (("m", "{root}", ["nosuch"]), "42P01", "does not exist"),
        (("m", "{root}", ["v"]), "42809", "is a view"),
        (("m", "{root}", ["mv"]), "42809", "materialized view"),
        (("m", "{root}", ["u"]), "42809", "unlogged"),
        (("m", "{root}", ["tmp"]), "42809", "temporary"),
        (("m", "{root}", ["azure_cdc.mirrors"]), "42809", "system table"),
        (("m", "{root}", []), "22023", "no tables"),
        (("m", "{root}", None, '{"unknown": 1}'), "22023", "unknown option"),
        (("m", "{root}", None, "[]"), "22023", "JSON object"),
        (("m", "{root}", None, '{"credential": 1}'), "22023", "must be a string"),
        (("m", "{root}", None, '{"credential": "nosuch"}'), "42704", "does not exist"),
    ],
)
def test_bad_arguments(db, cluster, args, sqlstate, words):
    db.sql("CREATE TABLE t (id int PRIMARY KEY)")
    db.sql("CREATE VIEW v AS SELECT 1 AS x")
    db.sql("CREATE MATERIALIZED VIEW mv AS SELECT 1 AS x")
    db.sql("CREATE UNLOGGED TABLE u (id int)")
    db.sql("CREATE TEMPORARY TABLE tmp (id int PRIMARY KEY)")
    root = cluster.new_folder(db.name)
    args = tuple(a.replace("{root}", "file://" + root) if isinstance(a, str) else a for a in args)
    before = state(db)
    placeholders = ", ".join(["%s"] * len(args))
    with pytest.raises(psycopg.Error) as e:
        db.sql(f"SELECT azure_cdc.start_mirror({placeholders})", args)
    assert e.value.sqlstate == sqlstate, e.value
    assert words in str(e.value) + str(e.value.diag.message_hint) + str(e.value.diag.message_detail)
    assert state(db) == before
    assert not os.path.exists(root)


def test_duplicate_name_and_overlapping_target(db, cluster):
    db.sql("CREATE TABLE t (id int PRIMARY KEY)")
    root = cluster.new_folder(db.name)
    db.sql("SELECT azure_cdc.start_mirror('m', %s)", ("file://" + root,))
    for args, code in [(("m", "file://" + root + "_other"), "42710"), (("m2", "file://" + root + "/inner"), "42710")]:
        with pytest.raises(psycopg.Error) as e:
            db.sql("SELECT azure_cdc.start_mirror(%s, %s)", args)
        assert e.value.sqlstate == code
    db.wait_snapshot("m")


def test_target_must_be_empty(db, cluster):
    db.sql("CREATE TABLE t (id int PRIMARY KEY)")
    root = cluster.new_folder(db.name)
    os.makedirs(root)
    open(os.path.join(root, "something"), "w").close()
    with pytest.raises(psycopg.Error) as e:
        db.sql("SELECT azure_cdc.start_mirror('m', %s)", ("file://" + root,))
    assert e.value.sqlstate == "55000" and "not empty" in str(e.value)


def test_unwritable_target(db):
    db.sql("CREATE TABLE t (id int PRIMARY KEY)")
    with pytest.raises(psycopg.Error) as e:
        db.sql("SELECT azure_cdc.start_mirror('m', 'file:///proc/azure_cdc_cannot_write_here')")
    assert e.value.sqlstate == "58030"
    assert db.one("SELECT count(*) FROM azure_cdc.mirrors") == 0


def test_unknown_mirror(db):
    for f in ["stop_mirror", "drop_mirror"]:
        with pytest.raises(psycopg.Error) as e:
            db.sql(f"SELECT azure_cdc.{f}('nosuch')")
        assert e.value.sqlstate == "42704"


def test_non_admin_is_refused_with_a_hint(db, cluster):
    db.sql("DO $$ BEGIN CREATE ROLE e2e_user LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    db.sql("CREATE TABLE t (id int PRIMARY KEY)")
    root = cluster.new_folder(db.name)
    with cluster.connect(db.name, options="-c role=e2e_user") as c:
        for call in [
            "SELECT azure_cdc.start_mirror('m', 'file://%s')" % root,
            "SELECT azure_cdc.stop_mirror('m')",
            "SELECT azure_cdc.drop_mirror('m')",
            "SELECT * FROM azure_cdc.get_all_tables_mirror_status()",
        ]:
            with pytest.raises(psycopg.Error) as e:
                c.execute(call)
            assert e.value.sqlstate == "42501"
            assert "azure_cdc_admin" in e.value.diag.message_hint
        for table in ["azure_cdc.mirrors", "azure_cdc.mirror_tables"]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(f"SELECT * FROM {table}")
        rows = dict(c.execute("SELECT code, status FROM azure_cdc.check_prerequisites()").fetchall())
        assert rows["USER_NOT_CDC_ADMIN"] == "ERROR"
    # With the grants README "Security model" gives an operator (a folder target needs
    # pg_write_server_files; a mirror takes the tables its owner owns).
    db.sql("GRANT azure_cdc_admin, pg_write_server_files TO e2e_user")
    db.sql("GRANT CREATE ON DATABASE %s TO e2e_user" % db.name)
    db.sql("ALTER TABLE t OWNER TO e2e_user")
    with cluster.connect(db.name, options="-c role=e2e_user") as c:
        c.execute("SELECT azure_cdc.start_mirror('m', 'file://%s')" % root)
    assert db.wait_snapshot("m")[("public", "t")]["state"] == "Replicating"
    db.sql("REVOKE azure_cdc_admin, pg_write_server_files FROM e2e_user")


def test_only_the_decoder_reads_with_the_azure_cdc_plugin(db):
    # Creating a slot with the plugin is allowed (the mirror's worker does it); reading one from SQL is not.
    db.sql("SELECT pg_create_logical_replication_slot('azure_cdc_reader_test', 'azure_cdc')")
    try:
        with pytest.raises(psycopg.Error) as e:
            db.sql("SELECT * FROM pg_logical_slot_peek_binary_changes('azure_cdc_reader_test', NULL, NULL)")
        assert e.value.sqlstate == "55000"
        assert "can only be read by the mirror's decoder" in str(e.value)
    finally:
        db.sql("SELECT pg_drop_replication_slot('azure_cdc_reader_test')")
