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
//!    `azure_cdc.max_snapshot_workers - 1` **snapshot helpers**, which import it. The worker and its
//!    helpers claim tables from a shared counter and scan each in the snapshot, converting tuples
//!    straight into Arrow batches ([`crate::tuples`]) that each process's encoder thread writes into
//!    numbered Parquet files published atomically. Each helper commits its tables' outcomes; once every
//!    helper has exited and every table is accounted for, the worker records its own tables and the
//!    mirror as Running in the same transaction (still holding the slot), and commits.
//!
//! Hand-off to the change stream: the slot's stream holds exactly the transactions that commit after
//! the snapshot, so a table's snapshot files never miss nor repeat a change. Because the slot and the
//! snapshot belong to one attempt, a failed attempt starts over from step 1 for all tables of the
//! mirror: helpers still running from it are terminated first, then its files are removed.
//!
//! A value that cannot be written (e.g. NaN in a numeric(p,s) column) parks only its table: the table
//! becomes Failed with the error, its folder is emptied, the other tables go on. Any other error fails
//! the attempt, is recorded in the catalog, and the launcher retries with back-off.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use azure_cdc_core::arrow_array::RecordBatch;
use azure_cdc_core::arrow_schema::SchemaRef;
use azure_cdc_core::batch::BatchBuilder;
use azure_cdc_core::cloud;
use azure_cdc_core::datafile::{Compression, PublishedFile, TableFileSink};
use azure_cdc_core::error::Disposition;
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
use crate::tuples::TupleConverter;
use crate::worker;

/// Messages from the main thread to the encoder thread.
enum ToEncoder {
    Begin {
        folder: String,
        schema: SchemaRef,
        compression: Compression,
        max_file_bytes: usize,
    },
    Batch(RecordBatch),
    /// The table is complete: publish what is left and report.
    End,
    /// The table is abandoned: remove its files and report.
    Abort,
}

/// The encoder thread: encodes and publishes the files of one table at a time. Never calls PostgreSQL.
struct Encoder {
    tx: Option<SyncSender<ToEncoder>>,
    rx: Receiver<Result<Vec<PublishedFile>>>,
    failed: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Encoder {
    fn start(target: Arc<Target>) -> Result<Encoder> {
        // Two batches in flight: the encoder works on one while the scan fills the next.
        let (tx, work) = sync_channel::<ToEncoder>(2);
        let (done, rx) = sync_channel::<Result<Vec<PublishedFile>>>(1);
        let failed = Arc::new(AtomicBool::new(false));
        let flag = failed.clone();
        let handle = std::thread::Builder::new()
            .name("azure_cdc encoder".into())
            .spawn(move || {
                cloud::run_thread_start_hook();
                encoder_loop(target, work, done, flag)
            })
            .map_err(|e| Error::new(ErrorKind::Internal, format!("could not start the encoder thread: {e}")))?;
        Ok(Encoder { tx: Some(tx), rx, failed, handle: Some(handle) })
    }

    fn send(&self, m: ToEncoder) -> Result<()> {
        let gone = || Error::new(ErrorKind::Internal, "the encoder thread stopped");
        self.tx.as_ref().ok_or_else(gone)?.send(m).map_err(|_| gone())
    }

    fn finish_table(&self, m: ToEncoder) -> Result<Vec<PublishedFile>> {
        self.send(m)?;
        self.rx.recv().map_err(|_| Error::new(ErrorKind::Internal, "the encoder thread stopped"))?
    }

    fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn encoder_loop(
    target: Arc<Target>,
    work: Receiver<ToEncoder>,
    done: SyncSender<Result<Vec<PublishedFile>>>,
    failed: Arc<AtomicBool>,
) {
    let mut sink: Option<(TableFileSink, String)> = None;
    let mut error: Option<Error> = None;
    while let Ok(msg) = work.recv() {
        let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Option<Result<Vec<PublishedFile>>> {
            match msg {
                ToEncoder::Begin { folder, schema, compression, max_file_bytes } => {
                    error = None;
                    failed.store(false, Ordering::Relaxed);
                    let s = TableFileSink::new(
                        target.clone(),
                        folder.clone(),
                        schema,
                        compression,
                        max_file_bytes,
                        1,
                        vec![],
                    );
                    sink = Some((s, folder));
                    None
                }
                ToEncoder::Batch(b) => {
                    if error.is_none() {
                        if let Some((s, _)) = sink.as_mut() {
                            if let Err(e) = s.push(&b) {
                                failed.store(true, Ordering::Relaxed);
                                error = Some(e);
                            }
                        }
                    }
                    None
                }
                ToEncoder::End => {
                    let r = match (sink.take(), error.take()) {
                        (_, Some(e)) => Err(e),
                        (Some((s, _)), None) => s.close(),
                        (None, None) => Ok(Vec::new()),
                    };
                    Some(r)
                }
                ToEncoder::Abort => {
                    error = None;
                    let r = match sink.take() {
                        Some((s, folder)) => {
                            drop(s);
                            target.reset_table_folder(&folder).map(|_| Vec::new())
                        }
                        None => Ok(Vec::new()),
                    };
                    Some(r)
                }
            }
        }));
        let reply = match step {
            Ok(r) => r,
            Err(_) => {
                failed.store(true, Ordering::Relaxed);
                sink = None;
                Some(Err(Error::new(ErrorKind::Internal, "the encoder thread panicked")))
            }
        };
        if let Some(r) = reply {
            if done.send(r).is_err() {
                return;
            }
        }
    }
}

/// What happened to one table in this attempt.
struct Outcome {
    relid: pg_sys::Oid,
    schema: String,
    table: String,
    keys: Vec<String>,
    rows: i64,
    files: Vec<PublishedFile>,
    parked: Option<Error>,
    /// A partitioned table: the signature of the partition tree that was copied.
    partitions: Option<String>,
    /// The columns of its files ([`azure_cdc_core::columns::to_text`]).
    columns: Option<String>,
}

/// Entry point of the snapshot worker. `arg` is the mirror's index in the shared registry.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn azure_cdc_snapshot_main(arg: pg_sys::Datum) {
    let Some((index, entry)) = worker::start(arg, "will not be snapshotted") else { return };
    let mirror_id = entry.mirror_id;
    let attempt = worker::catching(|| run(index, mirror_id));
    clear_progress(index);
    shmem::set_worker_pid(index, 0);
    if let Err(e) = attempt {
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

/// The snapshot helpers this worker started; terminated if the attempt ends early.
struct Helpers {
    workers: Vec<Option<pgrx::bgworkers::DynamicBackgroundWorker>>,
}

impl Helpers {
    /// Starts up to `wanted` helpers; fewer if no worker slot is free.
    fn start(index: usize, wanted: usize) -> Helpers {
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
    fn wait(&mut self) {
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

/// Records the outcome of one table (in the current transaction).
fn record_outcome(mirror_id: i64, o: &Outcome) -> Result<()> {
    match &o.parked {
        Some(e) => {
            TableState::Snapshotting.on(TableEvent::Failed)?;
            catalog::table_failed(mirror_id, o.relid, (&o.schema, &o.table), &e.full_text())
        }
        None => {
            TableState::Snapshotting.on(TableEvent::SnapshotPublished)?;
            catalog::table_copied(
                mirror_id,
                o.relid,
                TableState::Snapshotting,
                &catalog::CopiedTable {
                    keys: o.keys.clone(),
                    rows: o.rows,
                    files: o.files.len() as i64,
                    bytes: o.files.iter().map(|f| f.bytes as i64).sum(),
                    seed_snapshot: None,
                    partitions: o.partitions.clone(),
                    columns: o.columns.clone(),
                },
            )
            .map(|_| ())
        }
    }
}

/// Copies tables claimed from the shared counter until none is left; returns their outcomes.
fn copy_claimed_tables(
    index: usize,
    progress_slot: usize,
    tables: &[TableRow],
    target: &Arc<Target>,
    owner: pg_sys::Oid,
) -> Result<Vec<Outcome>> {
    let encoder = Encoder::start(target.clone())?;
    let mut outcomes = Vec::new();
    while let Some(i) = shmem::claim_next_table(index) {
        let t = tables
            .get(i)
            .ok_or_else(|| Error::new(ErrorKind::Internal, "snapshot workers disagree on the table list"))?;
        outcomes.push(snapshot_table(index, progress_slot, t, target, &encoder, owner)?);
    }
    Ok(outcomes)
}

/// Terminates snapshot helpers left running by an earlier attempt and waits for them to exit, so that
/// nothing writes into the folders this attempt clears.
fn end_stale_helpers(index: usize) -> Result<()> {
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
    let wanted = (crate::gucs::MAX_SNAPSHOT_WORKERS.get().max(1) as usize - 1).min(tables.len().saturating_sub(1));
    let mut helpers = Helpers::start(index, wanted);
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
    for o in &outcomes {
        record_outcome(mirror_id, o)?;
    }
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
            Ok(n) => e.helpers_committed += *n as u32,
            Err(_) => e.helper_failed = true,
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
    for o in &outcomes {
        record_outcome(mirror_id, o)?;
    }
    // SAFETY: pops the snapshot pushed above and commits on the main thread.
    unsafe {
        pg_sys::PopActiveSnapshot();
        pg_sys::CommitTransactionCommand();
    }
    Ok(outcomes.len())
}

fn mark_snapshotted(index: usize) {
    let mut r = shmem::REGISTRY.exclusive();
    r.entries[index].phase = Phase::Snapshotted;
    r.entries[index].failures = 0;
}

/// Copies one table. Errors that park only this table come back as an Outcome with `parked`; any
/// other error fails the attempt.
fn snapshot_table(
    index: usize,
    progress_slot: usize,
    t: &TableRow,
    target: &Arc<Target>,
    encoder: &Encoder,
    owner: pg_sys::Oid,
) -> Result<Outcome> {
    let folder = names::table_folder(&t.schema, &t.table);
    let mut outcome = Outcome {
        relid: t.relid,
        schema: t.schema.clone(),
        table: t.table.clone(),
        keys: Vec::new(),
        rows: 0,
        files: Vec::new(),
        parked: None,
        partitions: None,
        columns: None,
    };
    // SAFETY: try_relation_open returns NULL instead of raising when the table is gone.
    let rel = unsafe { pg_sys::try_relation_open(t.relid, pg_sys::AccessShareLock as i32) };
    if rel.is_null() {
        outcome.parked =
            Some(Error::new(ErrorKind::DataConversion, format!("table \"{}.{}\" no longer exists", t.schema, t.table)));
        return Ok(outcome);
    }
    // The mirror's owner must (still) own the table: a table it may not mirror is parked, uncopied.
    match privileges::table_refusal_error(owner, t.relid, &t.schema, &t.table, Who::Owner) {
        Ok(None) => {}
        refused => {
            // SAFETY: closing the relation opened above, keeping its lock to the end of the transaction.
            unsafe { pg_sys::relation_close(rel, pg_sys::NoLock as i32) };
            let e = refused?.unwrap_or_else(|| Error::new(ErrorKind::Internal, "no refusal"));
            pgrx::warning!("azure_cdc: table \"{}.{}\" parked: {}", t.schema, t.table, e.full_text());
            outcome.parked = Some(e);
            return Ok(outcome);
        }
    }
    // In a subtransaction: a PostgreSQL error while converting a value (a type's cast to json, an
    // encoding conversion) parks this table only, and the snapshot goes on with the others.
    let result = worker::in_subtransaction(|| -> Result<()> {
        // The keys recorded by start_mirror (before it may have set REPLICA IDENTITY FULL, which would
        // hide a REPLICA IDENTITY USING INDEX key from a new look-up).
        outcome.keys = t.key_columns.clone();
        target.put_document(
            &folder,
            landing_zone::METADATA_FILE,
            landing_zone::table_metadata(&outcome.keys).as_bytes(),
        )?;
        // SAFETY: rel is open (checked above).
        let mut conv = unsafe { TupleConverter::new(rel)? };
        let mut builder = BatchBuilder::new(conv.specs())?;
        outcome.columns = Some(azure_cdc_core::columns::to_text(&conv.columns()));
        // The partition tree in the snapshot the rows are read in.
        let tree = catalog::partition_tree(t.relid)?;
        // SAFETY: rel is open.
        if unsafe { (*(*rel).rd_rel).relkind } == pg_sys::RELKIND_PARTITIONED_TABLE as std::ffi::c_char {
            outcome.partitions = Some(tree.signature.clone());
        }
        encoder.send(ToEncoder::Begin {
            folder: folder.clone(),
            schema: builder.schema(),
            compression: crate::gucs::parquet_compression(),
            max_file_bytes: crate::gucs::snapshot_file_bytes(),
        })?;
        // SAFETY: scanning an open heap relation in the transaction's snapshot on the main thread.
        let scanned = unsafe { scan(rel, &tree, &mut conv, &mut builder, encoder, index, progress_slot, t.relid) };
        match scanned {
            Ok(rows) => {
                outcome.rows = rows;
                outcome.files = encoder.finish_table(ToEncoder::End)?;
                Ok(())
            }
            Err(e) => {
                let _ = encoder.finish_table(ToEncoder::Abort);
                Err(e)
            }
        }
    });
    if result.is_err() {
        // A PostgreSQL error may have ended the scan half way: the encoder drops what it wrote (a
        // second Abort after the one above changes nothing).
        let _ = encoder.finish_table(ToEncoder::Abort);
    }
    // SAFETY: closing the relation opened above, keeping the lock to the end of the transaction.
    unsafe { pg_sys::relation_close(rel, pg_sys::NoLock as i32) };
    match result {
        Ok(()) => Ok(outcome),
        Err(e) if e.kind.disposition() == Disposition::ParkTable => {
            target.reset_table_folder(&folder)?;
            pgrx::warning!("azure_cdc: table \"{}.{}\" parked: {}", t.schema, t.table, e.full_text());
            outcome.rows = 0;
            outcome.files.clear();
            outcome.parked = Some(e);
            Ok(outcome)
        }
        Err(e) => Err(e),
    }
}

/// Scans `rel` in the active snapshot, sending full batches to the encoder. Returns the row count.
///
/// # Safety
/// `rel` must be an open heap relation; main thread; inside the snapshot transaction.
#[allow(clippy::too_many_arguments)]
unsafe fn scan(
    rel: pg_sys::Relation,
    tree: &catalog::PartitionTree,
    conv: &mut TupleConverter,
    builder: &mut BatchBuilder,
    encoder: &Encoder,
    index: usize,
    progress_slot: usize,
    relid: pg_sys::Oid,
) -> Result<i64> {
    // SAFETY: the caller's guarantees; the active snapshot is the snapshot transaction's.
    unsafe {
        let snapshot = pg_sys::GetActiveSnapshot();
        let rows = crate::tuples::scan_table(rel, snapshot, tree, conv, builder, &mut |batch, rows| {
            encoder.send(ToEncoder::Batch(batch))?;
            shmem::set_progress(index, progress_slot, relid.to_u32(), rows);
            Ok(!encoder.has_failed())
        })?;
        shmem::set_progress(index, progress_slot, relid.to_u32(), rows);
        Ok(rows)
    }
}
