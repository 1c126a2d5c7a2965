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
//!
//! The code follows pgoutput's seams: [`callbacks`] (the plugin callbacks: they decide what a change
//! is and call one method), [`rows`] (row images and TOAST), [`plans`] (relation plans, partition
//! routes, column evolution), [`batches`] (batches, acknowledgements, confirmation, catalog
//! counters), [`holds`] (reseed holds and the copier), [`invalidation`] (catalog changes seen while
//! decoding) and [`pass`] (the worker and its passes over the slot). This file holds their shared
//! state.

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

mod batches;
mod callbacks;
mod holds;
mod invalidation;
mod pass;
mod plans;
mod rows;

use self::holds::*;
use self::invalidation::*;
use self::pass::*;
use self::rows::*;

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

/// Runs `f` on the running decoder (main thread, outside callbacks' own borrows).
fn with_decoder<T>(f: impl FnOnce(&mut Decoder) -> Result<T>) -> Result<T> {
    DECODER.with(|d| match d.borrow_mut().as_mut() {
        Some(dec) => f(dec),
        None => Err(Error::new(ErrorKind::Internal, "the decoder is not initialised")),
    })
}
