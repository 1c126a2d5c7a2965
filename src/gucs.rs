//! Server parameters of azure_cdc, all in one place. Each has a doc comment with its unit, range and
//! reload behaviour; README.md has the same table for users. Registered from `_PG_init` (postmaster);
//! read by any process.

use azure_cdc_core::datafile::Compression;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// `azure_cdc.max_fabric_mirrors`: how many mirrors the server can run at once (all databases).
/// Range 1–6, default 3. Restart to change (it sizes shared memory).
pub static MAX_FABRIC_MIRRORS: GucSetting<i32> = GucSetting::<i32>::new(3);
/// Upper bound of `azure_cdc.max_fabric_mirrors`, and the number of mirror entries in shared memory.
pub const MAX_FABRIC_MIRRORS_LIMIT: i32 = 6;

/// `azure_cdc.max_snapshot_workers`: background workers that copy tables of one mirror's initial
/// snapshot in parallel, all in the same consistent snapshot, across tables and across the block
/// ranges of a large table. Range 1–16, default 3. Reload (SIGHUP); read when a snapshot starts.
pub static MAX_SNAPSHOT_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(3);

/// `azure_cdc.snapshot_buffer_size`: the size, in MB, at which a snapshot data file is closed and
/// published (files are at most about this big). Range 10–4000, default 1000. Reload (SIGHUP); read
/// when a table's snapshot starts. Worker memory does not grow with it: rows are encoded straight into
/// the target's temporary file, one row group (at most 64 MB) at a time.
pub static SNAPSHOT_BUFFER_SIZE_MB: GucSetting<i32> = GucSetting::<i32>::new(1000);

/// `azure_cdc.change_batch_buffer_size`: the change buffer of one mirror, in MB: decoded changes not
/// yet published (as Arrow columns). It holds up to three batches — one filling, one waiting for the
/// shipper, one being written — so a batch closes when it reaches a third of this size, or
/// `azure_cdc.change_batch_export_timeout` after its first change. Range 1–1024, default 16. Reload
/// (SIGHUP).
pub static CHANGE_BATCH_BUFFER_SIZE_MB: GucSetting<i32> = GucSetting::<i32>::new(16);

/// `azure_cdc.change_batch_export_timeout`: the longest a decoded change waits in the buffer before its
/// batch is written, in milliseconds (the latency knob). Range 100 ms – 1 h, default 30 s. Reload
/// (SIGHUP).
pub static CHANGE_BATCH_EXPORT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);

/// `azure_cdc.onelake_buffer_size`: size, in MB, of one uploaded part of a data file on an
/// object-store target (OneLake, ADLS, Blob, S3, GCS). A data file up to this size is uploaded in one
/// request; a larger one in parts of this size, so a worker holds at most this much of a file in
/// memory per file it writes. Range 5–4000, default 100. Reload (SIGHUP); read when a worker opens
/// its target.
pub static ONELAKE_BUFFER_SIZE_MB: GucSetting<i32> = GucSetting::<i32>::new(100);

/// `azure_cdc.table_reset_timeout`: how long, in seconds, a table being reset (its folder deleted for
/// a reseed or a new attempt of the initial snapshot) waits for the landing zone's reader to drop it
/// before its folder is created again. Known on OneLake only (Fabric's mirrored database no longer has
/// the table in its `Tables` folder); elsewhere nothing is waited for. A reseed that waits longer parks
/// the table (Failed; `resync_table` tries again); an initial snapshot's attempt fails and is retried.
/// 0: do not wait. Range 0 – 1 day, default 15 min. Reload (SIGHUP).
pub static TABLE_RESET_TIMEOUT_S: GucSetting<i32> = GucSetting::<i32>::new(900);

/// `azure_cdc.max_parallel_uploads`: how many tables' change files of one batch are written at once.
/// Each is encoded and uploaded by its own thread of the decoder worker; batches are still published
/// one after another, and each table's files in number order. Raising it helps a store far away (each
/// file costs a few round trips) when transactions touch many tables. Range 1–64, default 32. Reload
/// (SIGHUP); read when a batch is closed.
pub static MAX_PARALLEL_UPLOADS: GucSetting<i32> = GucSetting::<i32>::new(32);

/// Values of `azure_cdc.parquet_compression`.
#[derive(pgrx::PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum ParquetCompression {
    #[name = c"zstd"]
    Zstd,
    #[name = c"snappy"]
    Snappy,
    #[name = c"gzip"]
    Gzip,
    #[name = c"uncompressed"]
    Uncompressed,
}

/// `azure_cdc.parquet_compression`: codec of data files: zstd (default), snappy, gzip or
/// uncompressed. Reload (SIGHUP); read when a data file is started.
pub static PARQUET_COMPRESSION: GucSetting<ParquetCompression> =
    GucSetting::<ParquetCompression>::new(ParquetCompression::Zstd);

pub fn init() {
    GucRegistry::define_int_guc(
        c"azure_cdc.max_fabric_mirrors",
        c"Maximum number of mirrors that can run at once on this server.",
        c"Each running mirror needs 3 background workers; see max_worker_processes.",
        &MAX_FABRIC_MIRRORS,
        1,
        MAX_FABRIC_MIRRORS_LIMIT,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"azure_cdc.max_snapshot_workers",
        c"Maximum number of background workers copying tables of one mirror's snapshot in parallel.",
        c"They share one snapshot; a large table is scanned by several of them, block range by block range.",
        &MAX_SNAPSHOT_WORKERS,
        1,
        16,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"azure_cdc.snapshot_buffer_size",
        c"Size at which a snapshot data file is closed and published.",
        c"",
        &SNAPSHOT_BUFFER_SIZE_MB,
        10,
        4000,
        GucContext::Sighup,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_int_guc(
        c"azure_cdc.change_batch_buffer_size",
        c"Size at which a mirror's batch of changes is closed and written to the target.",
        c"",
        &CHANGE_BATCH_BUFFER_SIZE_MB,
        1,
        1024,
        GucContext::Sighup,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_int_guc(
        c"azure_cdc.change_batch_export_timeout",
        c"Longest time a decoded change waits before its batch is written to the target.",
        c"",
        &CHANGE_BATCH_EXPORT_TIMEOUT_MS,
        100,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"azure_cdc.onelake_buffer_size",
        c"Size of one uploaded part of a data file on an object-store target.",
        c"",
        &ONELAKE_BUFFER_SIZE_MB,
        5,
        4000,
        GucContext::Sighup,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_int_guc(
        c"azure_cdc.table_reset_timeout",
        c"Longest wait for the landing zone's reader to drop a table whose folder was deleted to reset it.",
        c"0 does not wait.",
        &TABLE_RESET_TIMEOUT_S,
        0,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"azure_cdc.max_parallel_uploads",
        c"Maximum number of tables whose change files of one batch are written at once.",
        c"",
        &MAX_PARALLEL_UPLOADS,
        1,
        64,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"azure_cdc.parquet_compression",
        c"Compression codec of Parquet data files: zstd, snappy, gzip or uncompressed.",
        c"",
        &PARQUET_COMPRESSION,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

/// The compression codec in force.
pub fn parquet_compression() -> Compression {
    match PARQUET_COMPRESSION.get() {
        ParquetCompression::Zstd => Compression::Zstd,
        ParquetCompression::Snappy => Compression::Snappy,
        ParquetCompression::Gzip => Compression::Gzip,
        ParquetCompression::Uncompressed => Compression::Uncompressed,
    }
}

/// Snapshot file size limit in bytes.
pub fn snapshot_file_bytes() -> usize {
    SNAPSHOT_BUFFER_SIZE_MB.get().max(1) as usize * 1024 * 1024
}

/// Change buffer size in bytes.
pub fn change_buffer_bytes() -> usize {
    CHANGE_BATCH_BUFFER_SIZE_MB.get().max(1) as usize * 1024 * 1024
}

/// Change batch timeout.
pub fn change_batch_timeout() -> std::time::Duration {
    std::time::Duration::from_millis(CHANGE_BATCH_EXPORT_TIMEOUT_MS.get().max(100) as u64)
}

/// Tables of one batch written at once.
pub fn max_parallel_uploads() -> usize {
    MAX_PARALLEL_UPLOADS.get().max(1) as usize
}

/// Upload part size in bytes.
pub fn onelake_buffer_bytes() -> usize {
    ONELAKE_BUFFER_SIZE_MB.get().max(5) as usize * 1024 * 1024
}

/// The longest a table reset waits for the landing zone's reader.
pub fn table_reset_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(TABLE_RESET_TIMEOUT_S.get().max(0) as u64)
}
