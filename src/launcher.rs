//! The launcher: one static background worker per server. It keeps the mirrors' workers running:
//! after a start it sends a short-lived scout into every database to report the mirrors recorded there,
//! then, woken by the SQL API (commit of start_mirror / stop_mirror) or every few seconds, it starts the
//! worker a mirror needs (its snapshot worker until the snapshot is published, then its decoder),
//! restarts failed ones with exponential back-off, and terminates the workers of stopped mirrors. It is connected to no database and calls PostgreSQL only on its main thread.
//!
//! The scout (one per database, in turn) connects to its database, and if azure_cdc is installed
//! there, reserves a registry entry for every mirror that is not Stopped, then exits.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use azure_cdc_core::lifecycle::{restart_backoff, MirrorState};
use azure_cdc_core::names::{self, WorkerKind};
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::prelude::*;

use crate::catalog;
use crate::shmem::{self, Desired, Phase};

/// Registers the launcher with the postmaster (from `_PG_init`).
pub fn register() {
    BackgroundWorkerBuilder::new(WorkerKind::Launcher.backend_type())
        .set_type(WorkerKind::Launcher.backend_type())
        .set_library("azure_cdc")
        .set_function("azure_cdc_launcher_main")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// Databases the launcher could find mirrors in: (oid, name).
fn connectable_databases() -> Vec<(pg_sys::Oid, String)> {
    let mut out = Vec::new();
    // SAFETY: a catalog heap scan of pg_database (a shared catalog, readable without a database
    // connection) inside a transaction, on the main thread, as the autovacuum launcher does it.
    // GETSTRUCT is the tuple header plus t_hoff.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as i32);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tup = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tup.is_null() {
                break;
            }
            let header = (*tup).t_data;
            let form = (header as *const u8).add((*header).t_hoff as usize) as *const pg_sys::FormData_pg_database;
            if (*form).datallowconn && !(*form).datistemplate {
                let name = std::ffi::CStr::from_ptr((*form).datname.data.as_ptr()).to_string_lossy().into_owned();
                out.push(((*form).oid, name));
            }
        }
        pg_sys::heap_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
        pg_sys::PopActiveSnapshot();
        pg_sys::CommitTransactionCommand();
    }
    out
}

fn my_pid() -> i32 {
    // SAFETY: MyProcPid is set at process start.
    unsafe { pg_sys::MyProcPid }
}

/// Runs one scout per database, one after the other, so that the registry knows every mirror.
fn scout_all() {
    for (oid, name) in connectable_databases() {
        let worker = BackgroundWorkerBuilder::new(&names::worker_name(WorkerKind::Scout, &name, None))
            .set_type(WorkerKind::Scout.backend_type())
            .set_library("azure_cdc")
            .set_function("azure_cdc_scout_main")
            .enable_spi_access()
            .set_argument(Some(pg_sys::Datum::from(oid.to_u32() as usize)))
            .set_notify_pid(my_pid())
            .load_dynamic();
        match worker {
            Ok(w) => {
                if let Err(status) = w.wait_for_shutdown() {
                    pgrx::warning!("azure_cdc launcher: scout for database \"{name}\" ended with {status:?}");
                }
            }
            Err(_) => pgrx::warning!(
                "azure_cdc launcher: could not start a scout for database \"{name}\"; raise max_worker_processes"
            ),
        }
    }
}

struct Running {
    worker: DynamicBackgroundWorker,
    mirror_id: i64,
    /// The phase the mirror was in when the worker started (which kind of worker it is).
    phase: Phase,
}

struct Launcher {
    running: HashMap<usize, Running>,
    retry_at: HashMap<usize, Instant>,
}

impl Launcher {
    /// Starts the worker the mirror needs now: its snapshot worker until the snapshot is published,
    /// then its decoder.
    fn start_worker(&mut self, index: usize, e: &shmem::MirrorEntry) {
        let (kind, function) = match e.phase {
            Phase::Snapshot => (WorkerKind::Snapshot, "azure_cdc_snapshot_main"),
            Phase::Snapshotted => (WorkerKind::Decoder, "azure_cdc_decoder_main"),
        };
        let name = names::worker_name(kind, &e.database.to_string(), Some(&e.mirror_id.to_string()));
        let worker = BackgroundWorkerBuilder::new(&name)
            .set_type(kind.backend_type())
            .set_library("azure_cdc")
            .set_function(function)
            .enable_spi_access()
            .set_argument(Some(pg_sys::Datum::from(index)))
            .set_notify_pid(my_pid())
            .load_dynamic();
        match worker {
            Ok(w) => {
                shmem::REGISTRY.exclusive().entries[index].worker_registered = true;
                self.running.insert(index, Running { worker: w, mirror_id: e.mirror_id, phase: e.phase });
            }
            Err(_) => {
                pgrx::warning!(
                    "azure_cdc launcher: no background worker slot free for mirror {}; raise max_worker_processes",
                    e.mirror_id
                );
                self.retry_at.insert(index, Instant::now() + Duration::from_secs(10));
            }
        }
    }

    /// Notices workers that exited; counts failures for back-off.
    fn reap(&mut self) {
        let exited: Vec<usize> = self
            .running
            .iter()
            .filter(|(_, r)| matches!(r.worker.pid(), Err(BackgroundWorkerStatus::Stopped)))
            .map(|(i, _)| *i)
            .collect();
        for index in exited {
            let r = self.running.remove(&index);
            let failed = {
                let mut reg = shmem::REGISTRY.exclusive();
                let e = &mut reg.entries[index];
                e.worker_registered = false;
                let same = r.as_ref().is_some_and(|r| e.in_use && e.mirror_id == r.mirror_id);
                // A snapshot worker that exits before the snapshot is published failed; a decoder never
                // exits on its own while its mirror should run.
                let failed = match r.as_ref().map(|r| r.phase) {
                    Some(Phase::Snapshot) => e.phase == Phase::Snapshot,
                    Some(Phase::Snapshotted) => true,
                    None => false,
                };
                if same && failed && e.desired == Desired::Run {
                    e.failures += 1;
                    Some((e.failures, r.as_ref().map(|r| r.phase)))
                } else {
                    None
                }
            };
            if let Some((failures, phase)) = failed {
                let wait = restart_backoff(failures, jitter());
                let which = if phase == Some(Phase::Snapshot) { "snapshot worker" } else { "decoder" };
                pgrx::log!(
                    "azure_cdc launcher: {which} of mirror slot {index} exited ({failures} failures in a row); restarting in {:.1} s",
                    wait.as_secs_f64()
                );
                self.retry_at.insert(index, Instant::now() + wait);
            }
        }
    }

    fn reconcile(&mut self) {
        self.reap();
        for index in 0..shmem::capacity() {
            let e = shmem::entry(index);
            let mine = self.running.contains_key(&index);
            if !e.in_use || e.desired == Desired::Stop {
                if let Some(r) = self.running.remove(&index) {
                    let _ = r.worker.terminate().wait_for_shutdown();
                } else if shmem::worker_alive(e.worker_pid, e.database) {
                    // A worker registered by an earlier launcher process.
                    shmem::terminate_worker(e.worker_pid, e.database);
                    continue;
                }
                // Helpers of a snapshot worker that ended without terminating them.
                for pid in e.helper_pids {
                    shmem::terminate_worker(pid, e.database);
                }
                shmem::REGISTRY.exclusive().entries[index].worker_registered = false;
                continue;
            }
            if e.desired != Desired::Run || mine || shmem::worker_alive(e.worker_pid, e.database) {
                continue;
            }
            if self.retry_at.get(&index).is_some_and(|t| Instant::now() < *t) {
                continue;
            }
            self.retry_at.remove(&index);
            self.start_worker(index, &e);
        }
    }
}

/// Entry point of the launcher.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn azure_cdc_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    // SAFETY: MyLatch points into this process's PGPROC in shared memory, valid while the process lives.
    shmem::REGISTRY.exclusive().launcher_latch = unsafe { pg_sys::MyLatch } as usize;
    pgrx::log!("azure_cdc launcher started");
    scout_all();
    let mut launcher = Launcher { running: HashMap::new(), retry_at: HashMap::new() };
    launcher.reconcile();
    while crate::worker::wait(Duration::from_secs(5)) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reading the configuration file on the main thread, as every process does.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        launcher.reconcile();
    }
    shmem::REGISTRY.exclusive().launcher_latch = 0;
    pgrx::log!("azure_cdc launcher stopped");
}

/// Logs a warning for slots named like a mirror's in a database where azure_cdc is no longer installed
/// (the extension was dropped while mirrors ran): they hold WAL until someone drops them.
fn warn_orphaned_slots() {
    let slots: Vec<String> = Spi::connect(|c| {
        c.select(
            "SELECT slot_name::text FROM pg_catalog.pg_replication_slots \
              WHERE database = pg_catalog.current_database() AND slot_name LIKE 'azure\\_cdc\\_%'",
            None,
            &[],
        )
        .map(|t| t.filter_map(|r| r.get::<String>(1).ok().flatten()).collect())
        .unwrap_or_default()
    });
    for slot in slots.into_iter().filter(|s| names::mirror_of_slot(s).is_some()) {
        pgrx::warning!(
            "azure_cdc: replication slot \"{slot}\" belongs to a mirror of a dropped azure_cdc extension and retains WAL; \
             drop it with SELECT pg_drop_replication_slot('{slot}'); if it is not used otherwise"
        );
    }
}

/// Entry point of a scout. `arg` is the database OID.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn azure_cdc_scout_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGTERM);
    let database = arg.value() as u32;
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(database)), None);
    BackgroundWorker::transaction(|| {
        // Before any query: nothing the database's settings name may be reached.
        crate::privileges::pin_worker_settings();
        let installed =
            Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'azure_cdc')")
                .ok()
                .flatten()
                .unwrap_or(false);
        if !installed {
            warn_orphaned_slots();
            return;
        }
        let mirrors = match catalog::active_mirrors() {
            Ok(m) => m,
            Err(e) => {
                pgrx::warning!("azure_cdc scout: could not read the mirrors: {}", e.full_text());
                return;
            }
        };
        for m in mirrors {
            let state = MirrorState::parse(&m.state);
            let phase = match state {
                Ok(MirrorState::Starting) => Phase::Snapshot,
                _ => Phase::Snapshotted,
            };
            // A Failed or Paused mirror keeps its place (and slot) but runs no worker until resume_mirror.
            let desired = if state.is_ok_and(|s| !s.wants_workers()) { Desired::Stop } else { Desired::Run };
            if shmem::reserve(database, m.id, desired, phase).is_none() {
                pgrx::warning!(
                    "azure_cdc: mirror \"{}\" cannot run: all {} mirror places are in use",
                    m.name,
                    shmem::capacity()
                );
            }
        }
    });
    shmem::wake_launcher();
}

/// A number in [0, 1) that differs between calls and processes (for back-off jitter, not security).
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    h.write_u128(now.as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}
