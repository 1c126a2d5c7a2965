//! Batches, acknowledgements and confirmation: what the decoder does between records, how a batch
//! closes and goes to the shipper, how the slot is confirmed only past published changes, and the
//! counters and parked tables it records in the catalog.

use super::*;

impl Decoder {
    /// Between records (no transaction being replayed): collect acknowledgements, close a batch that
    /// is due, confirm what is published.
    pub(super) fn after_record(&mut self, ctx: *mut pg_sys::LogicalDecodingContext) -> Result<()> {
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
}

impl Decoder {
    pub(super) fn confirm(&mut self, lsn: u64) {
        // While a reseed holds, never past its hold point (see azure_cdc_core::reseed).
        let lsn = match &self.hold {
            Some(h) => h.cap(lsn),
            None => lsn,
        };
        // SAFETY: main thread, outside callbacks, the slot is acquired by this process.
        unsafe { crate::slot::confirm(lsn) };
        self.stats.confirmed_lsn = lsn;
    }
}

impl Decoder {
    /// How long to sleep when all WAL is read: the poll interval, or less if a batch falls due sooner.
    pub(super) fn next_wakeup(&self) -> Duration {
        match self.first_change {
            Some(t) => {
                crate::gucs::change_batch_timeout().saturating_sub(t.elapsed()).clamp(Duration::from_millis(1), POLL)
            }
            None => POLL,
        }
    }
}

impl Decoder {
    /// Takes acknowledgements from the shipper, waiting up to `wait` for the first one.
    pub(super) fn collect_acks(&mut self, wait: Duration) -> Result<usize> {
        let mut n = 0;
        let mut w = wait;
        while let Some(ack) = self.shipper.recv(w)? {
            self.on_shipped(ack)?;
            n += 1;
            w = Duration::ZERO;
        }
        Ok(n)
    }
}

impl Decoder {
    pub(super) fn on_shipped(&mut self, ack: Shipped) -> Result<()> {
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
}

impl Decoder {
    /// Closes the open batch and hands it to the shipper; `confirm_lsn` is how far the slot may be
    /// confirmed once it is published. Waits (for acknowledgements) while the shipper's queue is full.
    pub(super) fn close_batch(&mut self, confirm_lsn: u64) -> Result<()> {
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
}

impl Decoder {
    /// The live figures, for the status functions.
    pub(super) fn publish_stats(&mut self) {
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
}

impl Decoder {
    /// Writes the tables' counters and parked tables to the catalog (own transaction), at most once
    /// per CATALOG_EVERY unless `force`.
    pub(super) fn record_catalog(&mut self, mirror_id: i64, force: bool) -> Result<()> {
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
}

impl Decoder {
    /// Publishes everything handed to the shipper, confirms it and records the counters.
    pub(super) fn drain(&mut self, ctx: *mut pg_sys::LogicalDecodingContext) -> Result<()> {
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
}

impl Decoder {
    pub(super) fn park(&mut self, relid: u32, e: Error) {
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
}

pub(super) fn count_file(t: &mut Table, f: &PublishedFile) {
    t.unrecorded.rows += f.rows as i64;
    t.unrecorded.files += 1;
    t.unrecorded.bytes += f.bytes as i64;
    t.unrecorded.next_number = t.unrecorded.next_number.max(f.number as i64 + 1);
    t.unrecorded.touched = true;
}
