//! What differs between the PostgreSQL versions azure_cdc builds against (13 to 18), in one place,
//! behind pgrx's version features. Main thread of a backend or worker; calls PostgreSQL.
//!
//! - A tuple descriptor's attributes: an array `attrs` up to 17; from 18 they follow the compact
//!   attributes and are reached with `TupleDescAttr`.
//! - A decoded change's tuples: `ReorderBufferTupleBuf` up to 16, a plain `HeapTuple` from 17.
//! - Creating a replication slot takes `failover` and `synced` from 17; acquiring one takes
//!   `error_if_invalid` from 18.
//! - `pqsignal` is `pqsignal_be` in the backend from 18.
//! - `proc_exit` is bound as returning from 18.

use pgrx::pg_sys;

/// The attributes of a tuple descriptor, dropped ones included, in attribute-number order.
///
/// # Safety
/// `desc` must be a valid tuple descriptor that outlives the returned slice.
pub unsafe fn attributes<'a>(desc: pg_sys::TupleDesc) -> &'a [pg_sys::FormData_pg_attribute] {
    // SAFETY: the caller's guarantee; a descriptor holds natts attributes.
    unsafe {
        let natts = (*desc).natts.max(0) as usize;
        #[cfg(not(feature = "pg18"))]
        {
            (*desc).attrs.as_slice(natts)
        }
        #[cfg(feature = "pg18")]
        {
            if natts == 0 {
                return &[];
            }
            // From 18 the FormData_pg_attribute array follows the compact attributes, contiguous:
            // TupleDescAttr(desc, i) is its i-th element.
            std::slice::from_raw_parts(pg_sys::TupleDescAttr(desc, 0), natts)
        }
    }
}

/// A tuple of a decoded change (new or old image).
#[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
pub type ChangeTuple = *mut pg_sys::ReorderBufferTupleBuf;
#[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16")))]
pub type ChangeTuple = pg_sys::HeapTuple;

/// The heap tuple of a decoded change's tuple, or NULL.
///
/// # Safety
/// `t` is NULL or a tuple of a change being replayed.
pub unsafe fn change_heap_tuple(t: ChangeTuple) -> pg_sys::HeapTuple {
    if t.is_null() {
        return std::ptr::null_mut();
    }
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
    // SAFETY: a ReorderBufferTupleBuf embeds its HeapTupleData.
    unsafe {
        &mut (*t).tuple
    }
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16")))]
    {
        t
    }
}

/// Creates a database-specific, ephemeral logical slot without two-phase decoding (or failover).
///
/// # Safety
/// As `ReplicationSlotCreate`: main thread, no slot acquired.
pub unsafe fn create_slot(name: *const std::ffi::c_char) {
    let ephemeral = pg_sys::ReplicationSlotPersistency::RS_EPHEMERAL;
    // SAFETY: the caller's guarantee.
    unsafe {
        #[cfg(any(feature = "pg13"))]
        pg_sys::ReplicationSlotCreate(name, true, ephemeral);
        #[cfg(any(feature = "pg14", feature = "pg15", feature = "pg16"))]
        pg_sys::ReplicationSlotCreate(name, true, ephemeral, false);
        #[cfg(any(feature = "pg17", feature = "pg18"))]
        pg_sys::ReplicationSlotCreate(name, true, ephemeral, false, false, false);
    }
}

/// Acquires slot `name`, failing at once if another process has it (and, from 18, if it was
/// invalidated: the caller checks that itself before).
///
/// # Safety
/// As `ReplicationSlotAcquire`: main thread, no slot acquired.
pub unsafe fn acquire_slot(name: *const std::ffi::c_char) {
    // SAFETY: the caller's guarantee.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        pg_sys::ReplicationSlotAcquire(name, true);
        #[cfg(feature = "pg18")]
        pg_sys::ReplicationSlotAcquire(name, true, true);
    }
}

/// Installs a signal handler the way the backend does.
///
/// # Safety
/// Main thread, while signals are blocked (worker start).
pub unsafe fn set_signal_handler(signo: i32, handler: pg_sys::pqsigfunc) {
    // SAFETY: the caller's guarantee.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        pg_sys::pqsignal(signo, handler);
        #[cfg(feature = "pg18")]
        pg_sys::pqsignal_be(signo, handler);
    }
}

/// Ends the process with `code`, running its exit callbacks.
pub fn exit_process(code: i32) -> ! {
    // SAFETY: proc_exit runs the normal exit callbacks and never returns.
    unsafe { pg_sys::proc_exit(code) };
    #[allow(unreachable_code)]
    {
        unreachable!("proc_exit returned")
    }
}
