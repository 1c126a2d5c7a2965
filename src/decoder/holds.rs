//! Reseed holds and the copier: a reseed holds the slot's confirmation, waits for the transactions
//! running at the hold, resets the tables' folders, then hands the copy to the mirror's copier (or
//! copies itself) and rewinds once it is recorded (see `azure_cdc_core::reseed`).

use super::*;

/// What the reseed step asks of the pass loop.
pub(super) enum Reseed {
    Nothing,
    /// The tables are ready to be copied.
    Copy(PendingCopy),
    /// The copier has copied and recorded them.
    Copied,
}

/// Ends a copier left running (by an earlier pass or decoder process) and forgets its job, so that
/// at most one copier of a mirror runs, and only with the job of the pass that started it.
pub(super) fn end_copier(index: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Checked and forgotten in one step: a copier that has not claimed its job yet never will.
        let Some(pid) = shmem::clear_copy_job_if_no_copier(index) else { return Ok(()) };
        let e = shmem::entry(index);
        if !shmem::worker_alive(pid, e.database) {
            shmem::forget_dead_copier(index, pid);
            continue;
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
pub(super) struct PendingCopy {
    /// The mirror's owner: a table it may no longer mirror is parked instead of copied.
    pub(super) owner: pg_sys::Oid,
    pub(super) tables: Vec<crate::reseed::ToCopy>,
    /// Transactions running when the hold began: the copy's snapshot must see them all.
    pub(super) must_see: Vec<u64>,
    pub(super) target: Arc<Target>,
}

impl Decoder {
    /// Parks a table: its changes not yet handed to the shipper and all later ones are dropped; the
    /// catalog shows it Failed with the error. (Its folder keeps what was published.)
    /// Records the reseeds the stream asked for, marks every table the catalog says is Reseeding,
    /// and, if one is and no reseed holds yet, starts holding at the current position (between
    /// records) and notes the transactions running now (own transaction).
    pub(super) fn begin_holds(&mut self, ctx: *mut pg_sys::LogicalDecodingContext) -> Result<()> {
        let requests = std::mem::take(&mut self.requests);
        let mirror_id = self.mirror_id;
        let owner = self.owner;
        let (reseeding, running) = BackgroundWorker::transaction(std::panic::AssertUnwindSafe(|| {
            // SAFETY: see load(): catalog entries built under decoding's historic snapshots must not
            // be used here, nor the ones built here by decoding.
            unsafe { reset_caches() };
            let r = (|| -> Result<(Vec<catalog::TableRow>, (String, u64))> {
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
                // The WAL insert position before the running transactions are listed: every
                // transaction that committed before it is either ended now or in the list.
                // SAFETY: reads the shared WAL insert position.
                let inserted = unsafe { pg_sys::GetXLogInsertRecPtr() };
                let running = catalog::read(|| {
                    Spi::get_one::<String>("SELECT pg_catalog.pg_current_snapshot()::text").map_err(crate::errors::spi)
                })?
                .unwrap_or_default();
                Ok((tables, (running, inserted)))
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
            let (running, inserted) = running;
            let waiting: Vec<u64> = reseed::parse_snapshot(&running)?.running.into_iter().collect();
            // The hold point: the WAL insert position read just before the running transactions were
            // listed. Every transaction committed before it has ended before the copy's snapshot is
            // taken (the copy waits for those listed), so the copy sees it: the table's changes up to
            // there may be confirmed without being decoded again. Holding only where decoding has
            // read would let reseeds requested during a copy hold the slot at the same place again
            // and again. Never behind what decoding has read, nor behind the slot's confirmed
            // position (what was confirmed is published, and is never delivered again).
            // SAFETY: between records: every decoded commit is before EndRecPtr.
            let read = unsafe { (*(*ctx).reader).EndRecPtr };
            // SAFETY: the slot is acquired by this process.
            let hold_lsn = inserted.max(read).max(unsafe { crate::slot::confirmed_flush() });
            pgrx::log!("azure_cdc: mirror {mirror_id}: reseed holds the slot at {}", crate::slot::lsn_text(hold_lsn));
            self.hold = Some(Hold { hold_lsn, running_at_hold: waiting.clone(), waiting });
        }
        Ok(())
    }
}

impl Decoder {
    /// Between passes of the main loop: acts on a change of the tables' generation (resync_table),
    /// and once every transaction a hold waits for has ended, readies the copy of the reseeded
    /// tables. Returns the copy to make once this pass has ended (then the decoder rewinds).
    pub(super) fn step_reseed(&mut self, ctx: *mut pg_sys::LogicalDecodingContext, generation: u32) -> Result<Reseed> {
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
}

impl Decoder {
    /// Starts the mirror's copier with `copy` as its job. False when it cannot run it (the decoder
    /// then copies itself).
    pub(super) fn start_copier(&mut self, copy: &PendingCopy) -> Result<bool> {
        let relids: Vec<u32> = copy.tables.iter().map(|t| t.relid).collect();
        let Some(token) = shmem::set_copy_job(self.index, &relids, &copy.must_see) else { return Ok(false) };
        let e = shmem::entry(self.index);
        let name =
            names::worker_name(names::WorkerKind::Copier, &e.database.to_string(), Some(&e.mirror_id.to_string()));
        let started = pgrx::bgworkers::BackgroundWorkerBuilder::new(&name)
            .set_type(names::WorkerKind::Copier.backend_type())
            .set_library("azure_cdc")
            .set_function("azure_cdc_copier_main")
            .enable_spi_access()
            .set_argument(Some(pg_sys::Datum::from(self.index | ((token as usize) << 8))))
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
}

impl Decoder {
    /// Whether the copier has finished: its tables are recorded (decode again from the hold), or it
    /// failed (this decoder's attempt fails with its error, and the tables are copied again by the
    /// next one).
    pub(super) fn poll_copier(&mut self) -> Result<Reseed> {
        // The worker's status first, then the job's: a copier that finishes in between is then seen
        // finished, not gone without a result.
        let stopped = self
            .copier
            .as_ref()
            .is_some_and(|w| matches!(w.pid(), Err(pgrx::bgworkers::BackgroundWorkerStatus::Stopped)));
        let state = shmem::copy_state(self.index);
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
}

impl Decoder {
    /// Resets the reseeded tables (their folders deleted, in this pass, once everything handed to
    /// the shipper is published) and tells whether the landing zone's reader has dropped them all,
    /// so that the copy may create their folders again ([`ResetWait`]). Looks at most every 2 s; a
    /// table not known dropped `azure_cdc.table_reset_timeout` after its folder was deleted is parked
    /// (and a hold with no reseeded table left ends).
    pub(super) fn reset_folders(&mut self, ctx: *mut pg_sys::LogicalDecodingContext) -> Result<bool> {
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
}

impl Decoder {
    /// Before the copy: publish everything handed to the shipper (nothing may write into a folder
    /// being rebuilt), confirm it, record the counters. Returns what to copy.
    pub(super) fn ready_copy(&mut self, ctx: *mut pg_sys::LogicalDecodingContext) -> Result<PendingCopy> {
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
}

impl Decoder {
    /// Asks for a reseed of `relid` from inside a change callback: its changes are dropped from now
    /// on; the hold begins right after the transaction being replayed.
    pub(super) fn request_reseed(&mut self, relid: u32, reason: Reason) {
        if let Some(t) = self.tables.get_mut(&relid) {
            if !t.reseeding {
                pgrx::log!("azure_cdc: table \"{}.{}\" is reseeded: {}", t.schema, t.name, reason.as_str());
                t.reseeding = true;
                self.requests.push((relid, reason));
            }
        }
    }
}

/// The transactions of `xids` (full ids) that are still in progress: still in the server's
/// process array, so that a snapshot taken now would not see them (in a transaction).
pub(super) fn still_running(xids: &[u64]) -> Vec<u64> {
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
