//! Copying tables again while the mirror runs: the copy step of a reseed, run by the mirror's copier
//! (a background worker the decoder starts, while it goes on decoding the other tables), or by the
//! decoder itself between two passes when no copier can run. On the main thread (it calls
//! PostgreSQL); the files are written by the process's encoder thread ([`crate::copy`]). Why the
//! hand-off to the change stream is exact is explained in [`azure_cdc_core::reseed`]; the decoder
//! ([`crate::decoder`]) holds, waits and rewinds.
//!
//! Before the copy the decoder has deleted each table's folder ([`delete_folders`]) and, on OneLake,
//! waited until Fabric dropped the table ([`azure_cdc_core::reseed::ResetWait`]), so the copy lands
//! in a new folder that the landing zone's reader takes as a new table.
//!
//! One copy: in one repeatable-read transaction (one snapshot `S` for every table copied together),
//! for each table: create its folder, write `_metadata.json` with its key columns as they are now,
//! scan it into numbered snapshot files from 1, then record it Replicating with `S` (the decoder drops
//! its changes of transactions `S` sees), its counters and an event. A value the landing zone cannot
//! hold parks the table (Failed, folder deleted); any other error fails the decoder's attempt, and the
//! table stays Reseeding for the next one.

use std::sync::Arc;

use azure_cdc_core::error::Disposition;
use azure_cdc_core::landing_zone;
use azure_cdc_core::lifecycle::{Event, TableEvent, TableState};
use azure_cdc_core::names;
use azure_cdc_core::reseed::{sees_all, snapshot_text};
use azure_cdc_core::target::Target;
use azure_cdc_core::{Error, ErrorKind, Result};
use pgrx::prelude::*;

use crate::catalog;
use crate::copy::encoder::Encoder;
use crate::copy::{Copy, Scope};
use crate::shmem;

/// Resets the folders of `tables` (relid, folder): each folder is deleted with everything in it,
/// the documented reset of one table of a landing zone (fabric-docs
/// `docs/mirroring/open-mirroring-best-practices.md`: delete the table's folder, wait until the table
/// has left the mirrored database, recreate the folder with a full load). Notes in the catalog when
/// the folders that existed were deleted (in a transaction of its own unless one is open).
/// Returns the tables whose folder held something (and was deleted now); the catalog notes when.
pub fn delete_folders(mirror_id: i64, target: &Target, tables: &[(u32, String)]) -> Result<Vec<u32>> {
    let mut deleted = Vec::new();
    for (relid, folder) in tables {
        if target.reset_table_folder(folder)? {
            pgrx::log!("azure_cdc: deleted folder \"{folder}\" to reset its table");
            deleted.push(*relid);
        }
    }
    if deleted.is_empty() {
        return Ok(deleted);
    }
    let oids: Vec<pg_sys::Oid> = deleted.iter().map(|r| pg_sys::Oid::from(*r)).collect();
    // SAFETY: reading whether this process is inside a transaction.
    if unsafe { pg_sys::IsTransactionState() } {
        catalog::folders_deleted(mirror_id, &oids)?;
    } else {
        pgrx::bgworkers::BackgroundWorker::transaction(|| catalog::folders_deleted(mirror_id, &oids))?;
    }
    Ok(deleted)
}

/// The settle time of a reset ([`azure_cdc_core::reseed::RESET_SETTLE`], at most the timeout).
pub fn reset_settle() -> std::time::Duration {
    azure_cdc_core::reseed::RESET_SETTLE.min(crate::gucs::table_reset_timeout())
}

/// The error of a table the landing zone's reader has not dropped in time.
pub fn not_dropped_error(folder: &str, waited: std::time::Duration) -> Error {
    Error::new(
        ErrorKind::ObjectInUse,
        format!("the mirrored database still holds the table of folder \"{folder}\" {} s after the folder was deleted to reset it", waited.as_secs()),
    )
    .with_detail("A table is published again only once the landing zone's reader has dropped it; otherwise the reader could keep rows the source no longer has.")
    .with_hint("Check the mirrored database's replication status in Fabric. azure_cdc.table_reset_timeout sets how long to wait; resync_table tries again.")
}

/// A table to copy again.
pub struct ToCopy {
    pub relid: u32,
    pub schema: String,
    pub table: String,
    /// Key columns recorded for it so far.
    pub keys: Vec<String>,
}

/// Copies `tables` in one snapshot and records the outcome of each. `index` is the mirror's registry
/// entry (for live progress). Returns false, having copied nothing, if the snapshot does not see every
/// transaction of `must_see` (one that had committed but not yet left the process array).
pub fn copy_tables(
    mirror_id: i64,
    owner: pg_sys::Oid,
    (index, slot): (usize, usize),
    target: &Arc<Target>,
    tables: &[ToCopy],
    must_see: &[u64],
) -> Result<bool> {
    // SAFETY: the copier's (or the decoder's, between passes) main thread, outside any transaction. The isolation
    // level is set before the transaction's first snapshot (what SET TRANSACTION does), so that every
    // query of the transaction (and every scan, through the registered copy) uses snapshot S. Catalog
    // entries built under decoding's historic snapshots are dropped first, and the ones built here
    // after, so that each side reads its own catalog.
    let snap = unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::XactIsoLevel = pg_sys::XACT_REPEATABLE_READ as i32;
        pg_sys::InvalidateSystemCaches();
        // Every table is locked before the snapshot is taken: a rewrite committed after the snapshot
        // but before the scan (ALTER TABLE … SET ACCESS METHOD, say) would otherwise show the scan an
        // empty table. A table dropped meanwhile is found missing when it is opened.
        for t in tables {
            pg_sys::LockRelationOid(pg_sys::Oid::from(t.relid), pg_sys::AccessShareLock as i32);
        }
        let snap = pg_sys::RegisterSnapshot(pg_sys::GetTransactionSnapshot());
        pg_sys::PushActiveSnapshot(snap);
        snap
    };
    let r = (|| -> Result<bool> {
        crate::tuples::freeze_casts();
        // SAFETY: snap is the registered snapshot taken above.
        let visibility = unsafe { crate::verify::visibility_of(snap) };
        if !sees_all(&visibility, must_see) {
            pgrx::log!("azure_cdc: reseed snapshot does not see every transaction of its hold yet; retrying");
            return Ok(false);
        }
        let seed = snapshot_text(&visibility);
        pgrx::log!("azure_cdc: reseed copy in snapshot {seed}");
        let encoder = Encoder::start(target.clone())?;
        let copy = Copy { index, progress_slot: slot, encoder: &encoder };
        catalog::untrimmed(|| {
            tables.iter().try_for_each(|t| copy_one(mirror_id, owner, &copy, target, t, snap, &seed))
        })?;
        Ok(true)
    })();
    shmem::set_progress(index, slot, 0, 0);
    // SAFETY: ends the transaction begun above: commits what it recorded if the copy is complete,
    // else rolls it back (a PostgreSQL error does not come back here: it ends the worker).
    unsafe {
        pg_sys::PopActiveSnapshot();
        pg_sys::UnregisterSnapshot(snap);
        if matches!(r, Ok(true)) {
            pg_sys::CommitTransactionCommand();
        } else {
            pg_sys::AbortCurrentTransaction();
        }
        pg_sys::InvalidateSystemCaches();
    }
    r
}

/// Entry point of a mirror's copier. `arg` is the mirror's registry index. The decoder starts it
/// with a job in the registry ([`shmem::set_copy_job`]): the tables to copy (their folders reset)
/// and the transactions the copy's snapshot must see. It copies them as [`copy_tables`] does, while
/// the decoder goes on publishing the other tables' changes, records the outcome in the registry and
/// exits; the decoder then decodes again from its hold.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn azure_cdc_copier_main(arg: pg_sys::Datum) {
    crate::worker::install_signal_handlers();
    let index = arg.value() & 0xff;
    let token = (arg.value() >> 8) as u64;
    if index >= crate::gucs::MAX_FABRIC_MIRRORS_LIMIT as usize {
        return;
    }
    let entry = shmem::entry(index);
    if !entry.in_use || entry.copy.state != shmem::CopyState::Running || entry.copy.token != token {
        return;
    }
    pgrx::bgworkers::BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(entry.database)), None);
    // SAFETY: MyProcPid is set at process start.
    let Some((relids, must_see)) = shmem::claim_copy_job(index, token, unsafe { pg_sys::MyProcPid }) else {
        pgrx::log!("azure_cdc: a copier found its job gone (ended by a newer decoder); it exits");
        return;
    };
    crate::worker::forget_helper_pid_at_exit(index, shmem::COPIER_SLOT);
    let mirror_id = entry.mirror_id;
    let result = crate::worker::catching(|| {
        crate::worker::pin_settings()?;
        copier_run(index, mirror_id, &relids, &must_see)
    });
    shmem::set_progress(index, shmem::COPIER_SLOT, 0, 0);
    // The process ends: the target's threads are not waited for.
    azure_cdc_core::cloud::mark_process_exiting();
    shmem::finish_copy_job(index, token, &result);
    if let Err(e) = result {
        // SAFETY: abort what is left of the transaction after a failure.
        unsafe { pg_sys::AbortCurrentTransaction() };
        pgrx::log!("azure_cdc: the copier of mirror {mirror_id} failed: {}", e.full_text());
        crate::versions::exit_process(1);
    }
}

/// The copier's work: the job's tables, as the catalog has them, copied in one snapshot.
fn copier_run(index: usize, mirror_id: i64, relids: &[u32], must_see: &[u64]) -> Result<()> {
    let loaded = pgrx::bgworkers::BackgroundWorker::transaction(|| -> Result<_> {
        let m = catalog::mirror_by_id(mirror_id)?
            .ok_or_else(|| Error::new(ErrorKind::Internal, format!("mirror {mirror_id} is gone")))?;
        let tables: Vec<ToCopy> = catalog::tables(mirror_id)?
            .into_iter()
            .filter(|t| relids.contains(&t.relid.to_u32()) && t.state == TableState::Reseeding.as_str())
            .map(|t| ToCopy { relid: t.relid.to_u32(), schema: t.schema, table: t.table, keys: t.key_columns })
            .collect();
        let url = azure_cdc_core::target::TargetUrl::parse(&m.target)?;
        crate::privileges::check_local_target(&url, m.owner, crate::privileges::Who::Owner)?;
        let target =
            crate::credentials::open_target(&url, m.credential.as_deref(), crate::credentials::worker_settings())?;
        Ok((m.owner, tables, Arc::new(target)))
    })?;
    let (owner, tables, target) = loaded;
    pgrx::log!("azure_cdc: mirror {mirror_id}: the copier copies {} table(s)", tables.len());
    // A snapshot that does not see every transaction of the hold yet (one that has committed but not
    // left the process array) is taken again.
    while !copy_tables(mirror_id, owner, (index, shmem::COPIER_SLOT), &target, &tables, must_see)? {
        if !crate::worker::wait(std::time::Duration::from_millis(100)) {
            return Err(Error::new(ErrorKind::Internal, "the copier was asked to stop"));
        }
    }
    Ok(())
}

/// The key columns a reseeded table gets: its primary key (or replica identity index) as it is now;
/// else the recorded ones if they all still exist (REPLICA IDENTITY FULL, set for TOASTed columns,
/// hides an identity index from the look-up); else none.
fn keys_now(relid: pg_sys::Oid, recorded: &[String], columns: &[String]) -> Result<Vec<String>> {
    let now = catalog::key_columns(relid)?;
    if !now.is_empty() {
        return Ok(now);
    }
    if !recorded.is_empty() && recorded.iter().all(|k| columns.contains(k)) {
        return Ok(recorded.to_vec());
    }
    Ok(Vec::new())
}

fn copy_one(
    mirror_id: i64,
    owner: pg_sys::Oid,
    copy: &Copy,
    target: &Arc<Target>,
    t: &ToCopy,
    snap: pg_sys::Snapshot,
    seed: &str,
) -> Result<()> {
    let relid = pg_sys::Oid::from(t.relid);
    let folder = names::table_folder(&t.schema, &t.table);
    let name = (t.schema.as_str(), t.table.as_str());
    // SAFETY: try_relation_open returns NULL instead of raising when the table is gone.
    let rel = unsafe { pg_sys::try_relation_open(relid, pg_sys::AccessShareLock as i32) };
    if rel.is_null() {
        let e = Error::new(ErrorKind::UndefinedTable, format!("table \"{}.{}\" no longer exists", t.schema, t.table));
        return record_failed(mirror_id, relid, name, &e);
    }
    // The mirror's owner must (still) own the table: one it may not mirror is parked, uncopied.
    let refused =
        crate::privileges::table_refusal_error(owner, relid, &t.schema, &t.table, crate::privileges::Who::Owner);
    if !matches!(refused, Ok(None)) {
        // SAFETY: closing the relation opened above, keeping its lock to the end of the transaction.
        unsafe { pg_sys::relation_close(rel, pg_sys::NoLock as i32) };
        let e = refused?.unwrap_or_else(|| Error::new(ErrorKind::Internal, "no refusal"));
        return record_failed(mirror_id, relid, name, &e);
    }
    // In a subtransaction: a PostgreSQL error while converting a value parks this table only.
    let mut keys = Vec::new();
    let copied = crate::worker::in_subtransaction(|| {
        // SAFETY: rel is open (checked above); snap is the registered snapshot S.
        unsafe {
            copy.rows(rel, relid, &folder, snap, Scope::Whole, &mut |specs| {
                let columns: Vec<String> = specs.iter().map(|c| c.name.clone()).collect();
                keys = keys_now(relid, &t.keys, &columns)?;
                // The decoder deleted the folder just before the copy and waited for the reader to
                // drop the table. Something written there since would make this a second reset
                // without that wait.
                if target.reset_table_folder(&folder)? {
                    return Err(Error::new(
                        ErrorKind::TargetIo,
                        format!(
                            "the folder of table \"{}.{}\" was written after it was reset; it is reset again",
                            t.schema, t.table
                        ),
                    ));
                }
                target.put_document(
                    &folder,
                    landing_zone::METADATA_FILE,
                    landing_zone::table_metadata(&keys).as_bytes(),
                )
            })
        }
    });
    if copied.is_err() {
        copy.abandon();
    }
    // SAFETY: closing the relation opened above, keeping its lock to the end of the transaction.
    unsafe { pg_sys::relation_close(rel, pg_sys::NoLock as i32) };
    let copied = match copied {
        Ok(c) => c,
        Err(e) if e.kind.disposition() == Disposition::ParkTable => {
            target.reset_table_folder(&folder)?;
            return record_failed(mirror_id, relid, name, &e);
        }
        Err(e) => return Err(e),
    };
    TableState::Reseeding.on(TableEvent::SnapshotPublished)?;
    let recorded = catalog::table_copied(
        mirror_id,
        relid,
        TableState::Reseeding,
        &catalog::CopiedTable {
            keys,
            rows: copied.rows,
            files: copied.files,
            bytes: copied.bytes,
            seed_snapshot: Some(seed.to_string()),
            partitions: copied.partitions,
            columns: Some(copied.columns),
        },
    )?;
    if !recorded {
        // Removed from the mirror (remove_tables) after the job was handed over: it stays removed.
        pgrx::log!(
            "azure_cdc: table \"{}.{}\" left the mirror during its copy; its copy is not recorded",
            t.schema,
            t.table
        );
        return Ok(());
    }
    catalog::record_event(
        mirror_id,
        Some(name),
        Event::Reseeded,
        Some(&format!(
            "{} rows in {} snapshot file(s); changes follow from snapshot {seed}",
            copied.rows, copied.files
        )),
    )
}

fn record_failed(mirror_id: i64, relid: pg_sys::Oid, name: (&str, &str), e: &Error) -> Result<()> {
    TableState::Reseeding.on(TableEvent::Failed)?;
    pgrx::warning!("azure_cdc: reseed of a table parked it: {}", e.full_text());
    catalog::table_failed(mirror_id, relid, name, &e.full_text())
}
