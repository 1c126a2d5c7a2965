//! The output plugin: PostgreSQL's logical decoding calls these callbacks for each decoded
//! transaction. They only decide what a change is and hand it to one method of the decoder.

use super::*;

impl Decoder {
    /// One decoded INSERT / UPDATE / DELETE (inside the replay of a committed transaction).
    ///
    /// # Safety
    /// Called from the change callback with its arguments.
    pub(super) unsafe fn on_change(
        &mut self,
        rel: pg_sys::Relation,
        change: *mut pg_sys::ReorderBufferChange,
    ) -> Result<()> {
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
}

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
