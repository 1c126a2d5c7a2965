//! The catalog of azure_cdc (`azure_cdc.mirrors`, `azure_cdc.mirror_tables`, `azure_cdc.events`,
//! `azure_cdc.credentials`) and the PostgreSQL catalogs it consults, through SPI. Runs on the main
//! thread of a backend or worker, inside a transaction.
//!
//! The catalog belongs to the extension: admins are granted SELECT on three of its tables and nothing
//! else, and this module is the only code that writes it, with typed states and events. Every query
//! here runs with the extension's rights and a pinned search path ([`privileges::as_extension`]), is
//! schema-qualified and takes its values as parameters, so that nothing a caller created (an
//! operator, a function, a table in `pg_temp`) is reached from it. Two things run with the caller's
//! own rights on purpose: resolving a table name as the caller wrote it ([`resolve_relation`]), and
//! altering a table's replica identity (`set_replica_identity_*`, which needs the caller to own it).

use azure_cdc_core::lifecycle::{Event, MirrorState, TableState};
use azure_cdc_core::{Error, ErrorKind, Result};
use pgrx::prelude::*;

use crate::errors::spi;
use crate::privileges::as_extension;

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
    /// The role that started the mirror: its rights bound what the mirror may do.
    pub owner: pg_sys::Oid,
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
    /// Seconds since its folder was deleted to reset it, while its new copy is not published.
    pub folder_deleted_ago: Option<f64>,
    /// The next file number as last recorded (it may lag behind the folder, never run ahead of it).
    pub next_file_number: i64,
}

const MIRROR_COLUMNS: &str = "mirror_id, mirror_name, target, state, slot_name::text, credential, all_tables, owner";

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
        owner: row.get::<pg_sys::Oid>(8).map_err(spi)?.ok_or_else(missing)?,
    })
}

thread_local! {
    /// Set once this process has found the catalog's schema to be the extension's, owned by a
    /// superuser (only a superuser could change that afterwards).
    static CATALOG_TRUSTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Refuses a catalog whose schema is not the extension's own schema owned by a superuser: a schema
/// created by someone else before `CREATE EXTENSION` (which the installation script refuses) would
/// let its owner replace the catalog tables that the extension reads and writes with raised rights.
fn catalog_trusted() -> Result<()> {
    if CATALOG_TRUSTED.with(|c| c.get()) {
        return Ok(());
    }
    let ok = as_extension(|| {
        Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension e \
                              JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace \
                              JOIN pg_catalog.pg_roles r ON r.oid = n.nspowner \
                             WHERE e.extname = 'azure_cdc' AND n.nspname = 'azure_cdc' AND r.rolsuper)",
        )
        .map_err(spi)
    })?
    .unwrap_or(false);
    if !ok {
        return Err(Error::new(
            ErrorKind::InsufficientPrivilege,
            "the catalog of azure_cdc is not in the extension's own schema owned by a superuser",
        )
        .with_hint(
            "A superuser must drop the extension, drop or rename schema azure_cdc, and create the extension again.",
        ));
    }
    CATALOG_TRUSTED.with(|c| c.set(true));
    Ok(())
}

/// Runs a query of the catalog with the extension's rights (see the module header).
pub fn read<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    catalog_trusted()?;
    as_extension(f)
}

pub fn mirror_by_name(name: &str) -> Result<Option<MirrorRow>> {
    read(|| {
        Spi::connect(|c| {
            let q = format!("SELECT {MIRROR_COLUMNS} FROM azure_cdc.mirrors WHERE mirror_name = $1");
            let t = c.select(&q, None, &[name.into()]).map_err(spi)?;
            match t.into_iter().next() {
                Some(row) => Ok(Some(mirror_from(&row)?)),
                None => Ok(None),
            }
        })
    })
}

pub fn mirror_by_id(id: i64) -> Result<Option<MirrorRow>> {
    read(|| {
        Spi::connect(|c| {
            let q = format!("SELECT {MIRROR_COLUMNS} FROM azure_cdc.mirrors WHERE mirror_id = $1");
            let t = c.select(&q, None, &[id.into()]).map_err(spi)?;
            match t.into_iter().next() {
                Some(row) => Ok(Some(mirror_from(&row)?)),
                None => Ok(None),
            }
        })
    })
}

/// Mirrors of this database that need workers (not Stopped), for the scout.
pub fn active_mirrors() -> Result<Vec<MirrorRow>> {
    read(|| {
        Spi::connect(|c| {
            let q =
                format!("SELECT {MIRROR_COLUMNS} FROM azure_cdc.mirrors WHERE state <> 'Stopped' ORDER BY mirror_id");
            let t = c.select(&q, None, &[]).map_err(spi)?;
            t.into_iter().map(|r| mirror_from(&r)).collect()
        })
    })
}

/// Targets of the mirrors of this database that are not Stopped.
pub fn active_targets() -> Result<Vec<(String, String)>> {
    read(|| {
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
    })
}

pub fn tables(mirror_id: i64) -> Result<Vec<TableRow>> {
    read(|| {
        Spi::connect(|c| {
            let t = c
            .select(
                "SELECT relid, schema_name::text, table_name::text, state, key_columns::text[], seed_snapshot, partitions, columns, \
                        pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() - folder_deleted_at), next_file_number \
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
                        folder_deleted_ago: r.get::<f64>(9).map_err(spi)?,
                        next_file_number: r.get::<i64>(10).map_err(spi)?.ok_or_else(missing)?,
                    })
                })
                .collect()
        })
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
    read(|| {
        Spi::connect(|c| {
            let t = c
                .select(
                    "SELECT (SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.ord) \
                           FROM pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                           JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum), \
                        i.indisprimary OR i.indisreplident, \
                        (SELECT ic.relname::text FROM pg_catalog.pg_class ic WHERE ic.oid = i.indexrelid) \
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
    })
}

/// Key columns of a table (see [`key_columns_with_source`]).
pub fn key_columns(relid: pg_sys::Oid) -> Result<Vec<String>> {
    Ok(key_columns_with_source(relid)?.0)
}

/// Runs `ALTER TABLE` text built by the server's `format()` (identifiers quoted there) with the
/// caller's own rights: altering a table needs its owner.
fn alter_table_as_caller(format: &str, args: &[&str]) -> Result<()> {
    let args: Vec<pgrx::datum::DatumWithOid> = args.iter().map(|a| (*a).into()).collect();
    let stmt = read(|| Spi::get_one_with_args::<String>(format, &args).map_err(spi))?
        .ok_or_else(|| Error::new(ErrorKind::Internal, "format() returned NULL"))?;
    Spi::run(&stmt).map_err(spi)
}

/// `ALTER TABLE schema.table REPLICA IDENTITY USING INDEX index` (the index is in the table's schema).
pub fn set_replica_identity_index(schema: &str, table: &str, index: &str) -> Result<()> {
    alter_table_as_caller(
        "SELECT pg_catalog.format('ALTER TABLE %I.%I REPLICA IDENTITY USING INDEX %I', $1::text, $2::text, $3::text)",
        &[schema, table, index],
    )
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
    read(|| {
        Spi::connect(|c| {
            let q = format!("{RELATION_INFO} WHERE c.oid = $1");
            let t = c.select(&q, None, &[relid.into()]).map_err(spi)?;
            match t.into_iter().next() {
                Some(r) => Ok(Some(relation_from(&r)?)),
                None => Ok(None),
            }
        })
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
/// How many of `relids` have a main fork of at least `bytes` (a table's heap; 0 for a partitioned table).
pub fn tables_of_at_least(relids: &[pg_sys::Oid], bytes: i64) -> Result<i64> {
    read(|| {
        Spi::get_one_with_args::<i64>(
            "SELECT pg_catalog.count(*) FROM pg_catalog.unnest($1::pg_catalog.oid[]) AS r(oid) \
             WHERE pg_catalog.pg_relation_size(r.oid) >= $2",
            &[relids.to_vec().into(), bytes.into()],
        )
        .map_err(spi)
        .map(|n| n.unwrap_or(0))
    })
}

pub fn partition_tree(relid: pg_sys::Oid) -> Result<PartitionTree> {
    read(|| {
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
    })
}

/// Resolves a table name as the user wrote it (optionally schema-qualified, quoted as in SQL). The
/// name is looked up with the caller's rights and search path, as in their own SQL (nothing but the
/// schema-qualified `to_regclass` runs with them); what it names is then read with the extension's.
pub fn resolve_relation(name: &str) -> Result<Option<RelationInfo>> {
    let oid = match Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT pg_catalog.to_regclass($1)::pg_catalog.oid",
        &[name.into()],
    ) {
        Ok(Some(oid)) => oid,
        Ok(None) | Err(pgrx::spi::SpiError::InvalidPosition) => return Ok(None),
        Err(e) => return Err(spi(e)),
    };
    relation_by_oid(oid)
}

/// Schemas never mirrored.
pub const SYSTEM_SCHEMAS: &str = "('pg_catalog', 'information_schema', 'azure_cdc', 'pg_toast')";

/// Every table-like relation of the database outside the system schemas (tables, partitioned
/// tables, views, materialized views, foreign tables), by name: what "mirror all data" considers.
pub fn user_relations() -> Result<Vec<RelationInfo>> {
    read(|| {
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
    })
}

/// Records a new mirror owned by `owner` and its tables; returns the mirror id.
#[allow(clippy::too_many_arguments)]
pub fn insert_mirror(
    name: &str,
    target: &str,
    all_tables: bool,
    options: pgrx::JsonB,
    credential: Option<&str>,
    slot_name: &str,
    owner: pg_sys::Oid,
    tables: &[(RelationInfo, Vec<String>)],
) -> Result<i64> {
    let id = read(|| {
        Spi::connect_mut(|c| {
            c.update(
                "INSERT INTO azure_cdc.mirrors (mirror_name, target, all_tables, options, slot_name, credential, owner) \
                 VALUES ($1, $2, $3, $4, $5::name, $6, $7) RETURNING mirror_id",
                None,
                &[
                    name.into(),
                    target.into(),
                    all_tables.into(),
                    options.into(),
                    slot_name.into(),
                    credential.into(),
                    owner.into(),
                ],
            )
            .map_err(spi)?
            .first()
            .get_one::<i64>()
            .map_err(spi)?
            .ok_or_else(|| Error::new(ErrorKind::Internal, "INSERT returned no mirror_id"))
        })
    })?;
    insert_tables(id, tables, TableState::Snapshotting)?;
    Ok(id)
}

/// Records tables of a mirror in `state` (a table removed before is taken back in that state).
pub fn insert_tables(mirror_id: i64, tables: &[(RelationInfo, Vec<String>)], state: TableState) -> Result<()> {
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
                state.as_str().into(),
            ],
        )?;
    }
    Ok(())
}

/// Runs one catalog-writing statement with the extension's rights.
fn run(query: &str, args: &[pgrx::datum::DatumWithOid]) -> Result<()> {
    read(|| Spi::connect_mut(|c| c.update(query, None, args).map(|_| ()).map_err(spi)))
}

/// Runs an UPDATE of `mirror_tables` that returns (schema, table) of the rows it changed.
fn updated_tables(query: &str, args: &[pgrx::datum::DatumWithOid]) -> Result<Vec<(String, String)>> {
    read(|| {
        Spi::connect_mut(|c| {
            let t = c.update(query, None, args).map_err(spi)?;
            let mut out = Vec::new();
            for r in t {
                out.push((
                    r.get::<String>(1).map_err(spi)?.unwrap_or_default(),
                    r.get::<String>(2).map_err(spi)?.unwrap_or_default(),
                ));
            }
            Ok(out)
        })
    })
}

/// Runs one catalog-writing statement that returns one count.
fn run_counting(query: &str, args: &[pgrx::datum::DatumWithOid]) -> Result<i64> {
    read(|| Spi::get_one_with_args::<i64>(query, args).map(|n| n.unwrap_or(0)).map_err(spi))
}

/// Mirrored tables (for a partitioned table: its partitions) that can store values out of line (they
/// have a TOAST table) and whose REPLICA IDENTITY is not FULL: an UPDATE that leaves such a value
/// unchanged would not carry it in the change stream. Returns (schema, table).
pub fn tables_needing_full_identity(relids: &[pg_sys::Oid]) -> Result<Vec<(String, String)>> {
    let ids: Vec<pg_sys::Oid> = relids.to_vec();
    read(|| {
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
    })
}

/// `ALTER TABLE schema.table REPLICA IDENTITY FULL`.
pub fn set_replica_identity_full(schema: &str, table: &str) -> Result<()> {
    alter_table_as_caller(
        "SELECT pg_catalog.format('ALTER TABLE %I.%I REPLICA IDENTITY FULL', $1::text, $2::text)",
        &[schema, table],
    )
}

/// The number of events `azure_cdc.events` keeps per mirror.
pub const EVENTS_KEPT: i64 = 10_000;

thread_local! {
    /// Set while [`untrimmed`] runs.
    static UNTRIMMED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, recording every event it records without trimming the oldest ones (the next trimmed
/// write does): for a copy's long repeatable-read transaction, where deleting the oldest events would
/// conflict with other processes' event writes since its snapshot (the decoder's, the SQL
/// functions', other snapshot helpers'): a serialization failure, or them waiting for the whole copy.
pub fn untrimmed<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            UNTRIMMED.with(|u| u.set(self.0));
        }
    }
    let _restore = Restore(UNTRIMMED.with(|u| u.replace(true)));
    f()
}

/// Records an event of mirror `mirror_id` (and of one of its tables), and trims that mirror's
/// oldest events beyond [`EVENTS_KEPT`] (not inside [`untrimmed`]): one mirror's events never push
/// out another's. Every event is written here. In the caller's transaction. (The statement's own
/// insert is not visible to its DELETE: the newest `EVENTS_KEPT - 1` events before it stay, with it.)
pub fn record_event(mirror_id: i64, table: Option<(&str, &str)>, event: Event, detail: Option<&str>) -> Result<()> {
    let (schema, name) = match table {
        Some((s, t)) => (Some(s), Some(t)),
        None => (None, None),
    };
    if UNTRIMMED.with(|u| u.get()) {
        return run(
            "INSERT INTO azure_cdc.events (mirror_id, mirror_name, schema_name, table_name, event, detail) \
             SELECT mirror_id, mirror_name, $2::name, $3::name, $4, $5 FROM azure_cdc.mirrors WHERE mirror_id = $1",
            &[mirror_id.into(), schema.into(), name.into(), event.as_str().into(), detail.into()],
        );
    }
    run(
        "WITH e AS (INSERT INTO azure_cdc.events (mirror_id, mirror_name, schema_name, table_name, event, detail) \
                    SELECT mirror_id, mirror_name, $2::name, $3::name, $4, $5 FROM azure_cdc.mirrors \
                     WHERE mirror_id = $1 RETURNING event_id) \
         DELETE FROM azure_cdc.events WHERE mirror_id = $1 AND event_id < \
                (SELECT o.event_id FROM azure_cdc.events o WHERE o.mirror_id = $1 \
                  ORDER BY o.event_id DESC OFFSET $6 - 2 LIMIT 1)",
        &[mirror_id.into(), schema.into(), name.into(), event.as_str().into(), detail.into(), EVENTS_KEPT.into()],
    )
}

// ---- mirrors ------------------------------------------------------------------------------------

/// Whether the mirror's initial snapshot was ever published.
pub fn snapshot_completed(mirror_id: i64) -> Result<bool> {
    read(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT snapshot_completed_at IS NOT NULL FROM azure_cdc.mirrors WHERE mirror_id = $1",
            &[mirror_id.into()],
        )
        .map(|b| b.unwrap_or(false))
        .map_err(spi)
    })
}

/// The mirror's initial snapshot is published at consistent point `lsn`: it is Running.
pub fn mirror_snapshot_published(mirror_id: i64, lsn: &str) -> Result<()> {
    run(
        "UPDATE azure_cdc.mirrors SET state = $3, consistent_lsn = $2::pg_lsn, \
                snapshot_completed_at = pg_catalog.clock_timestamp(), last_error = NULL, last_error_code = NULL \
          WHERE mirror_id = $1",
        &[mirror_id.into(), lsn.into(), MirrorState::Running.as_str().into()],
    )?;
    record_event(
        mirror_id,
        None,
        Event::SnapshotPublished,
        Some(&format!("consistent point {lsn}; the mirror is Running")),
    )
}

/// The mirror is stopped: it and its tables are Stopped (its slot was dropped by the caller).
pub fn mirror_stopped(mirror_id: i64, detail: &str) -> Result<()> {
    run(
        "UPDATE azure_cdc.mirrors SET state = $2, stopped_at = pg_catalog.now() WHERE mirror_id = $1",
        &[mirror_id.into(), MirrorState::Stopped.as_str().into()],
    )?;
    run(
        "UPDATE azure_cdc.mirror_tables SET state = $2 WHERE mirror_id = $1",
        &[mirror_id.into(), TableState::Stopped.as_str().into()],
    )?;
    record_event(mirror_id, None, Event::Stopped, Some(detail))
}

/// Forgets a stopped mirror: its tables and its events go with it (so that a mirror that later
/// takes its name starts a history of its own).
pub fn delete_mirror(mirror_id: i64) -> Result<()> {
    run("DELETE FROM azure_cdc.events WHERE mirror_id = $1", &[mirror_id.into()])?;
    run("DELETE FROM azure_cdc.mirrors WHERE mirror_id = $1", &[mirror_id.into()])
}

pub fn mirror_paused(mirror_id: i64, was: MirrorState) -> Result<()> {
    run(
        "UPDATE azure_cdc.mirrors SET state = $2 WHERE mirror_id = $1",
        &[mirror_id.into(), MirrorState::Paused.as_str().into()],
    )?;
    record_event(mirror_id, None, Event::Paused, Some(&format!("was {}", was.as_str())))
}

/// A Paused or Failed mirror goes back to `state`, its error cleared.
pub fn mirror_resumed(mirror_id: i64, before: MirrorState, state: MirrorState) -> Result<()> {
    run(
        "UPDATE azure_cdc.mirrors SET state = $2, last_error = NULL, last_error_code = NULL WHERE mirror_id = $1",
        &[mirror_id.into(), state.as_str().into()],
    )?;
    record_event(mirror_id, None, Event::Resumed, Some(&format!("from {}, as {}", before.as_str(), state.as_str())))
}

/// A worker's attempt failed with `text` (code `code`, see azure_cdc_core::health). A permanent
/// error makes a Starting or Running mirror Failed. The tables still being copied show the error.
pub fn mirror_attempt_failed(mirror_id: i64, what: &str, text: &str, code: &str, permanent: bool) -> Result<()> {
    run(
        "UPDATE azure_cdc.mirrors SET last_error = $2, last_error_code = $4, \
                state = CASE WHEN $3 AND state IN ($5, $6) THEN $7 ELSE state END \
          WHERE mirror_id = $1",
        &[
            mirror_id.into(),
            text.into(),
            permanent.into(),
            code.into(),
            MirrorState::Starting.as_str().into(),
            MirrorState::Running.as_str().into(),
            MirrorState::Failed.as_str().into(),
        ],
    )?;
    record_event(
        mirror_id,
        None,
        if permanent { Event::Failed } else { Event::Error },
        Some(&format!("{what}: {text}")),
    )?;
    run(
        "UPDATE azure_cdc.mirror_tables SET last_error = $2 WHERE mirror_id = $1 AND state = $3",
        &[mirror_id.into(), text.into(), TableState::Snapshotting.as_str().into()],
    )
}

/// Publishing works again: an error an earlier attempt recorded is over.
pub fn mirror_recovered(mirror_id: i64) -> Result<()> {
    let cleared = run_counting(
        "WITH c AS (UPDATE azure_cdc.mirrors SET last_error = NULL, last_error_code = NULL \
                     WHERE mirror_id = $1 AND last_error IS NOT NULL RETURNING 1) \
         SELECT pg_catalog.count(*) FROM c",
        &[mirror_id.into()],
    )?;
    if cleared > 0 {
        record_event(mirror_id, None, Event::Recovered, Some("changes are published again"))?;
    }
    Ok(())
}

/// The mirror's slot was created again at `lsn` after it was lost (`why`): every table that was
/// replicating is reseeded. Returns how many.
pub fn slot_recreated(mirror_id: i64, slot: &str, why: &str, lsn: &str, reason: &str) -> Result<i64> {
    let reseeded = updated_tables(
        "UPDATE azure_cdc.mirror_tables SET state = $2, last_error = NULL \
          WHERE mirror_id = $1 AND state IN ($3, $2) RETURNING schema_name::text, table_name::text",
        &[mirror_id.into(), TableState::Reseeding.as_str().into(), TableState::Replicating.as_str().into()],
    )?;
    for (schema, table) in &reseeded {
        record_event(mirror_id, Some((schema, table)), Event::ReseedRequested, Some(reason))?;
    }
    let n = reseeded.len() as i64;
    run(
        "UPDATE azure_cdc.mirrors SET consistent_lsn = $2::pg_lsn WHERE mirror_id = $1",
        &[mirror_id.into(), lsn.into()],
    )?;
    record_event(
        mirror_id,
        None,
        Event::SlotLost,
        Some(&format!("replication slot \"{slot}\" {why}; created again at {lsn}; {n} table(s) reseeded")),
    )?;
    Ok(n)
}

// ---- tables -------------------------------------------------------------------------------------

/// The state of one table of a mirror, if the mirror has it.
pub fn table_state(mirror_id: i64, relid: pg_sys::Oid) -> Result<Option<TableState>> {
    let state = read(|| {
        Spi::get_one_with_args::<String>(
            "SELECT (SELECT state FROM azure_cdc.mirror_tables WHERE mirror_id = $1 AND relid = $2)",
            &[mirror_id.into(), relid.into()],
        )
        .map_err(spi)
    })?;
    state.map(|s| TableState::parse(&s)).transpose()
}

/// Sets a table's state (and clears its error).
pub fn set_table_state(mirror_id: i64, relid: pg_sys::Oid, state: TableState) -> Result<()> {
    run(
        "UPDATE azure_cdc.mirror_tables SET state = $3, last_error = NULL WHERE mirror_id = $1 AND relid = $2",
        &[mirror_id.into(), relid.into(), state.as_str().into()],
    )
}

/// The tables of a mirror start over for a new attempt of its initial snapshot.
pub fn snapshot_restarted(mirror_id: i64) -> Result<()> {
    run(
        "UPDATE azure_cdc.mirror_tables SET state = $2, rows_replicated = 0, files_published = 0, \
                bytes_published = 0, next_file_number = 1, last_completed_at = NULL WHERE mirror_id = $1",
        &[mirror_id.into(), TableState::Snapshotting.as_str().into()],
    )
}

/// The folders of these tables were deleted to reset them (they held something): noted until their
/// new copies are published.
pub fn folders_deleted(mirror_id: i64, relids: &[pg_sys::Oid]) -> Result<()> {
    run(
        "UPDATE azure_cdc.mirror_tables SET folder_deleted_at = pg_catalog.clock_timestamp() \
          WHERE mirror_id = $1 AND relid = ANY($2)",
        &[mirror_id.into(), relids.to_vec().into()],
    )
}

/// Tables added to a running mirror (`add_tables`): recorded Reseeding, each with its event.
pub fn tables_added(mirror_id: i64, tables: &[(RelationInfo, Vec<String>)], reason: &str) -> Result<()> {
    insert_tables(mirror_id, tables, TableState::Reseeding)?;
    for (rel, _) in tables {
        record_event(mirror_id, Some((&rel.schema, &rel.table)), Event::ReseedRequested, Some(reason))?;
    }
    Ok(())
}

/// A table left the mirror (`remove_tables`): state `state` (Stopped), its files kept.
pub fn table_removed(mirror_id: i64, rel: &RelationInfo, state: TableState) -> Result<()> {
    set_table_state(mirror_id, rel.relid, state)?;
    record_event(
        mirror_id,
        Some((&rel.schema, &rel.table)),
        Event::TableRemoved,
        Some("by remove_tables; its files are kept"),
    )
}

/// Asks for a table to be copied again (`reason`), if its state is one of `from`. Returns whether
/// it was.
pub fn reseed_requested(mirror_id: i64, relid: pg_sys::Oid, reason: &str, from: &[TableState]) -> Result<bool> {
    let from: Vec<String> = from.iter().map(|s| s.as_str().to_string()).collect();
    let updated = updated_tables(
        "UPDATE azure_cdc.mirror_tables SET state = $3, last_error = NULL \
          WHERE mirror_id = $1 AND relid = $2 AND state = ANY ($4) RETURNING schema_name::text, table_name::text",
        &[mirror_id.into(), relid.into(), TableState::Reseeding.as_str().into(), from.into()],
    )?;
    for (schema, table) in &updated {
        record_event(mirror_id, Some((schema, table)), Event::ReseedRequested, Some(reason))?;
    }
    Ok(!updated.is_empty())
}

/// A table was parked (Failed) with `error` (a text without table values).
pub fn table_failed(mirror_id: i64, relid: pg_sys::Oid, table: (&str, &str), error: &str) -> Result<()> {
    run(
        "UPDATE azure_cdc.mirror_tables SET state = $3, last_error = $4, folder_deleted_at = NULL \
          WHERE mirror_id = $1 AND relid = $2",
        &[mirror_id.into(), relid.into(), TableState::Failed.as_str().into(), error.into()],
    )?;
    record_event(mirror_id, Some(table), Event::TableFailed, Some(error))
}

/// The source table was dropped: state Dropped, its files kept.
pub fn table_dropped(mirror_id: i64, relid: pg_sys::Oid, table: (&str, &str)) -> Result<()> {
    run(
        "UPDATE azure_cdc.mirror_tables SET state = $3 WHERE mirror_id = $1 AND relid = $2",
        &[mirror_id.into(), relid.into(), TableState::Dropped.as_str().into()],
    )?;
    record_event(mirror_id, Some(table), Event::Dropped, Some("the source table was dropped; its files are kept"))
}

/// A table of a mirror of all tables was left out (`why`).
pub fn table_skipped(mirror_id: i64, table: (&str, &str), why: &str) -> Result<()> {
    record_event(mirror_id, Some(table), Event::TableSkipped, Some(why))
}

/// What a finished copy of a table (initial snapshot or reseed) records.
pub struct CopiedTable {
    pub keys: Vec<String>,
    pub rows: i64,
    pub files: i64,
    pub bytes: i64,
    /// After a reseed: the snapshot its copy was taken in.
    pub seed_snapshot: Option<String>,
    pub partitions: Option<String>,
    pub columns: Option<String>,
}

/// A table's copy is published: it is Replicating, with its counters and what its files hold.
/// Returns whether the table was still in state `from` (else nothing is written: it was removed or
/// stopped meanwhile, and stays so).
pub fn table_copied(mirror_id: i64, relid: pg_sys::Oid, from: TableState, c: &CopiedTable) -> Result<bool> {
    run_counting(
        "WITH u AS (UPDATE azure_cdc.mirror_tables SET state = $3, key_columns = $4, rows_replicated = $5, \
                files_published = $6, bytes_published = $7, next_file_number = $6 + 1, seed_snapshot = $8, \
                partitions = $9, columns = $10, last_completed_at = pg_catalog.clock_timestamp(), last_error = NULL, \
                folder_deleted_at = NULL \
          WHERE mirror_id = $1 AND relid = $2 AND state = $11 RETURNING 1) SELECT pg_catalog.count(*) FROM u",
        &[
            mirror_id.into(),
            relid.into(),
            TableState::Replicating.as_str().into(),
            c.keys.clone().into(),
            c.rows.into(),
            c.files.into(),
            c.bytes.into(),
            c.seed_snapshot.clone().into(),
            c.partitions.clone().into(),
            c.columns.clone().into(),
            from.as_str().into(),
        ],
    )
    .map(|n| n > 0)
}

/// The columns a table's files carry now, after column changes the decoder followed (`what`, one
/// event each).
pub fn table_columns_followed(
    mirror_id: i64,
    relid: pg_sys::Oid,
    table: (&str, &str),
    columns: &str,
    what: &[String],
) -> Result<()> {
    run(
        "UPDATE azure_cdc.mirror_tables SET columns = $3 WHERE mirror_id = $1 AND relid = $2",
        &[mirror_id.into(), relid.into(), columns.into()],
    )?;
    for w in what {
        record_event(mirror_id, Some(table), Event::ColumnsChanged, Some(w))?;
    }
    Ok(())
}

/// Adds what change files published for a table since the last call.
pub fn add_table_counters(
    mirror_id: i64,
    relid: pg_sys::Oid,
    rows: i64,
    files: i64,
    bytes: i64,
    next_number: i64,
) -> Result<()> {
    run(
        "UPDATE azure_cdc.mirror_tables SET rows_replicated = rows_replicated + $3, \
                files_published = files_published + $4, bytes_published = bytes_published + $5, \
                next_file_number = GREATEST(next_file_number, $6), \
                last_completed_at = pg_catalog.clock_timestamp() \
          WHERE mirror_id = $1 AND relid = $2",
        &[mirror_id.into(), relid.into(), rows.into(), files.into(), bytes.into(), next_number.into()],
    )
}

// ---- credentials --------------------------------------------------------------------------------

/// The options of a credential (JSON), if it exists.
pub fn credential_options(name: &str) -> Result<Option<serde_json::Value>> {
    read(|| {
        match Spi::get_one_with_args::<pgrx::JsonB>(
            "SELECT options FROM azure_cdc.credentials WHERE credential_name = $1",
            &[name.into()],
        ) {
            Ok(v) => Ok(v.map(|j| j.0)),
            Err(pgrx::spi::SpiError::InvalidPosition) => Ok(None),
            Err(e) => Err(spi(e)),
        }
    })
}

/// Creates or replaces a credential; returns whether it replaced one. `by` is the superuser doing it.
pub fn upsert_credential(name: &str, options: serde_json::Value, by: pg_sys::Oid) -> Result<bool> {
    read(|| {
        Spi::get_one_with_args::<bool>(
            "INSERT INTO azure_cdc.credentials AS c (credential_name, options, created_by) \
                  VALUES ($1, $2, pg_catalog.pg_get_userbyid($3)) \
             ON CONFLICT (credential_name) DO UPDATE \
                SET options = EXCLUDED.options, created_by = EXCLUDED.created_by, created_at = pg_catalog.now() \
             RETURNING c.xmax <> 0",
            &[name.into(), pgrx::JsonB(options).into(), by.into()],
        )
        .map(|b| b.unwrap_or(false))
        .map_err(spi)
    })
}

/// Drops a credential; returns whether it existed.
pub fn delete_credential(name: &str) -> Result<bool> {
    let n = run_counting(
        "WITH d AS (DELETE FROM azure_cdc.credentials WHERE credential_name = $1 RETURNING 1) SELECT pg_catalog.count(*) FROM d",
        &[name.into()],
    )?;
    Ok(n > 0)
}

/// The mirrors that are not stopped and use credential `name`.
pub fn mirrors_using_credential(name: &str) -> Result<Vec<String>> {
    read(|| {
        Spi::connect(|c| {
            let t = c
                .select(
                    "SELECT mirror_name FROM azure_cdc.mirrors WHERE credential = $1 AND state <> $2 ORDER BY 1",
                    None,
                    &[name.into(), MirrorState::Stopped.as_str().into()],
                )
                .map_err(spi)?;
            let mut v = Vec::new();
            for r in t {
                v.push(r.get::<String>(1).map_err(spi)?.unwrap_or_default());
            }
            Ok(v)
        })
    })
}

/// One credential as `list_credentials` sees it: name, options (to be filtered by the caller),
/// the mirrors naming it, when it was created.
pub type CredentialListing = (String, serde_json::Value, Vec<String>, Option<pgrx::datum::TimestampWithTimeZone>);

pub fn credentials() -> Result<Vec<CredentialListing>> {
    read(|| {
        Spi::connect(|c| {
            let t = c
                .select(
                    "SELECT c.credential_name, c.options, c.created_at, \
                            ARRAY(SELECT m.mirror_name FROM azure_cdc.mirrors m \
                                   WHERE m.credential = c.credential_name ORDER BY 1) \
                       FROM azure_cdc.credentials c ORDER BY 1",
                    None,
                    &[],
                )
                .map_err(spi)?;
            let mut out = Vec::new();
            for r in t {
                let name: String = r.get(1).map_err(spi)?.unwrap_or_default();
                let pgrx::JsonB(options) =
                    r.get::<pgrx::JsonB>(2).map_err(spi)?.unwrap_or(pgrx::JsonB(serde_json::json!({})));
                out.push((
                    name,
                    options,
                    r.get::<Vec<String>>(4).map_err(spi)?.unwrap_or_default(),
                    r.get(3).map_err(spi)?,
                ));
            }
            Ok(out)
        })
    })
}
