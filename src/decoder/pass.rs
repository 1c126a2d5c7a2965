//! The decoder worker's entry point and its passes over the slot: load the mirror and its tables,
//! open the slot, decode until told to stop, rewind after a copy, recover a lost slot.

use super::*;

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
pub(super) fn load(mirror_id: i64) -> Result<Option<Loaded>> {
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

/// What [`load`] found.
pub(super) enum Loaded {
    Ready(catalog::MirrorRow, HashMap<u32, Table>, HashSet<u32>),
    /// The slot is gone or invalidated (why): the changes it held are lost.
    SlotLost(catalog::MirrorRow, &'static str),
}

/// After the slot was lost: creates it again and reseeds every table that was replicating (own
/// transactions). The changes the old slot held are gone, so no table's files can be trusted to be
/// complete; each is copied again while the new slot streams (see azure_cdc_core::reseed).
pub(super) fn recover_lost_slot(m: &catalog::MirrorRow, why: &str) -> Result<()> {
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
pub(super) fn open_table(t: &catalog::TableRow, reseeding: bool) -> Result<Table> {
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

/// What the decoder does after one pass over the slot.
pub(super) enum Next {
    /// Stop: the mirror should not run (or the worker was told to stop).
    Exit,
    /// Reopen the slot at its confirmed position and decode again (after a reseed's copy).
    Rewind,
}

pub(super) fn run(index: usize, mirror_id: i64) -> Result<()> {
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
pub(super) unsafe fn close_pass(ctx: *mut pg_sys::LogicalDecodingContext) {
    let dec = DECODER.with(|d| d.borrow_mut().take());
    // Its plans' memory contexts go with it.
    drop(dec);
    // SAFETY: as required above: the context goes first, then the slot it decodes.
    unsafe { pg_sys::FreeDecodingContext(ctx) };
    crate::slot::release();
}

/// One pass over the slot, from its confirmed position.
pub(super) fn decode(index: usize, mirror_id: i64, change_cxt: pg_sys::MemoryContext) -> Result<Next> {
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
