"""End to end: real server, real launcher and snapshot worker, real slot, real files, replayed and
compared with the source cell by cell."""

import os
import re
import signal
import subprocess
import time

import psycopg
import pyarrow.parquet as pq
import pytest

from conftest import wait_for
from replay import (LandingZoneError, assert_mirror_equals_source, data_files, replay_table, table_folder)

TYPES_DDL = """
CREATE TABLE public.all_types (
    id int PRIMARY KEY, i2 int2, i8 int8, n numeric(12,3), n38 numeric(38,0), nu numeric, f4 real, f8 float8,
    b bool, t text, vc varchar(10), c char(5), by bytea, d date, tm time, ts timestamp, tz timestamptz,
    u uuid, j json, jb jsonb, ip inet, arr int[], iv interval, mood_col text
);
INSERT INTO public.all_types VALUES
 (1, 2, 3, 1234.5, 99999999999999999999999999999999999999, 12345678901234567890.123456789, 1.5, 'NaN', true,
  'héllo ☃', 'v', 'ab', '\\x0102ff', '2024-02-29', '12:34:56.789', '2024-01-01 00:00:00.000001',
  '1999-12-31 23:59:59.5+02', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": 1, "a": 2}', '{"b": [1, 2], "a": null}',
  '10.0.0.1/8', '{{1,NULL},{3,4}}', '1 year 2 mons 3 days 04:05:06.7', 'x'),
 (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL),
 (3, -32768, -9223372036854775808, -0.001, -99999999999999999999999999999999999999, 'NaN', '-Infinity', '-0',
  false, repeat('long toasted text ', 2000), '', '', '', 'infinity', '00:00', '-infinity', '4713-01-01 00:00:00+00 BC',
  '00000000-0000-0000-0000-000000000000', 'null', '[]', '::1', '{}', '-1 day', ''),
 (4, 32767, 9223372036854775807, 999999999.999, 0, '-Infinity', 3.4028235e38, 1e-300, true, E'tab\\tnew\\nline',
  'ten chars!', 'abcde', decode(repeat('ff', 9000), 'hex'), '-infinity', '23:59:59.999999', 'infinity',
  '294246-12-31 23:59:59.999999+00', 'ffffffff-ffff-ffff-ffff-ffffffffffff', '"x"', '{"k": "ü"}', '2001:db8::/32',
  '{-1}', '0', NULL),
 (5, 0, 0, 0, 1, '0.000000000000000000000000000001', 'NaN', 'Infinity', false, '', NULL, NULL, '\\x00', '0001-01-01 BC',
  '12:00', '2000-01-01', '1970-01-01 00:00:00+00', NULL, '{}', '{}', '0.0.0.0', '{NULL}', '1 microsecond', NULL);
"""


def test_types_nulls_and_a_large_table(db):
    db.sql(TYPES_DDL)
    db.sql("CREATE TABLE public.big (id bigint PRIMARY KEY, v text, amount numeric(10,2), at timestamptz)")
    db.sql("INSERT INTO public.big SELECT g, md5(g::text), g / 100.0, '2020-01-01'::timestamptz + g * interval '1 s' "
           "FROM generate_series(1, 250000) g")
    db.sql("CREATE TABLE public.all_nulls (a int, b text, c numeric, d date)")
    db.sql("INSERT INTO public.all_nulls SELECT NULL, NULL, NULL, NULL FROM generate_series(1, 3)")
    db.sql("CREATE TABLE public.by_unique (code text NOT NULL, part int NOT NULL, note text)")
    db.sql("CREATE UNIQUE INDEX by_unique_idx ON public.by_unique (part, code)")
    db.sql("ALTER TABLE public.by_unique REPLICA IDENTITY USING INDEX by_unique_idx")
    db.sql("INSERT INTO public.by_unique VALUES ('a', 1, 'x'), ('b', 1, NULL)")
    db.sql("CREATE TABLE public.empty_one (id int PRIMARY KEY)")
    db.sql("CREATE UNLOGGED TABLE public.skipped_unlogged (id int)")
    db.sql("CREATE VIEW public.skipped_view AS SELECT 1")
    root = db.cluster.new_folder(db.name)
    msg = db.one("SELECT azure_cdc.start_mirror('m', %s)", ("file://" + root,))
    assert "5 tables" in msg  # the summary start_mirror returns
    status = db.wait_snapshot("m")
    assert set(status) == {("public", t) for t in ["all_types", "big", "all_nulls", "by_unique", "empty_one"]}
    for (schema, table), s in status.items():
        assert s["state"] == "Replicating", (table, s)
        assert s["error"] is None
        rep = assert_mirror_equals_source(db.conn, root, schema, table)
        assert s["rows"] == len(rep.rows) and s["files"] == rep.files
    assert status[("public", "all_nulls")]["status"] == "WARNING"  # no key: inserts only
    assert status[("public", "all_types")]["status"] == "OK"
    assert replay_table(table_folder(root, "public", "by_unique")).keys == ["part", "code"]
    assert replay_table(table_folder(root, "public", "all_nulls")).keys == []
    assert status[("public", "big")]["rows"] == 250000
    assert status[("public", "empty_one")]["files"] == 0
    assert os.path.exists(os.path.join(root, "_partnerEvents.json"))
    # the slot exists; the stream starts at the snapshot's consistent point (the decoder has since
    # confirmed it further, as the WAL moves on)
    slot, lsn = db.sql("SELECT s.slot_name, s.confirmed_flush_lsn >= m.consistent_lsn FROM pg_replication_slots s "
                       "JOIN azure_cdc.mirrors m ON m.slot_name = s.slot_name")[0]
    assert slot == "azure_cdc_m" and lsn


def test_replay_detects_a_gap_and_a_changed_cell(db):
    """The comparison used everywhere must be able to fail."""
    db.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
    db.sql("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g")
    root = db.start_mirror("m")
    db.wait_snapshot("m")
    assert_mirror_equals_source(db.conn, root, "public", "t")
    db.sql("SELECT azure_cdc.stop_mirror('m')")  # so that the change below is not mirrored
    db.sql("UPDATE t SET v = 'changed' WHERE id = 7")
    with pytest.raises(AssertionError):
        assert_mirror_equals_source(db.conn, root, "public", "t")
    folder = table_folder(root, "public", "t")
    os.rename(os.path.join(folder, "%020d.parquet" % 1), os.path.join(folder, "%020d.parquet" % 2))
    with pytest.raises(LandingZoneError):
        data_files(folder)


def test_files_are_bounded_by_snapshot_buffer_size(db):
    with db.server_setting("azure_cdc.snapshot_buffer_size", '10MB'):
        db.sql("CREATE TABLE wide (id int PRIMARY KEY, blob bytea)")
        # incompressible: 12 000 rows of 5 kB random bytes, about 60 MB
        db.sql("INSERT INTO wide SELECT g, decode(string_agg(lpad(to_hex((random() * 2147483647)::int), 8, '0'), ''), 'hex') "
               "FROM generate_series(1, 12000) g, generate_series(1, 1280) k GROUP BY g")
        root = db.start_mirror("m")
        db.wait_snapshot("m")
        files = data_files(table_folder(root, "public", "wide"))
        assert len(files) >= 5
        for f in files[:-1]:
            # closed once it reaches 10 MB, within an eighth of the limit
            assert 10 * 2**20 <= os.path.getsize(f) <= 10 * 2**20 * 9 // 8 + 2**20, os.path.getsize(f)
        assert_mirror_equals_source(db.conn, root, "public", "wide")


@pytest.mark.parametrize("codec", ["snappy", "gzip", "uncompressed"])
def test_compression_parameter(db, codec):
    import pyarrow.parquet as pq
    with db.server_setting("azure_cdc.parquet_compression", codec):
        db.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")
        db.sql("INSERT INTO t SELECT g, repeat('x', g % 50) FROM generate_series(1, 5000) g")
        root = db.start_mirror("m")
        db.wait_snapshot("m")
        f = data_files(table_folder(root, "public", "t"))[0]
        assert pq.ParquetFile(f).metadata.row_group(0).column(0).compression == codec.upper()
        assert_mirror_equals_source(db.conn, root, "public", "t")


def test_explicit_tables_with_awkward_names(db):
    db.sql('CREATE SCHEMA "Sales Dept"')
    db.sql('CREATE TABLE "Sales Dept"."../Orders ü" (id int PRIMARY KEY, "Qty %" int)')
    db.sql('INSERT INTO "Sales Dept"."../Orders ü" VALUES (1, 10), (2, NULL)')
    db.sql("CREATE TABLE not_listed (id int PRIMARY KEY)")
    root = db.start_mirror("m", ['"Sales Dept"."../Orders ü"'])
    status = db.wait_snapshot("m")
    assert list(status) == [("Sales Dept", "../Orders ü")]
    folder = table_folder(root, "Sales Dept", "../Orders ü")
    assert folder.startswith(root) and os.path.basename(folder) == "..%2FOrders ü"
    assert os.path.basename(os.path.dirname(folder)) == "Sales Dept.schema"
    assert sorted(os.listdir(root)) == ["Sales Dept.schema", "_partnerEvents.json"]
    assert_mirror_equals_source(db.conn, root, "Sales Dept", "../Orders ü")


def test_a_bad_value_parks_only_its_table(db):
    db.sql("CREATE TABLE good (id int PRIMARY KEY)")
    db.sql("INSERT INTO good SELECT generate_series(1, 10)")
    db.sql("CREATE TABLE bad (id int PRIMARY KEY, amount numeric(10,2))")
    db.sql("INSERT INTO bad SELECT g, g FROM generate_series(1, 20000) g")
    db.sql("INSERT INTO bad VALUES (0, 'NaN')")
    root = db.start_mirror("m")
    status = db.wait_snapshot("m")
    assert status[("public", "good")]["state"] == "Replicating"
    bad = status[("public", "bad")]
    assert bad["state"] == "Failed" and bad["status"] == "ERROR"
    assert "NaN" in bad["error"] and "amount" in bad["error"]
    assert not os.path.exists(table_folder(root, "public", "bad")), "a parked table's folder is deleted"
    assert_mirror_equals_source(db.conn, root, "public", "good")


def test_stop_drop_and_reuse_the_name(db):
    db.sql("CREATE TABLE t (id int PRIMARY KEY)")
    db.sql("INSERT INTO t SELECT generate_series(1, 1000)")
    root = db.start_mirror("m")
    db.wait_snapshot("m")
    assert db.one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'azure_cdc_m'") == 1
    db.sql("SELECT azure_cdc.stop_mirror('m')")
    assert db.one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'azure_cdc_m'") == 0
    assert {s["state"] for s in db.status("m").values()} == {"Stopped"}
    assert data_files(table_folder(root, "public", "t")), "files are kept"
    with pytest.raises(psycopg.errors.DuplicateObject):
        db.sql("SELECT azure_cdc.start_mirror('m', %s)", ("file://" + root + "2",))
    db.sql("SELECT azure_cdc.drop_mirror('m')")
    db.sql("SELECT azure_cdc.start_mirror('m', %s)", ("file://" + root + "2",))
    db.wait_snapshot("m")
    assert_mirror_equals_source(db.conn, root + "2", "public", "t")


def eventually(condition, deadline_s=60):
    """Waits for a condition the server reaches asynchronously; fails after the deadline."""
    end = time.time() + deadline_s
    while not condition():
        assert time.time() < end, "condition not reached"
        time.sleep(0.1)


def snapshot_worker_pid(db, deadline_s=60):
    end = time.time() + deadline_s
    while time.time() < end:
        pid = db.one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'azure_cdc snapshot'")
        if pid:
            return pid
        time.sleep(0.05)
    raise AssertionError("no snapshot worker appeared")


def wait_rows_copied(db, mirror, at_least, deadline_s=120):
    end = time.time() + deadline_s
    while time.time() < end:
        done = sum(s["rows"] for s in db.status(mirror).values())
        if done >= at_least:
            return done
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} rows copied")


def test_a_killed_snapshot_worker_is_restarted_and_the_result_is_exact(db, cluster):
    db.sql("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
    db.sql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 600000) g")
    db.sql("ANALYZE t")
    postmaster = cluster.postmaster_pid()
    root = db.start_mirror("m")
    pid = snapshot_worker_pid(db)
    wait_rows_copied(db, "m", 50000)  # progress is visible while the snapshot runs
    est, pct, state = db.sql("SELECT snapshot_rows_estimated, snapshot_percent, state "
                             "FROM azure_cdc.get_all_tables_mirror_status() WHERE table_name = 't'")[0]
    if state == "Snapshotting":
        assert 500000 < est < 700000 and 0 < pct <= 100, (est, pct)
    assert db.one("SELECT pg_terminate_backend(%s)", (pid,))
    db.sql("INSERT INTO t VALUES (0, 'after the first attempt')")
    status = db.wait_snapshot("m")
    assert cluster.postmaster_pid() == postmaster, "the server did not restart"
    assert status[("public", "t")]["rows"] == 600001
    db.wait_caught_up("m")  # should the row above have come after the new slot, it is streamed
    assert_mirror_equals_source(db.conn, root, "public", "t")
    log = open(cluster.log).read()
    assert "snapshot worker of mirror slot" in log and "restarting in" in log


def test_immediate_shutdown_during_the_snapshot_then_restart(db, cluster):
    db.sql("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
    db.sql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 600000) g")
    root = db.start_mirror("m")
    snapshot_worker_pid(db)
    wait_rows_copied(db, "m", 50000)
    cluster.stop("immediate")
    cluster.start()
    db.reconnect()
    status = db.wait_snapshot("m")  # the launcher's scout found the mirror and snapshotted it again
    assert status[("public", "t")]["state"] == "Replicating"
    assert_mirror_equals_source(db.conn, root, "public", "t")
    assert db.one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'azure_cdc_m'") == 1


def test_mirrors_survive_a_clean_restart(db, cluster):
    db.sql("CREATE TABLE t (id int PRIMARY KEY)")
    db.sql("INSERT INTO t SELECT generate_series(1, 10)")
    root = db.start_mirror("m")
    db.wait_snapshot("m")
    before = sorted(os.listdir(table_folder(root, "public", "t")))
    cluster.restart("fast")
    db.reconnect()
    # the scout registers it again: it counts against max_fabric_mirrors (deadline, not a timing check)
    eventually(lambda: db.one("SELECT detail->>'active_mirrors' FROM azure_cdc.check_prerequisites() "
                              "WHERE code = 'MAX_FABRIC_MIRRORS_REACHED'") != "0")
    assert db.one("SELECT state FROM azure_cdc.mirrors WHERE mirror_name = 'm'") == "Running"
    assert sorted(os.listdir(table_folder(root, "public", "t"))) == before, "a published snapshot is not redone"
    db.sql("SELECT azure_cdc.stop_mirror('m')")


def test_launcher_runs(cluster):
    with cluster.connect() as c:
        n = c.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'azure_cdc launcher'").fetchone()[0]
    assert n == 1


def snapshot_log_lines(cluster, mirror):
    return [l for l in open(cluster.log).read().splitlines() if f'mirror "{mirror}": snapshot of' in l]


def make_tables(db, n, rows):
    for i in range(n):
        db.sql(f"CREATE TABLE t{i} (id bigint PRIMARY KEY, v text, x float8)")
        db.sql(f"INSERT INTO t{i} SELECT g, md5(g::text), g * 0.5 FROM generate_series(1, {rows}) g")


def test_parallel_snapshot_workers_share_one_snapshot(db, cluster):
    make_tables(db, 6, 150000)
    mirror = "par_" + db.name
    root = db.start_mirror(mirror)
    # once copying has begun the snapshot exists: later writes must not appear in any table's files,
    # whichever worker copies it
    wait_rows_copied(db, mirror, 1)
    for i in range(6):
        db.sql(f"UPDATE t{i} SET v = 'changed during the snapshot' WHERE id % 1000 = 0")
    db.wait_snapshot(mirror)
    [line] = snapshot_log_lines(cluster, mirror)
    assert "by 2 helpers" in line, line  # max_snapshot_workers = 3: the worker and two helpers
    # The snapshot files (no __rowMarker__) hold the rows as of the snapshot; the concurrent updates
    # arrive as change files after them, and the replay equals the source. (Folders are read once the
    # decoder has published everything: while it writes, a `_`-prefixed temporary file is there.)
    db.wait_caught_up(mirror)
    for i in range(6):
        for path in data_files(table_folder(root, "public", f"t{i}")):
            t = pq.read_table(path)
            if "__rowMarker__" not in t.column_names:
                assert "changed during the snapshot" not in t.column("v").to_pylist(), path
    for i in range(6):
        assert_mirror_equals_source(db.conn, root, "public", f"t{i}")


def parts_published(cluster, table):
    """(worker, rows, files) of each snapshot worker that published parts of public.<table>."""
    pattern = re.compile(r'snapshot worker (\d+) published (\d+) rows of table "public\.%s" in (\d+) file' % table)
    return [tuple(map(int, m.groups())) for m in pattern.finditer(open(cluster.log).read())]


def test_one_large_table_is_scanned_in_parts_by_several_workers(db, cluster):
    # about 50 MB of heap: split into parts that the worker and its two helpers take in turn, each
    # writing files of its own that are numbered as they complete
    table = "big_" + db.name
    with db.server_setting("azure_cdc.snapshot_buffer_size", '10MB'):
        db.sql(f"CREATE TABLE {table} (id bigint PRIMARY KEY, v text, x float8)")
        db.sql(f"INSERT INTO {table} SELECT g, md5(g::text), g * 0.5 FROM generate_series(1, 600000) g")
        mirror = "parts_" + db.name
        root = db.start_mirror(mirror)
        # rows written once the copy has begun are not in the snapshot, whichever part holds them
        wait_rows_copied(db, mirror, 1)
        db.sql(f"UPDATE {table} SET v = 'changed during the snapshot' WHERE id % 997 = 0")
        status = db.wait_snapshot(mirror)
        s = status[("public", table)]
        assert s["state"] == "Replicating" and s["rows"] == 600000, s
        assert f'table "public.{table}" (' in open(cluster.log).read(), "the table was not scanned in parts"
        published = parts_published(cluster, table)
        assert len({w for w, _, _ in published}) >= 2, published
        assert sum(r for _, r, _ in published) == 600000, published
        db.wait_caught_up(mirror)
        files = data_files(table_folder(root, "public", table))
        snapshot_files = [f for f in files if "__rowMarker__" not in pq.read_schema(f).names]
        assert len(snapshot_files) == sum(f for _, _, f in published)
        for f in snapshot_files:
            assert "changed during the snapshot" not in pq.read_table(f).column("v").to_pylist(), f
        # every number from 1 without a gap (the replay refuses gaps), each row once, equal to the source
        assert_mirror_equals_source(db.conn, root, "public", table)


def test_a_bad_value_in_one_part_parks_the_whole_table(db, cluster):
    table = "bad_" + db.name
    db.sql("CREATE TABLE good (id int PRIMARY KEY)")
    db.sql("INSERT INTO good SELECT generate_series(1, 10)")
    db.sql(f"CREATE TABLE {table} (id bigint PRIMARY KEY, v text, amount numeric(10,2))")
    db.sql(f"INSERT INTO {table} SELECT g, md5(g::text), g / 100.0 FROM generate_series(1, 400000) g")
    # the last block: a part other than the first
    db.sql(f"INSERT INTO {table} VALUES (0, 'bad', 'NaN')")
    root = db.start_mirror("m")
    status = db.wait_snapshot("m")
    assert status[("public", "good")]["state"] == "Replicating"
    bad = status[("public", table)]
    assert bad["state"] == "Failed" and bad["status"] == "ERROR", bad
    assert "NaN" in bad["error"] and "amount" in bad["error"]
    assert f'table "public.{table}" (' in open(cluster.log).read(), "the table was not scanned in parts"
    assert not os.path.exists(table_folder(root, "public", table)), "a parked table's folder is deleted"
    assert_mirror_equals_source(db.conn, root, "public", "good")


def test_helpers_ended_while_a_table_is_scanned_in_parts(db, cluster):
    """Helpers ended (SIGTERM: FATAL at their next interrupt check, the process exits without
    returning to azure_cdc's code) while they hold parts of a table and take turns publishing its
    files: nobody may wait for a turn they held; the attempt fails, the next one copies again."""
    table = "killed_" + db.name
    db.sql(f"CREATE TABLE {table} (id bigint PRIMARY KEY, v text, x float8)")
    db.sql(f"INSERT INTO {table} SELECT g, md5(g::text), g * 0.5 FROM generate_series(1, 600000) g")
    mirror = "kparts_" + db.name
    root = db.start_mirror(mirror)
    wait_for("the table to be split", lambda: f'table "public.{table}" (' in open(cluster.log).read(), deadline_s=120)
    wait_rows_copied(db, mirror, 1)
    ended = db.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE backend_type = 'azure_cdc snapshot helper'")
    assert ended, "no helper ran"
    status = db.wait_snapshot(mirror)
    assert status[("public", table)]["state"] == "Replicating"
    assert "a snapshot helper failed" in open(cluster.log).read()
    assert_mirror_equals_source(db.conn, root, "public", table)


def test_one_snapshot_worker_starts_no_helper(db, cluster):
    with db.server_setting("azure_cdc.max_snapshot_workers", '1'):
        make_tables(db, 3, 1000)
        mirror = "one_" + db.name
        root = db.start_mirror(mirror)
        db.wait_snapshot(mirror)
        [line] = snapshot_log_lines(cluster, mirror)
        assert "(3 copied by this worker, 0 by 0 helpers)" in line, line
        for i in range(3):
            assert_mirror_equals_source(db.conn, root, "public", f"t{i}")


def test_a_killed_helper_fails_the_attempt_and_the_retry_is_exact(db, cluster):
    make_tables(db, 4, 300000)
    mirror = "kill_" + db.name
    root = db.start_mirror(mirror)
    # once two tables are being copied at the same time, a helper holds one of them: kill every helper
    end = time.time() + 120
    while sum(1 for s in db.status(mirror).values() if s["state"] == "Snapshotting" and s["rows"] > 0) < 2:
        assert time.time() < end, "tables were not copied in parallel"
        time.sleep(0.02)
    killed = db.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'azure_cdc snapshot helper'")
    assert killed
    db.wait_snapshot(mirror)
    assert "a snapshot helper failed" in open(cluster.log).read()
    for i in range(4):
        assert_mirror_equals_source(db.conn, root, "public", f"t{i}")


def test_stop_during_the_snapshot_ends_every_worker_and_drops_the_slot(db, cluster):
    make_tables(db, 4, 300000)
    mirror = "stop_" + db.name
    root = db.start_mirror(mirror)
    wait_rows_copied(db, mirror, 1)
    db.sql("SELECT azure_cdc.stop_mirror(%s)", (mirror,))
    assert db.one("SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'azure_cdc snapshot%%'") == 0
    assert db.one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", ("azure_cdc_" + mirror,)) == 0
    assert {s["state"] for s in db.status(mirror).values()} == {"Stopped"}
    time.sleep(6)  # longer than one launcher cycle (5 s): nothing restarts it
    assert db.one("SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'azure_cdc snapshot%%'") == 0


def test_drop_extension_with_a_running_mirror_is_reported_after_restart(db, cluster):
    db.sql("CREATE TABLE t (id int PRIMARY KEY)")
    mirror = "orphan_" + db.name
    db.start_mirror(mirror)
    db.wait_snapshot(mirror)
    db.sql("DROP EXTENSION azure_cdc")
    cluster.restart("fast")
    db.reconnect()
    slot = "azure_cdc_" + mirror
    eventually(lambda: f'replication slot "{slot}" belongs to a mirror of a dropped azure_cdc extension'
               in open(cluster.log).read())
    db.sql("SELECT pg_drop_replication_slot(%s)", (slot,))
    db.sql("CREATE EXTENSION azure_cdc")  # for the fixture's clean-up
