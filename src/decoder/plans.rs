//! Relation plans: which mirrored table a decoded relation belongs to (partition routes), the
//! conversion plan of its columns, the owner and key checks made when a plan is built, and how a
//! change of columns is followed or reseeds the table.

use super::*;

impl Decoder {
    /// The partitioned tables `rel` is a partition of, nearest first (none if it is not a partition),
    /// as of this point of the stream.
    ///
    /// # Safety
    /// `rel` is the open relation of a change being replayed (historic snapshot set); main thread.
    pub(super) unsafe fn route(&mut self, rel: pg_sys::Relation, relid: u32) -> Vec<u32> {
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
}

impl Decoder {
    /// One decoded change of relation `relid` (`rel`), for mirrored table `owner`: the relation
    /// itself or a partitioned table it is a partition of.
    ///
    /// # Safety
    /// Called from the change callback with its arguments.
    pub(super) unsafe fn change_of(
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

/// Makes sure `t` has a conversion plan for the changes of `rel` (the table itself or one of its
/// partitions) as it is at this point of the stream. Returns false when its columns (or key columns)
/// are no longer those of the table's files: the table must be reseeded.
///
/// # Safety
/// `rel` is the open relation of a change being replayed; main thread.
pub(super) unsafe fn ensure_plan(
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

pub(super) fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
