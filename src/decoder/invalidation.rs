//! What changed in the catalog while decoding: dropped tables, partition trees, owners and row-level
//! security (checked after invalidations), and which conversion plans an invalidation makes stale.

use super::*;

/// Records a table whose source was dropped: state Dropped, its files kept (in a transaction).
pub(super) fn mark_dropped(mirror_id: i64, t: &catalog::TableRow) -> Result<()> {
    TableState::parse(&t.state)?.on(TableEvent::Dropped)?;
    pgrx::log!("azure_cdc: table \"{}.{}\" was dropped; its files are kept", t.schema, t.table);
    catalog::table_dropped(mirror_id, t.relid, (&t.schema, &t.table))
}

impl Decoder {
    /// After relcache invalidations, between records:
    /// - Notices mirrored tables that were dropped: an invalidated table the current catalog no
    ///   longer has is noted with the WAL insert position; once decoding has read past that position
    ///   (the DROP, and every change before it, is decoded) the table is marked Dropped.
    /// - Reseeds a partitioned table whose partition tree is no longer the one its files were copied
    ///   from: a partition attached, detached, created or dropped brings or takes rows that have no
    ///   change of their own in the stream. The tree is compared as it is now, which may be ahead of
    ///   decoding: a reseed then copies the table as of a snapshot that already has the change, and
    ///   the stream goes on from there (see azure_cdc_core::reseed).
    pub(super) fn check_vanished(&mut self, ctx: *mut pg_sys::LogicalDecodingContext) -> Result<()> {
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
}

impl Decoder {
    /// After a relcache invalidation of `relid` (or of all relations): the conversion plans and
    /// partition routes built from its old descriptor go.
    pub(super) fn drop_stale_plans(&mut self, relid: u32) {
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
}

/// A cast was created or dropped (decoded at its commit): every conversion plan is rebuilt, so that
/// a cast to json that azure_cdc does not run (see tuples::user_json_cast) parks its tables before
/// any of their later changes is converted.
#[pg_guard]
pub(super) unsafe extern "C-unwind" fn casts_changed(_arg: pg_sys::Datum, _cache: std::ffi::c_int, _hash: u32) {
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
pub(super) unsafe fn reset_caches() {
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
pub(super) unsafe extern "C-unwind" fn relcache_changed(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
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
