"""Replay of an azure_cdc landing zone, for tests (and anyone checking a mirror by hand).

`replay_table(folder)` reads a table folder the way a lakehouse replicator does: `_metadata.json`
for the key columns, then the data files in number order (which must be contiguous from 1, with no
half-written `_`-prefixed file left), applying each row by its `__rowMarker__` (absent: insert;
0 insert, 1 update, 2 delete, 4 upsert). Values come back as PostgreSQL's text output of the source
column, so that a mirror can be compared cell by cell with `source_rows()`:

    int, float, decimal -> the number as PostgreSQL prints it (NaN, Infinity, -Infinity kept)
    date / timestamp    -> days / microseconds since 1970; +-infinity are the int32 / int64 extremes
    timestamptz         -> as PostgreSQL prints it with TimeZone = UTC
    bytea               -> \\x followed by hex
    everything else     -> the string as written (it already is the text output)
"""

import json
import os
import re
import unicodedata
import urllib.parse
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FILE_RE = re.compile(r"^(\d{20})\.parquet$")
ROW_MARKER = "__rowMarker__"
INT32_MAX, INT32_MIN = 2**31 - 1, -(2**31)
INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)


class LandingZoneError(AssertionError):
    pass


def _must_encode(c, i, n):
    # The rule of core/src/names.rs: separators, '%', control characters, a leading '_', a trailing '.'.
    return c in "/\\%" or unicodedata.category(c) == "Cc" or (i == 0 and c == "_") or (i == n - 1 and c == ".")


def encode_component(name):
    return "".join(
        "".join("%%%02X" % b for b in c.encode()) if _must_encode(c, i, len(name)) else c for i, c in enumerate(name)
    )


def decode_component(s):
    name = urllib.parse.unquote(s, errors="strict")
    assert encode_component(name) == s, f"{s!r} is not an encoded name"
    return name


def table_folder(root, schema, table):
    return os.path.join(root, encode_component(schema) + ".schema", encode_component(table))


def data_files(folder):
    """Published data files of a table folder, checked: numbers contiguous from 1, no temporary file."""
    names = sorted(os.listdir(folder))
    temps = [n for n in names if n.startswith("_") and n.endswith(".parquet")]
    if temps:
        raise LandingZoneError(f"{folder}: temporary files left behind: {temps}")
    numbers = sorted(int(m.group(1)) for n in names if (m := FILE_RE.match(n)))
    if numbers != list(range(1, len(numbers) + 1)):
        raise LandingZoneError(f"{folder}: file numbers are not contiguous from 1: {numbers}")
    return [os.path.join(folder, "%020d.parquet" % n) for n in numbers]


def key_columns(folder):
    with open(os.path.join(folder, "_metadata.json")) as f:
        return json.load(f).get("keyColumns", [])


# ---- PostgreSQL text output of Arrow values -------------------------------------------------------

def civil_from_days(z):
    """Proleptic Gregorian (year, month, day) of days since 1970-01-01 (year 0 = 1 BC)."""
    z += 719468
    era = z // 146097  # Python floors already
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return (y + 1 if m <= 2 else y), m, d


def pg_date(days):
    if days == INT32_MAX:
        return "infinity"
    if days == INT32_MIN:
        return "-infinity"
    y, m, d = civil_from_days(days)
    if y <= 0:
        return "%04d-%02d-%02d BC" % (1 - y, m, d)
    return "%04d-%02d-%02d" % (y, m, d)


def pg_time_of_day(micros):
    s, us = divmod(micros, 1_000_000)
    h, rem = divmod(s, 3600)
    mi, sec = divmod(rem, 60)
    text = "%02d:%02d:%02d" % (h, mi, sec)
    if us:
        text += ("." + "%06d" % us).rstrip("0")
    return text


def pg_timestamp(micros, tz):
    if micros == INT64_MAX:
        return "infinity"
    if micros == INT64_MIN:
        return "-infinity"
    days, day_us = divmod(micros, 86_400_000_000)
    date = pg_date(days)
    bc = date.endswith(" BC")
    text = date.removesuffix(" BC") + " " + pg_time_of_day(day_us) + ("+00" if tz else "")
    return text + (" BC" if bc else "")


def pg_float(v, bits):
    if v != v:
        return "NaN"
    if v == float("inf"):
        return "Infinity"
    if v == float("-inf"):
        return "-Infinity"
    text = str(np.float32(v)) if bits == 32 else repr(float(v))
    if text.endswith(".0"):
        text = text[:-2]
    if "e" in text:
        mant, exp = text.split("e")
        sign = "-" if exp.startswith("-") else "+"
        text = "%se%s%02d" % (mant.removesuffix(".0"), sign, int(exp.lstrip("+-")))
    return text


def to_pg_text(typ, v):
    if v is None:
        return None
    if pa.types.is_boolean(typ):
        return "t" if v else "f"
    if pa.types.is_integer(typ):
        return str(v)
    if pa.types.is_float32(typ):
        return pg_float(v, 32)
    if pa.types.is_float64(typ):
        return pg_float(v, 64)
    if pa.types.is_decimal(typ):
        return format(Decimal(v), "f")
    if pa.types.is_binary(typ):
        return "\\x" + v.hex()
    if pa.types.is_string(typ):
        return v
    raise LandingZoneError(f"no text form for Arrow type {typ}")


def column_as_text(col):
    typ = col.type
    if pa.types.is_date32(typ):
        return [None if v is None else pg_date(v) for v in col.cast(pa.int32()).to_pylist()]
    if pa.types.is_time64(typ):
        return [None if v is None else pg_time_of_day(v) for v in col.cast(pa.int64()).to_pylist()]
    if pa.types.is_timestamp(typ):
        tz = typ.tz is not None
        return [None if v is None else pg_timestamp(v, tz) for v in col.cast(pa.int64()).to_pylist()]
    return [to_pg_text(typ, v) for v in col.to_pylist()]


# ---- replay --------------------------------------------------------------------------------------

class Replayed:
    """The rows of one table after replay: `rows` maps key tuple (or row number, without keys) to a
    dict column -> PostgreSQL text."""

    def __init__(self, keys):
        self.keys = keys
        self.rows = {}
        self.files = 0
        self.columns = []


def replay_table(folder):
    keys = key_columns(folder)
    out = Replayed(keys)
    serial = 0
    for path in data_files(folder):
        table = pq.read_table(path)
        if table.num_rows == 0:
            raise LandingZoneError(f"{path} is empty")
        out.files += 1
        names = [n for n in table.column_names if n != ROW_MARKER]
        for n in names:
            if n not in out.columns:
                out.columns.append(n)
        cols = {n: column_as_text(table.column(n)) for n in names}
        markers = table.column(ROW_MARKER).to_pylist() if ROW_MARKER in table.column_names else [0] * table.num_rows
        for i, marker in enumerate(markers):
            # A column the file lacks (added later, or dropped before it was written) is NULL.
            row = {**{c: None for c in out.columns}, **{n: cols[n][i] for n in names}}
            if keys:
                k = tuple(row[c] for c in keys)
            else:
                k, serial = serial, serial + 1
            if marker == 0:
                if keys and k in out.rows:
                    raise LandingZoneError(f"{path}: insert of existing key {k}")
                out.rows[k] = row
            elif marker in (1, 4):
                if marker == 1 and k not in out.rows:
                    raise LandingZoneError(f"{path}: update of missing key {k}")
                out.rows[k] = {**out.rows.get(k, {}), **row}
            elif marker == 2:
                if out.rows.pop(k, None) is None:
                    raise LandingZoneError(f"{path}: delete of missing key {k}")
            else:
                raise LandingZoneError(f"{path}: unknown row marker {marker}")
    return out


def source_rows(conn, schema, table):
    """Every row of the source table as dicts column -> the type's text output (TimeZone UTC)."""
    with conn.cursor() as cur:
        cur.execute("SET TimeZone = 'UTC'")
        # Arrays and composites land as JSON (array_to_json / row_to_json), everything else as its
        # text output; a domain is its base type.
        cur.execute(
            "WITH RECURSIVE base(attnum, attname, oid) AS ("
            "  SELECT a.attnum, a.attname, a.atttypid FROM pg_attribute a"
            "   WHERE a.attrelid = format('%%I.%%I', %s::text, %s::text)::regclass AND a.attnum > 0 AND NOT a.attisdropped"
            "  UNION ALL SELECT b.attnum, b.attname, t.typbasetype FROM base b JOIN pg_type t ON t.oid = b.oid"
            "   WHERE t.typtype = 'd') "
            "SELECT b.attname, t.typsubscript = 'array_subscript_handler'::regproc OR t.typtype = 'c' "
            "  FROM base b JOIN pg_type t ON t.oid = b.oid WHERE t.typtype <> 'd' ORDER BY b.attnum",
            (schema, table),
        )
        typed = cur.fetchall()
        cols = [r[0] for r in typed]
        exprs = ", ".join(
            # to_json is strict (NULL stays NULL); a composite whose fields are all NULL "IS NULL" in
            # SQL but is a value, written as an object.
            ("pg_catalog.to_json(t.{c})::text" if as_json else
             "CASE WHEN t.{c} IS NULL THEN NULL ELSE pg_catalog.format('%s', t.{c}) END").format(c=quote_ident(c))
            for c, as_json in typed
        )
        cur.execute(f"SELECT {exprs} FROM {quote_ident(schema)}.{quote_ident(table)} t")
        return cols, [dict(zip(cols, r)) for r in cur.fetchall()]


def quote_ident(name):
    return '"' + name.replace('"', '""') + '"'


def assert_mirror_equals_source(conn, root, schema, table):
    """Replays the table's folder and compares it with the source cell by cell. Returns the replay."""
    folder = table_folder(root, schema, table)
    return assert_rows_equal_source(conn, replay_table(folder), schema, table)


def assert_rows_equal_source(conn, rep, schema, table):
    """Compares a replayed table (keys, columns, rows) with the source cell by cell. Returns it."""
    cols, rows = source_rows(conn, schema, table)
    # The files may also carry columns dropped since (NULL in later rows): only the source's count.
    assert [c for c in rep.columns if c in cols] == cols or (rep.files == 0 and not rows), (
        f"{schema}.{table}: columns {rep.columns} != {cols}")
    mirrored = {k: {c: r.get(c) for c in cols} for k, r in rep.rows.items()}
    if rep.keys:
        source = {tuple(r[c] for c in rep.keys): r for r in rows}
        assert len(source) == len(rows), f"{schema}.{table}: duplicate keys in source"
        missing = source.keys() - rep.rows.keys()
        extra = rep.rows.keys() - source.keys()
        assert not missing and not extra, (
            f"{schema}.{table}: {len(missing)} rows missing (e.g. {list(missing)[:3]}), "
            f"{len(extra)} extra (e.g. {list(extra)[:3]})"
        )
        for k, r in source.items():
            assert mirrored[k] == r, f"{schema}.{table} key {k}: mirror {mirrored[k]} != source {r}"
    else:
        def canon(r):
            return tuple(sorted(((c, v) for c, v in r.items()), key=lambda x: x[0]))
        mine = sorted(canon(r) for r in mirrored.values())
        theirs = sorted(canon(r) for r in rows)
        assert mine == theirs, f"{schema}.{table}: rows differ ({len(mine)} in mirror, {len(theirs)} in source)"
    return rep
