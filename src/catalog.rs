//! Reading and writing azure_cdc's catalog tables (`azure_cdc.mirrors`, `azure_cdc.mirror_tables`)
//! and the PostgreSQL catalogs it consults, through SPI. Runs on the main thread of a backend or
//! worker, inside a transaction. Every statement is schema-qualified and takes its values as
//! parameters.

use azure_cdc_core::{Error, ErrorKind, Result};
use pgrx::prelude::*;

use crate::errors::spi;

#[derive(Debug, Clone)]
pub struct MirrorRow {
    pub id: i64,
    pub name: String,
    pub target: String,
    pub state: String,
    pub slot_name: String,
    /// Name of the credential used to reach the target, if any.
    pub credential: Option<String>,
    /// "Mirror all data": tables created later join the mirror.
    pub all_tables: bool,
}

#[derive(Debug, Clone)]
pub struct TableRow {
    pub relid: pg_sys::Oid,
    pub schema: String,
    pub table: String,
    pub state: String,
    /// Key columns recorded when the table was snapshotted.
    pub key_columns: Vec<String>,
    /// The snapshot of its last reseed's copy (pg_snapshot text), if it was reseeded.
    pub seed_snapshot: Option<String>,
    /// A partitioned table: the signature of its partition tree when it was last copied.
    pub partitions: Option<String>,
    /// The columns its files carry ([`azure_cdc_core::columns::to_text`]), once it was copied.
    pub columns: Option<String>,
}

const MIRROR_COLUMNS: &str = "mirror_id, mirror_name, target, state, slot_name::text, credential, all_tables";

fn mirror_from(row: &pgrx::spi::SpiHeapTupleData) -> Result<MirrorRow> {
    let missing = || Error::new(ErrorKind::Internal, "azure_cdc.mirrors has a NULL in a NOT NULL column");
    Ok(MirrorRow {
        id: row.get::<i64>(1).map_err(spi)?.ok_or_else(missing)?,
        name: row.get::<String>(2).map_err(spi)?.ok_or_else(missing)?,
        target: row.get::<String>(3).map_err(spi)?.ok_or_else(missing)?,
        state: row.get::<String>(4).map_err(spi)?.ok_or_else(missing)?,
        slot_name: row.get::<String>(5).map_err(spi)?.ok_or_else(missing)?,
        credential: row.get::<String>(6).map_err(spi)?,
        all_tables: row.get::<bool>(7).map_err(spi)?.unwrap_or(false),
    })
}

pub fn mirror_by_name(name: &str) -> Result<Option<MirrorRow>> {
    Spi::connect(|c| {
        let q = format!("SELECT {MIRROR_COLUMNS} FROM azure_cdc.mirrors WHERE mirror_name = $1");
        let t = c.select(&q, None, &[name.into()]).map_err(spi)?;
        match t.into_iter().next() {
            Some(row) => Ok(Some(mirror_from(&row)?)),
            None => Ok(None),
        }
    })
}

pub fn mirror_by_id(id: i64) -> Result<Option<MirrorRow>> {
    Spi::connect(|c| {
        let q = format!("SELECT {MIRROR_COLUMNS} FROM azure_cdc.mirrors WHERE mirror_id = $1");
        let t = c.select(&q, None, &[id.into()]).map_err(spi)?;
        match t.into_iter().next() {
            Some(row) => Ok(Some(mirror_from(&row)?)),
            None => Ok(None),
        }
    })
}

/// Mirrors of this database that need workers (not Stopped), for the scout.
pub fn active_mirrors() -> Result<Vec<MirrorRow>> {
    Spi::connect(|c| {
        let q = format!("SELECT {MIRROR_COLUMNS} FROM azure_cdc.mirrors WHERE state <> 'Stopped' ORDER BY mirror_id");
        let t = c.select(&q, None, &[]).map_err(spi)?;
        t.into_iter().map(|r| mirror_from(&r)).collect()
    })
}

/// Targets of the mirrors of this database that are not Stopped.
pub fn active_targets() -> Result<Vec<(String, String)>> {
    Spi::connect(|c| {
        let t = c
            .select("SELECT mirror_name, target FROM azure_cdc.mirrors WHERE state <> 'Stopped'", None, &[])
            .map_err(spi)?;
        let mut v = Vec::new();
        for r in t {
            if let (Some(n), Some(t)) = (r.get::<String>(1).map_err(spi)?, r.get::<String>(2).map_err(spi)?) {
                v.push((n, t));
            }
        }
        Ok(v)
    })
}

pub fn tables(mirror_id: i64) -> Result<Vec<TableRow>> {
    Spi::connect(|c| {
        let t = c
            .select(
                "SELECT relid, schema_name::text, table_name::text, state, key_columns::text[], seed_snapshot, partitions, columns \
                   FROM azure_cdc.mirror_tables \
                 WHERE mirror_id = $1 ORDER BY schema_name, table_name",
                None,
                &[mirror_id.into()],
            )
            .map_err(spi)?;
        let missing = || Error::new(ErrorKind::Internal, "azure_cdc.mirror_tables has a NULL in a NOT NULL column");
        t.into_iter()
            .map(|r| {
                Ok(TableRow {
                    relid: r.get::<pg_sys::Oid>(1).map_err(spi)?.ok_or_else(missing)?,
                    schema: r.get::<String>(2).map_err(spi)?.ok_or_else(missing)?,
                    table: r.get::<String>(3).map_err(spi)?.ok_or_else(missing)?,
                    state: r.get::<String>(4).map_err(spi)?.ok_or_else(missing)?,
                    key_columns: r.get::<Vec<String>>(5).map_err(spi)?.ok_or_else(missing)?,
                    seed_snapshot: r.get::<String>(6).map_err(spi)?,
                    partitions: r.get::<String>(7).map_err(spi)?,
                    columns: r.get::<String>(8).map_err(spi)?,
                })
            })
            .collect()
    })
}

/// Where a table's key columns come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Its primary key or its replica identity index: the old key is in the WAL of every UPDATE and
    /// DELETE.
    Identity,
    /// A unique index (named) on NOT NULL columns, not yet the replica identity: `start_mirror` makes
    /// it the replica identity (with a NOTICE) unless the table gets FULL anyway.
    UniqueIndex(String),
    /// REPLICA IDENTITY FULL set by the user on a table with neither: every column is the key.
    AllColumns,
    /// None: inserts are mirrored, an UPDATE or DELETE parks the table.
    None,
}

/// Key columns of a table, in index order: its primary key, else its replica identity index, else
/// the unique index on NOT NULL columns with the fewest columns (non-partial, no expressions, not
/// deferrable), else, if its replica identity is FULL, every column; else none. A partitioned table's
/// keys are its primary key only: the replica identity that logs old keys is each partition's own,
/// and a partition's primary key is its partitioned table's.
pub fn key_columns_with_source(relid: pg_sys::Oid) -> Result<(Vec<String>, KeySource)> {
    Spi::connect(|c| {
        let t = c
            .select(
                "SELECT (SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.ord) \
                           FROM pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                           JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum), \
                        i.indisprimary OR i.indisreplident, i.indexrelid::regclass::text \
                   FROM pg_catalog.pg_index i \
                  WHERE i.indrelid = $1 AND i.indisvalid AND i.indisready AND i.indislive \
                    AND (i.indisprimary OR (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = $1) <> 'p') \
                    AND (i.indisprimary OR i.indisreplident \
                         OR (i.indisunique AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL \
                             AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a \
                                              WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
                                                AND NOT a.attnotnull))) \
                  ORDER BY i.indisprimary DESC, i.indisreplident DESC, i.indnatts, i.indexrelid \
                  LIMIT 1",
                None,
                &[relid.into()],
            )
            .map_err(spi)?;
        if let Some(r) = t.into_iter().next() {
            let cols = r.get::<Vec<String>>(1).map_err(spi)?.unwrap_or_default();
            let identity = r.get::<bool>(2).map_err(spi)?.unwrap_or(false);
            let index = r.get::<String>(3).map_err(spi)?.unwrap_or_default();
            if !cols.is_empty() {
                return Ok((cols, if identity { KeySource::Identity } else { KeySource::UniqueIndex(index) }));
            }
        }
        let full = c
            .select(
                "SELECT pg_catalog.array_agg(a.attname::text ORDER BY a.attnum) FROM pg_catalog.pg_attribute a \
                   JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
                  WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND c.relreplident = 'f' \
                    AND c.relkind <> 'p'",
                None,
                &[relid.into()],
            )
            .map_err(spi)?;
        match full.into_iter().next().and_then(|r| r.get::<Vec<String>>(1).ok().flatten()) {
            Some(cols) if !cols.is_empty() => Ok((cols, KeySource::AllColumns)),
            _ => Ok((Vec::new(), KeySource::None)),
        }
    })
}

/// Key columns of a table (see [`key_columns_with_source`]).
pub fn key_columns(relid: pg_sys::Oid) -> Result<Vec<String>> {
    Ok(key_columns_with_source(relid)?.0)
}

/// `ALTER TABLE schema.table REPLICA IDENTITY USING INDEX index` (identifiers quoted by format()).
pub fn set_replica_identity_index(schema: &str, table: &str, index: &str) -> Result<()> {
    let stmt = Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.format('ALTER TABLE %I.%I REPLICA IDENTITY USING INDEX %I', $1::text, $2::text, \
                (SELECT c.relname::text FROM pg_catalog.pg_class c WHERE c.oid = $3::regclass))",
        &[schema.into(), table.into(), index.into()],
    )
    .map_err(spi)?
    .ok_or_else(|| Error::new(ErrorKind::Internal, "format() returned NULL"))?;
    Spi::run(&stmt).map_err(spi)
}

/// What a listed or discovered relation is, for validation.
#[derive(Debug, Clone)]
pub struct RelationInfo {
    pub relid: pg_sys::Oid,
    pub schema: String,
    pub table: String,
    pub relkind: String,
    pub persistence: String,
    pub heap: bool,
    /// A partition of a partitioned table.
    pub partition: bool,
}

const RELATION_INFO: &str = "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text, c.relpersistence::text, \
            COALESCE(am.amname = 'heap', false), c.relispartition \
       FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
       LEFT JOIN pg_catalog.pg_am am ON am.oid = c.relam";

fn relation_from(r: &pgrx::spi::SpiHeapTupleData) -> Result<RelationInfo> {
    let missing = || Error::new(ErrorKind::Internal, "pg_class row with a NULL");
    Ok(RelationInfo {
        relid: r.get::<pg_sys::Oid>(1).map_err(spi)?.ok_or_else(missing)?,
        schema: r.get::<String>(2).map_err(spi)?.ok_or_else(missing)?,
        table: r.get::<String>(3).map_err(spi)?.ok_or_else(missing)?,
        relkind: r.get::<String>(4).map_err(spi)?.ok_or_else(missing)?,
        persistence: r.get::<String>(5).map_err(spi)?.ok_or_else(missing)?,
        heap: r.get::<bool>(6).map_err(spi)?.unwrap_or(false),
        partition: r.get::<bool>(7).map_err(spi)?.unwrap_or(false),
    })
}

/// What relation `relid` is now, if it exists.
pub fn relation_by_oid(relid: pg_sys::Oid) -> Result<Option<RelationInfo>> {
    Spi::connect(|c| {
        let q = format!("{RELATION_INFO} WHERE c.oid = $1");
        let t = c.select(&q, None, &[relid.into()]).map_err(spi)?;
        match t.into_iter().next() {
            Some(r) => Ok(Some(relation_from(&r)?)),
            None => Ok(None),
        }
    })
}

/// Whether a relation joins a mirror of all tables: an ordinary, permanent heap table or a
/// partitioned table outside the system schemas, not a partition (its rows are mirrored with its
/// partitioned table's), what `start_mirror` takes in that mode.
pub fn joins_all_tables(rel: &RelationInfo) -> bool {
    (rel.relkind == "r" && rel.heap || rel.relkind == "p")
        && rel.persistence == "p"
        && !rel.partition
        && !SYSTEM_SCHEMAS.contains(&format!("'{}'", rel.schema))
        && !rel.schema.starts_with("pg_temp_")
        && !rel.schema.starts_with("pg_toast_temp_")
}

/// The partitions of a partitioned table, at every level, as the current snapshot sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionTree {
    /// Partitions that hold rows (not themselves partitioned), with their relkind.
    pub leaves: Vec<(pg_sys::Oid, String)>,
    /// Each partition with the transaction that made it one (`pg_inherits.xmin`), in a canonical text
    /// form: a partition attached, detached, created or dropped (or detached and attached again)
    /// gives another signature.
    pub signature: String,
}

/// The partition tree of `relid` (empty for a table that is not partitioned). Read with SQL, so in
/// the snapshot of the caller's statement or transaction (a copy's tree and its rows agree).
pub fn partition_tree(relid: pg_sys::Oid) -> Result<PartitionTree> {
    Spi::connect(|c| {
        let t = c
            .select(
                "WITH RECURSIVE tree AS ( \
                     SELECT i.inhrelid, i.xmin::text AS x FROM pg_catalog.pg_inherits i WHERE i.inhparent = $1 \
                     UNION ALL \
                     SELECT i.inhrelid, i.xmin::text FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.inhrelid) \
                 SELECT tree.inhrelid, c.relkind::text, tree.x FROM tree \
                   JOIN pg_catalog.pg_class c ON c.oid = tree.inhrelid ORDER BY tree.inhrelid",
                None,
                &[relid.into()],
            )
            .map_err(spi)?;
        let mut tree = PartitionTree::default();
        let mut parts = Vec::new();
        for r in t {
            let missing = || Error::new(ErrorKind::Internal, "pg_inherits row with a NULL");
            let oid = r.get::<pg_sys::Oid>(1).map_err(spi)?.ok_or_else(missing)?;
            let kind = r.get::<String>(2).map_err(spi)?.ok_or_else(missing)?;
            let xmin = r.get::<String>(3).map_err(spi)?.ok_or_else(missing)?;
            parts.push(format!("{}:{xmin}", oid.to_u32()));
            if kind != "p" {
                tree.leaves.push((oid, kind));
            }
        }
        tree.signature = parts.join(",");
        Ok(tree)
    })
}

/// Resolves a table name as the user wrote it (optionally schema-qualified, quoted as in SQL).
pub fn resolve_relation(name: &str) -> Result<Option<RelationInfo>> {
    Spi::connect(|c| {
        let q = format!("{RELATION_INFO} WHERE c.oid = pg_catalog.to_regclass($1)");
        let t = c.select(&q, None, &[name.into()]).map_err(spi)?;
        match t.into_iter().next() {
            Some(r) => Ok(Some(relation_from(&r)?)),
            None => Ok(None),
        }
    })
}

/// Schemas never mirrored.
pub const SYSTEM_SCHEMAS: &str = "('pg_catalog', 'information_schema', 'azure_cdc', 'pg_toast')";

/// Every table-like relation of the database outside the system schemas (tables, partitioned
/// tables, views, materialized views, foreign tables), by name: what "mirror all data" considers.
pub fn user_relations() -> Result<Vec<RelationInfo>> {
    Spi::connect(|c| {
        let q = format!(
            "{RELATION_INFO} WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') \
               AND n.nspname NOT IN {SYSTEM_SCHEMAS} AND n.nspname NOT LIKE 'pg\\_temp\\_%' \
               AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%' \
             ORDER BY n.nspname, c.relname"
        );
        let t = c.select(&q, None, &[]).map_err(spi)?;
        t.into_iter().map(|r| relation_from(&r)).collect()
    })
}

/// Records a new mirror and its tables; returns the mirror id.
pub fn insert_mirror(
    name: &str,
    target: &str,
    all_tables: bool,
    options: pgrx::JsonB,
    credential: Option<&str>,
    slot_name: &str,
    tables: &[(RelationInfo, Vec<String>)],
) -> Result<i64> {
    Spi::connect_mut(|c| {
        let id = c
            .update(
                "INSERT INTO azure_cdc.mirrors (mirror_name, target, all_tables, options, slot_name, credential) \
                 VALUES ($1, $2, $3, $4, $5::name, $6) RETURNING mirror_id",
                None,
                &[name.into(), target.into(), all_tables.into(), options.into(), slot_name.into(), credential.into()],
            )
            .map_err(spi)?
            .first()
            .get_one::<i64>()
            .map_err(spi)?
            .ok_or_else(|| Error::new(ErrorKind::Internal, "INSERT returned no mirror_id"))?;
        Ok::<_, Error>(id)
    })
    .and_then(|id| {
        insert_tables(id, tables, "Snapshotting")?;
        Ok(id)
    })
}

/// Records tables of a mirror in `state` (a table removed before is taken back in that state).
pub fn insert_tables(mirror_id: i64, tables: &[(RelationInfo, Vec<String>)], state: &str) -> Result<()> {
    for (rel, keys) in tables {
        run(
            "INSERT INTO azure_cdc.mirror_tables (mirror_id, relid, schema_name, table_name, key_columns, state) \
             VALUES ($1, $2, $3::name, $4::name, $5, $6) \
             ON CONFLICT (mirror_id, relid) DO UPDATE SET state = EXCLUDED.state, key_columns = EXCLUDED.key_columns, \
                    schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name, last_error = NULL, \
                    rows_replicated = 0, files_published = 0, bytes_published = 0, next_file_number = 1, \
                    last_completed_at = NULL, seed_snapshot = NULL, partitions = NULL, columns = NULL",
            &[
                mirror_id.into(),
                rel.relid.into(),
                rel.schema.as_str().into(),
                rel.table.as_str().into(),
                keys.clone().into(),
                state.into(),
            ],
        )?;
    }
    Ok(())
}

/// Runs one catalog-writing statement.
pub fn run(query: &str, args: &[pgrx::datum::DatumWithOid]) -> Result<()> {
    Spi::connect_mut(|c| c.update(query, None, args).map(|_| ()).map_err(spi))
}

/// Mirrored tables (for a partitioned table: its partitions) that can store values out of line (they
/// have a TOAST table) and whose REPLICA IDENTITY is not FULL: an UPDATE that leaves such a value
/// unchanged would not carry it in the change stream. Returns (schema, table).
pub fn tables_needing_full_identity(relids: &[pg_sys::Oid]) -> Result<Vec<(String, String)>> {
    let ids: Vec<pg_sys::Oid> = relids.to_vec();
    Spi::connect(|c| {
        let t = c
            .select(
                "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c \
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                  WHERE (c.oid = ANY ($1) \
                         OR c.oid IN (SELECT t.relid FROM pg_catalog.unnest($1::pg_catalog.oid[]) AS r(oid), \
                                             LATERAL pg_catalog.pg_partition_tree(r.oid) AS t WHERE t.isleaf)) \
                    AND c.reltoastrelid <> 0 AND c.relreplident <> 'f' \
                  ORDER BY 1, 2",
                None,
                &[ids.into()],
            )
            .map_err(spi)?;
        t.into_iter()
            .map(|r| {
                let missing = || Error::new(ErrorKind::Internal, "pg_class row without a name");
                Ok((
                    r.get::<String>(1).map_err(spi)?.ok_or_else(missing)?,
                    r.get::<String>(2).map_err(spi)?.ok_or_else(missing)?,
                ))
            })
            .collect()
    })
}

/// `ALTER TABLE schema.table REPLICA IDENTITY FULL` (identifiers quoted by the server's format()).
pub fn set_replica_identity_full(schema: &str, table: &str) -> Result<()> {
    let stmt = Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.format('ALTER TABLE %I.%I REPLICA IDENTITY FULL', $1::text, $2::text)",
        &[schema.into(), table.into()],
    )
    .map_err(spi)?
    .ok_or_else(|| Error::new(ErrorKind::Internal, "format() returned NULL"))?;
    Spi::run(&stmt).map_err(spi)
}

/// The number of events `azure_cdc.events` keeps.
pub const EVENTS_KEPT: i64 = 10_000;

/// Records an event of mirror `mirror_id` (and of one of its tables), and trims the oldest events
/// beyond [`EVENTS_KEPT`]. In the caller's transaction.
pub fn record_event(mirror_id: i64, table: Option<(&str, &str)>, event: &str, detail: Option<&str>) -> Result<()> {
    let (schema, name) = match table {
        Some((s, t)) => (Some(s), Some(t)),
        None => (None, None),
    };
    run(
        "WITH e AS (INSERT INTO azure_cdc.events (mirror_name, schema_name, table_name, event, detail) \
                    SELECT mirror_name, $2::name, $3::name, $4, $5 FROM azure_cdc.mirrors WHERE mirror_id = $1 \
                    RETURNING event_id) \
         DELETE FROM azure_cdc.events WHERE event_id <= (SELECT max(event_id) FROM e) - $6",
        &[mirror_id.into(), schema.into(), name.into(), event.into(), detail.into(), EVENTS_KEPT.into()],
    )
}
