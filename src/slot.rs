//! The mirror's logical replication slot, created in-process the way a WAL sender's
//! `CREATE_REPLICATION_SLOT … LOGICAL … (SNAPSHOT 'use')` does it (walsender.c): the slot is created,
//! decoding is run up to its consistent point, and the current transaction adopts the snapshot of
//! that point. Every change committed after the snapshot is then in the slot's stream, and nothing
//! the snapshot contains is. Runs on the main thread of a snapshot worker (or a backend, to drop).
//!
//! The slot records this library as its output plugin (`_PG_output_plugin_init` in
//! [`crate::decoder`]); the mirror's decoder reads it in-process ([`open_decoding`]).

use std::ffi::CString;

use azure_cdc_core::{Error, ErrorKind, Result};
use pgrx::pg_sys;

/// Output plugin recorded in the slot.
const PLUGIN: &std::ffi::CStr = c"azure_cdc";

unsafe extern "C-unwind" {
    // replication/snapbuild.h, not in pgrx's bindings.
    fn SnapBuildInitialSnapshot(builder: *mut pg_sys::SnapBuild) -> pg_sys::Snapshot;
    // The WAL reading callbacks of access/xlogutils.h, as raw symbols (pgrx binds them as guarded
    // Rust wrappers, which cannot be stored as C callbacks).
    fn read_local_xlog_page(
        state: *mut pg_sys::XLogReaderState,
        target_page: pg_sys::XLogRecPtr,
        req_len: std::ffi::c_int,
        target_rec: pg_sys::XLogRecPtr,
        buf: *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
    fn wal_segment_open(state: *mut pg_sys::XLogReaderState, seg: pg_sys::XLogSegNo, tli: *mut pg_sys::TimeLineID);
    fn wal_segment_close(state: *mut pg_sys::XLogReaderState);
    // replication/decode.h, not in pgrx's bindings.
    fn LogicalDecodingProcessRecord(ctx: *mut pg_sys::LogicalDecodingContext, record: *mut pg_sys::XLogReaderState);
}

fn c_name(name: &str) -> Result<CString> {
    CString::new(name).map_err(|_| Error::new(ErrorKind::Internal, "slot name contains a NUL byte"))
}

/// Whether a replication slot of that name exists.
pub fn exists(name: &str) -> Result<bool> {
    let c = c_name(name)?;
    // SAFETY: SearchNamedReplicationSlot takes the control lock itself when need_lock is true and only
    // reads shared memory; the name outlives the call.
    Ok(unsafe { !pg_sys::SearchNamedReplicationSlot(c.as_ptr(), true).is_null() })
}

/// Whose the slot of that name is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotFound {
    /// No slot of that name.
    Missing,
    /// A logical slot of this database decoded with azure_cdc: the mirror's own.
    Mine,
    /// Something else has the name (why it is not the mirror's).
    Other(String),
}

/// Whether the slot the catalog records for mirror `mirror_name` is the one azure_cdc creates for
/// it: named after the mirror, logical, of this database, decoded by azure_cdc (in a transaction).
pub fn find_mirror_slot(mirror_name: &str, slot: &str) -> Result<SlotFound> {
    if slot != azure_cdc_core::names::slot_name(mirror_name) {
        return Ok(SlotFound::Other(format!("\"{slot}\" is not the slot name of mirror \"{mirror_name}\"")));
    }
    let row = crate::catalog::read(|| {
        pgrx::spi::Spi::connect(|c| {
            let t = c
                .select(
                    "SELECT slot_type, plugin::text, database = pg_catalog.current_database() \
                       FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                    None,
                    &[slot.into()],
                )
                .map_err(crate::errors::spi)?;
            match t.into_iter().next() {
                None => Ok(None),
                Some(r) => Ok(Some((
                    r.get::<String>(1).map_err(crate::errors::spi)?.unwrap_or_default(),
                    r.get::<String>(2).map_err(crate::errors::spi)?.unwrap_or_default(),
                    r.get::<bool>(3).map_err(crate::errors::spi)?.unwrap_or(false),
                ))),
            }
        })
    })?;
    Ok(match row {
        None => SlotFound::Missing,
        Some((kind, _, _)) if kind != "logical" => SlotFound::Other(format!("\"{slot}\" is a {kind} slot")),
        Some((_, _, false)) => SlotFound::Other(format!("\"{slot}\" belongs to another database")),
        Some((_, plugin, _)) if plugin.as_bytes() != PLUGIN.to_bytes() => {
            SlotFound::Other(format!("\"{slot}\" is decoded by output plugin \"{plugin}\""))
        }
        Some(_) => SlotFound::Mine,
    })
}

/// Drops the mirror's slot if it exists, is the mirror's own ([`find_mirror_slot`]) and no process
/// uses it. A slot of that name that is not the mirror's is never dropped: the error says whose it
/// looks like. Returns whether a slot was dropped.
pub fn drop_mirror_slot(mirror_name: &str, slot: &str) -> Result<bool> {
    match find_mirror_slot(mirror_name, slot)? {
        SlotFound::Missing => Ok(false),
        SlotFound::Other(why) => Err(Error::new(
            ErrorKind::ObjectInUse,
            format!("replication slot \"{slot}\" is not the slot of mirror \"{mirror_name}\": {why}"),
        )
        .with_hint("azure_cdc never drops a slot it did not create for the mirror; drop or rename that slot, or use another mirror name.")),
        SlotFound::Mine => {
            let c = c_name(slot)?;
            // SAFETY: called on the main thread without a slot acquired (MyReplicationSlot is NULL in
            // a backend, or in a worker between transactions); nowait = true raises an error instead of
            // waiting if another process holds the slot, which the pgrx guard turns into a Rust panic /
            // PostgreSQL error.
            unsafe { pg_sys::ReplicationSlotDrop(c.as_ptr(), true) };
            Ok(true)
        }
    }
}

/// Creates the slot and makes the current transaction use the snapshot of its consistent point.
/// Returns the consistent point (the LSN the change stream starts at). The slot stays acquired by this
/// process (so that no other process can drop it) until [`release`].
///
/// # Safety
/// Must be called on the main thread, first thing in a transaction that has read nothing and holds no
/// snapshot yet (`StartTransactionCommand()` just called), with no slot acquired.
pub unsafe fn create_with_snapshot(name: &str) -> Result<u64> {
    let c = c_name(name)?;
    // SAFETY (whole block): these are the steps walsender.c's CreateReplicationSlot performs for
    // SNAPSHOT 'use'; the caller guarantees the transaction state they require. Errors are raised
    // as PostgreSQL errors through the guarded FFI boundary, aborting the transaction, which releases
    // and removes the still-ephemeral slot.
    unsafe {
        pg_sys::XactIsoLevel = pg_sys::XACT_REPEATABLE_READ as i32;
        pg_sys::XactReadOnly = true;
        pg_sys::CheckSlotRequirements();
        pg_sys::CheckLogicalDecodingRequirements();
        crate::versions::create_slot(c.as_ptr());
        let mut routine = pg_sys::XLogReaderRoutine {
            page_read: Some(read_local_xlog_page),
            segment_open: Some(wal_segment_open),
            segment_close: Some(wal_segment_close),
        };
        let ctx = pg_sys::CreateInitDecodingContext(
            PLUGIN.as_ptr(),
            std::ptr::null_mut(),
            true,
            0,
            &mut routine,
            None,
            None,
            None,
        );
        pg_sys::DecodingContextFindStartpoint(ctx);
        pg_sys::InvalidateCatalogSnapshot();
        let builder = (*ctx).snapshot_builder;
        let snap = pg_sys::ffi::pg_guard_ffi_boundary(|| SnapBuildInitialSnapshot(builder));
        pg_sys::RestoreTransactionSnapshot(snap, pg_sys::MyProc.cast());
        let lsn = (*pg_sys::MyReplicationSlot).data.confirmed_flush;
        pg_sys::FreeDecodingContext(ctx);
        pg_sys::ReplicationSlotPersist();
        Ok(lsn)
    }
}

/// Acquires the mirror's slot and sets up logical decoding of it from its confirmed position, the way
/// `pg_logical_slot_get_changes` does (logicalfuncs.c), with this library as the output plugin. The
/// context lives in TopMemoryContext until the process exits. Returns the context.
///
/// # Safety
/// Main thread, outside any transaction, no slot acquired, connected to the slot's database.
pub unsafe fn open_decoding(name: &str) -> Result<*mut pg_sys::LogicalDecodingContext> {
    let c = c_name(name)?;
    // SAFETY (whole block): the steps of pg_logical_slot_get_changes_guts up to XLogBeginRead; errors
    // are raised as PostgreSQL errors through the guarded FFI boundary. The reader routine is copied
    // into the reader by XLogReaderAllocate.
    unsafe {
        pg_sys::CheckLogicalDecodingRequirements();
        crate::versions::acquire_slot(c.as_ptr());
        if (*pg_sys::MyReplicationSlot).data.database != pg_sys::MyDatabaseId {
            pg_sys::ReplicationSlotRelease();
            return Err(Error::new(
                ErrorKind::ObjectInUse,
                format!("replication slot \"{name}\" belongs to another database"),
            )
            .with_hint("azure_cdc decodes only the slot it created for the mirror."));
        }
        let plugin = std::ffi::CStr::from_ptr((*pg_sys::MyReplicationSlot).data.plugin.data.as_ptr());
        if plugin != PLUGIN {
            let found = plugin.to_string_lossy().into_owned();
            pg_sys::ReplicationSlotRelease();
            return Err(Error::new(
                ErrorKind::PrerequisiteNotMet,
                format!("replication slot \"{name}\" uses output plugin \"{found}\", not azure_cdc"),
            )
            .with_detail("The mirror was started by a version of azure_cdc without change capture.")
            .with_hint("Stop the mirror and start it again into a new folder."));
        }
        let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
        let mut routine = pg_sys::XLogReaderRoutine {
            page_read: Some(read_local_xlog_page),
            segment_open: Some(wal_segment_open),
            segment_close: Some(wal_segment_close),
        };
        let ctx = pg_sys::CreateDecodingContext(
            pg_sys::InvalidXLogRecPtr as u64,
            std::ptr::null_mut(),
            false,
            &mut routine,
            None,
            None,
            None,
        );
        pg_sys::MemoryContextSwitchTo(old);
        pg_sys::XLogBeginRead((*ctx).reader, (*pg_sys::MyReplicationSlot).data.restart_lsn);
        Ok(ctx)
    }
}

/// Decodes the next WAL record, calling the output plugin for every transaction it commits. Returns
/// false when there was no record to read.
///
/// # Safety
/// `ctx` must come from [`open_decoding`]; main thread; outside any transaction.
pub unsafe fn decode_next(ctx: *mut pg_sys::LogicalDecodingContext) -> Result<bool> {
    // SAFETY: the loop body of pg_logical_slot_get_changes_guts; errors raise PostgreSQL errors.
    unsafe {
        let mut errm: *mut std::ffi::c_char = std::ptr::null_mut();
        let record = pg_sys::XLogReadRecord((*ctx).reader, &mut errm);
        if !errm.is_null() {
            let text = std::ffi::CStr::from_ptr(errm).to_string_lossy().into_owned();
            return Err(Error::new(ErrorKind::Internal, format!("could not find record for logical decoding: {text}")));
        }
        if record.is_null() {
            return Ok(false);
        }
        pg_sys::ffi::pg_guard_ffi_boundary(|| LogicalDecodingProcessRecord(ctx, (*ctx).reader));
        Ok(true)
    }
}

/// Confirms to the slot that everything before `lsn` is processed, and marks the slot for saving at
/// the next checkpoint (what `pg_logical_slot_get_changes` does after a call).
///
/// # Safety
/// Main thread, this process has the slot acquired, outside any decoding callback.
pub unsafe fn confirm(lsn: u64) {
    // SAFETY: as required above.
    unsafe {
        // Never backwards: before PostgreSQL 17 the slot takes any position it is given.
        if lsn <= (*pg_sys::MyReplicationSlot).data.confirmed_flush {
            return;
        }
        pg_sys::LogicalConfirmReceivedLocation(lsn);
        pg_sys::ReplicationSlotMarkDirty();
    }
}

/// How far the slot this process has acquired is confirmed.
///
/// # Safety
/// Main thread, this process has the slot acquired.
pub unsafe fn confirmed_flush() -> u64 {
    // SAFETY: as required above; only this process moves it.
    unsafe { (*pg_sys::MyReplicationSlot).data.confirmed_flush }
}

/// Releases the slot this process has acquired, if any (an ephemeral slot, from a creation that
/// failed half way, is dropped by the release).
pub fn release() {
    // SAFETY: MyReplicationSlot is this process's own pointer; releasing is what a process does when it
    // stops using a slot, on the main thread.
    unsafe {
        if !pg_sys::MyReplicationSlot.is_null() {
            pg_sys::ReplicationSlotRelease();
        }
    }
}

/// An LSN in PostgreSQL's text form (`16/B374D848`).
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}
