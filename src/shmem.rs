//! Shared memory of azure_cdc: the registry of running mirrors that the launcher, the workers and the
//! SQL functions share. One fixed array of `azure_cdc.max_fabric_mirrors` (at most 6) entries under one
//! LWLock; nothing here allocates. Used by every process of the extension; calls PostgreSQL only to
//! take the lock and set latches.
//!
//! What lives here is what must be seen live, across processes: which mirrors should run, which
//! workers run, and snapshot progress. Everything durable lives in the catalog tables.

use std::sync::atomic::{AtomicBool, AtomicU64};

use azure_cdc_core::parts::Split;
use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgAtomic, PgLwLock};

use crate::gucs::MAX_FABRIC_MIRRORS_LIMIT;

/// Tables whose snapshot progress can be shown at once per mirror (one per snapshot worker).
pub const MAX_PROGRESS: usize = 16;

/// Tables one copy job of the copier can take (more reseeded at once are copied by the decoder).
pub const MAX_COPY_TABLES: usize = 256;
/// Transactions running when a reseed's hold began that the copier's snapshot must see (more: the
/// decoder copies itself).
pub const MAX_COPY_MUST_SEE: usize = 1024;
/// The registry's helper slot (and progress slot) of a mirror's copier. The copier runs only once
/// the snapshot is published, when the snapshot helpers that use the same slots are gone.
pub const COPIER_SLOT: usize = 1;

/// Where the copy job of a mirror's copier stands.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum CopyState {
    /// No job.
    #[default]
    Idle,
    /// Handed to the copier, which has not finished it.
    Running,
    /// Copied and recorded (committed).
    Done,
    /// The copier failed; `error` says why.
    Failed,
}

/// A copy job: the decoder writes it and starts the copier, which copies these tables in one
/// snapshot that sees every transaction of `must_see` and reports the outcome here.
#[derive(Copy, Clone, Debug)]
pub struct CopyJob {
    pub state: CopyState,
    /// Which job this is: the copier started for it carries it, claims the job with it and reports
    /// under it, so that a copier late to start can never take or end a later job.
    pub token: u64,
    pub tables: [u32; MAX_COPY_TABLES],
    pub table_count: u32,
    pub must_see: [u64; MAX_COPY_MUST_SEE],
    pub must_see_count: u32,
    /// The failure's kind and text (NUL-padded), when `state` is Failed.
    pub error_kind: Option<azure_cdc_core::ErrorKind>,
    pub error: [u8; 512],
}

impl Default for CopyJob {
    fn default() -> Self {
        CopyJob {
            state: CopyState::Idle,
            token: 0,
            tables: [0; MAX_COPY_TABLES],
            table_count: 0,
            must_see: [0; MAX_COPY_MUST_SEE],
            must_see_count: 0,
            error_kind: None,
            error: [0; 512],
        }
    }
}

/// What the SQL API asks for a mirror.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Desired {
    /// Entry reserved by a `start_mirror` whose transaction has not committed yet.
    #[default]
    Reserved,
    Run,
    Stop,
}

/// Where a running mirror is in its life.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    /// The initial snapshot has not been published yet: a snapshot worker must run.
    #[default]
    Snapshot,
    /// The snapshot is published; the slot holds every later change.
    Snapshotted,
}

/// Tables whose parts can be scanned by several snapshot workers at once, per mirror.
pub const MAX_SPLITS: usize = MAX_PROGRESS;

/// Whose turn it is to publish into the folder of a split table: the next number to hand out and
/// the highest number published. Atomics, because the encoder threads that publish take turns
/// without PostgreSQL's locks.
#[derive(Debug, Default)]
pub struct PublishTurn {
    pub next: AtomicU64,
    pub published: AtomicU64,
    /// A writer of the attempt failed: nobody waits for a turn any more.
    pub failed: AtomicBool,
}

#[derive(Debug, Default)]
pub struct PublishTurns {
    pub turns: [[PublishTurn; MAX_SPLITS]; MAX_FABRIC_MIRRORS_LIMIT as usize],
}

// SAFETY: atomics only; no pointers.
unsafe impl PGRXSharedMemory for PublishTurns {}

// SAFETY: the name is unique to this extension; initialised by pg_shmem_init! in _PG_init.
pub static PUBLISH_TURNS: PgAtomic<PublishTurns> = unsafe { PgAtomic::new(c"azure_cdc_publish_turns") };

#[derive(Copy, Clone, Debug, Default)]
pub struct TableProgress {
    pub relid: u32,
    pub rows: i64,
}

#[derive(Copy, Clone, Debug, Default)]
pub struct MirrorEntry {
    pub in_use: bool,
    pub database: u32,
    pub mirror_id: i64,
    pub desired: Desired,
    pub phase: Phase,
    /// Set by the launcher while a worker it registered for this mirror has not exited.
    pub worker_registered: bool,
    /// Process id of the mirror's worker, set by the worker itself while it runs (0 otherwise).
    pub worker_pid: i32,
    /// Consecutive failed attempts, for back-off.
    pub failures: u32,
    /// Live snapshot progress, one slot per snapshot worker (0: the mirror's snapshot worker, 1..: helpers).
    pub progress: [TableProgress; MAX_PROGRESS],
    /// The exported snapshot helpers import (NUL-padded), valid while the snapshot worker's transaction is open.
    pub snapshot_name: [u8; 32],
    /// Tables of the current attempt, and the index of the next one to claim.
    pub tables_total: u32,
    pub next_table: u32,
    /// Tables whose outcome helpers have committed, and whether a helper failed.
    pub helpers_committed: u32,
    pub helper_failed: bool,
    /// Snapshot workers of the attempt (the worker and the helpers it started).
    pub participants: u32,
    /// Tables claimed whole whose worker has not yet decided whether to split them: a worker that
    /// finds nothing else to do waits for those decisions before it stops.
    pub deciding: u32,
    /// Tables being scanned in parts.
    pub splits: [Split; MAX_SPLITS],
    /// Process ids of running snapshot helpers (0: none), indexed by progress slot.
    pub helper_pids: [i32; MAX_PROGRESS],
    /// Live figures of the mirror's decoder (zero while none runs).
    pub stream: StreamStats,
    /// Bumped by the SQL API when it changes which of the mirror's tables the decoder must reseed;
    /// the decoder rereads the catalog when it sees a new value.
    pub tables_generation: u32,
    /// The copier's job (reseeds, added and new tables), beside the decoder.
    pub copy: CopyJob,
}

/// What the decoder of a mirror reports about its change stream.
#[derive(Copy, Clone, Debug, Default)]
pub struct StreamStats {
    /// The slot's confirmed LSN as this decoder last set it.
    pub confirmed_lsn: u64,
    /// Bytes of changes decoded and not yet published (open batch and batches in flight).
    pub buffered_bytes: u64,
    /// Commit time (PostgreSQL TimestampTz) of the oldest transaction with changes not yet published; 0: none.
    pub oldest_unshipped_commit: i64,
    /// Changes published since the decoder started.
    pub changes_shipped: u64,
    /// When the decoder last published a batch (TimestampTz); 0: not yet.
    pub last_shipped_at: i64,
    /// Bytes of change files published since the decoder started.
    pub bytes_shipped: u64,
    /// Samples of the two counters above over the last minute (time: TimestampTz / 1000).
    pub rates: azure_cdc_core::health::RateWindow,
}

#[derive(Copy, Clone, Debug, Default)]
pub struct Registry {
    /// Address of the launcher's latch (shared memory, same address in every process), 0 if none.
    pub launcher_latch: usize,
    pub entries: [MirrorEntry; MAX_FABRIC_MIRRORS_LIMIT as usize],
}

// SAFETY: Registry is plain old data (no pointers into process-local memory; the latch address points
// into shared memory), so it may live in shared memory and be read by any process under the lock.
unsafe impl PGRXSharedMemory for Registry {}

// SAFETY: the name is unique to this extension and the lock is initialised by pg_shmem_init! in _PG_init.
pub static REGISTRY: PgLwLock<Registry> = unsafe { PgLwLock::new(c"azure_cdc_registry") };

pub fn init() {
    pgrx::pg_shmem_init!(REGISTRY);
    pgrx::pg_shmem_init!(PUBLISH_TURNS);
}

/// Usable entries (the GUC may be lower than the compiled-in maximum).
pub fn capacity() -> usize {
    crate::gucs::MAX_FABRIC_MIRRORS.get().clamp(1, MAX_FABRIC_MIRRORS_LIMIT) as usize
}

/// Wakes the launcher, if it runs.
pub fn wake_launcher() {
    let latch = REGISTRY.share().launcher_latch;
    if latch != 0 {
        // SAFETY: the address was stored by the launcher as its MyLatch, which points into shared memory
        // (its PGPROC) and stays valid for the life of the postmaster; SetLatch is safe to call on any
        // process's latch.
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}

/// Index of the entry of a mirror, if it has one.
pub fn find(database: u32, mirror_id: i64) -> Option<usize> {
    let r = REGISTRY.share();
    r.entries.iter().position(|e| e.in_use && e.database == database && e.mirror_id == mirror_id)
}

/// Number of entries in use (mirrors running or reserved, all databases).
pub fn active_mirrors() -> usize {
    REGISTRY.share().entries.iter().filter(|e| e.in_use).count()
}

/// Reserves an entry for a new mirror. None when `max_fabric_mirrors` entries are in use.
pub fn reserve(database: u32, mirror_id: i64, desired: Desired, phase: Phase) -> Option<usize> {
    let cap = capacity();
    let mut r = REGISTRY.exclusive();
    if let Some(i) = r.entries.iter().position(|e| e.in_use && e.database == database && e.mirror_id == mirror_id) {
        return Some(i);
    }
    let i = r.entries[..cap].iter().position(|e| !e.in_use)?;
    r.entries[i] = MirrorEntry { in_use: true, database, mirror_id, desired, phase, ..Default::default() };
    Some(i)
}

/// Frees an entry.
pub fn release(index: usize) {
    let mut r = REGISTRY.exclusive();
    r.entries[index] = MirrorEntry::default();
}

/// Lets the workers of entry `index` run again, in `phase`, with the failure count reset.
pub fn resume(index: usize, phase: Phase) {
    let mut r = REGISTRY.exclusive();
    let e = &mut r.entries[index];
    e.phase = phase;
    e.failures = 0;
    e.desired = Desired::Run;
}

/// Tells the decoder of entry `index` that the mirror's tables changed in the catalog (after commit
/// it rereads them).
pub fn tables_changed(index: usize) {
    let mut r = REGISTRY.exclusive();
    let e = &mut r.entries[index];
    e.tables_generation = e.tables_generation.wrapping_add(1);
}

pub fn set_desired(index: usize, desired: Desired) {
    REGISTRY.exclusive().entries[index].desired = desired;
}

pub fn entry(index: usize) -> MirrorEntry {
    REGISTRY.share().entries[index]
}

/// Records live snapshot progress of one table (`slot` is the snapshot worker's progress slot).
pub fn set_progress(index: usize, slot: usize, relid: u32, rows: i64) {
    if slot < MAX_PROGRESS {
        REGISTRY.exclusive().entries[index].progress[slot] = TableProgress { relid, rows };
    }
}

/// Live rows copied so far of a table being snapshotted, if a worker reports it.
pub fn progress_of(database: u32, mirror_id: i64, relid: u32) -> Option<i64> {
    let r = REGISTRY.share();
    r.entries.iter().filter(|e| e.in_use && e.database == database && e.mirror_id == mirror_id).find_map(|e| {
        // A table scanned in parts: what its workers scan now and what they have published.
        let scanning = e.progress.iter().filter(|p| p.relid == relid && relid != 0);
        let done = e.splits.iter().filter(|s| s.in_use() && s.relid == relid);
        let (n, rows) = scanning.fold((0, 0), |(n, r), p| (n + 1, r + p.rows));
        let (m, published) = done.fold((0, 0), |(m, r), s| (m + 1, r + s.rows));
        (n + m > 0).then_some(rows + published)
    })
}

/// Whether `pid` is a live process of this server connected to `database`. The pids azure_cdc keeps
/// are its workers' own, recorded by themselves and cleared however they exit
/// ([`crate::worker::register_pid`]); this check also keeps a pid that some other process has taken
/// since from ever counting as (or being signalled as) a worker.
pub fn worker_alive(pid: i32, database: u32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: BackendPidGetProc takes ProcArrayLock and returns the PGPROC of a process attached to
    // this server's process array, or NULL; PGPROCs live in shared memory for the postmaster's life.
    unsafe {
        let p = pg_sys::BackendPidGetProc(pid);
        !p.is_null() && (*p).databaseId.to_u32() == database
    }
}

/// Asks worker `pid` of a mirror of `database` to stop (SIGTERM: it exits at its next interrupt
/// check), if [`worker_alive`] says it is one.
pub fn terminate_worker(pid: i32, database: u32) {
    if worker_alive(pid, database) {
        // SAFETY: signals a process of this server that runs azure_cdc's worker code for this mirror.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

/// Whether any worker of entry `index` may still be running.
pub fn workers_may_run(index: usize) -> bool {
    workers_may_run_entry(&entry(index))
}

/// [`workers_may_run`] for an entry already read.
pub fn workers_may_run_entry(e: &MirrorEntry) -> bool {
    e.worker_registered
        || worker_alive(e.worker_pid, e.database)
        || e.helper_pids.iter().any(|p| worker_alive(*p, e.database))
}

/// Records (or clears, with 0) the pid of the worker of entry `index`.
pub fn set_worker_pid(index: usize, pid: i32) {
    REGISTRY.exclusive().entries[index].worker_pid = pid;
}

/// Hands a copy job to the copier of entry `index` (state Running). Returns the job's token; None,
/// with nothing changed, when it does not fit.
pub fn set_copy_job(index: usize, tables: &[u32], must_see: &[u64]) -> Option<u64> {
    if tables.len() > MAX_COPY_TABLES || must_see.len() > MAX_COPY_MUST_SEE {
        return None;
    }
    let mut r = REGISTRY.exclusive();
    let token = r.entries[index].copy.token.wrapping_add(1) & 0x00ff_ffff_ffff_ffff;
    let mut job = CopyJob { state: CopyState::Running, token, ..Default::default() };
    job.tables[..tables.len()].copy_from_slice(tables);
    job.table_count = tables.len() as u32;
    job.must_see[..must_see.len()].copy_from_slice(must_see);
    job.must_see_count = must_see.len() as u32;
    r.entries[index].copy = job;
    Some(token)
}

/// The copier started for job `token` takes it: only while that job is still the entry's and Running,
/// and no copier is registered; records `pid` as the copier's in the same step. Returns the job's
/// (tables, transactions to see).
pub fn claim_copy_job(index: usize, token: u64, pid: i32) -> Option<(Vec<u32>, Vec<u64>)> {
    let mut r = REGISTRY.exclusive();
    let e = &mut r.entries[index];
    let j = &e.copy;
    if !e.in_use || j.state != CopyState::Running || j.token != token || e.helper_pids[COPIER_SLOT] != 0 {
        return None;
    }
    let job = (j.tables[..j.table_count as usize].to_vec(), j.must_see[..j.must_see_count as usize].to_vec());
    e.helper_pids[COPIER_SLOT] = pid;
    Some(job)
}

/// The state of the entry's copy job.
pub fn copy_state(index: usize) -> CopyState {
    REGISTRY.share().entries[index].copy.state
}

/// Records how copy job `token` ended (its copier does, before it exits), if it is still the entry's.
pub fn finish_copy_job(index: usize, token: u64, outcome: &azure_cdc_core::Result<()>) {
    let mut r = REGISTRY.exclusive();
    let j = &mut r.entries[index].copy;
    if j.token != token || j.state != CopyState::Running {
        return;
    }
    match outcome {
        Ok(()) => j.state = CopyState::Done,
        Err(e) => {
            j.state = CopyState::Failed;
            j.error_kind = Some(e.kind);
            let text = e.full_text();
            let mut n = text.len().min(j.error.len() - 1);
            while !text.is_char_boundary(n) {
                n -= 1;
            }
            j.error = [0; 512];
            j.error[..n].copy_from_slice(&text.as_bytes()[..n]);
        }
    }
}

/// Forgets the entry's copy job if no copier is registered (checked and done in one step, so that a
/// copier late to start cannot claim it afterwards). Returns the registered copier's pid otherwise.
pub fn clear_copy_job_if_no_copier(index: usize) -> Option<i32> {
    let mut r = REGISTRY.exclusive();
    let e = &mut r.entries[index];
    let pid = e.helper_pids[COPIER_SLOT];
    if pid != 0 {
        return Some(pid);
    }
    e.copy.state = CopyState::Idle;
    None
}

/// Forgets a copier's registration that outlived its process (`pid`, no longer alive).
pub fn forget_dead_copier(index: usize, pid: i32) {
    let mut r = REGISTRY.exclusive();
    let e = &mut r.entries[index];
    if e.helper_pids[COPIER_SLOT] == pid {
        e.helper_pids[COPIER_SLOT] = 0;
    }
}

/// The failure the copier recorded, if its job failed.
pub fn copy_failure(index: usize) -> Option<azure_cdc_core::Error> {
    let r = REGISTRY.share();
    let j = &r.entries[index].copy;
    if j.state != CopyState::Failed {
        return None;
    }
    let len = j.error.iter().position(|b| *b == 0).unwrap_or(j.error.len());
    let text = String::from_utf8_lossy(&j.error[..len]).into_owned();
    Some(azure_cdc_core::Error::new(j.error_kind.unwrap_or(azure_cdc_core::ErrorKind::Internal), text))
}

/// Forgets the copy job of entry `index`.
pub fn clear_copy_job(index: usize) {
    REGISTRY.exclusive().entries[index].copy.state = CopyState::Idle;
}

/// Publishes the decoder's figures for the status functions.
pub fn set_stream_stats(index: usize, stats: StreamStats) {
    REGISTRY.exclusive().entries[index].stream = stats;
}
