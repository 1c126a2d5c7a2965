//! Pure logic of azure_cdc, kept apart from the PostgreSQL glue so that it can be unit tested with a
//! plain `cargo test` in milliseconds.
//!
//! Nothing in this crate links against PostgreSQL, uses `unsafe`, or knows about pgrx. The extension
//! crate (the pgrx shell at the top of the repository) reads catalogs and tuples and hands owned values
//! to the code here. Any thread may call this crate.
//!
//! Vocabulary used across the project:
//! - **mirror**: one `start_mirror` call; a set of tables of one database copied to one target.
//! - **target**: where the landing zone lives: a local folder (`file://`) or an object store (Azure
//!   Blob / ADLS Gen2 / OneLake, S3, GCS).
//! - **credential**: named options (keys, secrets, endpoints) a mirror uses to reach its target.
//! - **landing zone**: the folder layout and files the lakehouse reads (`<schema>.schema/<table>/`,
//!   `_metadata.json`, numbered Parquet data files, `_partnerEvents.json`).
//! - **snapshot file / change file**: a data file holding a table's initial rows / later changes.
//! - **file number**: the 20-digit, contiguous-from-1 sequence number of a data file within its table.

pub mod batch;
pub mod changes;
pub mod cloud;
pub mod columns;
pub mod datafile;
pub mod dfs;
pub mod error;
pub mod health;
pub mod landing_zone;
pub mod lifecycle;
pub mod names;
pub mod numeric;
pub mod parts;
pub mod prerequisites;
pub mod reseed;
pub mod shipper;
pub mod target;
pub mod typemap;
pub mod verify;

pub use arrow_array;
pub use arrow_schema;
pub use error::{Error, ErrorKind, Result};
