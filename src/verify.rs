//! `verify_table()` and `verify_mirror()`: read a table's landing zone back from the target, replay
//! it, and compare it with the source as of one MVCC snapshot, exactly, while the table keeps
//! changing. Runs in the calling backend: the scan and the catalog on its main thread; reading the
//! target on the target's I/O threads. The rules (visibility cut, replay, comparison) are pure, in
//! `azure_cdc_core::verify`.
//!
//! Steps: take a snapshot S of the source and scan the tables in it; read the WAL insert position U
//! right after S was taken (every transaction S sees has its commit record before U); wait until the
//! mirror's slot is confirmed past U (everything S sees is then published); replay each table's
//! files, applying exactly the rows of transactions S sees (change files carry their transaction
//! index); compare key by key.

use azure_cdc_core::batch::BatchBuilder;
use azure_cdc_core::lifecycle::{MirrorState, TableState};
use azure_cdc_core::names;
use azure_cdc_core::target::TargetUrl;
use azure_cdc_core::verify::{self, full_xid, Image, Replayer, RowEncoder, Visibility};
use azure_cdc_core::{Error, ErrorKind, Result};
use pgrx::prelude::*;

use crate::catalog;
use crate::errors::{spi, OrRaise};
use crate::tuples::TupleConverter;

/// One table to verify: its source image, taken in the snapshot.
struct Plan {
    schema: String,
    table: String,
    folder: String,
    enc: RowEncoder,
    image: Image,
    duplicate_keys: Vec<String>,
}

type VerifyRow = (String, String, String, String, i64, i64, i64, i64, i64, i64, Vec<String>, String);

/// The full transaction ids a snapshot sees.
///
/// # Safety
/// `snap` must be a valid MVCC snapshot.
pub(crate) unsafe fn visibility_of(snap: pg_sys::Snapshot) -> Visibility {
    // SAFETY: the caller's guarantee; xip holds xcnt entries. ReadNextFullTransactionId takes a shared
    // lock briefly.
    unsafe {
        let next = pg_sys::ReadNextFullTransactionId().value;
        let s = &*snap;
        let running = (0..s.xcnt as usize).map(|i| full_xid(next, u32::from(*s.xip.add(i)))).collect();
        Visibility { xmin: full_xid(next, u32::from(s.xmin)), xmax: full_xid(next, u32::from(s.xmax)), running }
    }
}

/// Scans one table in `snap` into its source image.
fn plan_table(t: &catalog::TableRow, snap: pg_sys::Snapshot) -> Result<Plan> {
    // SAFETY: try_relation_open returns NULL when the table is gone; the relation stays open (locked)
    // for the scan and is closed right after.
    let rel = unsafe { pg_sys::try_relation_open(t.relid, pg_sys::AccessShareLock as i32) };
    if rel.is_null() {
        return Err(Error::new(
            ErrorKind::UndefinedTable,
            format!("table \"{}.{}\" no longer exists", t.schema, t.table),
        ));
    }
    let result = (|| -> Result<Plan> {
        // SAFETY: rel is open.
        // A type's cast to json runs as the caller, as in the caller's own SELECT to_json(…).
        let mut conv = unsafe { TupleConverter::new(rel)? }.with_cast_role(crate::privileges::current_user());
        let mut builder = BatchBuilder::new(conv.specs())?;
        let enc = RowEncoder::new(builder.schema(), &t.key_columns)?;
        let tree = catalog::partition_tree(t.relid)?;
        let mut image = Image::default();
        let mut duplicate_keys = Vec::new();
        // SAFETY: an open heap relation and a registered snapshot, on the main thread.
        unsafe {
            crate::tuples::scan_table(rel, snap, &tree, &mut conv, &mut builder, &mut |batch, _| {
                duplicate_keys.extend(enc.add_source(&mut image, &batch)?);
                Ok(true)
            })?;
        }
        Ok(Plan {
            schema: t.schema.clone(),
            table: t.table.clone(),
            folder: names::table_folder(&t.schema, &t.table),
            enc,
            image,
            duplicate_keys,
        })
    })();
    // SAFETY: closing the relation opened above; the lock is kept to the end of the transaction.
    unsafe { pg_sys::relation_close(rel, pg_sys::NoLock as i32) };
    result
}

/// Waits until the mirror's slot is confirmed at or past `upto`, or `wait_seconds` pass.
fn wait_until_published(mirror_name: &str, slot: &str, upto: u64, wait_seconds: i32) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait_seconds.max(0) as u64);
    let upto_text = crate::slot::lsn_text(upto);
    loop {
        let (state, done) = crate::catalog::read(|| {
            Spi::get_two_with_args::<String, bool>(
                "SELECT m.state, s.confirmed_flush_lsn >= $2::pg_lsn FROM azure_cdc.mirrors m \
                   LEFT JOIN pg_catalog.pg_replication_slots s ON s.slot_name = m.slot_name WHERE m.mirror_name = $1",
                &[mirror_name.into(), upto_text.as_str().into()],
            )
            .map_err(spi)
        })?;
        if done == Some(true) {
            return Ok(());
        }
        if state.as_deref() != Some(MirrorState::Running.as_str()) {
            return Err(Error::new(
                ErrorKind::PrerequisiteNotMet,
                format!("mirror \"{mirror_name}\" became {} while it was being verified", state.unwrap_or_default()),
            ));
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::new(
                ErrorKind::ObjectInUse,
                format!("mirror \"{mirror_name}\" has not published up to {upto_text} within {wait_seconds} s"),
            )
            .with_detail(format!("Its slot {slot} is confirmed below the WAL position the verification needs."))
            .with_hint("Check list_mirrors() and get_health_status(); retry with a larger wait_seconds."));
        }
        crate::api::nap();
    }
}

fn verify_impl(function: &str, mirror_name: &str, table: Option<&str>, wait_seconds: i32) -> Result<Vec<VerifyRow>> {
    crate::privileges::require_admin(function)?;
    // Values are converted as the mirror's workers convert them (see tuples::OUTPUT_SETTINGS).
    crate::tuples::pin_output_settings(true)?;
    let m = catalog::mirror_by_name(mirror_name)?.ok_or_else(|| crate::api::unknown_mirror(mirror_name))?;
    if MirrorState::parse(&m.state)? != MirrorState::Running {
        return Err(Error::new(
            ErrorKind::PrerequisiteNotMet,
            format!("mirror \"{mirror_name}\" is {}; only a Running mirror can be verified", m.state),
        ));
    }
    let mut tables = Vec::new();
    for t in catalog::tables(m.id)? {
        if TableState::parse(&t.state)? == TableState::Replicating {
            tables.push(t);
        }
    }
    if let Some(name) = table {
        let rel = catalog::resolve_relation(name)?
            .ok_or_else(|| Error::new(ErrorKind::UndefinedTable, format!("table \"{name}\" does not exist")))?;
        tables.retain(|t| t.relid == rel.relid);
        if tables.is_empty() {
            return Err(Error::new(
                ErrorKind::UndefinedObject,
                format!("table \"{name}\" is not replicated by mirror \"{mirror_name}\""),
            )
            .with_hint("get_all_tables_mirror_status() shows the mirror's tables and their states; only Replicating tables are verified."));
        }
        if !crate::privileges::may_read_table(rel.relid) {
            return Err(Error::new(
                ErrorKind::InsufficientPrivilege,
                format!("permission denied for table \"{}.{}\"", rel.schema, rel.table),
            )
            .with_detail("verify_table compares a table only for a caller who may SELECT all of it (every column, no row-level security)."));
        }
    }
    // verify_mirror compares the tables the caller may read; the others get a row that says so and
    // shows nothing of them.
    let (tables, unreadable): (Vec<catalog::TableRow>, Vec<catalog::TableRow>) =
        tables.into_iter().partition(|t| crate::privileges::may_read_table(t.relid));
    // 1. One snapshot for every table, and the WAL position after it.
    // SAFETY: main thread inside a transaction; the snapshot is registered (copied) and unregistered
    // below, also on the error path (the transaction's resource owner releases it on abort).
    let snap = unsafe { pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot()) };
    // SAFETY: snap is a valid MVCC snapshot; GetXLogInsertRecPtr reads shared state.
    let (vis, upto) = unsafe { (visibility_of(snap), pg_sys::GetXLogInsertRecPtr()) };
    let plans: Result<Vec<Plan>> = tables.iter().map(|t| plan_table(t, snap)).collect();
    // SAFETY: registered above.
    unsafe { pg_sys::UnregisterSnapshot(snap) };
    let plans = plans?;
    // 2. Everything the snapshot sees is published.
    wait_until_published(mirror_name, &m.slot_name, upto, wait_seconds)?;
    // 3. Replay and compare.
    let url = TargetUrl::parse(&m.target)?;
    let target = crate::credentials::open_target(&url, m.credential.as_deref(), crate::credentials::worker_settings())?;
    let mut rows = Vec::with_capacity(plans.len() + unreadable.len());
    for t in unreadable {
        rows.push((
            m.name.clone(),
            t.schema,
            t.table,
            "SKIPPED".to_string(),
            0,
            0,
            0,
            0,
            0,
            0,
            Vec::new(),
            "permission denied: the caller may not SELECT all of this table, so it is not compared".to_string(),
        ));
    }
    for p in plans {
        // Files the landing zone's reader moved are read where they are now; files it purged are
        // gone, and without them the table cannot be compared.
        let files = target.data_files(&p.folder)?;
        // Purged files are the oldest (the reader deletes processed files and keeps the newest): a
        // missing first run of numbers. A number missing after one that is there is a gap, which
        // the replay reports as a problem of the files.
        let mut gone = verify::purged_numbers(&files.iter().map(|f| f.number).collect::<Vec<_>>());
        let mut replayer = Replayer::new(&p.enc, &vis);
        if gone.is_empty() {
            for f in &files {
                match target.read_data_file(&p.folder, f)? {
                    Some(bytes) => replayer.apply(&verify::read_file(f.number, bytes)?)?,
                    // Purged between the listing and the read.
                    None => gone.push(f.number),
                }
                pg_sys::check_for_interrupts!();
            }
        }
        if !gone.is_empty() {
            rows.push((
                m.name.clone(),
                p.schema,
                p.table,
                "UNVERIFIABLE".to_string(),
                p.image.rows() as i64,
                0,
                0,
                0,
                0,
                files.len() as i64,
                Vec::new(),
                format!(
                    "data files {} are no longer in the landing zone (Fabric's replicator moves processed files to _ProcessedFiles, then _FilesReadyToDelete, and deletes them after seven days), so the table cannot be compared with its files; resync_table publishes it again in full",
                    verify::number_ranges(&gone)
                ),
            ));
            continue;
        }
        let replay = replayer.finish();
        let cmp = verify::compare(&p.enc, &p.image, &replay.image);
        let ok = cmp.matches() && replay.problem_count == 0;
        let mut detail = format!(
            "{} file{} replayed; {} row{} of transactions the snapshot does not see left out",
            replay.files,
            if replay.files == 1 { "" } else { "s" },
            replay.rows_left_out,
            if replay.rows_left_out == 1 { "" } else { "s" },
        );
        if replay.problem_count > 0 {
            detail.push_str(&format!(
                "; {} problem(s) in the files: {}",
                replay.problem_count,
                replay.problems.join("; ")
            ));
        }
        if !p.duplicate_keys.is_empty() {
            detail.push_str(&format!("; the source has duplicate keys: {}", p.duplicate_keys.join("; ")));
        }
        rows.push((
            m.name.clone(),
            p.schema,
            p.table,
            if ok { "OK" } else { "MISMATCH" }.to_string(),
            cmp.source_rows as i64,
            cmp.mirror_rows as i64,
            cmp.missing as i64,
            cmp.extra as i64,
            cmp.differing as i64,
            replay.files as i64,
            cmp.sample,
            detail,
        ));
    }
    Ok(rows)
}

/// Verifies one table of a running mirror: reads its landing zone back from the target, replays it
/// and compares it, key by key and value by value, with the source as of one snapshot (exact while
/// the table keeps changing). Waits up to `wait_seconds` for the mirror to publish what the snapshot
/// sees. Files the landing zone's reader moved (`_ProcessedFiles`, `_FilesReadyToDelete`) are read
/// there. `verdict` is OK, MISMATCH, or UNVERIFIABLE when files the replay needs were deleted by the
/// reader (the detail names them); `sample` names up to 10 keys that differ (`missing`, `extra`,
/// `differs`); `detail` lists problems found in the files themselves (a gap in the numbers, an
/// insert of an existing key, …).
#[pg_extern]
fn verify_table(
    mirror_name: &str,
    table_name: &str,
    wait_seconds: default!(i32, 300),
) -> TableIterator<
    'static,
    (
        name!(mirror_name, String),
        name!(schema_name, String),
        name!(table_name, String),
        name!(verdict, String),
        name!(source_rows, i64),
        name!(mirror_rows, i64),
        name!(missing, i64),
        name!(extra, i64),
        name!(differing, i64),
        name!(files, i64),
        name!(sample, Vec<String>),
        name!(detail, String),
    ),
> {
    TableIterator::new(verify_impl("verify_table", mirror_name, Some(table_name), wait_seconds).or_raise())
}

/// `verify_table` for every Replicating table of the mirror, all in one snapshot. A table the caller
/// may not SELECT whole is not compared: its row says SKIPPED and shows nothing of it.
#[pg_extern]
fn verify_mirror(
    mirror_name: &str,
    wait_seconds: default!(i32, 300),
) -> TableIterator<
    'static,
    (
        name!(mirror_name, String),
        name!(schema_name, String),
        name!(table_name, String),
        name!(verdict, String),
        name!(source_rows, i64),
        name!(mirror_rows, i64),
        name!(missing, i64),
        name!(extra, i64),
        name!(differing, i64),
        name!(files, i64),
        name!(sample, Vec<String>),
        name!(detail, String),
    ),
> {
    TableIterator::new(verify_impl("verify_mirror", mirror_name, None, wait_seconds).or_raise())
}
