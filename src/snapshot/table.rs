//! One table of a snapshot attempt, in the process that claimed it (snapshot worker or helper):
//! checks, `_metadata.json`, the copy ([`crate::copy`]), whole or in parts ([`super::parts`]), and
//! the outcome this process records. Main thread; calls PostgreSQL.

use std::sync::Arc;

use azure_cdc_core::error::Disposition;
use azure_cdc_core::landing_zone;
use azure_cdc_core::lifecycle::{TableEvent, TableState};
use azure_cdc_core::names;
use azure_cdc_core::parts::Part;
use azure_cdc_core::target::Target;
use azure_cdc_core::{Error, ErrorKind, Result};
use pgrx::prelude::*;

use super::parts::{self, Work};
use crate::catalog::{self, TableRow};
use crate::copy::encoder::Encoder;
use crate::copy::{Copy, Scope};
use crate::privileges::{self, Who};
use crate::shmem;
use crate::worker;

/// What happened to one table in this attempt.
pub struct Outcome {
    relid: pg_sys::Oid,
    schema: String,
    table: String,
    keys: Vec<String>,
    rows: i64,
    files: i64,
    bytes: i64,
    parked: Option<Error>,
    /// A partitioned table: the signature of the partition tree that was copied.
    partitions: Option<String>,
    /// The columns of its files ([`azure_cdc_core::columns::to_text`]).
    columns: Option<String>,
}

/// Records the outcome of one table (in the current transaction).
pub fn record_outcome(mirror_id: i64, o: &Outcome) -> Result<()> {
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
                    files: o.files,
                    bytes: o.bytes,
                    seed_snapshot: None,
                    partitions: o.partitions.clone(),
                    columns: o.columns.clone(),
                },
            )
            .map(|_| ())
        }
    }
}

/// What one snapshot process works with.
struct Job<'a> {
    tables: &'a [TableRow],
    target: &'a Arc<Target>,
    copy: Copy<'a>,
    owner: pg_sys::Oid,
}

/// Copies tables, and parts of tables, claimed from the attempt's shared list until none is left;
/// returns the outcomes this process records (one per table, whoever scanned its parts).
pub fn copy_claimed_tables(
    index: usize,
    progress_slot: usize,
    tables: &[TableRow],
    target: &Arc<Target>,
    owner: pg_sys::Oid,
) -> Result<Vec<Outcome>> {
    let encoder = Encoder::start(target.clone())?;
    let copy = Copy { index, progress_slot, encoder: &encoder };
    let job = Job { tables, target, copy, owner };
    let mut outcomes = Vec::new();
    // Waiting for another worker's decision is bounded: that worker may itself wait for a lock held
    // by a session that waits for one of ours, which PostgreSQL's deadlock detector cannot see.
    let mut waits = 0;
    while let Some(work) = parts::claim(index) {
        let (i, joined, deciding) = match work {
            Work::Table(i, deciding) => (i, None, Some(deciding)),
            Work::Part(i, k, p) => (i, Some((k, p)), None),
            Work::Wait if waits < 200 => {
                waits += 1;
                if !worker::wait(std::time::Duration::from_millis(10)) {
                    return Err(Error::new(ErrorKind::Internal, "the snapshot worker was asked to stop"));
                }
                continue;
            }
            Work::Wait => break,
        };
        waits = 0;
        outcomes.extend(snapshot_table(&job, i, joined, deciding)?);
        shmem::set_progress(index, progress_slot, 0, 0);
    }
    Ok(outcomes)
}

/// Copies table `i`, or, when `joined`, parts of it from the given one on (split `k`), until none is
/// left. A large plain table claimed whole is split ([`parts`]) and its first part scanned here;
/// `deciding` (a table claimed whole) is dropped once that is decided.
/// Returns the table's outcome if this process records it: a table copied whole; the last holder of a
/// split table; the first to park a split table. Errors that park only this table come back as an
/// outcome with `parked`; any other error fails the attempt.
fn snapshot_table(
    job: &Job,
    i: usize,
    joined: Option<(usize, Part)>,
    mut deciding: Option<parts::Deciding>,
) -> Result<Option<Outcome>> {
    let t = job
        .tables
        .get(i)
        .ok_or_else(|| Error::new(ErrorKind::Internal, "snapshot workers disagree on the table list"))?;
    let index = job.copy.index;
    // A table claimed whole: until `deciding` is dropped, workers with nothing else to do wait in
    // case it is split.
    let folder = names::table_folder(&t.schema, &t.table);
    let mut outcome = Outcome {
        relid: t.relid,
        schema: t.schema.clone(),
        table: t.table.clone(),
        keys: t.key_columns.clone(),
        rows: 0,
        files: 0,
        bytes: 0,
        parked: None,
        partitions: None,
        columns: None,
    };
    let mut scope = match joined {
        Some((split, first)) => Scope::Parts { split, first },
        None => Scope::Whole,
    };
    // SAFETY: try_relation_open returns NULL instead of raising when the table is gone.
    let rel = unsafe { pg_sys::try_relation_open(t.relid, pg_sys::AccessShareLock as i32) };
    if rel.is_null() {
        let e = Error::new(ErrorKind::DataConversion, format!("table \"{}.{}\" no longer exists", t.schema, t.table));
        return park(job, &folder, scope, false, outcome, e);
    }
    // The mirror's owner must (still) own the table: a table it may not mirror is parked, uncopied.
    match privileges::table_refusal_error(job.owner, t.relid, &t.schema, &t.table, Who::Owner) {
        Ok(None) => {}
        refused => {
            // SAFETY: closing the relation opened above, keeping its lock to the end of the transaction.
            unsafe { pg_sys::relation_close(rel, pg_sys::NoLock as i32) };
            let e = refused?.unwrap_or_else(|| Error::new(ErrorKind::Internal, "no refusal"));
            return park(job, &folder, scope, false, outcome, e);
        }
    }
    // SAFETY: rel is open.
    let (relkind, relfile) = unsafe { ((*(*rel).rd_rel).relkind, (*(*rel).rd_rel).relfilenode.to_u32()) };
    if let Some((split, _)) = joined {
        if parts::relfile(index, split) != relfile {
            // Rewritten (VACUUM FULL, CLUSTER) after the worker that split it let go of its lock:
            // rows moved between blocks, some already scanned. The attempt starts over.
            // SAFETY: closing the relation opened above, keeping its lock to the end of the transaction.
            unsafe { pg_sys::relation_close(rel, pg_sys::NoLock as i32) };
            return Err(Error::new(
                ErrorKind::Internal,
                format!("table \"{}.{}\" was rewritten while the snapshot scanned it in parts", t.schema, t.table),
            ));
        }
    } else {
        // The keys recorded by start_mirror (before it may have set REPLICA IDENTITY FULL, which would
        // hide a REPLICA IDENTITY USING INDEX key from a new look-up), before any data file: written
        // before the table is split, so that no other worker's file comes first.
        let written = job.target.put_document(
            &folder,
            landing_zone::METADATA_FILE,
            landing_zone::table_metadata(&t.key_columns).as_bytes(),
        );
        if let Err(e) = written {
            // SAFETY: as above.
            unsafe { pg_sys::relation_close(rel, pg_sys::NoLock as i32) };
            return Err(e);
        }
    }
    if joined.is_none() && relkind == pg_sys::RELKIND_RELATION as std::ffi::c_char {
        // SAFETY: rel is open. Its size now, after the snapshot was taken: every row the snapshot sees
        // lies in these blocks.
        let nblocks = unsafe { pg_sys::RelationGetNumberOfBlocksInFork(rel, pg_sys::ForkNumber::MAIN_FORKNUM) };
        if let Some((split, first)) = parts::split(index, i, t.relid.to_u32(), relfile, nblocks) {
            pgrx::log!(
                "azure_cdc: table \"{}.{}\" ({nblocks} blocks) is scanned in parts of {} blocks",
                t.schema,
                t.table,
                azure_cdc_core::parts::part_blocks(nblocks, shmem::entry(index).participants)
            );
            scope = Scope::Parts { split, first };
        }
    }
    deciding.take();
    // In a subtransaction: a PostgreSQL error while converting a value (a type's cast to json, an
    // encoding conversion) parks this table only, and the snapshot goes on with the others.
    let result = worker::in_subtransaction(|| {
        // SAFETY: rel is open (checked above); the active snapshot is the attempt's, the one every
        // worker of the attempt scans in.
        unsafe { job.copy.rows(rel, t.relid, &folder, pg_sys::GetActiveSnapshot(), scope, &mut |_| Ok(())) }
    });
    if result.is_err() {
        job.copy.abandon();
    }
    // SAFETY: closing the relation opened above, keeping the lock to the end of the transaction.
    unsafe { pg_sys::relation_close(rel, pg_sys::NoLock as i32) };
    let copied = match result {
        Ok(c) => c,
        Err(e) if e.kind.disposition() == Disposition::ParkTable => return park(job, &folder, scope, true, outcome, e),
        Err(e) => return Err(e),
    };
    outcome.rows = copied.rows;
    outcome.files = copied.files;
    outcome.bytes = copied.bytes;
    outcome.columns = Some(copied.columns);
    outcome.partitions = copied.partitions;
    let Scope::Parts { split, .. } = scope else { return Ok(Some(outcome)) };
    pgrx::log!(
        "azure_cdc: snapshot worker {} published {} rows of table \"{}.{}\" in {} file(s) from the parts it scanned",
        job.copy.progress_slot,
        outcome.rows,
        t.schema,
        t.table,
        outcome.files
    );
    match parts::release(index, split, outcome.rows, outcome.files, outcome.bytes) {
        None => Ok(None),
        Some(totals) if totals.parked => {
            job.target.reset_table_folder(&folder)?;
            Ok(None)
        }
        Some(totals) => {
            outcome.rows = totals.rows;
            outcome.files = totals.files;
            outcome.bytes = totals.bytes;
            Ok(Some(outcome))
        }
    }
}

/// Parks a table: a table copied whole by this process has its folder reset if it `wrote` into it and
/// is recorded Failed; a split table is recorded Failed by the first process to park it, and its
/// folder reset by the last holder to let go.
fn park(job: &Job, folder: &str, scope: Scope, wrote: bool, mut outcome: Outcome, e: Error) -> Result<Option<Outcome>> {
    pgrx::warning!("azure_cdc: table \"{}.{}\" parked: {}", outcome.schema, outcome.table, e.full_text());
    let first = match scope {
        Scope::Whole => {
            if wrote {
                job.target.reset_table_folder(folder)?;
            }
            true
        }
        Scope::Parts { split, .. } => {
            let index = job.copy.index;
            let first = parts::park(index, split);
            if parts::release(index, split, 0, 0, 0).is_some() {
                job.target.reset_table_folder(folder)?;
            }
            first
        }
    };
    if !first {
        return Ok(None);
    }
    outcome.rows = 0;
    outcome.files = 0;
    outcome.bytes = 0;
    outcome.parked = Some(e);
    Ok(Some(outcome))
}
