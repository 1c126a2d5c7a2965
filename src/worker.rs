//! What every background worker of a mirror (snapshot worker, snapshot helper, decoder) does the same
//! way: install PostgreSQL's signal handlers, pin its settings over what the database or a role sets
//! (search path first: see [`crate::privileges`]), keep its pid in the registry exactly while it
//! runs, turn a PostgreSQL error inside an attempt into an [`Error`], check that the extension is
//! still installed, and end a failed attempt — record the error where users can read it, release the
//! slot, exit non-zero so that the launcher retries with back-off. Main thread of a worker; calls
//! PostgreSQL.

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

/// Ends the process at once if the postmaster has died, as PostgreSQL's own processes do: asks
/// PostgreSQL's wait machinery without waiting, with `WL_EXIT_ON_PM_DEATH` (it exits there). Nothing
/// is published, confirmed or recorded on the way out; what was not confirmed is decoded again by
/// the next server's decoder. Cheap enough for every batch of rows (one non-blocking poll).
pub fn exit_if_postmaster_died() {
    // SAFETY: main thread of a process under the postmaster; MyLatch is this process's latch.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            0,
            pg_sys::PG_WAIT_EXTENSION,
        );
    }
}

/// Sleeps on the process latch for at most `timeout`, waking for a signal. False when the worker is
/// asked to stop (pgrx's SIGTERM flag; workers with PostgreSQL's own handler stop at the interrupt
/// check here). If the postmaster dies, the process ends at once (`WL_EXIT_ON_PM_DEATH`).
pub fn wait(timeout: std::time::Duration) -> bool {
    let ms = timeout.as_millis().min(i32::MAX as u128) as std::ffi::c_long;
    // SAFETY: main thread of a process under the postmaster; MyLatch is this process's latch.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            ms,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pg_sys::check_for_interrupts!();
    !BackgroundWorker::sigterm_received()
}

/// At process exit: threads and runtimes still held (in thread-local state the exit drops) are not
/// waited for (see `azure_cdc_core::cloud::mark_process_exiting`).
#[pg_guard]
unsafe extern "C-unwind" fn process_exiting(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    azure_cdc_core::cloud::mark_process_exiting();
}

/// Installs PostgreSQL's standard handlers, then unblocks signals: SIGTERM sets the die flags that
/// CHECK_FOR_INTERRUPTS acts on, so the worker stops at its next check; SIGHUP marks the
/// configuration for reload.
pub fn install_signal_handlers() {
    // SAFETY: registers a callback PostgreSQL runs when the process exits, on the main thread.
    unsafe { pg_sys::on_proc_exit(Some(process_exiting), pg_sys::Datum::from(0usize)) };
    // SAFETY: called once at worker start, on the main thread, before signals are unblocked.
    unsafe {
        crate::versions::set_signal_handler(pg_sys::SIGTERM as i32, Some(die));
        crate::versions::set_signal_handler(pg_sys::SIGHUP as i32, Some(SignalHandlerForConfigReload));
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
    register_pid(index, None);
    // Before any query: nothing the database's or a role's settings name may be reached.
    if let Err(e) = pin_settings() {
        pgrx::warning!("azure_cdc: could not fix the worker's settings: {}", e.full_text());
        shmem::set_worker_pid(index, 0);
        return None;
    }
    if !extension_installed() {
        pgrx::warning!(
            "azure_cdc: the extension was dropped from this database; mirror {} {what} and its slot, if any, is left for an administrator to drop",
            entry.mirror_id
        );
        shmem::set_worker_pid(index, 0);
        shmem::release(index);
        return None;
    }
    Some((index, entry))
}

/// Pins the worker's settings (own transaction): the search path and the others of
/// [`crate::privileges::pin_worker_settings`], then the output settings values are converted with.
pub fn pin_settings() -> Result<()> {
    BackgroundWorker::transaction(|| {
        crate::privileges::pin_worker_settings();
        crate::tuples::pin_output_settings(false)
    })
}

/// Records this worker's pid in entry `index` of the registry (as the mirror's worker, or as snapshot
/// helper `helper`), and clears it again however the process exits (an error, a FATAL such as
/// termination), so that no pid is left behind for the launcher to signal after the process is gone.
pub fn register_pid(index: usize, helper: Option<usize>) {
    // SAFETY: MyProcPid is set at process start.
    let pid = unsafe { pg_sys::MyProcPid };
    let arg = index | (helper.unwrap_or(0) << 8) | (usize::from(helper.is_some()) << 16);
    {
        let mut r = shmem::REGISTRY.exclusive();
        let e = &mut r.entries[index];
        match helper {
            Some(slot) => e.helper_pids[slot] = pid,
            None => e.worker_pid = pid,
        }
    }
    // SAFETY: registers a callback PostgreSQL runs on this process's exit, before shared memory is
    // detached; the argument is plain data.
    unsafe { pg_sys::before_shmem_exit(Some(forget_pid), pg_sys::Datum::from(arg)) };
}

/// For a worker that recorded its pid in helper slot `slot` itself (the copier claims its job and
/// records its pid in one step): clears it however the process exits, as [`register_pid`] does.
pub fn forget_helper_pid_at_exit(index: usize, slot: usize) {
    let arg = index | (slot << 8) | (1 << 16);
    // SAFETY: as in register_pid.
    unsafe { pg_sys::before_shmem_exit(Some(forget_pid), pg_sys::Datum::from(arg)) };
}

/// Clears the pid [`register_pid`] recorded, if it is still this process's.
#[pg_guard]
unsafe extern "C-unwind" fn forget_pid(_code: std::ffi::c_int, arg: pg_sys::Datum) {
    let arg = arg.value();
    let index = arg & 0xff;
    let slot = (arg >> 8) & 0xff;
    let helper = (arg >> 16) & 1 == 1;
    // SAFETY: MyProcPid is set at process start.
    let me = unsafe { pg_sys::MyProcPid };
    if index >= crate::gucs::MAX_FABRIC_MIRRORS_LIMIT as usize || slot >= shmem::MAX_PROGRESS {
        return;
    }
    let mut r = shmem::REGISTRY.exclusive();
    let e = &mut r.entries[index];
    if helper {
        if e.helper_pids[slot] == me {
            e.helper_pids[slot] = 0;
        }
    } else if e.worker_pid == me {
        e.worker_pid = 0;
    }
}

thread_local! {
    /// The mirrored table (relid) whose value conversion raised the error that ends this attempt:
    /// [`exit_after_failure`] parks it, so that the next attempt goes on without it.
    static PARK_ON_EXIT: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

/// The five-character SQLSTATE of an error code (PostgreSQL packs it six bits a character).
pub fn sqlstate_text(code: PgSqlErrorCode) -> String {
    let v = code as i32;
    (0..5).map(|i| (((v >> (6 * i)) & 0x3F) as u8 + b'0') as char).collect()
}

/// A value of a table could not be converted: an error of class 22 (data exception, such as a
/// character with no UTF-8 form) raised while a conversion of one of its values ran. Only such an
/// error parks the table; any other (a cancel, running out of memory, an internal error) is not
/// about the value and fails the attempt as it is.
fn value_error(caught: &pg_sys::panic::CaughtError) -> Option<(Error, u32)> {
    let (message, code) = match caught {
        pg_sys::panic::CaughtError::PostgresError(r)
        | pg_sys::panic::CaughtError::ErrorReport(r)
        | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => (r.message().to_string(), r.sql_error_code()),
    };
    let converting = crate::tuples::take_failed_conversion()?;
    let sqlstate = sqlstate_text(code);
    if !sqlstate.starts_with("22") {
        return None;
    }
    // Its text may quote the value: the server log has it; what users read names the column.
    pgrx::log!("azure_cdc: converting a value of {} failed: {message}", converting.what);
    let e = Error::new(
        ErrorKind::DataConversion,
        format!(
            "converting a value of {} failed (SQLSTATE {sqlstate}); the server log has the error's text",
            converting.what
        ),
    )
    .with_hint("For example, a character with no UTF-8 form. Fix the value, then run azure_cdc.resync_table.");
    Some((e, converting.relid))
}

fn caught_message(caught: &pg_sys::panic::CaughtError) -> String {
    match caught {
        pg_sys::panic::CaughtError::PostgresError(r)
        | pg_sys::panic::CaughtError::ErrorReport(r)
        | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => r.message().to_string(),
    }
}

/// Runs one attempt, turning a PostgreSQL error (or a panic) raised inside it into an [`Error`], so
/// that the worker can record it and exit cleanly. (A FATAL, such as termination, exits directly.)
/// An error about a value of a table ([`value_error`]) marks that table to be parked on exit.
pub fn catching<T>(f: impl FnOnce() -> Result<T> + std::panic::UnwindSafe) -> Result<T> {
    PgTryBuilder::new(f)
        .catch_others(|caught| match value_error(&caught) {
            Some((e, relid)) => {
                PARK_ON_EXIT.with(|p| p.set(Some(relid)));
                Err(e)
            }
            None => {
                PARK_ON_EXIT.with(|p| p.set(None));
                // An error of ours raised through PostgreSQL's code (a decoding callback) keeps its
                // kind, so that a permanent one stops the mirror instead of being retried.
                let message = caught_message(&caught);
                Err(crate::errors::take_raised(&message).unwrap_or_else(|| Error::new(ErrorKind::Internal, message)))
            }
        })
        .execute()
}

/// What a subtransaction ended with.
enum Ended<T> {
    /// `f` ran to its end, with its own result.
    Ran(Result<T>),
    /// A value of a table could not be converted: the subtransaction is rolled back, the error
    /// comes back and the transaction goes on.
    Value(Error),
    /// Any other PostgreSQL error: rolled back, then raised again.
    Other(pg_sys::panic::CaughtError),
}

/// Runs `f` in a subtransaction of the current transaction. A PostgreSQL error about a value
/// ([`value_error`]) rolls back only what `f` did and comes back as an [`Error`] (the transaction
/// goes on: that table is parked, the others copied); any other error (a cancel, out of memory) is
/// raised again once the subtransaction is rolled back.
pub fn in_subtransaction<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    // SAFETY: the internal-subtransaction pattern of PL/pgSQL's exception blocks (pl_exec.c): save
    // the memory context and resource owner, begin, run in the saved context; on success release
    // the subtransaction, on error roll it back; then restore both. Main thread, inside a transaction.
    unsafe {
        let cxt = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(cxt);
        let f = std::panic::AssertUnwindSafe(f);
        let ended: Ended<T> = PgTryBuilder::new(move || {
            let f = f;
            Ended::Ran((f.0)())
        })
        .catch_others(|caught| match value_error(&caught) {
            Some((e, _)) => Ended::Value(e),
            None => Ended::Other(caught),
        })
        .execute();
        match &ended {
            Ended::Ran(_) => pg_sys::ReleaseCurrentSubTransaction(),
            Ended::Value(_) | Ended::Other(_) => {
                pg_sys::MemoryContextSwitchTo(cxt);
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
            }
        }
        pg_sys::MemoryContextSwitchTo(cxt);
        pg_sys::CurrentResourceOwner = owner;
        match ended {
            Ended::Ran(r) => r,
            Ended::Value(e) => Err(e),
            Ended::Other(caught) => caught.rethrow(),
        }
    }
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
    let park = PARK_ON_EXIT.with(|p| p.take());
    let recorded = catching(|| {
        BackgroundWorker::transaction(|| -> Result<()> {
            // A value of one table could not be converted: that table is parked (its later changes
            // are not published) and the next attempt goes on with the others.
            if let Some(relid) = park {
                let relid = pg_sys::Oid::from(relid);
                if let Some(t) = catalog::tables(mirror_id)?.into_iter().find(|t| t.relid == relid) {
                    pgrx::warning!("azure_cdc: table \"{}.{}\" parked: {text}", t.schema, t.table);
                    return catalog::table_failed(mirror_id, relid, (&t.schema, &t.table), &text);
                }
            }
            catalog::mirror_attempt_failed(
                mirror_id,
                what,
                &text,
                azure_cdc_core::health::error_code(e.kind),
                permanent,
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
    crate::versions::exit_process(1)
}
