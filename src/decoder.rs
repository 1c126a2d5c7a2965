//! The decoder worker: one per mirror whose snapshot is published. A dynamic background worker
//! connected to the mirror's database that reads the mirror's slot in-process — PostgreSQL's logical
//! decoding machinery runs in this process, with this library as the output plugin
//! (`_PG_output_plugin_init`): its callbacks turn each decoded tuple of a mirrored table straight
//! into Arrow column values, without a text protocol in between. Its main thread calls PostgreSQL;
//! its shipper thread ([`azure_cdc_core::shipper`]) never does.
//!
//! Flow: decoded changes of mirrored tables are appended to per-table builders (the change buffer,
//! `azure_cdc.change_batch_buffer_size`). A batch closes when the buffer is full or
//! `azure_cdc.change_batch_export_timeout` after its first change; it goes to the shipper, which writes
//! one change file per table and acknowledges. Only then is the slot confirmed past the batch's
//! transactions. How this is exactly once across crashes is explained in [`azure_cdc_core::changes`].
//!
//! Row images: an INSERT is written with marker 0; an UPDATE with marker 1 as the whole new row, or,
//! when it changes the key, as a delete (2) of the old key followed by an insert (0) of the new row; a
//! DELETE with marker 2 and the old row as the change carries it (at least the key columns).
//!
//! Unchanged TOASTed values: a decoded UPDATE does not carry the value of a TOASTed column it did
//! not change. `start_mirror` therefore sets REPLICA IDENTITY FULL on mirrored tables that have
//! TOAST-able columns, so that the old row image — logged whole, TOASTed values inlined — supplies
//! them. If such a value is ever missing anyway (the identity was changed back), the table is parked
//! with an error rather than written with a NULL or a made-up value.
//!
//! What reseeds one table (its folder rebuilt while the others go on; the hand-off is explained in
//! [`azure_cdc_core::reseed`]): a TRUNCATE, a change of its columns or key columns, `resync_table`,
//! `add_tables`, a table created later in a mirror of all tables, a lost slot (every table). What
//! parks one table (Failed, its later changes skipped, the others go on): an UPDATE or DELETE of a
//! table without key columns, a missing unchanged TOASTed value, a value the landing zone cannot
//! hold. Any other error ends the worker; the launcher restarts it with back-off and it resumes from
//! the slot.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use azure_cdc_core::arrow_array::RecordBatch;
use azure_cdc_core::batch::{BatchBuilder, ColumnSpec};
use azure_cdc_core::changes::{
    already_shipped, batch_due, change_columns, extend_runs, InFlight, Position, RowMarker, TxnRun,
};
use azure_cdc_core::columns::{self, Column, Evolution, NewColumnFacts};
use azure_cdc_core::datafile::PublishedFile;
use azure_cdc_core::error::Disposition;
use azure_cdc_core::lifecycle::{MirrorState, TableEvent, TableState};
use azure_cdc_core::names;
use azure_cdc_core::reseed::{self, Hold, Reason, ResetWait};
use azure_cdc_core::shipper::{self, ShipBatch, Shipped, Shipper, TableChanges};
use azure_cdc_core::target::{Target, TargetUrl};
use azure_cdc_core::verify::{full_xid, Visibility};
use azure_cdc_core::{Error, ErrorKind, Result};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;

use crate::catalog;
use crate::privileges::{self, Who};
use crate::shmem::{self, StreamStats};
use crate::tuples::{datums_equal, is_unchanged_toast, TupleConverter};
use crate::worker;

/// How long the decoder sleeps on its latch when it has read all flushed WAL.
const POLL: Duration = Duration::from_millis(20);
/// Batches that may wait for the shipper while it writes one.
const SHIP_QUEUE: usize = 1;
/// CPU priority of the decoder and its shipper (nice value): under CPU contention the primary's own
/// backends come first; the decoder catches up when there is room.
const NICE: i32 = 10;

/// Bytes at which the open batch closes: a third of `azure_cdc.change_batch_buffer_size`, so that the
/// batch being filled, the one waiting for the shipper and the one being written together stay within it.
fn batch_bytes() -> usize {
    (crate::gucs::change_buffer_bytes() / 3).max(1)
}
/// Least time between two writes of the tables' counters to the catalog.
const CATALOG_EVERY: Duration = Duration::from_secs(1);

/// Set in a decoder worker: only it may read a mirror's slot.
static IN_DECODER: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The running decoder, for the output plugin callbacks (main thread only).
    static DECODER: RefCell<Option<Decoder>> = const { RefCell::new(None) };
    /// Relations whose cached conversion plan may be out of date (relcache invalidations).
    static STALE: RefCell<HashSet<u32>> = RefCell::new(HashSet::new());
    /// Relations invalidated since the decoder last checked that its tables still exist.
    static INVALIDATED: RefCell<HashSet<u32>> = RefCell::new(HashSet::new());
    static ALL_INVALIDATED: Cell<bool> = const { Cell::new(false) };
    static ALL_STALE: Cell<bool> = const { Cell::new(false) };
}

/// One mirrored table, as the decoder sees it.
struct Table {
    schema: String,
    name: String,
    folder: String,
    keys: Vec<String>,
    /// Columns of its files; a decoded change with other columns reseeds the table.
    specs: Vec<ColumnSpec>,
    /// Conversion plans by the relation whose changes they convert: the table itself, or, for a
    /// partitioned table, each of its partitions. Dropped after a relcache invalidation.
    plans: HashMap<u32, Plan>,
    /// A partitioned table: the signature of its partition tree when it was last copied
    /// ([`catalog::PartitionTree`]).
    partitions: Option<String>,
    /// The columns its files carry, by attribute number: what a table's own descriptor in the
    /// stream is compared with ([`azure_cdc_core::columns::evolve`]).
    shipped: Vec<Column>,
    /// Column changes the files followed, not yet recorded in the catalog (what changed, each).
    columns_unrecorded: Vec<String>,
    builder: BatchBuilder,
    done: Vec<RecordBatch>,
    /// Position of the last change in the open batch.
    last_in_batch: Option<Position>,
    rows_in_batch: u64,
    /// Which rows of the open batch belong to which transaction.
    txn_runs: Vec<TxnRun>,
    /// Position of the last change already in the landing zone when the decoder started.
    published: Option<Position>,
    next_number: u64,
    parked: Option<Error>,
    park_recorded: bool,
    /// Being reseeded: its changes are dropped until its copy is published (then the decoder rewinds).
    reseeding: bool,
    /// The next file number the catalog recorded when the decoder started.
    recorded_next: u64,
    /// While reseeding: when its folder was first deleted to reset it (from the catalog: seconds ago).
    deleted_ago: Option<f64>,
    /// While reseeding: its folder was deleted in this pass; since when (the latest deletion) and
    /// what is known of the landing zone's reader dropping the table.
    reset: Option<(Instant, ResetWait)>,
    /// The snapshot of its last reseed's copy: its changes of transactions this sees are in the copy.
    seed: Option<Visibility>,
    /// Counters not yet written to the catalog.
    unrecorded: Counters,
}

/// How to convert the changes of one relation into a mirrored table's columns.
struct Plan {
    conv: TupleConverter,
    /// Memory of the plan's FmgrInfo (functions may cache data in fn_mcxt).
    cxt: pg_sys::MemoryContext,
    /// Tuple-descriptor indexes of the key columns, with their attlen / attbyval.
    key_atts: Vec<(usize, i16, bool)>,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: the plan's own context, referenced by nothing else once the plan goes.
        unsafe { pg_sys::MemoryContextDelete(self.cxt) };
    }
}

#[derive(Default, Clone, Copy)]
struct Counters {
    rows: i64,
    files: i64,
    bytes: i64,
    next_number: i64,
    touched: bool,
}

/// State of the decoder, shared by the main loop and the output plugin callbacks.
struct Decoder {
    index: usize,
    mirror_id: i64,
    /// The mirror's owner: tables it may not mirror are parked or left out.
    owner: pg_sys::Oid,
    tables: HashMap<u32, Table>,
    /// A reseed in progress: the slot is not confirmed past its hold point.
    hold: Option<Hold>,
    /// Reseeds asked for by the change stream (TRUNCATE, a change of columns), not yet recorded.
    requests: Vec<(u32, Reason)>,
    /// "Mirror all data": a table first seen in the stream joins the mirror.
    all_tables: bool,
    /// Every table the mirror's catalog knows, whatever its state (so that a removed or dropped
    /// table is not taken for a new one).
    known: HashSet<u32>,
    /// Partitions seen in the stream, with their partitioned tables (nearest first), as of the
    /// point of the stream they were looked up at; dropped after a relcache invalidation.
    routes: HashMap<u32, Vec<u32>>,
    /// Tables the current catalog no longer has, with the WAL insert position when that was seen:
    /// once decoding has read past it, the DROP has been decoded and the table is marked Dropped.
    vanished: Vec<(u32, u64)>,
    /// The registry's tables generation last acted on.
    generation: u32,
    shipper: Shipper,
    /// The mirror's target (a reseed's copy writes to it from the main thread).
    target: Arc<Target>,
    inflight: InFlight,
    /// Per batch in flight: (rows, first commit time, buffered bytes).
    inflight_info: VecDeque<(u64, i64, usize)>,
    /// Open batch: when its first change came, the commit time of its first transaction, its bytes.
    first_change: Option<Instant>,
    first_commit_time: i64,
    buffered: usize,
    /// Transaction being replayed: its commit LSN and commit time, and the ordinal of its last change.
    commit_lsn: u64,
    commit_time: i64,
    ordinal: u64,
    /// Its full (epoch-extended) transaction id, for the files' transaction index.
    xid: u64,
    /// Memory for one change's deformed and detoasted values, reset after each change.
    change_cxt: pg_sys::MemoryContext,
    /// An LSN to confirm, from acknowledgements received inside a callback.
    confirm_pending: Option<u64>,
    stats: StreamStats,
    last_catalog_write: Instant,
    /// Whether the mirror's last_error (of an earlier, failed decoder) was cleared after a publish.
    error_cleared: bool,
    /// When to look again whether the landing zone's reader has dropped the tables being reset.
    next_reset_check: Instant,
    /// The copier copying this pass's reseeded tables, while it runs.
    copier: Option<pgrx::bgworkers::DynamicBackgroundWorker>,
}

/// Entry point of the decoder worker. `arg` is the mirror's index in the shared registry.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn azure_cdc_decoder_main(arg: pg_sys::Datum) {
    IN_DECODER.store(true, Ordering::Relaxed);
    let Some((index, entry)) = worker::start(arg, "is not decoded") else { return };
    let mirror_id = entry.mirror_id;
    let result = worker::catching(|| run(index, mirror_id));
    // The process ends now: a batch still being published is abandoned (never acknowledged, so
    // decoded again by the next decoder) rather than waited for.
    azure_cdc_core::cloud::mark_process_exiting();
    DECODER.with(|d| d.borrow_mut().take());
    shmem::set_stream_stats(index, StreamStats::default());
    shmem::set_worker_pid(index, 0);
    if let Err(e) = result {
        worker::exit_after_failure(mirror_id, "decoder", &e);
    }
}

/// Reads the mirror and its replicating tables (own transaction). None: the mirror is not running.
fn load(mirror_id: i64) -> Result<Option<Loaded>> {
    BackgroundWorker::transaction(|| {
        let Some(m) = catalog::mirror_by_id(mirror_id)? else { return Ok(None) };
        if MirrorState::parse(&m.state)? != MirrorState::Running {
            return Ok(None);
        }
        // The owner's rights bound the mirror: checked again at every start.
        privileges::owner_standing(m.owner)?;
        privileges::check_local_target(&TargetUrl::parse(&m.target)?, m.owner, Who::Owner)?;
        let wal_status = catalog::read(|| {
            Spi::get_one_with_args::<String>(
                "SELECT (SELECT COALESCE(wal_status, 'unknown') FROM pg_catalog.pg_replication_slots WHERE slot_name = $1)",
                &[m.slot_name.as_str().into()],
            )
            .map_err(crate::errors::spi)
        })?;
        if let Some(lost) = match wal_status.as_deref() {
            Some("lost") => Some("was invalidated: WAL it had not read was removed (max_slot_wal_keep_size)"),
            None => Some("is missing"),
            Some(_) => None,
        } {
            return Ok(Some(Loaded::SlotLost(m, lost)));
        }
        let mut tables = HashMap::new();
        let mut known = HashSet::new();
        for t in catalog::tables(mirror_id)? {
            known.insert(t.relid.to_u32());
            let state = TableState::parse(&t.state)?;
            if !matches!(state, TableState::Replicating | TableState::Reseeding) {
                continue;
            }
            if catalog::relation_by_oid(t.relid)?.is_none() {
                mark_dropped(mirror_id, &t)?;
                continue;
            }
            let mut table = open_table(&t, state == TableState::Reseeding)?;
            // A table the owner may no longer mirror is parked (its later changes are not published).
            if let Some(e) = privileges::table_refusal_error(m.owner, t.relid, &t.schema, &t.table, Who::Owner)? {
                table.reseeding = false;
                table.parked = Some(e);
                table.park_recorded = false;
            }
            tables.insert(t.relid.to_u32(), table);
        }
        // SAFETY: drop catalog entries this transaction built from the current catalog, so that
        // decoding builds its own from the historic snapshots.
        unsafe { reset_caches() };
        Ok(Some(Loaded::Ready(m, tables, known)))
    })
}

/// Records a table whose source was dropped: state Dropped, its files kept (in a transaction).
fn mark_dropped(mirror_id: i64, t: &catalog::TableRow) -> Result<()> {
    TableState::parse(&t.state)?.on(TableEvent::Dropped)?;
    pgrx::log!("azure_cdc: table \"{}.{}\" was dropped; its files are kept", t.schema, t.table);
    catalog::table_dropped(mirror_id, t.relid, (&t.schema, &t.table))
}

/// What [`load`] found.
enum Loaded {
    Ready(catalog::MirrorRow, HashMap<u32, Table>, HashSet<u32>),
    /// The slot is gone or invalidated (why): the changes it held are lost.
    SlotLost(catalog::MirrorRow, &'static str),
}

/// After the slot was lost: creates it again and reseeds every table that was replicating (own
/// transactions). The changes the old slot held are gone, so no table's files can be trusted to be
/// complete; each is copied again while the new slot streams (see azure_cdc_core::reseed).
fn recover_lost_slot(m: &catalog::MirrorRow, why: &str) -> Result<()> {
    pgrx::warning!(
        "azure_cdc: mirror \"{}\": replication slot \"{}\" {why}; creating it again and reseeding",
        m.name,
        m.slot_name
    );
    BackgroundWorker::transaction(|| crate::slot::drop_mirror_slot(&m.name, &m.slot_name))?;
    // SAFETY: a fresh transaction that has read nothing, as create_with_snapshot requires; the
    // snapshot it adopts is not used (the reseed takes its own); the commit persists nothing else.
    let lsn = unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        let lsn = crate::slot::create_with_snapshot(&m.slot_name)?;
        pg_sys::CommitTransactionCommand();
        lsn
    };
    crate::slot::release();
    BackgroundWorker::transaction(|| {
        catalog::slot_recreated(m.id, &m.slot_name, why, &crate::slot::lsn_text(lsn), Reason::SlotLost.as_str())
            .map(|_| ())
    })
}

/// The decoder's view of one table, from its catalog row (in a transaction).
fn open_table(t: &catalog::TableRow, reseeding: bool) -> Result<Table> {
    // SAFETY: try_relation_open returns NULL when the table is gone; the converter only reads the
    // descriptor of the open relation, which is closed right after.
    let (specs, now, parked) = unsafe {
        let rel = pg_sys::try_relation_open(t.relid, pg_sys::AccessShareLock as i32);
        if rel.is_null() {
            (Vec::new(), Vec::new(), Some(Error::new(ErrorKind::FeatureNotSupported, "the table no longer exists")))
        } else {
            let conv = TupleConverter::new(rel);
            pg_sys::relation_close(rel, pg_sys::AccessShareLock as i32);
            match conv {
                Ok(conv) => (conv.specs().to_vec(), conv.columns(), None),
                // A table that cannot be converted (say, a cast to json azure_cdc does not run) is
                // parked; the mirror's other tables go on.
                Err(e) if e.kind.disposition() == Disposition::ParkTable => (Vec::new(), Vec::new(), Some(e)),
                Err(e) => return Err(e),
            }
        }
    };
    // The files' columns as recorded; a table copied by an earlier build has none recorded: its
    // columns now stand in for them.
    let shipped = match &t.columns {
        Some(text) => columns::from_text(text)?,
        None => now,
    };
    let builder = BatchBuilder::new(&change_columns(&specs))?;
    Ok(Table {
        schema: t.schema.clone(),
        name: t.table.clone(),
        folder: names::table_folder(&t.schema, &t.table),
        keys: t.key_columns.clone(),
        specs,
        plans: HashMap::new(),
        partitions: t.partitions.clone(),
        shipped,
        columns_unrecorded: Vec::new(),
        builder,
        done: Vec::new(),
        last_in_batch: None,
        rows_in_batch: 0,
        txn_runs: Vec::new(),
        published: None,
        next_number: 1,
        parked: if reseeding { None } else { parked },
        park_recorded: false,
        reseeding,
        recorded_next: t.next_file_number.max(1) as u64,
        deleted_ago: t.folder_deleted_ago,
        reset: None,
        seed: t.seed_snapshot.as_deref().map(reseed::parse_snapshot).transpose()?,
        unrecorded: Counters::default(),
    })
}

/// What the reseed step asks of the pass loop.
enum Reseed {
    Nothing,
    /// The tables are ready to be copied.
    Copy(PendingCopy),
    /// The copier has copied and recorded them.
    Copied,
}

/// Ends a copier left running (by an earlier pass or decoder process) and forgets its job, so that
/// at most one copier of a mirror runs, and only with the job of the pass that started it.
fn end_copier(index: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let e = shmem::entry(index);
        let pid = e.helper_pids[shmem::COPIER_SLOT];
        if !shmem::worker_alive(pid, e.database) {
            shmem::clear_copy_job(index);
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::new(
                ErrorKind::ObjectInUse,
                format!("the copier (pid {pid}) of an earlier pass did not exit"),
            ));
        }
        if e.copy.state == shmem::CopyState::Running {
            shmem::terminate_worker(pid, e.database);
        }
        std::thread::sleep(Duration::from_millis(20));
        pg_sys::check_for_interrupts!();
        worker::exit_if_postmaster_died();
    }
}

/// The copy step of a reseed, made between two passes.
struct PendingCopy {
    /// The mirror's owner: a table it may no longer mirror is parked instead of copied.
    owner: pg_sys::Oid,
    tables: Vec<crate::reseed::ToCopy>,
    /// Transactions running when the hold began: the copy's snapshot must see them all.
    must_see: Vec<u64>,
    target: Arc<Target>,
}

/// What the decoder does after one pass over the slot.
enum Next {
    /// Stop: the mirror should not run (or the worker was told to stop).
    Exit,
    /// Reopen the slot at its confirmed position and decode again (after a reseed's copy).
    Rewind,
}

fn run(index: usize, mirror_id: i64) -> Result<()> {
    // SAFETY: once per process, on the main thread, before decoding starts.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(relcache_changed), pg_sys::Datum::from(0usize));
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::CASTSOURCETARGET as i32,
            Some(casts_changed),
            pg_sys::Datum::from(0usize),
        );
    }
    // SAFETY: a memory context under TopMemoryContext, alive as long as the process.
    let change_cxt = unsafe {
        pg_sys::AllocSetContextCreateInternal(
            pg_sys::TopMemoryContext,
            c"azure_cdc change".as_ptr(),
            0,
            8 * 1024,
            8 * 1024 * 1024,
        )
    };
    loop {
        match decode(index, mirror_id, change_cxt)? {
            Next::Exit => return Ok(()),
            Next::Rewind => {
                pgrx::log!("azure_cdc: mirror {mirror_id}: decoding again from the slot's confirmed position")
            }
        }
    }
}

/// Ends one pass: the decoder state (and its shipper thread) goes, the slot is released.
///
/// # Safety
/// `ctx` is the live decoding context of this process, not used afterwards; main thread, outside
/// any transaction.
unsafe fn close_pass(ctx: *mut pg_sys::LogicalDecodingContext) {
    let dec = DECODER.with(|d| d.borrow_mut().take());
    // Its plans' memory contexts go with it.
    drop(dec);
    // SAFETY: as required above: the context goes first, then the slot it decodes.
    unsafe { pg_sys::FreeDecodingContext(ctx) };
    crate::slot::release();
}

/// One pass over the slot, from its confirmed position.
fn decode(index: usize, mirror_id: i64, change_cxt: pg_sys::MemoryContext) -> Result<Next> {
    // Read before the catalog: a table changed (resync_table, add_tables) after this is seen by
    // load() or by the next generation check; read after load(), a change made in between would be
    // neither.
    let generation = shmem::entry(index).tables_generation;
    end_copier(index)?;
    let (mirror, mut tables, known) = match load(mirror_id)? {
        None => {
            pgrx::log!("azure_cdc: mirror {mirror_id} is not running; decoder exits");
            return Ok(Next::Exit);
        }
        Some(Loaded::SlotLost(m, why)) => {
            recover_lost_slot(&m, why)?;
            return Ok(Next::Rewind);
        }
        Some(Loaded::Ready(m, t, k)) => (m, t, k),
    };
    let url = TargetUrl::parse(&mirror.target)?;
    let target = Arc::new(BackgroundWorker::transaction(|| {
        crate::credentials::open_target(&url, mirror.credential.as_deref(), crate::credentials::worker_settings())
    })?);
    for t in tables.values_mut() {
        let (next, published) = shipper::folder_state(&target, &t.folder)?;
        if next < t.recorded_next && !t.reseeding && t.parked.is_none() {
            // Files this mirror published are gone (the catalog's count lags the folder, never leads
            // it): numbering again from there would regress numbers the reader has seen.
            t.parked = Some(
                Error::new(
                    ErrorKind::TargetMissing,
                    format!(
                        "data files of table \"{}.{}\" are missing from the landing zone: the mirror published up to file {}, its folder holds up to file {}",
                        t.schema,
                        t.name,
                        t.recorded_next - 1,
                        next - 1
                    ),
                )
                .with_hint("Something other than the mirror deleted them. resync_table publishes the table again in full."),
            );
            t.park_recorded = false;
        }
        t.next_number = next;
        t.published = published;
    }
    // SAFETY: lowers this thread's own priority (Linux: per thread); the shipper thread started next
    // inherits it. Raising one's own nice value needs no privilege; a failure changes nothing.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICE) };
    let shipper = Shipper::start(target.clone(), SHIP_QUEUE)?;
    // SAFETY: main thread, no transaction open (load committed), no slot acquired yet.
    let ctx = unsafe { crate::slot::open_decoding(&mirror.slot_name)? };
    // SAFETY: the slot is acquired by this process (open_decoding).
    let confirmed = unsafe { crate::slot::confirmed_flush() };
    pgrx::log!(
        "azure_cdc: mirror \"{}\": decoding slot {} from {} ({} tables)",
        mirror.name,
        mirror.slot_name,
        crate::slot::lsn_text(confirmed),
        tables.len()
    );
    DECODER.with(|d| {
        *d.borrow_mut() = Some(Decoder {
            index,
            mirror_id,
            owner: mirror.owner,
            tables,
            hold: None,
            requests: Vec::new(),
            all_tables: mirror.all_tables,
            known,
            routes: HashMap::new(),
            vanished: Vec::new(),
            generation,
            shipper,
            target: target.clone(),
            inflight: InFlight::new(confirmed),
            inflight_info: VecDeque::new(),
            first_change: None,
            first_commit_time: 0,
            buffered: 0,
            commit_lsn: 0,
            xid: 0,
            commit_time: 0,
            ordinal: 0,
            change_cxt,
            confirm_pending: None,
            stats: StreamStats { confirmed_lsn: confirmed, ..Default::default() },
            last_catalog_write: Instant::now(),
            error_cleared: false,
            next_reset_check: Instant::now(),
            copier: None,
        })
    });
    with_decoder(|d| {
        d.record_catalog(mirror_id, true)?;
        if d.tables.values().any(|t| t.reseeding) {
            // Reseeds left from an earlier pass or process: hold from here.
            d.begin_holds(ctx)?;
        }
        Ok(())
    })?;
    loop {
        pg_sys::check_for_interrupts!();
        worker::exit_if_postmaster_died();
        // SAFETY: reading a signal flag set by PostgreSQL's SIGHUP handler, on the main thread.
        if unsafe { pg_sys::ConfigReloadPending } != 0 {
            // SAFETY: as every process does after SIGHUP.
            unsafe {
                pg_sys::ConfigReloadPending = 0;
                pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
            }
        }
        let e = shmem::entry(index);
        if !e.in_use || e.mirror_id != mirror_id || e.desired != shmem::Desired::Run {
            return Ok(Next::Exit);
        }
        // SAFETY: GetFlushRecPtr reads shared WAL state; a null timeline pointer is allowed.
        let flushed = unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) };
        let started = Instant::now();
        let mut read_any = false;
        loop {
            // SAFETY: ctx is the live decoding context of this process.
            if unsafe { (*(*ctx).reader).EndRecPtr } >= flushed {
                break;
            }
            // SAFETY: main thread, outside any transaction, ctx from open_decoding.
            if !unsafe { crate::slot::decode_next(ctx)? } {
                break;
            }
            read_any = true;
            with_decoder(|d| d.after_record(ctx))?;
            if started.elapsed() >= CATALOG_EVERY {
                break;
            }
        }
        with_decoder(|d| d.after_record(ctx))?;
        // SAFETY: ctx is live; EndRecPtr is where decoding has read to.
        let read_upto = unsafe { (*(*ctx).reader).EndRecPtr };
        with_decoder(|d| {
            if d.first_change.is_none() {
                if let Some(lsn) = d.inflight.idle(read_upto) {
                    d.confirm(lsn);
                }
            }
            d.publish_stats();
            d.record_catalog(mirror_id, false)
        })?;
        with_decoder(|d| d.check_vanished(ctx))?;
        match with_decoder(|d| d.step_reseed(ctx, e.tables_generation))? {
            Reseed::Nothing => {}
            Reseed::Copied => {
                // The copier has recorded its tables: decode again from the hold.
                // SAFETY: ctx is this pass's context, not used after this.
                unsafe { close_pass(ctx) };
                return Ok(Next::Rewind);
            }
            Reseed::Copy(copy) => {
                // The copier copies while this decoder goes on with the other tables; when it cannot
                // be started (no free worker slot, a job too large for the registry), the decoder
                // copies itself, and the other tables wait.
                if !with_decoder(|d| d.start_copier(&copy))? {
                    // The slot is released before the copy: a process that decodes a slot is left
                    // out of the horizon other backends prune dead rows by, so its snapshot would not
                    // keep the row versions the copy must read.
                    // SAFETY: ctx is this pass's context, not used after this.
                    unsafe { close_pass(ctx) };
                    pgrx::log!("azure_cdc: mirror {mirror_id}: copying {} reseeded table(s)", copy.tables.len());
                    crate::reseed::copy_tables(
                        mirror_id,
                        copy.owner,
                        (index, 0),
                        &copy.target,
                        &copy.tables,
                        &copy.must_see,
                    )?;
                    return Ok(Next::Rewind);
                }
            }
        }
        if !read_any {
            let wait = with_decoder(|d| Ok(d.next_wakeup()))?;
            if !worker::wait(wait) {
                return Ok(Next::Exit);
            }
        }
    }
}

/// Runs `f` on the running decoder (main thread, outside callbacks' own borrows).
fn with_decoder<T>(f: impl FnOnce(&mut Decoder) -> Result<T>) -> Result<T> {
    DECODER.with(|d| match d.borrow_mut().as_mut() {
        Some(dec) => f(dec),
        None => Err(Error::new(ErrorKind::Internal, "the decoder is not initialised")),
    })
}

impl Decoder {
    /// Between records (no transaction being replayed): collect acknowledgements, close a batch that
    /// is due, confirm what is published.
    fn after_record(&mut self, ctx: *mut pg_sys::LogicalDecodingContext) -> Result<()> {
        if !self.requests.is_empty() {
            // Before anything is confirmed past the transaction that asked for a reseed.
            self.begin_holds(ctx)?;
        }
        self.collect_acks(Duration::ZERO)?;
        if batch_due(
            self.buffered,
            batch_bytes(),
            self.first_change,
            Instant::now(),
            crate::gucs::change_batch_timeout(),
        ) {
            // SAFETY: reading where decoding has read to; between records every decoded commit up to
            // there is in the batch.
            let upto = unsafe { (*(*ctx).reader).EndRecPtr };
            self.close_batch(upto)?;
        }
        if let Some(lsn) = self.confirm_pending.take() {
            self.confirm(lsn);
        }
        Ok(())
    }

    fn confirm(&mut self, lsn: u64) {
        // While a reseed holds, never past its hold point (see azure_cdc_core::reseed).
        let lsn = match &self.hold {
            Some(h) => h.cap(lsn),
            None => lsn,
        };
        // SAFETY: main thread, outside callbacks, the slot is acquired by this process.
        unsafe { crate::slot::confirm(lsn) };
        self.stats.confirmed_lsn = lsn;
    }

    /// How long to sleep when all WAL is read: the poll interval, or less if a batch falls due sooner.
    fn next_wakeup(&self) -> Duration {
        match self.first_change {
            Some(t) => {
                crate::gucs::change_batch_timeout().saturating_sub(t.elapsed()).clamp(Duration::from_millis(1), POLL)
            }
            None => POLL,
        }
    }

    /// Takes acknowledgements from the shipper, waiting up to `wait` for the first one.
    fn collect_acks(&mut self, wait: Duration) -> Result<usize> {
        let mut n = 0;
        let mut w = wait;
        while let Some(ack) = self.shipper.recv(w)? {
            self.on_shipped(ack)?;
            n += 1;
            w = Duration::ZERO;
        }
        Ok(n)
    }

    fn on_shipped(&mut self, ack: Shipped) -> Result<()> {
        if let Some(lsn) = self.inflight.ack(ack.seq)? {
            self.confirm_pending = Some(lsn);
        }
        let (rows, _, _) = self.inflight_info.pop_front().unwrap_or_default();
        if self.stats.changes_shipped == 0 {
            // Publishing works again: a later failure starts its back-off afresh.
            shmem::REGISTRY.exclusive().entries[self.index].failures = 0;
        }
        self.stats.changes_shipped += rows;
        // SAFETY: reads the clock.
        self.stats.last_shipped_at = unsafe { pg_sys::GetCurrentTimestamp() };
        for (relid, f) in ack.files {
            self.stats.bytes_shipped += f.bytes;
            if let Some(t) = self.tables.get_mut(&relid) {
                count_file(t, &f);
            }
        }
        Ok(())
    }

    /// Closes the open batch and hands it to the shipper; `confirm_lsn` is how far the slot may be
    /// confirmed once it is published. Waits (for acknowledgements) while the shipper's queue is full.
    fn close_batch(&mut self, confirm_lsn: u64) -> Result<()> {
        if self.first_change.is_none() {
            return Ok(());
        }
        let mut tables = Vec::new();
        let mut rows = 0;
        for (relid, t) in self.tables.iter_mut() {
            if t.builder.rows() > 0 {
                t.done.push(t.builder.finish()?);
            }
            let Some(last) = t.last_in_batch.take() else {
                t.done.clear();
                continue;
            };
            rows += t.rows_in_batch;
            t.rows_in_batch = 0;
            let txns = std::mem::take(&mut t.txn_runs);
            tables.push(TableChanges {
                relid: *relid,
                folder: t.folder.clone(),
                schema: t.builder.schema(),
                batches: std::mem::take(&mut t.done),
                last,
                number: t.next_number,
                txns,
            });
            t.next_number += 1;
        }
        let bytes = self.buffered;
        let first_commit = self.first_commit_time;
        self.first_change = None;
        self.buffered = 0;
        if tables.is_empty() {
            return Ok(());
        }
        let seq = self.inflight.push(confirm_lsn);
        self.inflight_info.push_back((rows, first_commit, bytes));
        let mut batch = ShipBatch {
            seq,
            compression: crate::gucs::parquet_compression(),
            parallel: crate::gucs::max_parallel_uploads(),
            tables,
        };
        loop {
            match self.shipper.try_send(batch)? {
                None => return Ok(()),
                Some(back) => {
                    batch = back;
                    self.collect_acks(Duration::from_millis(50))?;
                    pg_sys::check_for_interrupts!();
                    worker::exit_if_postmaster_died();
                }
            }
        }
    }

    /// The live figures, for the status functions.
    fn publish_stats(&mut self) {
        let oldest = self
            .inflight_info
            .front()
            .map(|i| i.1)
            .or(if self.first_change.is_some() { Some(self.first_commit_time) } else { None })
            .unwrap_or(0);
        self.stats.oldest_unshipped_commit = oldest;
        self.stats.buffered_bytes = self.buffered as u64 + self.inflight_info.iter().map(|i| i.2 as u64).sum::<u64>();
        // SAFETY: reads the clock.
        let now_ms = unsafe { pg_sys::GetCurrentTimestamp() } / 1000;
        self.stats.rates.record(now_ms, self.stats.changes_shipped, self.stats.bytes_shipped);
        shmem::set_stream_stats(self.index, self.stats);
    }

    /// Writes the tables' counters and parked tables to the catalog (own transaction), at most once
    /// per CATALOG_EVERY unless `force`.
    fn record_catalog(&mut self, mirror_id: i64, force: bool) -> Result<()> {
        let parked = self.tables.values().any(|t| t.parked.is_some() && !t.park_recorded);
        let touched = self.tables.values().any(|t| t.unrecorded.touched);
        let columns = self.tables.values().any(|t| !t.columns_unrecorded.is_empty());
        if !(parked || force || columns || (touched && self.last_catalog_write.elapsed() >= CATALOG_EVERY)) {
            return Ok(());
        }
        self.last_catalog_write = Instant::now();
        let tables = &mut self.tables;
        // Publishing works: an error recorded by an earlier decoder is over.
        let clear_error = !self.error_cleared && self.stats.changes_shipped > 0;
        BackgroundWorker::transaction(std::panic::AssertUnwindSafe(|| -> Result<()> {
            // SAFETY: see load(): this transaction must neither use nor leave catalog entries built
            // under the historic snapshots of decoding.
            unsafe { reset_caches() };
            if clear_error {
                catalog::mirror_recovered(mirror_id)?;
            }
            for (relid, t) in tables.iter_mut() {
                let relid = pg_sys::Oid::from(*relid);
                if let (Some(e), false) = (&t.parked, t.park_recorded) {
                    TableState::Replicating.on(TableEvent::Failed)?;
                    catalog::table_failed(mirror_id, relid, (&t.schema, &t.name), &e.full_text())?;
                    t.park_recorded = true;
                }
                if !t.columns_unrecorded.is_empty() {
                    let what = std::mem::take(&mut t.columns_unrecorded);
                    catalog::table_columns_followed(
                        mirror_id,
                        relid,
                        (&t.schema, &t.name),
                        &columns::to_text(&t.shipped),
                        &what,
                    )?;
                }
                if t.unrecorded.touched {
                    let c = t.unrecorded;
                    catalog::add_table_counters(mirror_id, relid, c.rows, c.files, c.bytes, c.next_number)?;
                    t.unrecorded = Counters::default();
                }
            }
            // SAFETY: as above.
            unsafe { reset_caches() };
            Ok(())
        }))?;
        self.error_cleared |= clear_error;
        Ok(())
    }

    /// Parks a table: its changes not yet handed to the shipper and all later ones are dropped; the
    /// catalog shows it Failed with the error. (Its folder keeps what was published.)
    /// Records the reseeds the stream asked for, marks every table the catalog says is Reseeding,
    /// and, if one is and no reseed holds yet, starts holding at the current position (between
    /// records) and notes the transactions running now (own transaction).
    fn begin_holds(&mut self, ctx: *mut pg_sys::LogicalDecodingContext) -> Result<()> {
        let requests = std::mem::take(&mut self.requests);
        let mirror_id = self.mirror_id;
        let owner = self.owner;
        let (reseeding, running) = BackgroundWorker::transaction(std::panic::AssertUnwindSafe(|| {
            // SAFETY: see load(): catalog entries built under decoding's historic snapshots must not
            // be used here, nor the ones built here by decoding.
            unsafe { reset_caches() };
            let r = (|| -> Result<(Vec<catalog::TableRow>, String)> {
                for (relid, reason) in &requests {
                    let oid = pg_sys::Oid::from(*relid);
                    if *reason == Reason::NewTable {
                        if let Some(rel) = catalog::relation_by_oid(oid)?.filter(catalog::joins_all_tables) {
                            // A mirror of all tables takes only tables its owner may mirror.
                            if let Some(why) = privileges::table_refusal(owner, oid)? {
                                pgrx::log!(
                                    "azure_cdc: new table \"{}.{}\" is not mirrored: {why}",
                                    rel.schema,
                                    rel.table
                                );
                                catalog::table_skipped(
                                    mirror_id,
                                    (&rel.schema, &rel.table),
                                    &format!("a new table the mirror's owner may not mirror: {why}"),
                                )?;
                                continue;
                            }
                            let keys = catalog::key_columns(oid)?;
                            catalog::tables_added(mirror_id, &[(rel, keys)], reason.as_str())?;
                        }
                        continue;
                    }
                    catalog::reseed_requested(
                        mirror_id,
                        oid,
                        reason.as_str(),
                        &[TableState::Replicating, TableState::Reseeding],
                    )?;
                }
                let tables = catalog::tables(mirror_id)?;
                let running = catalog::read(|| {
                    Spi::get_one::<String>("SELECT pg_catalog.pg_current_snapshot()::text").map_err(crate::errors::spi)
                })?
                .unwrap_or_default();
                Ok((tables, running))
            })();
            // SAFETY: as above.
            unsafe { reset_caches() };
            r
        }))?;
        // Tables the catalog no longer follows (removed by remove_tables, or Failed / Dropped as
        // recorded) leave the decoder; their files stay as they are.
        let following: HashSet<u32> = reseeding
            .iter()
            .filter(|t| t.state == TableState::Replicating.as_str() || t.state == TableState::Reseeding.as_str())
            .map(|t| t.relid.to_u32())
            .collect();
        self.known.extend(reseeding.iter().map(|t| t.relid.to_u32()));
        for (relid, t) in self.tables.iter_mut() {
            if !following.contains(relid) && t.parked.is_none() {
                // Its rows already in the open batch are still published; later changes are not.
                t.parked = Some(Error::new(ErrorKind::FeatureNotSupported, "the table left the mirror"));
                t.park_recorded = true;
            }
        }
        let mut any = false;
        for row in reseeding.into_iter().filter(|t| t.state == TableState::Reseeding.as_str()) {
            any = true;
            let relid = row.relid.to_u32();
            match self.tables.get_mut(&relid) {
                Some(t) => {
                    if !t.reseeding {
                        pgrx::log!(
                            "azure_cdc: table \"{}.{}\" is reseeded; its changes wait for its copy",
                            t.schema,
                            t.name
                        );
                    }
                    if !t.reseeding {
                        t.reset = None;
                    }
                    t.reseeding = true;
                    t.parked = None;
                }
                None => {
                    let t = BackgroundWorker::transaction(|| open_table(&row, true))?;
                    self.tables.insert(relid, t);
                }
            }
        }
        if any && self.hold.is_none() {
            let waiting: Vec<u64> = reseed::parse_snapshot(&running)?.running.into_iter().collect();
            // SAFETY: between records: every decoded commit is before EndRecPtr. Before the first
            // record EndRecPtr is where reading starts, behind the slot's confirmed position, which
            // the hold must not take back: what was confirmed is published, and decoding never
            // delivers a transaction committed before it again.
            let hold_lsn = unsafe { (*(*ctx).reader).EndRecPtr.max(crate::slot::confirmed_flush()) };
            pgrx::log!("azure_cdc: mirror {mirror_id}: reseed holds the slot at {}", crate::slot::lsn_text(hold_lsn));
            self.hold = Some(Hold { hold_lsn, running_at_hold: waiting.clone(), waiting });
        }
        Ok(())
    }

    /// Between passes of the main loop: acts on a change of the tables' generation (resync_table),
    /// and once every transaction a hold waits for has ended, readies the copy of the reseeded
    /// tables. Returns the copy to make once this pass has ended (then the decoder rewinds).
    fn step_reseed(&mut self, ctx: *mut pg_sys::LogicalDecodingContext, generation: u32) -> Result<Reseed> {
        if generation != self.generation {
            self.generation = generation;
            self.begin_holds(ctx)?;
        }
        if self.copier.is_some() {
            return self.poll_copier();
        }
        let Some(waiting) = self.hold.as_ref().map(|h| h.waiting.clone()) else { return Ok(Reseed::Nothing) };
        if !waiting.is_empty() {
            let still = BackgroundWorker::transaction(|| still_running(&waiting));
            let done = still.is_empty();
            if let Some(h) = self.hold.as_mut() {
                h.waiting = still;
            }
            if !done {
                return Ok(Reseed::Nothing);
            }
        }
        if !self.reset_folders(ctx)? {
            return Ok(Reseed::Nothing);
        }
        self.ready_copy(ctx).map(Reseed::Copy)
    }

    /// Starts the mirror's copier with `copy` as its job. False when it cannot run it (the decoder
    /// then copies itself).
    fn start_copier(&mut self, copy: &PendingCopy) -> Result<bool> {
        let relids: Vec<u32> = copy.tables.iter().map(|t| t.relid).collect();
        if !shmem::set_copy_job(self.index, &relids, &copy.must_see) {
            return Ok(false);
        }
        let e = shmem::entry(self.index);
        let name =
            names::worker_name(names::WorkerKind::Copier, &e.database.to_string(), Some(&e.mirror_id.to_string()));
        let started = pgrx::bgworkers::BackgroundWorkerBuilder::new(&name)
            .set_type(names::WorkerKind::Copier.backend_type())
            .set_library("azure_cdc")
            .set_function("azure_cdc_copier_main")
            .enable_spi_access()
            .set_argument(Some(pg_sys::Datum::from(self.index)))
            // SAFETY: MyProcPid is set at process start.
            .set_notify_pid(unsafe { pg_sys::MyProcPid })
            .load_dynamic();
        match started {
            Ok(w) => {
                pgrx::log!(
                    "azure_cdc: mirror {}: the copier copies {} reseeded table(s); the other tables go on",
                    self.mirror_id,
                    relids.len()
                );
                self.copier = Some(w);
                Ok(true)
            }
            Err(_) => {
                shmem::clear_copy_job(self.index);
                pgrx::log!(
                    "azure_cdc: mirror {}: no free background worker slot for the copier; the decoder copies",
                    self.mirror_id
                );
                Ok(false)
            }
        }
    }

    /// Whether the copier has finished: its tables are recorded (decode again from the hold), or it
    /// failed (this decoder's attempt fails with its error, and the tables are copied again by the
    /// next one).
    fn poll_copier(&mut self) -> Result<Reseed> {
        let (state, _, _) = shmem::copy_job(self.index);
        let stopped = self
            .copier
            .as_ref()
            .is_some_and(|w| matches!(w.pid(), Err(pgrx::bgworkers::BackgroundWorkerStatus::Stopped)));
        match state {
            shmem::CopyState::Done => {
                self.copier = None;
                Ok(Reseed::Copied)
            }
            shmem::CopyState::Failed => {
                self.copier = None;
                Err(shmem::copy_failure(self.index)
                    .unwrap_or_else(|| Error::new(ErrorKind::Internal, "the copier failed")))
            }
            _ if stopped => {
                self.copier = None;
                Err(Error::new(
                    ErrorKind::Internal,
                    "the copier exited before it finished its copy; see the server log",
                ))
            }
            _ => Ok(Reseed::Nothing),
        }
    }

    /// Resets the reseeded tables (their folders deleted, in this pass, once everything handed to
    /// the shipper is published) and tells whether the landing zone's reader has dropped them all,
    /// so that the copy may create their folders again ([`ResetWait`]). Looks at most every 2 s; a
    /// table not known dropped `azure_cdc.table_reset_timeout` after its folder was deleted is parked
    /// (and a hold with no reseeded table left ends).
    fn reset_folders(&mut self, ctx: *mut pg_sys::LogicalDecodingContext) -> Result<bool> {
        let pending: Vec<(u32, String)> = self
            .tables
            .iter()
            .filter(|(_, t)| t.reseeding && t.reset.is_none())
            .map(|(relid, t)| (*relid, t.folder.clone()))
            .collect();
        if !pending.is_empty() {
            self.drain(ctx)?;
            let deleted = crate::reseed::delete_folders(self.mirror_id, &self.target, &pending)?;
            let now = Instant::now();
            for (relid, _) in &pending {
                if let Some(t) = self.tables.get_mut(relid) {
                    // Timed from the latest deletion: this one, or an earlier attempt's whose copy
                    // was not published (its folder then held files the reader may have read).
                    let since = if deleted.contains(relid) {
                        now
                    } else {
                        let ago = Duration::from_secs_f64(t.deleted_ago.unwrap_or(0.0).max(0.0));
                        now.checked_sub(ago).unwrap_or(now)
                    };
                    let existed = deleted.contains(relid) || t.deleted_ago.is_some();
                    t.reset = Some((since, ResetWait { existed, seen_held: false }));
                }
            }
            self.next_reset_check = now;
        }
        if Instant::now() < self.next_reset_check {
            return Ok(false);
        }
        self.next_reset_check = Instant::now() + Duration::from_secs(2);
        let settle = crate::reseed::reset_settle();
        let timeout = crate::gucs::table_reset_timeout();
        let mut waiting = Vec::new();
        let relids: Vec<u32> = self.tables.iter().filter(|(_, t)| t.reseeding).map(|(r, _)| *r).collect();
        for relid in relids {
            let Some(t) = self.tables.get(&relid) else { continue };
            let held = self.target.table_downstream(&t.folder)?;
            let Some(t) = self.tables.get_mut(&relid) else { continue };
            let Some((since, wait)) = t.reset.as_mut() else { continue };
            let waited = since.elapsed();
            if !wait.done(held, waited, settle) {
                waiting.push((relid, waited));
            }
        }
        if waiting.is_empty() {
            return Ok(true);
        }
        for (relid, waited) in waiting.into_iter().filter(|(_, w)| *w >= timeout) {
            let folder = self.tables.get(&relid).map(|t| t.folder.clone()).unwrap_or_default();
            self.park(relid, crate::reseed::not_dropped_error(&folder, waited));
            if let Some(t) = self.tables.get_mut(&relid) {
                t.reseeding = false;
                t.reset = None;
                t.deleted_ago = None;
            }
        }
        if !self.tables.values().any(|t| t.reseeding) {
            // Nothing left to copy: the hold ends (the parked tables' changes are dropped).
            self.hold = None;
            self.record_catalog(self.mirror_id, true)?;
        }
        Ok(false)
    }

    /// Publishes everything handed to the shipper, confirms it and records the counters.
    fn drain(&mut self, ctx: *mut pg_sys::LogicalDecodingContext) -> Result<()> {
        // SAFETY: between records.
        let upto = unsafe { (*(*ctx).reader).EndRecPtr };
        self.close_batch(upto)?;
        while !self.inflight.is_empty() {
            self.collect_acks(Duration::from_millis(100))?;
            pg_sys::check_for_interrupts!();
            worker::exit_if_postmaster_died();
        }
        if let Some(lsn) = self.confirm_pending.take() {
            self.confirm(lsn);
        }
        self.record_catalog(self.mirror_id, true)
    }

    /// Before the copy: publish everything handed to the shipper (nothing may write into a folder
    /// being rebuilt), confirm it, record the counters. Returns what to copy.
    fn ready_copy(&mut self, ctx: *mut pg_sys::LogicalDecodingContext) -> Result<PendingCopy> {
        self.drain(ctx)?;
        let list: Vec<crate::reseed::ToCopy> = self
            .tables
            .iter()
            .filter(|(_, t)| t.reseeding)
            .map(|(relid, t)| crate::reseed::ToCopy {
                relid: *relid,
                schema: t.schema.clone(),
                table: t.name.clone(),
                keys: t.keys.clone(),
            })
            .collect();
        let must_see = self.hold.as_ref().map(|h| h.running_at_hold.clone()).unwrap_or_default();
        Ok(PendingCopy { owner: self.owner, tables: list, must_see, target: self.target.clone() })
    }

    /// After relcache invalidations, between records:
    /// - Notices mirrored tables that were dropped: an invalidated table the current catalog no
    ///   longer has is noted with the WAL insert position; once decoding has read past that position
    ///   (the DROP, and every change before it, is decoded) the table is marked Dropped.
    /// - Reseeds a partitioned table whose partition tree is no longer the one its files were copied
    ///   from: a partition attached, detached, created or dropped brings or takes rows that have no
    ///   change of their own in the stream. The tree is compared as it is now, which may be ahead of
    ///   decoding: a reseed then copies the table as of a snapshot that already has the change, and
    ///   the stream goes on from there (see azure_cdc_core::reseed).
    fn check_vanished(&mut self, ctx: *mut pg_sys::LogicalDecodingContext) -> Result<()> {
        let all = ALL_INVALIDATED.with(|a| a.replace(false));
        let mut candidates: Vec<u32> = INVALIDATED.with(|s| s.borrow_mut().drain().collect());
        let any = all || !candidates.is_empty();
        if all {
            candidates = self.tables.keys().copied().collect();
        }
        candidates.retain(|r| {
            self.tables.get(r).is_some_and(|t| t.parked.is_none()) && !self.vanished.iter().any(|v| v.0 == *r)
        });
        // Partitioned tables whose tree to compare (any invalidation may be of one of their
        // partitions, at any level).
        let roots: Vec<(u32, String)> = if any {
            self.tables
                .iter()
                .filter(|(_, t)| t.parked.is_none() && !t.reseeding)
                .filter_map(|(r, t)| t.partitions.clone().map(|p| (*r, p)))
                .collect()
        } else {
            Vec::new()
        };
        // SAFETY: between records; EndRecPtr is where decoding has read to.
        let read_upto = unsafe { (*(*ctx).reader).EndRecPtr };
        let due: Vec<u32> = self.vanished.iter().filter(|v| read_upto >= v.1).map(|v| v.0).collect();
        if candidates.is_empty() && due.is_empty() && roots.is_empty() {
            return Ok(());
        }
        let mirror_id = self.mirror_id;
        let owner = self.owner;
        let mut gone = Vec::new();
        let mut dropped = Vec::new();
        let mut regrown = Vec::new();
        let mut refused = Vec::new();
        BackgroundWorker::transaction(std::panic::AssertUnwindSafe(|| -> Result<()> {
            // SAFETY: see load().
            unsafe { reset_caches() };
            for relid in &candidates {
                let oid = pg_sys::Oid::from(*relid);
                match catalog::relation_by_oid(oid)? {
                    // SAFETY: reads the shared WAL insert position.
                    None => gone.push((*relid, unsafe { pg_sys::GetXLogInsertRecPtr() })),
                    // A table whose owner or row-level security changed: the mirror's owner may no
                    // longer be allowed to mirror it.
                    Some(rel) => {
                        if let Some(e) =
                            privileges::table_refusal_error(owner, oid, &rel.schema, &rel.table, Who::Owner)?
                        {
                            refused.push((*relid, e));
                        }
                    }
                }
            }
            for (relid, copied) in &roots {
                let oid = pg_sys::Oid::from(*relid);
                if catalog::relation_by_oid(oid)?.is_some() && catalog::partition_tree(oid)?.signature != *copied {
                    regrown.push(*relid);
                }
            }
            for row in catalog::tables(mirror_id)?.iter().filter(|t| due.contains(&t.relid.to_u32())) {
                mark_dropped(mirror_id, row)?;
                dropped.push(row.relid.to_u32());
            }
            // SAFETY: see load().
            unsafe { reset_caches() };
            Ok(())
        }))?;
        // This transaction read the current catalog: the invalidations its own cache reset raised
        // (and any that came before) are accounted for.
        ALL_INVALIDATED.with(|a| a.set(false));
        self.vanished.extend(gone);
        self.vanished.retain(|v| !due.contains(&v.0));
        for relid in regrown {
            self.request_reseed(relid, Reason::PartitionsChanged);
        }
        for (relid, e) in refused {
            self.park(relid, e);
        }
        if !self.requests.is_empty() {
            self.begin_holds(ctx)?;
        }
        for relid in dropped {
            if let Some(t) = self.tables.get_mut(&relid) {
                t.parked = Some(Error::new(ErrorKind::FeatureNotSupported, "the table was dropped"));
                t.park_recorded = true;
            }
        }
        Ok(())
    }

    /// Asks for a reseed of `relid` from inside a change callback: its changes are dropped from now
    /// on; the hold begins right after the transaction being replayed.
    fn request_reseed(&mut self, relid: u32, reason: Reason) {
        if let Some(t) = self.tables.get_mut(&relid) {
            if !t.reseeding {
                pgrx::log!("azure_cdc: table \"{}.{}\" is reseeded: {}", t.schema, t.name, reason.as_str());
                t.reseeding = true;
                self.requests.push((relid, reason));
            }
        }
    }

    fn park(&mut self, relid: u32, e: Error) {
        if let Some(t) = self.tables.get_mut(&relid) {
            if t.parked.is_none() {
                pgrx::warning!("azure_cdc: table \"{}.{}\" parked: {}", t.schema, t.name, e.full_text());
                t.parked = Some(e);
                t.park_recorded = false;
                t.builder.abandon();
                t.done.clear();
                t.last_in_batch = None;
                t.rows_in_batch = 0;
                t.txn_runs.clear();
            }
        }
    }

    /// One decoded INSERT / UPDATE / DELETE (inside the replay of a committed transaction).
    ///
    /// # Safety
    /// Called from the change callback with its arguments.
    unsafe fn on_change(&mut self, rel: pg_sys::Relation, change: *mut pg_sys::ReorderBufferChange) -> Result<()> {
        self.ordinal += 1;
        // SAFETY: rel is the open relation of the change.
        let relid = unsafe { (*rel).rd_id.to_u32() };
        self.drop_stale_plans(relid);
        let pos = Position { commit_lsn: self.commit_lsn, ordinal: self.ordinal };
        // SAFETY: as above; decoding's historic snapshot is set for catalog look-ups.
        let ancestors = unsafe { self.route(rel, relid) };
        if self.all_tables {
            // The table a mirror of all tables would follow: a partition's topmost partitioned table.
            let top = ancestors.last().copied().unwrap_or(relid);
            if !self.known.contains(&top) {
                // A table this mirror of all tables has never seen: created after the mirror started.
                // Whether it qualifies is decided with the current catalog when the reseed is recorded.
                self.known.insert(top);
                self.requests.push((top, Reason::NewTable));
                return Ok(());
            }
        }
        // The change belongs to the relation itself if it is mirrored, and to each mirrored
        // partitioned table it is a partition of.
        let owners: Vec<u32> =
            std::iter::once(relid).chain(ancestors).filter(|r| self.tables.contains_key(r)).collect();
        for owner in owners {
            // SAFETY: the callback's own arguments.
            unsafe { self.change_of(owner, rel, relid, change, pos)? };
        }
        Ok(())
    }

    /// After a relcache invalidation of `relid` (or of all relations): the conversion plans and
    /// partition routes built from its old descriptor go.
    fn drop_stale_plans(&mut self, relid: u32) {
        if ALL_STALE.with(|a| a.replace(false)) {
            STALE.with(|s| s.borrow_mut().clear());
            self.routes.clear();
            for t in self.tables.values_mut() {
                t.plans.clear();
            }
        } else if STALE.with(|s| s.borrow_mut().remove(&relid)) {
            self.routes.remove(&relid);
            for t in self.tables.values_mut() {
                t.plans.remove(&relid);
            }
        }
    }

    /// The partitioned tables `rel` is a partition of, nearest first (none if it is not a partition),
    /// as of this point of the stream.
    ///
    /// # Safety
    /// `rel` is the open relation of a change being replayed (historic snapshot set); main thread.
    unsafe fn route(&mut self, rel: pg_sys::Relation, relid: u32) -> Vec<u32> {
        // SAFETY: as required above: rd_rel is the relation's pg_class row; get_partition_ancestors
        // reads pg_inherits in decoding's historic snapshot and returns a list of OIDs, freed here.
        unsafe {
            if !(*(*rel).rd_rel).relispartition {
                return Vec::new();
            }
            if let Some(r) = self.routes.get(&relid) {
                return r.clone();
            }
            let list = pg_sys::ffi::pg_guard_ffi_boundary(|| get_partition_ancestors(pg_sys::Oid::from(relid)));
            let mut ancestors = Vec::new();
            if !list.is_null() {
                for i in 0..(*list).length as usize {
                    ancestors.push((*(*list).elements.add(i)).oid_value.to_u32());
                }
                pg_sys::list_free(list);
            }
            self.routes.insert(relid, ancestors.clone());
            ancestors
        }
    }

    /// One decoded change of relation `relid` (`rel`), for mirrored table `owner`: the relation
    /// itself or a partitioned table it is a partition of.
    ///
    /// # Safety
    /// Called from the change callback with its arguments.
    unsafe fn change_of(
        &mut self,
        owner: u32,
        rel: pg_sys::Relation,
        relid: u32,
        change: *mut pg_sys::ReorderBufferChange,
        pos: Position,
    ) -> Result<()> {
        let mirror_owner = self.owner;
        let Some(t) = self.tables.get_mut(&owner) else { return Ok(()) };
        if t.parked.is_some()
            || t.reseeding
            || reseed::in_copy(t.seed.as_ref(), self.xid)
            || already_shipped(t.published, pos)
        {
            return Ok(());
        }
        // The partitioned table itself was invalidated (its owner changed, say): its partitions'
        // plans are rebuilt, and checked again, like its own would be.
        if owner != relid && STALE.with(|s| s.borrow_mut().remove(&owner)) {
            t.plans.clear();
        }
        // SAFETY: rel is the open relation of the change being replayed.
        match unsafe { ensure_plan(t, rel, relid, owner, mirror_owner) } {
            Ok(true) => {}
            Ok(false) => {
                self.request_reseed(owner, Reason::ColumnsChanged);
                return Ok(());
            }
            Err(e) if e.kind.disposition() == Disposition::ParkTable => {
                self.park(owner, e);
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        // Columns added or dropped (followed by ensure_plan): the open batch closes with the old
        // columns, and the table's later files carry the new ones.
        let changed =
            t.plans.get(&relid).map(|p| p.conv.specs()).filter(|s| *s != t.specs.as_slice()).map(<[_]>::to_vec);
        if let Some(specs) = changed {
            if t.rows_in_batch > 0 {
                self.close_batch(self.commit_lsn)?;
            }
            let Some(t) = self.tables.get_mut(&owner) else { return Ok(()) };
            t.builder = BatchBuilder::new(&change_columns(&specs))?;
            t.specs = specs;
        }
        let Some(t) = self.tables.get_mut(&owner) else { return Ok(()) };
        // SAFETY: the change's tuple data is valid during the callback; all memory this allocates goes
        // to change_cxt, reset below once the values are copied into Arrow builders.
        let r = unsafe {
            let old = pg_sys::MemoryContextSwitchTo(self.change_cxt);
            let r = append_change(t, rel, relid, change, pos);
            pg_sys::MemoryContextSwitchTo(old);
            pg_sys::MemoryContextReset(self.change_cxt);
            r
        };
        match r {
            Ok(0) => Ok(()),
            Ok(bytes) => {
                extend_runs(&mut t.txn_runs, self.xid, t.rows_in_batch);
                if self.first_change.is_none() {
                    self.first_change = Some(Instant::now());
                    self.first_commit_time = self.commit_time;
                }
                self.buffered += bytes;
                if self.buffered >= batch_bytes() {
                    // Mid-transaction: confirm no further than this transaction's commit record, so
                    // that the rest of it is decoded again after a restart.
                    self.close_batch(self.commit_lsn)?;
                }
                Ok(())
            }
            Err(e) if e.kind.disposition() == Disposition::ParkTable => {
                self.park(owner, e);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

unsafe extern "C-unwind" {
    /// catalog/partition.h (PostgreSQL 12 and later; not in pgrx's bindings): the partitioned tables
    /// a partition belongs to, nearest first, as a List of OIDs allocated in the current context.
    /// Called through pg_guard_ffi_boundary (it may raise an error).
    fn get_partition_ancestors(relid: pg_sys::Oid) -> *mut pg_sys::List;
}

/// The transactions of `xids` (full ids) that are still in progress: still in the server's
/// process array, so that a snapshot taken now would not see them (in a transaction).
fn still_running(xids: &[u64]) -> Vec<u64> {
    // SAFETY: GetLatestSnapshot sets RecentXmin, which TransactionIdIsInProgress relies on; both read
    // shared state under their own locks. A committed transaction stays "in progress" here until it
    // has left the process array, which is what a snapshot goes by.
    unsafe {
        pg_sys::GetLatestSnapshot();
        xids.iter()
            .copied()
            .filter(|x| pg_sys::TransactionIdIsInProgress(pg_sys::TransactionId::from(*x as u32)))
            .collect()
    }
}

fn count_file(t: &mut Table, f: &PublishedFile) {
    t.unrecorded.rows += f.rows as i64;
    t.unrecorded.files += 1;
    t.unrecorded.bytes += f.bytes as i64;
    t.unrecorded.next_number = t.unrecorded.next_number.max(f.number as i64 + 1);
    t.unrecorded.touched = true;
}

/// Makes sure `t` has a conversion plan for the changes of `rel` (the table itself or one of its
/// partitions) as it is at this point of the stream. Returns false when its columns (or key columns)
/// are no longer those of the table's files: the table must be reseeded.
///
/// # Safety
/// `rel` is the open relation of a change being replayed; main thread.
unsafe fn ensure_plan(
    t: &mut Table,
    rel: pg_sys::Relation,
    relid: u32,
    mirrored: u32,
    mirror_owner: pg_sys::Oid,
) -> Result<bool> {
    let own = relid == mirrored;
    if t.plans.contains_key(&relid) {
        return Ok(true);
    }
    pgrx::debug1!("azure_cdc: building the conversion plan of relation {relid}");
    // A plan is (re)built after every invalidation of the table: the mirror's owner must still be
    // allowed to mirror it as of this point of the stream (ALTER TABLE … OWNER TO, FORCE ROW LEVEL
    // SECURITY), or the table is parked before any later change of it is published.
    // SAFETY: rel is open; the look-ups read the historic catalog decoding has set up.
    unsafe {
        let table_owner = if own {
            (*(*rel).rd_rel).relowner
        } else {
            match crate::tuples::relation_owner(pg_sys::Oid::from(mirrored)) {
                Some(o) => o,
                None => {
                    return Err(Error::new(
                        ErrorKind::FeatureNotSupported,
                        "the partitioned table of this partition is not in the catalog at this point of the stream",
                    ))
                }
            }
        };
        let why = if !pg_sys::has_privs_of_role(mirror_owner, table_owner) {
            Some(format!(
                "{} does not own it (its owner is {})",
                privileges::role_name(mirror_owner),
                privileges::role_name(table_owner)
            ))
        } else if pg_sys::check_enable_rls(pg_sys::Oid::from(mirrored), mirror_owner, true)
            == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32
        {
            Some(format!("row-level security applies to {} on it", privileges::role_name(mirror_owner)))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(Error::new(
                ErrorKind::TablePrivilege,
                format!("the mirror's owner may no longer mirror this table: {why}"),
            ));
        }
    }
    // SAFETY: a long-lived context for the plan's FmgrInfo (functions may cache data in fn_mcxt),
    // owned by the Plan (deleted when it is dropped) or deleted here.
    unsafe {
        let cxt = pg_sys::AllocSetContextCreateInternal(
            pg_sys::TopMemoryContext,
            c"azure_cdc conversion plan".as_ptr(),
            0,
            1024,
            64 * 1024,
        );
        let old = pg_sys::MemoryContextSwitchTo(cxt);
        let conv = TupleConverter::new(rel);
        pg_sys::MemoryContextSwitchTo(old);
        let conv = match conv {
            Ok(c) => c,
            Err(e) => {
                pg_sys::MemoryContextDelete(cxt);
                return Err(e);
            }
        };
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let attrs = crate::versions::attributes(desc);
        let conv = if own {
            // The table's own descriptor: columns added or dropped are followed by the files where
            // the format can express it (see azure_cdc_core::columns).
            let now = conv.columns();
            let facts = |c: &Column| match attrs.get((c.attnum - 1) as usize) {
                Some(a) => NewColumnFacts {
                    has_missing_value: a.atthasmissing,
                    filled_existing_rows: a.atthasdef
                        || a.attidentity != 0
                        || a.attgenerated != 0
                        || pg_sys::getBaseType(a.atttypid) != a.atttypid,
                },
                None => NewColumnFacts { has_missing_value: true, filled_existing_rows: true },
            };
            match columns::evolve(&t.shipped, &now, &t.keys, facts) {
                Evolution::Same => conv,
                Evolution::Follow { dropped, added } => {
                    let what = format!("added: {}; dropped: {}", list_or_none(&added), list_or_none(&dropped));
                    pgrx::log!(
                        "azure_cdc: columns of \"{}.{}\" changed ({what}); later files follow",
                        t.schema,
                        t.name
                    );
                    t.shipped = now;
                    t.columns_unrecorded.push(what);
                    conv
                }
                Evolution::Reseed(why) => {
                    pg_sys::MemoryContextDelete(cxt);
                    pgrx::log!("azure_cdc: columns of \"{}.{}\" changed: {why}", t.schema, t.name);
                    return Ok(false);
                }
            }
        } else {
            // A partition: its columns in its partitioned table's order, or the table is reseeded.
            let now: Vec<String> = conv.specs().iter().map(|c| c.name.clone()).collect();
            // Its rows belong to the partitioned table: a type's cast runs as that table's owner
            // (as of this point of the stream), never as a partition's.
            let Some(cast_role) = crate::tuples::relation_owner(pg_sys::Oid::from(mirrored)) else {
                pg_sys::MemoryContextDelete(cxt);
                return Err(Error::new(
                    ErrorKind::FeatureNotSupported,
                    "the partitioned table of this partition is not in the catalog at this point of the stream",
                ));
            };
            let of = crate::tuples::RowsOf { cast_role, relid: mirrored, table: format!("{}.{}", t.schema, t.name) };
            match conv.belonging_to(&t.specs, &of) {
                Some(c) => c,
                None => {
                    pg_sys::MemoryContextDelete(cxt);
                    let was: Vec<&str> = t.specs.iter().map(|c| c.name.as_str()).collect();
                    pgrx::log!("azure_cdc: columns of \"{}.{}\" changed from {was:?} to {now:?}", t.schema, t.name);
                    return Ok(false);
                }
            }
        };
        let plan = Plan { conv, cxt, key_atts: Vec::new() };
        // A primary key other than the key columns of the files (changed, or added to a table keyed
        // otherwise) is a new key: the folder must be rebuilt with it.
        let pk = pg_sys::RelationGetIndexAttrBitmap(rel, pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_PRIMARY_KEY);
        let mut pk_names = Vec::new();
        let mut member = pg_sys::bms_next_member(pk, -1);
        while member >= 0 {
            let attno = member + pg_sys::FirstLowInvalidHeapAttributeNumber;
            if attno >= 1 && (attno as usize) <= natts {
                let a = &attrs[attno as usize - 1];
                pk_names.push(std::ffi::CStr::from_ptr(a.attname.data.as_ptr()).to_string_lossy().into_owned());
            }
            member = pg_sys::bms_next_member(pk, member);
        }
        if !pk.is_null() {
            pg_sys::bms_free(pk);
        }
        let mut keys_sorted = t.keys.clone();
        keys_sorted.sort();
        pk_names.sort();
        if !pk_names.is_empty() && pk_names != keys_sorted {
            pgrx::log!(
                "azure_cdc: primary key of \"{}.{}\" is now {pk_names:?}, files have {:?}",
                t.schema,
                t.name,
                t.keys
            );
            return Ok(false);
        }
        let mut key_atts = Vec::new();
        for k in &t.keys {
            let found = attrs.iter().enumerate().find(|(_, a)| {
                !a.attisdropped && std::ffi::CStr::from_ptr(a.attname.data.as_ptr()).to_bytes() == k.as_bytes()
            });
            match found {
                Some((i, a)) => key_atts.push((i, a.attlen, a.attbyval)),
                None => {
                    pgrx::log!("azure_cdc: key column \"{k}\" of \"{}.{}\" is gone", t.schema, t.name);
                    return Ok(false);
                }
            }
        }
        let mut plan = plan;
        plan.key_atts = key_atts;
        t.plans.insert(relid, plan);
    }
    Ok(true)
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// A deformed tuple image.
struct Image {
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
}

/// # Safety
/// `buf` is a tuple of the change being replayed, `desc` its relation's descriptor.
unsafe fn deform(buf: crate::versions::ChangeTuple, desc: pg_sys::TupleDesc) -> Option<Image> {
    if buf.is_null() {
        return None;
    }
    // SAFETY: as required above; heap_deform_tuple fills natts entries.
    unsafe {
        let natts = (*desc).natts as usize;
        let mut img = Image { values: vec![pg_sys::Datum::from(0usize); natts], nulls: vec![true; natts] };
        let tuple = crate::versions::change_heap_tuple(buf);
        pg_sys::heap_deform_tuple(tuple, desc, img.values.as_mut_ptr(), img.nulls.as_mut_ptr());
        Some(img)
    }
}

/// Appends the rows of one change to the table's builder. Returns the bytes added.
///
/// # Safety
/// Inside the change callback, with change_cxt current.
unsafe fn append_change(
    t: &mut Table,
    rel: pg_sys::Relation,
    relid: u32,
    change: *mut pg_sys::ReorderBufferChange,
    pos: Position,
) -> Result<usize> {
    use pg_sys::ReorderBufferChangeType as C;
    let Some(plan) = t.plans.get_mut(&relid) else {
        return Err(Error::new(ErrorKind::Internal, "no conversion plan"));
    };
    // SAFETY: the caller guarantees a live change and relation.
    unsafe {
        let desc = (*rel).rd_att;
        let tp = (*change).data.tp;
        let action = (*change).action;
        let no_keys = || {
            Error::new(
                ErrorKind::FeatureNotSupported,
                "updates and deletes of a table without key columns cannot be mirrored",
            )
            .with_hint(
                "Give the table a primary key (or REPLICA IDENTITY USING INDEX), then stop and start the mirror.",
            )
        };
        let mut rows: Vec<(Image, RowMarker)> = Vec::with_capacity(2);
        match action {
            C::REORDER_BUFFER_CHANGE_INSERT => {
                let Some(new) = deform(tp.newtuple, desc) else { return Ok(0) };
                rows.push((new, RowMarker::Insert));
            }
            C::REORDER_BUFFER_CHANGE_UPDATE => {
                if t.keys.is_empty() {
                    return Err(no_keys());
                }
                let Some(mut new) = deform(tp.newtuple, desc) else { return Ok(0) };
                let old = deform(tp.oldtuple, desc);
                fill_unchanged_toast(&mut new, old.as_ref(), desc)?;
                let key_changed = match &old {
                    None => false,
                    Some(o) => plan.key_atts.iter().any(|&(i, len, byval)| {
                        o.nulls[i] != new.nulls[i]
                            || (!o.nulls[i] && !datums_equal(o.values[i], new.values[i], len, byval))
                    }),
                };
                if key_changed {
                    let Some(o) = old else { return Ok(0) };
                    rows.push((o, RowMarker::Delete));
                    rows.push((new, RowMarker::Insert));
                } else {
                    rows.push((new, RowMarker::Update));
                }
            }
            C::REORDER_BUFFER_CHANGE_DELETE => {
                if t.keys.is_empty() {
                    return Err(no_keys());
                }
                let Some(old) = deform(tp.oldtuple, desc) else {
                    return Err(Error::new(ErrorKind::FeatureNotSupported, "a deleted row came without its key")
                        .with_hint(
                            "Set REPLICA IDENTITY DEFAULT or FULL on the table, then stop and start the mirror.",
                        ));
                };
                rows.push((old, RowMarker::Delete));
            }
            _ => return Ok(0),
        }
        let attrs = crate::versions::attributes(desc);
        let before = t.builder.bytes();
        for (img, marker) in &rows {
            // No value may be a TOAST pointer the stream does not resolve: fill_unchanged_toast took
            // care of an UPDATE's new image; this also guards old images (key change, DELETE).
            for (i, null) in img.nulls.iter().enumerate() {
                if !*null && attrs[i].attlen == -1 && is_unchanged_toast(img.values[i]) {
                    return Err(missing_toast(desc, i));
                }
            }
            plan.conv.append_row(&img.values, &img.nulls, Some(*marker as i32), &mut t.builder)?;
            t.rows_in_batch += 1;
        }
        let added = t.builder.bytes().saturating_sub(before);
        if t.builder.is_full() {
            t.done.push(t.builder.finish()?);
        }
        t.last_in_batch = Some(pos);
        Ok(added.max(1))
    }
}

/// Replaces unchanged TOASTed values of an UPDATE's new image with the old image's values.
///
/// # Safety
/// Images of the change being replayed, `desc` their descriptor.
unsafe fn fill_unchanged_toast(new: &mut Image, old: Option<&Image>, desc: pg_sys::TupleDesc) -> Result<()> {
    // SAFETY: as required above.
    unsafe {
        let attrs = crate::versions::attributes(desc);
        for (i, a) in attrs.iter().enumerate() {
            if a.attisdropped || a.attlen != -1 || new.nulls[i] || !is_unchanged_toast(new.values[i]) {
                continue;
            }
            match old {
                Some(o) if !o.nulls[i] && !is_unchanged_toast(o.values[i]) => new.values[i] = o.values[i],
                _ => return Err(missing_toast(desc, i)),
            }
        }
    }
    Ok(())
}

/// # Safety
/// `desc` a live descriptor with more than `i` attributes.
unsafe fn missing_toast(desc: pg_sys::TupleDesc, i: usize) -> Error {
    // SAFETY: as required above.
    let name = unsafe {
        let a = &crate::versions::attributes(desc)[i];
        std::ffi::CStr::from_ptr(a.attname.data.as_ptr()).to_string_lossy().into_owned()
    };
    Error::new(
        ErrorKind::FeatureNotSupported,
        format!("the change stream lacks the unchanged TOASTed value of column \"{name}\""),
    )
    .with_detail(
        "The table's REPLICA IDENTITY is not FULL, so an UPDATE that leaves the value unchanged does not carry it.",
    )
    .with_hint("ALTER TABLE … REPLICA IDENTITY FULL, then stop and start the mirror.")
}

// ---- output plugin ------------------------------------------------------------------------------

/// The output plugin entry point PostgreSQL looks up in the library named by the slot.
///
/// # Safety
/// Called by PostgreSQL's LoadOutputPlugin with a callbacks struct to fill.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn _PG_output_plugin_init(cb: *mut pg_sys::OutputPluginCallbacks) {
    // SAFETY: cb points to the struct LoadOutputPlugin passes.
    unsafe {
        (*cb).startup_cb = Some(startup_cb);
        (*cb).begin_cb = Some(begin_cb);
        (*cb).change_cb = Some(change_cb);
        (*cb).truncate_cb = Some(truncate_cb);
        (*cb).commit_cb = Some(commit_cb);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn startup_cb(
    _ctx: *mut pg_sys::LogicalDecodingContext,
    options: *mut pg_sys::OutputPluginOptions,
    is_init: bool,
) {
    // SAFETY: options points to the context's options.
    unsafe {
        (*options).output_type = pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_BINARY_OUTPUT;
        (*options).receive_rewrites = false;
    }
    if !is_init && !IN_DECODER.load(Ordering::Relaxed) {
        crate::errors::raise(
            Error::new(
                ErrorKind::PrerequisiteNotMet,
                "the replication slot of an azure_cdc mirror can only be read by the mirror's decoder",
            )
            .with_hint("Use azure_cdc.get_all_tables_mirror_status() to follow a mirror."),
        );
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn begin_cb(_ctx: *mut pg_sys::LogicalDecodingContext, txn: *mut pg_sys::ReorderBufferTXN) {
    // SAFETY: txn is the transaction being replayed; its commit LSN and time are set before replay.
    // ReadNextFullTransactionId takes a shared lock briefly.
    let (lsn, time, xid, next) = unsafe {
        ((*txn).final_lsn, (*txn).xact_time.commit_time, (*txn).xid, pg_sys::ReadNextFullTransactionId().value)
    };
    DECODER.with(|d| {
        if let Some(d) = d.borrow_mut().as_mut() {
            d.commit_lsn = lsn;
            d.commit_time = time;
            d.xid = full_xid(next, u32::from(xid));
            d.ordinal = 0;
        }
    });
}

/// Required by PostgreSQL. Nothing to do at commit: the transaction's changes are already in the
/// buffer, and where a batch may confirm to is decided when it closes.
#[pg_guard]
unsafe extern "C-unwind" fn commit_cb(
    _ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    _commit_lsn: pg_sys::XLogRecPtr,
) {
}

#[pg_guard]
unsafe extern "C-unwind" fn change_cb(
    _ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    rel: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    let r = DECODER.with(|d| match d.borrow_mut().as_mut() {
        // SAFETY: the callback's own arguments.
        Some(d) => unsafe { d.on_change(rel, change) },
        None => Ok(()),
    });
    if let Err(e) = r {
        crate::errors::raise(e);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn truncate_cb(
    _ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    nrelations: std::ffi::c_int,
    relations: *mut pg_sys::Relation,
    _change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: relations holds nrelations open relations.
    let relations = unsafe { std::slice::from_raw_parts(relations, nrelations.max(0) as usize) };
    DECODER.with(|d| {
        if let Some(d) = d.borrow_mut().as_mut() {
            d.ordinal += 1;
            let pos = Position { commit_lsn: d.commit_lsn, ordinal: d.ordinal };
            for &rel in relations {
                // SAFETY: an open relation of the change being replayed (historic snapshot set).
                let relid = unsafe { (*rel).rd_id.to_u32() };
                d.drop_stale_plans(relid);
                // SAFETY: as above.
                let ancestors = unsafe { d.route(rel, relid) };
                // A truncated partition empties part of each mirrored partitioned table above it.
                for owner in std::iter::once(relid).chain(ancestors) {
                    let xid = d.xid;
                    let follows = d.tables.get(&owner).is_some_and(|t| {
                        t.parked.is_none()
                            && !t.reseeding
                            && !reseed::in_copy(t.seed.as_ref(), xid)
                            && !already_shipped(t.published, pos)
                    });
                    if follows {
                        d.request_reseed(owner, Reason::Truncated);
                    }
                }
            }
        }
    });
}

/// A cast was created or dropped (decoded at its commit): every conversion plan is rebuilt, so that
/// a cast to json that azure_cdc does not run (see tuples::user_json_cast) parks its tables before
/// any of their later changes is converted.
#[pg_guard]
unsafe extern "C-unwind" fn casts_changed(_arg: pg_sys::Datum, _cache: std::ffi::c_int, _hash: u32) {
    if OWN_RESET.with(Cell::get) {
        return;
    }
    ALL_STALE.with(|a| a.set(true));
}

thread_local! {
    /// Set while the decoder itself resets the caches ([`reset_caches`]).
    static OWN_RESET: Cell<bool> = const { Cell::new(false) };
}

/// Discards every catalog cache entry of this process (so that entries built under decoding's
/// historic snapshots and under the current catalog never meet; see `load`). The callbacks this
/// runs are not taken for changes of the mirrored relations: nothing changed, and taking them would
/// rebuild every plan and look every table up again after each of the decoder's catalog writes.
/// Invalidations that did happen reach the callbacks on their own, by relation (decoded
/// transactions' invalidations; the current catalog's, at the start of each transaction), or as a
/// reset PostgreSQL itself makes when this process fell behind on them.
///
/// # Safety
/// Main thread, inside a transaction, outside decoding callbacks.
unsafe fn reset_caches() {
    struct Own;
    impl Drop for Own {
        fn drop(&mut self) {
            OWN_RESET.with(|o| o.set(false));
        }
    }
    OWN_RESET.with(|o| o.set(true));
    let _own = Own;
    // SAFETY: as required above.
    unsafe { pg_sys::InvalidateSystemCaches() };
}

/// Relcache invalidation: conversion plans of the relation (or all, for InvalidOid) must be rebuilt.
#[pg_guard]
unsafe extern "C-unwind" fn relcache_changed(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    if OWN_RESET.with(Cell::get) {
        return;
    }
    if relid == pg_sys::InvalidOid {
        // Every plan is rebuilt on its next use (the next change marks them all stale).
        ALL_STALE.with(|a| a.set(true));
        ALL_INVALIDATED.with(|a| a.set(true));
    } else {
        STALE.with(|s| s.borrow_mut().insert(relid.to_u32()));
        INVALIDATED.with(|s| s.borrow_mut().insert(relid.to_u32()));
    }
}
