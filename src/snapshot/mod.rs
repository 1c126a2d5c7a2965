//! The snapshot worker: one per mirror whose initial snapshot is not published yet. Runs as a dynamic
//! background worker connected to the mirror's database; its main thread calls PostgreSQL, its encoder
//! thread never does.
//!
//! One attempt:
//! 1. (transaction 1) read the mirror and its tables; drop a slot left by an earlier, failed attempt;
//!    clear the tables' folders of files that attempt published; reset the tables' counters;
//!    write `_partnerEvents.json`.
//! 2. (transaction 2, repeatable read) create the mirror's slot and adopt the snapshot of its
//!    consistent point ([`crate::slot`]); export that snapshot and start up to
//!    `azure_cdc.max_snapshot_workers - 1` **snapshot helpers** ([`helpers`]), which import it. The
//!    worker and its helpers claim tables from a shared list and copy each in the snapshot
//!    ([`table`], [`crate::copy`]): tuples go straight into Arrow batches ([`crate::tuples`]) that each
//!    process's encoder thread writes into numbered Parquet files published atomically. A large table
//!    is split into block ranges that every worker with no whole table left joins in scanning
//!    ([`parts`]). Each helper commits the outcomes it records; once every helper has exited and every
//!    table is accounted for, the worker records its own and the mirror as Running in the same
//!    transaction (still holding the slot), and commits.
//!
//! Hand-off to the change stream: the slot's stream holds exactly the transactions that commit after
//! the snapshot, so a table's snapshot files never miss nor repeat a change. Because the slot and the
//! snapshot belong to one attempt, a failed attempt starts over from step 1 for all tables of the
//! mirror: helpers still running from it are terminated first, then its files are removed.
//!
//! A value that cannot be written (e.g. NaN in a numeric(p,s) column) parks only its table: the table
//! becomes Failed with the error, its folder is emptied, the other tables go on. Any other error fails
//! the attempt, is recorded in the catalog, and the launcher retries with back-off.

mod helpers;
pub mod parts;
mod table;

use std::sync::Arc;

use azure_cdc_core::landing_zone;
use azure_cdc_core::lifecycle::{MirrorState, TableEvent, TableState};
use azure_cdc_core::names;
use azure_cdc_core::reseed::ResetWait;
use azure_cdc_core::target::{Target, TargetUrl};
use azure_cdc_core::{Error, ErrorKind, Result};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;

use crate::catalog::{self, MirrorRow, TableRow};
use crate::privileges::{self, Who};
use crate::shmem::{self, Phase};
use crate::worker;
use helpers::{end_stale_helpers, Helpers};
use table::{copy_claimed_tables, record_outcome};

/// Entry point of the snapshot worker. `arg` is the mirror's index in the shared registry.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn azure_cdc_snapshot_main(arg: pg_sys::Datum) {
    let Some((index, entry)) = worker::start(arg, "will not be snapshotted") else { return };
    let mirror_id = entry.mirror_id;
    parts::fail_all_at_exit(index, None);
    let attempt = worker::catching(|| run(index, mirror_id));
    if attempt.is_ok() {
        parts::finished();
    }
    clear_progress(index);
    shmem::set_worker_pid(index, 0);
    if let Err(e) = attempt {
        parts::fail_all(index);
        worker::exit_after_failure(mirror_id, "snapshot", &e);
    }
}

fn clear_progress(index: usize) {
    for slot in 0..shmem::MAX_PROGRESS {
        shmem::set_progress(index, slot, 0, 0);
    }
}

/// Step 1: read the mirror, clean up after an earlier attempt. Returns None when there is nothing to do.
fn prepare(mirror_id: i64) -> Result<Option<(MirrorRow, Vec<TableRow>, Arc<Target>)>> {
    BackgroundWorker::transaction(|| {
        let Some(m) = catalog::mirror_by_id(mirror_id)? else { return Ok(None) };
        if MirrorState::parse(&m.state)? != MirrorState::Starting {
            return Ok(None);
        }
        // The owner's rights bound the mirror: checked again at every start.
        privileges::owner_standing(m.owner)?;
        // A slot left by an earlier attempt of this mirror (never one that is not the mirror's).
        crate::slot::drop_mirror_slot(&m.name, &m.slot_name)?;
        let url = TargetUrl::parse(&m.target)?;
        privileges::check_local_target(&url, m.owner, Who::Owner)?;
        let target = Arc::new(crate::credentials::open_target(
            &url,
            m.credential.as_deref(),
            crate::credentials::worker_settings(),
        )?);
        let mut tables = catalog::tables(mirror_id)?;
        // Files an earlier attempt published may have been read already: each table is reset (its
        // folder deleted); run() waits until the landing zone's reader has dropped them.
        let folders: Vec<(u32, String)> =
            tables.iter().map(|t| (t.relid.to_u32(), names::table_folder(&t.schema, &t.table))).collect();
        let deleted = crate::reseed::delete_folders(mirror_id, &target, &folders)?;
        for t in tables.iter_mut().filter(|t| deleted.contains(&t.relid.to_u32())) {
            t.folder_deleted_ago = Some(0.0);
        }
        let version = Spi::get_one::<String>("SELECT pg_catalog.current_setting('server_version')")
            .map_err(crate::errors::spi)?
            .unwrap_or_default();
        let database = Spi::get_one::<String>("SELECT pg_catalog.current_database()::text")
            .map_err(crate::errors::spi)?
            .unwrap_or_default();
        target.put_document(
            "",
            landing_zone::PARTNER_EVENTS_FILE,
            landing_zone::partner_events(&version, &database, &m.name).as_bytes(),
        )?;
        for t in &tables {
            let state = TableState::parse(&t.state)?;
            if state != TableState::Snapshotting {
                state.on(TableEvent::SnapshotRestarted)?;
            }
        }
        catalog::snapshot_restarted(mirror_id)?;
        Ok(Some((m, tables, target)))
    })
}

/// Waits until the landing zone's reader has dropped the tables whose folders were deleted to reset
/// them ([`azure_cdc_core::reseed::ResetWait`]), each at most `azure_cdc.table_reset_timeout` since
/// its latest deletion. `tables`: (folder, seconds since its latest deletion if it held something).
fn wait_until_dropped(target: &Target, tables: &[(String, Option<f64>)]) -> Result<()> {
    let now = std::time::Instant::now();
    let mut waits: Vec<(String, std::time::Instant, ResetWait)> = tables
        .iter()
        .map(|(folder, ago)| {
            let since = now.checked_sub(std::time::Duration::from_secs_f64(ago.unwrap_or(0.0).max(0.0))).unwrap_or(now);
            (folder.clone(), since, ResetWait { existed: ago.is_some(), seen_held: false })
        })
        .collect();
    loop {
        let settle = crate::reseed::reset_settle();
        let mut waiting = None;
        for (folder, since, wait) in waits.iter_mut() {
            let held = target.table_downstream(folder)?;
            if !wait.done(held, since.elapsed(), settle) {
                waiting.get_or_insert((folder.clone(), since.elapsed()));
            }
        }
        let Some((first, waited)) = waiting else { return Ok(()) };
        if waited >= crate::gucs::table_reset_timeout() {
            return Err(crate::reseed::not_dropped_error(&first, waited));
        }
        pgrx::log!("azure_cdc: waiting for the landing zone's reader to drop the table of folder \"{first}\", deleted to reset it");
        if !worker::wait(std::time::Duration::from_secs(2)) {
            return Err(Error::new(ErrorKind::Internal, "the server is shutting down"));
        }
    }
}

fn run(index: usize, mirror_id: i64) -> Result<()> {
    end_stale_helpers(index)?;
    let Some((mirror, tables, target)) = prepare(mirror_id)? else {
        mark_snapshotted(index);
        return Ok(());
    };
    let folders: Vec<(String, Option<f64>)> =
        tables.iter().map(|t| (names::table_folder(&t.schema, &t.table), t.folder_deleted_ago)).collect();
    wait_until_dropped(&target, &folders)?;
    // SAFETY: a fresh transaction that has read nothing yet, as create_with_snapshot requires.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
    }
    // SAFETY: as above: first thing in the new transaction, no slot acquired.
    let lsn = unsafe { crate::slot::create_with_snapshot(&mirror.slot_name)? };
    crate::tuples::freeze_casts();
    pgrx::log!(
        "azure_cdc: mirror \"{}\": slot {} created at consistent point {}",
        mirror.name,
        mirror.slot_name,
        crate::slot::lsn_text(lsn)
    );
    // SAFETY: the transaction snapshot was just set by create_with_snapshot; making it the active
    // snapshot lets SPI and the scans below use it, and exporting it lets the helpers share it for as
    // long as this transaction stays open (it does until they have exited).
    let exported = unsafe {
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        std::ffi::CStr::from_ptr(pg_sys::ExportSnapshot(pg_sys::GetActiveSnapshot())).to_bytes().to_vec()
    };
    {
        let mut r = shmem::REGISTRY.exclusive();
        let e = &mut r.entries[index];
        e.snapshot_name = [0; 32];
        if exported.len() > 31 {
            return Err(Error::new(ErrorKind::Internal, "exported snapshot name too long"));
        }
        let n = exported.len();
        e.snapshot_name[..n].copy_from_slice(&exported[..n]);
        e.tables_total = tables.len() as u32;
        e.next_table = 0;
        e.helpers_committed = 0;
        e.helper_failed = false;
    }
    // A helper per table beyond the first, and as many as allowed when a table is large enough to be
    // scanned in parts.
    let most = crate::gucs::MAX_SNAPSHOT_WORKERS.get().max(1) as usize - 1;
    let relids: Vec<pg_sys::Oid> = tables.iter().map(|t| t.relid).collect();
    let large = catalog::tables_of_at_least(
        &relids,
        i64::from(azure_cdc_core::parts::MIN_SPLIT_BLOCKS) * pg_sys::BLCKSZ as i64,
    )?;
    let wanted = if large > 0 { most } else { most.min(tables.len().saturating_sub(1)) };
    parts::reset(index, wanted + 1);
    let mut helpers = Helpers::start(index, wanted);
    parts::set_participants(index, helpers.workers.len() + 1);
    let outcomes = copy_claimed_tables(index, 0, &tables, &target, mirror.owner)?;
    helpers.wait();
    let e = shmem::entry(index);
    if e.helper_failed || outcomes.len() + e.helpers_committed as usize != tables.len() {
        return Err(Error::new(
            ErrorKind::Internal,
            format!(
                "a snapshot helper failed ({} of {} tables done); see the server log",
                outcomes.len() + e.helpers_committed as usize,
                tables.len()
            ),
        ));
    }

    // SAFETY: the scans are done; this transaction may now write its bookkeeping.
    unsafe { pg_sys::XactReadOnly = false };
    // The transaction's snapshot is the attempt's, from before other processes' event writes.
    catalog::untrimmed(|| outcomes.iter().try_for_each(|o| record_outcome(mirror_id, o)))?;
    catalog::mirror_snapshot_published(mirror_id, &crate::slot::lsn_text(lsn))?;
    // SAFETY: pops the snapshot pushed above and commits on the main thread.
    unsafe {
        pg_sys::PopActiveSnapshot();
        pg_sys::CommitTransactionCommand();
    }
    crate::slot::release();
    mark_snapshotted(index);
    pgrx::log!(
        "azure_cdc: mirror \"{}\": snapshot of {} tables published ({} copied by this worker, {} by {} helpers)",
        mirror.name,
        tables.len(),
        outcomes.len(),
        e.helpers_committed,
        helpers.workers.len()
    );
    Ok(())
}

fn mark_snapshotted(index: usize) {
    let mut r = shmem::REGISTRY.exclusive();
    r.entries[index].phase = Phase::Snapshotted;
    r.entries[index].failures = 0;
}
