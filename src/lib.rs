//! azure_cdc: keeps a read-only, continuously replicated copy of a database's tables in a lakehouse
//! landing zone (Microsoft Fabric Open Mirroring format) — this crate is the PostgreSQL side.
//!
//! Processes (see DESIGN.md): one static **launcher** per server; per mirrored database a short-lived
//! **scout** that reports the database's mirrors after a restart; per mirror a **snapshot** worker
//! that creates the mirror's logical replication slot and copies its tables into Parquet files in the
//! same consistent snapshot, then a **decoder** ([`decoder`]) that reads the slot in-process with this
//! library as the output plugin and publishes change files through its shipper thread. The SQL API
//! ([`api`]) only validates, writes catalog rows and wakes the launcher.
//!
//! Vocabulary (shared with the pure crate `azure_cdc_core`): mirror, target, landing zone, table
//! folder, data file, file number, slot, consistent point. Pure logic lives in `azure_cdc_core`;
//! everything in this crate is PostgreSQL glue and runs on the main thread of a backend or worker,
//! except the encoder thread of the snapshot worker and the shipper thread of the decoder, which
//! never call PostgreSQL.

use pgrx::prelude::*;

mod api;
mod catalog;
mod copy;
mod credentials;
mod decoder;
mod errors;
mod gucs;
mod launcher;
mod privileges;
mod reseed;
mod shmem;
mod slot;
mod snapshot;
mod status;
mod tuples;
mod verify;
mod versions;
mod worker;

// The #[pg_test] tier (in pg_tests.rs: SQL API, privileges, catalog rules, numeric decoding).
#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    include!("pg_tests.rs");
}

::pgrx::pg_module_magic!();

pgrx::extension_sql_file!("../sql/catalog.sql", name = "catalog", bootstrap);

/// Set when the library was loaded by the postmaster through `shared_preload_libraries`.
static PRELOADED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub(crate) fn preloaded() -> bool {
    PRELOADED.load(std::sync::atomic::Ordering::Relaxed)
}

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: reading a PostgreSQL global flag from the main thread during library load.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "azure_cdc must be loaded via shared_preload_libraries",
            function_name!(),
        )
        .set_hint("Add azure_cdc to shared_preload_libraries in postgresql.conf and restart the server.")
        .report(PgLogLevel::ERROR);
        return;
    }
    PRELOADED.store(true, std::sync::atomic::Ordering::Relaxed);
    gucs::init();
    shmem::init();
    launcher::register();
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    /// The settings of `pg_test_config`, the top-level file every test cluster starts with. A line
    /// marked `? ` is taken only where the server knows its parameter.
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        const CONFIG: &str = include_str!("../pg_test_config");
        let known = server_parameters();
        CONFIG
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| match l.strip_prefix("? ") {
                Some(optional) => {
                    let name = optional.split(|c: char| c == '=' || c.is_whitespace()).next().unwrap_or_default();
                    // Unknown (no server found): taken, as every server the tests run on has it.
                    known.as_ref().is_none_or(|k| k.iter().any(|p| p == name)).then_some(optional)
                }
                None => Some(l),
            })
            .collect()
    }

    /// The parameters of the server this build is tested on: `postgres --describe-config` from the
    /// bin folder of the pg_config cargo-pgrx registered for this major version.
    fn server_parameters() -> Option<Vec<String>> {
        let home = std::env::var("PGRX_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|_| std::env::var("HOME").map(|h| std::path::Path::new(&h).join(".pgrx")))
            .ok()?;
        let config = std::fs::read_to_string(home.join("config.toml")).ok()?;
        let key = format!("pg{}", pgrx::pg_sys::PG_MAJORVERSION_NUM);
        let pg_config = config.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
        })?;
        let out = std::process::Command::new(&pg_config).arg("--bindir").output().ok()?;
        let bindir = String::from_utf8(out.stdout).ok()?;
        let out = std::process::Command::new(std::path::Path::new(bindir.trim()).join("postgres"))
            .arg("--describe-config")
            .output()
            .ok()?;
        Some(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split('\t').next())
                .map(str::to_string)
                .collect(),
        )
    }
}
