//! One table scanned by several snapshot workers at once. Used by the snapshot worker and its helpers
//! (main threads, under the registry's lock) and by their encoder threads (the publish turns:
//! lock-free atomics in shared memory, no PostgreSQL call).
//!
//! The worker that claims a large plain table splits it ([`azure_cdc_core::parts`]): the table's
//! blocks, as many as it has when split, are cut into parts; that worker scans the first part, and any
//! worker with no whole table left to claim takes the next part ([`claim`]). All of them scan in the
//! snapshot they share, so every row visible to it lies in exactly one part (a part is a block range:
//! `heap_setscanlimits`, what TID-range scans use). Each worker writes the rows of the parts it holds
//! into files of its own, under staging names; a complete file takes the folder's next number and is
//! published only once every lower number is ([`Turn`]): the folder's numbers stay contiguous and
//! appear in order, as Fabric's replicator requires. A snapshot is all inserts and each row is in one
//! file, so the order of rows across files does not matter.
//!
//! A worker holds the table from its first part until its last file is published; it then lets go
//! ([`release`]) with its counts. The last holder to let go once every part is handed out records
//! the table's outcome. A value that cannot be written parks the table: the first worker to meet one
//! records it Failed; the last holder resets the folder. Any other failure fails the attempt, and
//! the turns of the mirror are marked failed so that no encoder waits for a turn that never comes.

use std::sync::atomic::{AtomicBool, Ordering};

use azure_cdc_core::datafile::PublishTurns;
use azure_cdc_core::parts::{self as plan, Part, Split, Totals};
use azure_cdc_core::{Error, ErrorKind, Result};
use pgrx::prelude::*;

use crate::shmem::{MAX_SPLITS, PUBLISH_TURNS, REGISTRY};

/// What a snapshot worker scans next.
pub enum Work {
    /// A whole table (index in the attempt's list), which it may split; drop the [`Deciding`] once
    /// it has decided.
    Table(usize, Deciding),
    /// A part of split `.1` of table `.0`; the worker now holds the table.
    Part(usize, usize, Part),
    /// Nothing now, but a table claimed whole may still be split: ask again shortly.
    Wait,
}

/// Frees every split of the mirror and clears its publish turns, at the start of an attempt (no
/// worker of an earlier attempt runs any more). `participants`: the attempt's snapshot workers.
pub fn reset(index: usize, participants: usize) {
    let mut r = REGISTRY.exclusive();
    let e = &mut r.entries[index];
    e.participants = participants as u32;
    e.deciding = 0;
    e.splits = [Split::default(); MAX_SPLITS];
    for t in &PUBLISH_TURNS.get().turns[index] {
        t.failed.store(false, Ordering::SeqCst);
    }
}

/// How many snapshot workers the attempt has (the worker and the helpers that started).
pub fn set_participants(index: usize, participants: usize) {
    REGISTRY.exclusive().entries[index].participants = participants as u32;
}

/// A worker of the attempt failed: nobody waits for a publish turn any more.
pub fn fail_all(index: usize) {
    for t in &PUBLISH_TURNS.get().turns[index] {
        t.failed.store(true, Ordering::SeqCst);
    }
}

/// Set once this process's share of the attempt has ended cleanly.
static FINISHED: AtomicBool = AtomicBool::new(false);

/// However this snapshot process exits before [`finished`] (an error; FATAL after SIGTERM, which ends
/// the process without returning to the worker's code; a lost postmaster), the other workers stop
/// waiting for publish turns it may hold (its encoder thread ends with it) and stop claiming work:
/// the attempt has failed (`helper_failed`, which the snapshot worker also reads as that). `helper`:
/// the helper's progress slot; None for the snapshot worker.
pub fn fail_all_at_exit(index: usize, helper: Option<usize>) {
    let arg = index | (usize::from(helper.is_some()) << 8);
    // SAFETY: registers a callback PostgreSQL runs on this process's exit, before shared memory is
    // detached; the argument is plain data.
    unsafe { pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(arg)) };
}

/// This process's share of the attempt has ended cleanly: its exit fails nothing.
pub fn finished() {
    FINISHED.store(true, Ordering::SeqCst);
}

#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: std::ffi::c_int, arg: pg_sys::Datum) {
    if FINISHED.load(Ordering::SeqCst) {
        return;
    }
    let index = arg.value() & 0xff;
    if index >= crate::gucs::MAX_FABRIC_MIRRORS_LIMIT as usize {
        return;
    }
    fail_all(index);
    // The attempt has failed, whichever process this is: workers stop claiming and waiting.
    REGISTRY.exclusive().entries[index].helper_failed = true;
}

/// The next work of the attempt: a whole table while one is left, else a part of a split table, else
/// a wait while a worker still decides whether to split the table it claimed; nothing once the
/// attempt has failed.
pub fn claim(index: usize) -> Option<Work> {
    let mut r = REGISTRY.exclusive();
    let e = &mut r.entries[index];
    if e.helper_failed {
        // The attempt has failed: the worker stops claiming and reports it.
        return None;
    }
    if e.next_table < e.tables_total {
        e.next_table += 1;
        e.deciding += 1;
        return Some(Work::Table(e.next_table as usize - 1, Deciding(index)));
    }
    let part = e.splits.iter_mut().enumerate().find_map(|(k, s)| s.join().map(|p| Work::Part(s.table_index(), k, p)));
    part.or((e.deciding > 0).then_some(Work::Wait))
}

/// The worker that claimed a table whole has decided whether to split it (or will not copy it):
/// workers waiting for that decision may stop if nothing was split. Dropping the value says so.
pub struct Deciding(usize);

impl Drop for Deciding {
    fn drop(&mut self) {
        let mut r = REGISTRY.exclusive();
        let e = &mut r.entries[self.0];
        e.deciding = e.deciding.saturating_sub(1);
    }
}

/// Splits table `table` (the attempt's index; `relid`, stored in `relfile`) of `nblocks` blocks if it
/// is worth it and a split is free. Returns the split and the caller's first part (it holds the table).
pub fn split(index: usize, table: usize, relid: u32, relfile: u32, nblocks: u32) -> Option<(usize, Part)> {
    let mut r = REGISTRY.exclusive();
    let e = &mut r.entries[index];
    if !plan::worth_splitting(nblocks, e.participants) {
        return None;
    }
    let k = e.splits.iter().position(|s| !s.in_use())?;
    let turn = &PUBLISH_TURNS.get().turns[index][k];
    turn.next.store(1, Ordering::SeqCst);
    turn.published.store(0, Ordering::SeqCst);
    e.splits[k] = Split::new(table, relid, relfile, nblocks, e.participants);
    e.splits[k].take().map(|p| (k, p))
}

/// The storage split `k`'s table had when it was split.
pub fn relfile(index: usize, k: usize) -> u32 {
    REGISTRY.share().entries[index].splits[k].relfile
}

/// The next part of split `k` for a worker that holds it, if any is left.
pub fn next_part(index: usize, k: usize) -> Option<Part> {
    REGISTRY.exclusive().entries[index].splits[k].take()
}

/// Marks split `k` parked. True for the first worker to do so (it records the table Failed).
pub fn park(index: usize, k: usize) -> bool {
    REGISTRY.exclusive().entries[index].splits[k].park()
}

/// A holder of split `k` lets go with what it published ([`Split::release`]).
pub fn release(index: usize, k: usize, rows: i64, files: i64, bytes: i64) -> Option<Totals> {
    REGISTRY.exclusive().entries[index].splits[k].release(rows, files, bytes)
}

/// The publish turns of split `k` of mirror `index`, for one writer's encoder thread: a complete file
/// takes the next number and waits until every lower number is published. A wait ends with an error
/// when the attempt failed, this process is asked to stop, or the postmaster died.
pub struct Turn {
    index: usize,
    split: usize,
    /// The postmaster's pid: a process whose parent is another has lost its postmaster.
    postmaster: i32,
}

impl Turn {
    pub fn new(index: usize, split: usize) -> Turn {
        // SAFETY: PostmasterPid is set before any worker starts and never changes.
        Turn { index, split, postmaster: unsafe { pg_sys::PostmasterPid } }
    }

    fn stopping(&self) -> Option<&'static str> {
        // SAFETY: a read of the flag PostgreSQL's SIGTERM handler (die) sets: a sig_atomic_t, read with
        // a volatile load as a signal handler's flag is; no PostgreSQL function is called.
        if unsafe { std::ptr::read_volatile(&raw const pg_sys::ProcDiePending) } != 0 {
            return Some("the snapshot worker was asked to stop");
        }
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != self.postmaster {
            return Some("the server's postmaster is gone");
        }
        None
    }
}

impl PublishTurns for Turn {
    fn publish(&mut self, publish: &mut dyn FnMut(u64) -> Result<()>) -> Result<u64> {
        let turn = &PUBLISH_TURNS.get().turns[self.index][self.split];
        let fail = |why: &str| Error::new(ErrorKind::Internal, format!("a table's parts were not published: {why}"));
        let n = turn.next.fetch_add(1, Ordering::SeqCst);
        let mut pause = std::time::Duration::from_micros(100);
        while turn.published.load(Ordering::SeqCst) + 1 != n {
            if turn.failed.load(Ordering::SeqCst) {
                return Err(fail("another snapshot worker failed"));
            }
            if let Some(why) = self.stopping() {
                turn.failed.store(true, Ordering::SeqCst);
                return Err(fail(why));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(5));
        }
        match publish(n) {
            Ok(()) => {
                turn.published.store(n, Ordering::SeqCst);
                Ok(n)
            }
            Err(e) => {
                turn.failed.store(true, Ordering::SeqCst);
                Err(e)
            }
        }
    }
}
