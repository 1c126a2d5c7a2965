//! What every background worker of a mirror (snapshot worker, snapshot helper, decoder) does the same
//! way: install PostgreSQL's signal handlers, turn a PostgreSQL error inside an attempt into an
//! [`Error`], check that the extension is still installed, and end a failed attempt — record the
//! error where users can read it, release the slot, exit non-zero so that the launcher retries with
//! back-off. Main thread of a worker; calls PostgreSQL.

use azure_cdc_core::{Error, ErrorKind, Result};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;

use crate::catalog;
use crate::shmem::{self, MirrorEntry};

unsafe extern "C-unwind" {
    // PostgreSQL's standard signal handlers (tcop/tcopprot.h, postmaster/interrupt.h), as raw symbols.
    fn die(signal: std::ffi::c_int);
    fn SignalHandlerForConfigReload(signal: std::ffi::c_int);
}

/// Installs PostgreSQL's standard handlers, then unblocks signals: SIGTERM sets the die flags that
/// CHECK_FOR_INTERRUPTS acts on, so the worker stops at its next check; SIGHUP marks the
/// configuration for reload.
pub fn install_signal_handlers() {
    // SAFETY: called once at worker start, on the main thread, before signals are unblocked.
    unsafe {
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(die));
        pg_sys::pqsignal(pg_sys::SIGHUP as i32, Some(SignalHandlerForConfigReload));
        pg_sys::BackgroundWorkerUnblockSignals();
    }
}

/// The common start of a mirror's worker: signal handlers, the registry entry `arg` points to, a
/// connection to the mirror's database, the worker's pid in the registry. Returns None (the worker
/// just exits) when the entry is not in use, or when the extension was dropped from the database:
/// then the entry is freed and the mirror's slot left, with a warning, for an administrator to drop.
/// `what` says what the worker would have done, for that warning.
pub fn start(arg: pg_sys::Datum, what: &str) -> Option<(usize, MirrorEntry)> {
    install_signal_handlers();
    let index = arg.value();
    if index >= crate::gucs::MAX_FABRIC_MIRRORS_LIMIT as usize {
        return None;
    }
    let entry = shmem::entry(index);
    if !entry.in_use {
        return None;
    }
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(entry.database)), None);
    // SAFETY: MyProcPid is set at process start.
    shmem::set_worker_pid(index, unsafe { pg_sys::MyProcPid });
    if !extension_installed() {
        pgrx::warning!(
            "azure_cdc: the extension was dropped from this database; mirror {} {what} and its slot, if any, is left for an administrator to drop",
            entry.mirror_id
        );
        shmem::set_worker_pid(index, 0);
        shmem::release(index);
        return None;
    }
    if let Err(e) = BackgroundWorker::transaction(|| crate::tuples::pin_output_settings(false)) {
        pgrx::warning!("azure_cdc: could not fix the output settings: {}", e.full_text());
        shmem::set_worker_pid(index, 0);
        return None;
    }
    Some((index, entry))
}

/// Runs one attempt, turning a PostgreSQL error (or a panic) raised inside it into an [`Error`], so
/// that the worker can record it and exit cleanly. (A FATAL, such as termination, exits directly.)
pub fn catching<T>(f: impl FnOnce() -> Result<T> + std::panic::UnwindSafe) -> Result<T> {
    PgTryBuilder::new(f)
        .catch_others(|caught| {
            let message = match &caught {
                pg_sys::panic::CaughtError::PostgresError(r)
                | pg_sys::panic::CaughtError::ErrorReport(r)
                | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => r.message().to_string(),
            };
            Err(Error::new(ErrorKind::Internal, message))
        })
        .execute()
}

/// Whether azure_cdc is installed in this database (its own transaction).
pub fn extension_installed() -> bool {
    BackgroundWorker::transaction(|| {
        Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'azure_cdc')")
            .ok()
            .flatten()
            .unwrap_or(false)
    })
}

/// Ends a failed attempt of a mirror's worker: aborts what is left of its transaction, releases the
/// slot if it holds it (an ephemeral slot is dropped by the release), logs the error, records it in
/// the mirror's `last_error` (and, while snapshotting, in its tables still being copied), and exits
/// with code 1, which tells the launcher to retry with back-off. `what` names the worker in the log.
/// An error that retrying cannot fix (the target rejected the credential, denied permission, or its
/// container is gone) marks the mirror Failed instead and tells the launcher not to restart it; the
/// slot is kept, so nothing is lost until an operator fixes the cause and runs `resume_mirror`.
pub fn exit_after_failure(mirror_id: i64, what: &str, e: &Error) -> ! {
    let permanent = e.kind.disposition() == azure_cdc_core::error::Disposition::StopMirror;
    // SAFETY: back to a clean state on the main thread after an error was caught.
    unsafe { pg_sys::AbortCurrentTransaction() };
    crate::slot::release();
    pgrx::log!("azure_cdc: {what} of mirror {mirror_id} failed: {}", e.full_text());
    let text = e.full_text();
    let recorded = catching(|| {
        BackgroundWorker::transaction(|| -> Result<()> {
            catalog::run(
                "UPDATE azure_cdc.mirrors SET last_error = $2, last_error_code = $4, \
                        state = CASE WHEN $3 AND state IN ('Starting', 'Running') THEN 'Failed' ELSE state END \
                  WHERE mirror_id = $1",
                &[
                    mirror_id.into(),
                    text.as_str().into(),
                    permanent.into(),
                    azure_cdc_core::health::error_code(e.kind).into(),
                ],
            )?;
            catalog::record_event(
                mirror_id,
                None,
                if permanent { "Failed" } else { "Error" },
                Some(&format!("{what}: {text}")),
            )?;
            catalog::run(
                "UPDATE azure_cdc.mirror_tables SET last_error = $2 WHERE mirror_id = $1 AND state = 'Snapshotting'",
                &[mirror_id.into(), text.as_str().into()],
            )
        })
    });
    if let Err(r) = recorded {
        pgrx::log!("azure_cdc: could not record the failure of mirror {mirror_id} in the catalog: {}", r.full_text());
    } else if permanent {
        // SAFETY: MyDatabaseId is set once the worker is connected.
        let database = unsafe { pg_sys::MyDatabaseId }.to_u32();
        if let Some(index) = shmem::find(database, mirror_id) {
            shmem::set_desired(index, shmem::Desired::Stop);
        }
        pgrx::log!("azure_cdc: mirror {mirror_id} is Failed until resume_mirror; its slot is kept");
    }
    // SAFETY: proc_exit runs the normal exit callbacks of a background worker.
    unsafe { pg_sys::proc_exit(1) }
}
