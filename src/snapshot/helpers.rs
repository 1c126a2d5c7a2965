//! The snapshot helpers: up to `azure_cdc.max_snapshot_workers - 1` background workers a snapshot
//! worker starts for one attempt. Each imports the worker's exported snapshot, claims tables and
//! parts of tables from the attempt's shared list ([`super::parts`]), copies them as the worker
//! does ([`super::table`]), commits the outcomes it records and exits. Main thread calls PostgreSQL;
//! its encoder thread never does.

use std::sync::Arc;

use azure_cdc_core::names;
use azure_cdc_core::target::TargetUrl;
use azure_cdc_core::{Error, ErrorKind, Result};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;

use super::parts;
use super::table::{copy_claimed_tables, record_outcome};
use crate::catalog;
use crate::shmem;
use crate::worker;

/// The snapshot helpers this worker started; terminated if the attempt ends early.
pub struct Helpers {
    pub workers: Vec<Option<pgrx::bgworkers::DynamicBackgroundWorker>>,
}

impl Helpers {
    /// Starts up to `wanted` helpers; fewer if no worker slot is free.
    pub fn start(index: usize, wanted: usize) -> Helpers {
        let mut workers = Vec::new();
        for k in 1..=wanted.min(shmem::MAX_PROGRESS - 1) {
            let w = pgrx::bgworkers::BackgroundWorkerBuilder::new(names::WorkerKind::SnapshotHelper.backend_type())
                .set_type(names::WorkerKind::SnapshotHelper.backend_type())
                .set_library("azure_cdc")
                .set_function("azure_cdc_snapshot_helper_main")
                .enable_spi_access()
                .set_argument(Some(pg_sys::Datum::from(index | (k << 8))))
                // SAFETY: MyProcPid is set at process start.
                .set_notify_pid(unsafe { pg_sys::MyProcPid })
                .load_dynamic();
            match w {
                Ok(w) => workers.push(Some(w)),
                Err(_) => {
                    pgrx::log!(
                        "azure_cdc: no free background worker slot for snapshot helper {k}; continuing with {}",
                        k - 1
                    );
                    break;
                }
            }
        }
        Helpers { workers }
    }

    /// Waits until every helper has exited.
    pub fn wait(&mut self) {
        for w in self.workers.iter_mut() {
            if let Some(w) = w.take() {
                let _ = w.wait_for_shutdown();
            }
        }
    }
}

impl Drop for Helpers {
    fn drop(&mut self) {
        for w in self.workers.iter_mut() {
            if let Some(w) = w.take() {
                let _ = w.terminate();
            }
        }
    }
}

/// Terminates snapshot helpers left running by an earlier attempt and waits for them to exit, so that
/// nothing writes into the folders this attempt clears.
pub fn end_stale_helpers(index: usize) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let e = shmem::entry(index);
        let pids: Vec<i32> = e.helper_pids.iter().copied().filter(|p| shmem::worker_alive(*p, e.database)).collect();
        if pids.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::new(
                ErrorKind::ObjectInUse,
                format!("snapshot helpers {pids:?} of an earlier attempt did not exit"),
            ));
        }
        for p in pids {
            shmem::terminate_worker(p, e.database);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        pg_sys::check_for_interrupts!();
    }
}

/// Entry point of a snapshot helper. `arg` is the mirror's registry index | (progress slot << 8).
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn azure_cdc_snapshot_helper_main(arg: pg_sys::Datum) {
    worker::install_signal_handlers();
    let index = arg.value() & 0xff;
    let slot = arg.value() >> 8;
    if index >= crate::gucs::MAX_FABRIC_MIRRORS_LIMIT as usize || slot == 0 || slot >= shmem::MAX_PROGRESS {
        return;
    }
    let entry = shmem::entry(index);
    if !entry.in_use {
        return;
    }
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(entry.database)), None);
    worker::register_pid(index, Some(slot));
    parts::fail_all_at_exit(index, Some(slot));
    let mirror_id = entry.mirror_id;
    let result = worker::catching(|| {
        worker::pin_settings()?;
        helper_run(index, slot, mirror_id)
    });
    shmem::set_progress(index, slot, 0, 0);
    {
        let mut r = shmem::REGISTRY.exclusive();
        let e = &mut r.entries[index];
        match &result {
            Ok(n) => {
                e.helpers_committed += *n as u32;
                parts::finished();
            }
            Err(_) => {
                e.helper_failed = true;
                parts::fail_all(index);
            }
        }
        e.helper_pids[slot] = 0;
    }
    if let Err(e) = result {
        // SAFETY: abort what is left of the transaction after a failure.
        unsafe { pg_sys::AbortCurrentTransaction() };
        pgrx::log!("azure_cdc: snapshot helper {slot} of mirror {mirror_id} failed: {}", e.full_text());
        // A non-zero exit after the failure is recorded in the registry.
        crate::versions::exit_process(1);
    }
}

/// A helper's work: import the snapshot worker's snapshot, copy claimed tables, commit their outcomes.
/// Returns how many tables it committed.
fn helper_run(index: usize, slot: usize, mirror_id: i64) -> Result<usize> {
    let name = shmem::entry(index).snapshot_name;
    let len = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    let name = std::ffi::CString::new(&name[..len])
        .map_err(|_| Error::new(ErrorKind::Internal, "bad exported snapshot name"))?;
    // SAFETY: a fresh repeatable-read, read-only transaction that has run no query yet, as
    // ImportSnapshot (SET TRANSACTION SNAPSHOT) requires; the exporting transaction stays open until
    // this helper exits.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::XactIsoLevel = pg_sys::XACT_REPEATABLE_READ as i32;
        pg_sys::XactReadOnly = true;
        pg_sys::ImportSnapshot(name.as_ptr());
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    crate::tuples::freeze_casts();
    let mirror = catalog::mirror_by_id(mirror_id)?
        .ok_or_else(|| Error::new(ErrorKind::Internal, format!("mirror {mirror_id} is gone")))?;
    let url = TargetUrl::parse(&mirror.target)?;
    let target = Arc::new(crate::credentials::open_target(
        &url,
        mirror.credential.as_deref(),
        crate::credentials::worker_settings(),
    )?);
    let tables = catalog::tables(mirror_id)?;
    if tables.len() != shmem::entry(index).tables_total as usize {
        return Err(Error::new(ErrorKind::Internal, "snapshot workers disagree on the table list"));
    }
    let outcomes = copy_claimed_tables(index, slot, &tables, &target, mirror.owner)?;
    // SAFETY: the scans are done; the helper writes its tables' outcomes and commits.
    unsafe { pg_sys::XactReadOnly = false };
    // The transaction's snapshot is the attempt's, from before other processes' event writes.
    catalog::untrimmed(|| outcomes.iter().try_for_each(|o| record_outcome(mirror_id, o)))?;
    // SAFETY: pops the snapshot pushed above and commits on the main thread.
    unsafe {
        pg_sys::PopActiveSnapshot();
        pg_sys::CommitTransactionCommand();
    }
    Ok(outcomes.len())
}
