"""The type matrix, end to end: one column per row of the README's type table, with edge values and
NULLs, through the snapshot and through change files (inserts and updates), replayed and compared
with the source cell by cell, then verify_mirror from a session whose own time zone and date style
differ from the server's output settings."""

import psycopg
import pytest

from replay import assert_mirror_equals_source, replay_table, table_folder

SETUP = """
CREATE EXTENSION IF NOT EXISTS citext;
CREATE EXTENSION IF NOT EXISTS hstore;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE DOMAIN short_text AS text CHECK (length(VALUE) < 100);
CREATE TYPE pair AS (label text, n numeric, at timestamptz, tags text[]);
CREATE TABLE matrix (
    id int PRIMARY KEY,
    f4 real, f8 float8, nu numeric, n38 numeric(38,10), n50 numeric(50,20),
    ts timestamp, tz timestamptz, d date, tm time, ttz timetz, iv interval,
    mn money, by bytea, u uuid, ip inet, cn cidr, mac macaddr, mac8 macaddr8,
    bt bit(4), vb varbit, x xml, md mood, dp posint, ds short_text,
    j json, jb jsonb,
    ai int[], at text[], an numeric[], atz timestamptz[], af float8[], ajb jsonb[], ad posint[],
    r int4range, rt tstzrange, rn numrange, mr int4multirange,
    cp pair, acp pair[],
    tv tsvector, tq tsquery, pt point, ln line, sg lseg, bx box, pa path, pg polygon, ci circle,
    lsn pg_lsn, o oid, ch "char", nm name, ti tid,
    ci2 citext, hs hstore
);
"""

# One value per column, in column order after id; each row a set of edge cases.
ROWS = [
    ("'NaN'", "'-0'", "'NaN'", "-0.0000000001", "'12345678901234567890123456789.12345678901234567890'",
     "'infinity'", "'-infinity'", "'4713-01-01 BC'", "'24:00'", "'23:59:59.999999-15:59'", "'-178000000 years'",
     "'-92233720368547758.08'", "'\\x00ff'", "'00000000-0000-0000-0000-000000000000'", "'::ffff:1.2.3.4/128'",
     "'10.0.0.0/8'", "'08:00:2b:01:02:03'", "'08:00:2b:01:02:03:04:05'", "B'1010'", "B''", "'<a b=\"1\">x &amp; y</a>'",
     "'happy'", "1", "'ünïcödé ☃'", "'{\"a\": 1, \"a\": 2}'", "'{\"b\": [1, 2.50], \"a\": null}'",
     "'{{1,NULL,3},{4,5,6}}'", "ARRAY['a\"b', 'c,d', NULL, '', 'NULL']", "'{NaN,1e-30,-0,12345678901234567890.5}'",
     "ARRAY['infinity'::timestamptz, '2000-01-01 12:00+05']", "'{NaN,Infinity,-Infinity,-0,1.5e300}'",
     "ARRAY['{\"k\": [1]}'::jsonb, 'null']", "'{1,2}'", "'[1,5)'", "'[2000-01-01 00:00+00,infinity)'",
     "'(,1.5]'", "'{[1,3),[7,9)}'", "ROW('x\"y', 'NaN', '2020-02-29 23:59:59.999999+00', ARRAY['t',NULL])::pair",
     "ARRAY[ROW('a', 1, NULL, '{}')::pair, NULL]", "'a:1 fat:2B cat'", "'fat & (rat | !cat)'", "'(1.5,-0)'",
     "'{1,-1,0}'", "'[(0,0),(1,1)]'", "'((0,0),(1,1))'", "'[(0,0),(1,1),(2,0)]'", "'((0,0),(1,1),(2,0))'",
     "'<(0,0),1.5>'", "'FFFFFFFF/FFFFFFFF'", "4294967295", "'\\001'", "'a name'", "'(4294967295,65535)'",
     "'MiXeD Case'", "'a=>1, \"b c\"=>NULL'"),
    ("'Infinity'", "'1e-310'", "'-1e-1000'", "0", "NULL", "'294246-12-31 23:59:59.999999'",
     "'1970-01-01 00:00:00+14'", "'infinity'", "'00:00'", "'00:00+00'", "'1 mon -1 day 00:00:00.000001'",
     "'0'", "''", "'ffffffff-ffff-ffff-ffff-ffffffffffff'", "'2001:db8::1'", "'2001:db8::/32'",
     "'ff:ff:ff:ff:ff:ff'", "'00:00:00:00:00:00:00:00'", "B'0000'", "B'1'", "'plain'", "'sad'", "2147483647",
     "''", "'[]'", "'{}'", "'{}'", "'{}'", "'{}'", "'{}'", "'{}'", "'{}'", "'{}'", "'empty'", "'empty'", "'empty'",
     "'{}'", "ROW(NULL, NULL, NULL, NULL)::pair", "'{}'", "''", "'a'", "'(0,0)'", "'{0,1,0}'", "'[(0,0),(0,0)]'",
     "'((0,0),(0,0))'", "'((0,0))'", "'((0,0))'", "'<(0,0),0>'", "'0/0'", "0", "' '", "''", "'(0,0)'",
     "''", "''"),
]


def insert(db, ident, values):
    db.sql(f"INSERT INTO matrix VALUES ({ident}, {', '.join(values)})")


XML_COLUMN = 20  # position of "x xml" among the columns after id


def server_has_xml(db):
    """Whether the server was built with libxml (the PyPI build of PostgreSQL 18 is not)."""
    try:
        db.sql("SELECT '<a/>'::xml")
        return True
    except psycopg.errors.FeatureNotSupported:
        return False


def test_every_type_through_snapshot_and_changes(db):
    setup, rows = SETUP, ROWS
    if not server_has_xml(db):
        # The xml type exists but takes no value on a server built without libxml.
        setup = SETUP.replace(" x xml,", "")
        rows = [r[:XML_COLUMN] + r[XML_COLUMN + 1:] for r in ROWS]
    db.sql(setup)
    ncols = db.one("SELECT count(*) FROM pg_attribute WHERE attrelid = 'matrix'::regclass AND attnum > 1")
    assert all(len(r) == ncols for r in rows), (ncols, [len(r) for r in rows])
    for i, r in enumerate(rows):
        insert(db, i + 1, r)
    db.sql("INSERT INTO matrix (id) VALUES (100)")                       # every column NULL
    root = db.start_mirror("m", ["matrix"])
    db.wait_snapshot("m")
    # The same values through change files, then updates that swap the edge cases around.
    for i, r in enumerate(rows):
        insert(db, 1000 + i, r)
    db.sql("INSERT INTO matrix (id) VALUES (1100)")
    db.sql("UPDATE matrix m SET (" + ", ".join(
        a for (a,) in db.sql("SELECT attname FROM pg_attribute WHERE attrelid = 'matrix'::regclass "
                             "AND attnum > 1 ORDER BY attnum")) + ") = (SELECT " + ", ".join(
        "o." + a for (a,) in db.sql("SELECT attname FROM pg_attribute WHERE attrelid = 'matrix'::regclass "
                                    "AND attnum > 1 ORDER BY attnum")) + " FROM matrix o WHERE o.id = 2) "
           "WHERE m.id IN (1, 1000)")
    db.sql("UPDATE matrix SET acp = ARRAY[ROW('changed', -0.5, 'infinity', '{x,y}')::pair] WHERE id = 1001")
    db.wait_caught_up("m")
    rep = assert_mirror_equals_source(db.conn, root, "public", "matrix")
    assert len(rep.rows) == 2 * len(rows) + 2
    # Arrays and composites land as JSON.
    row = replay_table(table_folder(root, "public", "matrix")).rows[("1000",)]
    assert row["ai"] is None or row["ai"].startswith("[")
    assert replay_table(table_folder(root, "public", "matrix")).rows[("1",)]["cp"].startswith("{")
    # A session with other output settings verifies the same values.
    db.sql("SET TimeZone = 'America/New_York'")
    db.sql("SET DateStyle = 'SQL, DMY'")
    db.sql("SET IntervalStyle = 'sql_standard'")
    db.sql("SET extra_float_digits = 3")
    rows = db.sql("SELECT table_name, verdict, detail FROM azure_cdc.verify_mirror('m')")
    assert rows and rows[0][1] == "OK", rows
    assert db.one("SHOW TimeZone") == "America/New_York", "verification changes the session's settings only locally"
