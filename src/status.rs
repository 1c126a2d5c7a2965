//! Monitoring in SQL: `list_mirrors()` (one row per mirror, live figures from shared memory),
//! `get_mirror_status()` (its older, shorter form), `get_health_status()` (problems with stable codes
//! and hints, from the pure rules in `azure_cdc_core::health`) and `metrics()` (name/value rows for a
//! Prometheus exporter). Runs in the calling backend, on its main thread; reads only.

use azure_cdc_core::health::{self, MirrorFacts, Problem};
use azure_cdc_core::lifecycle::{Health, MirrorState, TableState};
use azure_cdc_core::prerequisites;
use azure_cdc_core::Result;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

use crate::errors::{spi, OrRaise};
use crate::shmem::{self, Phase, StreamStats};

/// What `list_mirrors` shows of one mirror.
struct MirrorView {
    name: String,
    state: MirrorState,
    display_state: String,
    target: String,
    credential: Option<String>,
    tables: i64,
    tables_failed: i64,
    tables_warning: i64,
    confirmed_lsn: Option<String>,
    lag_bytes: Option<i64>,
    lag_seconds: Option<f64>,
    wal_retained_bytes: Option<i64>,
    wal_status: Option<String>,
    safe_wal_bytes: Option<i64>,
    buffered_bytes: Option<i64>,
    spilled_bytes: Option<i64>,
    changes_per_second: Option<f64>,
    bytes_per_second: Option<f64>,
    changes_published: Option<i64>,
    bytes_published: Option<i64>,
    last_published_at: Option<TimestampWithTimeZone>,
    worker_pid: Option<i32>,
    last_error: Option<String>,
    last_error_code: Option<String>,
    failed_tables: Vec<(String, String)>,
    keyless_tables: Vec<String>,
    /// The role that started the mirror and controls it.
    owner: String,
}

/// The live figures of a mirror's decoder, if one runs.
fn live_stream(mirror_id: i64) -> (Option<StreamStats>, Option<i32>) {
    match shmem::find(crate::api::database_oid(), mirror_id).map(shmem::entry) {
        Some(e) if shmem::worker_alive(e.worker_pid, e.database) => {
            ((e.phase == Phase::Snapshotted).then_some(e.stream), Some(e.worker_pid))
        }
        _ => (None, None),
    }
}

fn mirror_views(function: &str) -> Result<Vec<MirrorView>> {
    crate::privileges::require_admin(function)?;
    // SAFETY: reads the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    crate::catalog::read(|| {
        Spi::connect(|c| {
            let t = c
            .select(
                "SELECT m.mirror_id, m.mirror_name, m.state, m.target, m.credential, \
                        s.confirmed_flush_lsn::text, \
                        CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL \
                             ELSE pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint END, \
                        CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL \
                             ELSE pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), s.restart_lsn)::bigint END, \
                        s.wal_status, s.safe_wal_size, st.spill_bytes, m.last_error, m.last_error_code, \
                        (SELECT pg_catalog.count(*) FROM azure_cdc.mirror_tables t WHERE t.mirror_id = m.mirror_id), \
                        ARRAY(SELECT pg_catalog.format('%s.%s', t.schema_name, t.table_name) || E'\\x1f' || COALESCE(t.last_error, '') \
                                FROM azure_cdc.mirror_tables t WHERE t.mirror_id = m.mirror_id AND t.state = 'Failed' ORDER BY 1), \
                        ARRAY(SELECT pg_catalog.format('%s.%s', t.schema_name, t.table_name) \
                                FROM azure_cdc.mirror_tables t WHERE t.mirror_id = m.mirror_id \
                                 AND t.state IN ('Snapshotting', 'Replicating') \
                                 AND pg_catalog.cardinality(t.key_columns) = 0 ORDER BY 1), \
                        pg_catalog.pg_get_userbyid(m.owner)::text \
                   FROM azure_cdc.mirrors m \
                   LEFT JOIN pg_catalog.pg_replication_slots s ON s.slot_name = m.slot_name \
                   LEFT JOIN pg_catalog.pg_stat_replication_slots st ON st.slot_name = m.slot_name \
                  ORDER BY m.mirror_name",
                None,
                &[],
            )
            .map_err(spi)?;
            let mut out = Vec::new();
            for r in t {
                let mirror_id: i64 = r.get(1).map_err(spi)?.unwrap_or_default();
                let state = MirrorState::parse(&r.get::<String>(3).map_err(spi)?.unwrap_or_default())?;
                let (stream, pid) = live_stream(mirror_id);
                let lag_seconds = stream.map(|s| {
                    if s.oldest_unshipped_commit == 0 {
                        0.0
                    } else {
                        (now - s.oldest_unshipped_commit).max(0) as f64 / 1e6
                    }
                });
                let rates = stream.map(|s| s.rates.per_second(now / 1000, s.changes_shipped, s.bytes_shipped));
                let failed_tables: Vec<(String, String)> = r
                    .get::<Vec<String>>(15)
                    .map_err(spi)?
                    .unwrap_or_default()
                    .into_iter()
                    .map(|s| match s.split_once('\u{1f}') {
                        Some((t, e)) => (t.to_string(), e.to_string()),
                        None => (s, String::new()),
                    })
                    .collect();
                let keyless_tables: Vec<String> = r.get(16).map_err(spi)?.unwrap_or_default();
                let last_error: Option<String> = r.get(12).map_err(spi)?;
                // A stop or pause in progress (another session's stop_mirror / pause_mirror, not yet
                // committed, waits for the workers to exit): the registry wants them stopped.
                let stopping = state.wants_workers()
                    && shmem::find(crate::api::database_oid(), mirror_id)
                        .map(shmem::entry)
                        .is_some_and(|e| e.desired == shmem::Desired::Stop && shmem::workers_may_run_entry(&e));
                let display_state = match state {
                    _ if stopping => "Stopping".to_string(),
                    MirrorState::Running
                        if last_error.is_some() || !failed_tables.is_empty() || !keyless_tables.is_empty() =>
                    {
                        "Running with warning".to_string()
                    }
                    s => s.as_str().to_string(),
                };
                out.push(MirrorView {
                    name: r.get(2).map_err(spi)?.unwrap_or_default(),
                    state,
                    display_state,
                    target: r.get(4).map_err(spi)?.unwrap_or_default(),
                    credential: r.get(5).map_err(spi)?,
                    tables: r.get(14).map_err(spi)?.unwrap_or(0),
                    tables_failed: failed_tables.len() as i64,
                    tables_warning: keyless_tables.len() as i64,
                    confirmed_lsn: r.get(6).map_err(spi)?,
                    lag_bytes: r.get(7).map_err(spi)?,
                    lag_seconds,
                    wal_retained_bytes: r.get(8).map_err(spi)?,
                    wal_status: r.get(9).map_err(spi)?,
                    safe_wal_bytes: r.get(10).map_err(spi)?,
                    buffered_bytes: stream.map(|s| s.buffered_bytes as i64),
                    spilled_bytes: r.get(11).map_err(spi)?,
                    changes_per_second: rates.map(|r| r.0),
                    bytes_per_second: rates.map(|r| r.1),
                    changes_published: stream.map(|s| s.changes_shipped as i64),
                    bytes_published: stream.map(|s| s.bytes_shipped as i64),
                    last_published_at: stream
                        .filter(|s| s.last_shipped_at != 0)
                        .and_then(|s| TimestampWithTimeZone::try_from(s.last_shipped_at).ok()),
                    worker_pid: pid,
                    last_error,
                    last_error_code: r.get(13).map_err(spi)?,
                    failed_tables,
                    keyless_tables,
                    owner: r.get(17).map_err(spi)?.unwrap_or_default(),
                });
            }
            Ok(out)
        })
    })
}

/// One row per mirror of this database. `state`: Starting (snapshot), Running, Running with warning
/// (an error being retried, a parked table or a table without keys), Stopping (a stop or pause waits
/// for the workers to exit), Paused, Failed, Stopped. `owner`: the role that started the mirror and
/// controls it.
/// `target` is the URL (credentials are never in it), `credential` the credential's name. Slot
/// figures: `confirmed_lsn`, `lag_bytes` (WAL since then), `wal_retained_bytes` (WAL the slot keeps,
/// from its restart LSN), `wal_status` and `safe_wal_bytes` (WAL that can still be written before
/// the slot is invalidated by `max_slot_wal_keep_size`; NULL when unlimited). Live decoder figures
/// (NULL while no decoder runs): `lag_seconds`, `buffered_bytes`, changes and bytes per second over
/// the last minute, changes and bytes published since the decoder started, the last publication.
/// `spilled_bytes`: the server's reorder buffer spill for the slot. `worker_pid`: the mirror's
/// snapshot worker or decoder.
#[pg_extern]
fn list_mirrors() -> TableIterator<
    'static,
    (
        name!(mirror_name, String),
        name!(state, String),
        name!(target, String),
        name!(credential, Option<String>),
        name!(tables, i64),
        name!(tables_failed, i64),
        name!(tables_warning, i64),
        name!(confirmed_lsn, Option<String>),
        name!(lag_bytes, Option<i64>),
        name!(lag_seconds, Option<f64>),
        name!(wal_retained_bytes, Option<i64>),
        name!(wal_status, Option<String>),
        name!(safe_wal_bytes, Option<i64>),
        name!(buffered_bytes, Option<i64>),
        name!(spilled_bytes, Option<i64>),
        name!(changes_per_second, Option<f64>),
        name!(bytes_per_second, Option<f64>),
        name!(changes_published, Option<i64>),
        name!(bytes_published, Option<i64>),
        name!(last_published_at, Option<TimestampWithTimeZone>),
        name!(worker_pid, Option<i32>),
        name!(last_error, Option<String>),
        name!(last_error_code, Option<String>),
        name!(owner, String),
    ),
> {
    let rows = mirror_views("list_mirrors").or_raise();
    TableIterator::new(rows.into_iter().map(|m| {
        (
            m.name,
            m.display_state,
            m.target,
            m.credential,
            m.tables,
            m.tables_failed,
            m.tables_warning,
            m.confirmed_lsn,
            m.lag_bytes,
            m.lag_seconds,
            m.wal_retained_bytes,
            m.wal_status,
            m.safe_wal_bytes,
            m.buffered_bytes,
            m.spilled_bytes,
            m.changes_per_second,
            m.bytes_per_second,
            m.changes_published,
            m.bytes_published,
            m.last_published_at,
            m.worker_pid,
            m.last_error,
            m.last_error_code,
            m.owner,
        )
    }))
}

pgrx::extension_sql!(
    r#"
-- The shorter status of earlier versions, kept for scripts that use it.
CREATE FUNCTION azure_cdc.get_mirror_status()
RETURNS TABLE (mirror_name text, state text, confirmed_lsn text, lag_bytes bigint, lag_seconds float8,
               buffered_bytes bigint, spilled_bytes bigint, changes_published bigint,
               last_published_at timestamptz, decoder_pid int, last_error text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT m.mirror_name, m.state, m.confirmed_lsn, m.lag_bytes, m.lag_seconds, m.buffered_bytes,
           m.spilled_bytes, m.changes_published, m.last_published_at,
           CASE WHEN m.changes_published IS NOT NULL THEN m.worker_pid END, m.last_error
      FROM azure_cdc.list_mirrors() m
$$;
"#,
    name = "get_mirror_status",
    requires = [list_mirrors]
);

/// The problems of the server and of this database's mirrors.
fn problems(mirror: Option<&str>) -> Result<Vec<Problem>> {
    crate::privileges::require_admin("get_health_status")?;
    let mut out = Vec::new();
    if mirror.is_none() {
        let mut facts = crate::api::server_facts()?;
        // The prerequisite rules count one mirror more (the next one); health is about those running.
        facts.active_mirrors = (facts.active_mirrors - 1).max(0);
        for check in prerequisites::evaluate(&facts) {
            let about_caller = matches!(
                check.code,
                "USER_NOT_CDC_ADMIN"
                    | "NO_CREATE_PRIVILEGE_ON_DATABASE"
                    | "MAX_FABRIC_MIRRORS_REACHED"
                    | "NO_FREE_REPLICATION_SLOTS"
            );
            if check.is_error() && !about_caller {
                let code = match check.code {
                    "MAX_WORKER_PROCESSES_TOO_LOW" => "CDC_ERR_TOO_MANY_WORKERS",
                    "WAL_LEVEL_NOT_LOGICAL" => "CDC_ERR_WAL_LEVEL_NOT_LOGICAL",
                    "NOT_IN_SHARED_PRELOAD_LIBRARIES" => "CDC_ERR_NOT_PRELOADED",
                    "SERVER_IN_RECOVERY" => "CDC_ERR_SERVER_IN_RECOVERY",
                    "OUTPUT_PLUGIN_NOT_ALLOWED" => "CDC_ERR_OUTPUT_PLUGIN_NOT_ALLOWED",
                    "CDC_ADMIN_ROLE_NOT_EXISTS" => "CDC_ERR_ADMIN_ROLE_MISSING",
                    _ => "CDC_ERR_PREREQUISITE",
                };
                out.push(Problem {
                    scope: "system",
                    object: String::new(),
                    level: Health::Error,
                    code,
                    message: format!("prerequisite {} is not met", check.code),
                    hint: check.detail.get("hint").and_then(|h| h.as_str()).unwrap_or_default().to_string(),
                });
            }
        }
        let launcher = crate::catalog::read(|| {
            Spi::get_one::<bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity WHERE backend_type = 'azure_cdc launcher')",
            )
            .map_err(spi)
        })?
        .unwrap_or(false);
        if !launcher && crate::preloaded() {
            out.push(Problem {
                scope: "system",
                object: String::new(),
                level: Health::Error,
                code: "CDC_ERR_LAUNCHER_NOT_RUNNING",
                message: "the azure_cdc launcher is not running".into(),
                hint: "The postmaster restarts it within seconds; if not, check the server log.".into(),
            });
        }
    }
    let max_keep_mb = crate::catalog::read(|| {
        Spi::get_one::<String>("SELECT setting FROM pg_catalog.pg_settings WHERE name = 'max_slot_wal_keep_size'")
            .map_err(spi)
    })?
    .and_then(|s| s.parse::<i64>().ok())
    .filter(|mb| *mb >= 0);
    let views = mirror_views("get_health_status")?;
    if let Some(name) = mirror {
        if !views.iter().any(|m| m.name == name) {
            return Err(crate::api::unknown_mirror(name));
        }
    }
    for m in views.into_iter().filter(|m| mirror.is_none_or(|n| n == m.name)) {
        let facts = MirrorFacts {
            name: m.name.clone(),
            state: Some(m.state),
            last_error_code: m
                .last_error_code
                .clone()
                .or(m.last_error.as_ref().map(|_| "CDC_ERR_WORKER_FAILED".to_string())),
            last_error: m.last_error.clone(),
            worker_running: m.worker_pid.is_some(),
            wal_status: m.wal_status.clone(),
            safe_wal_size: m.safe_wal_bytes,
            max_slot_wal_keep_size: max_keep_mb.map(|mb| mb * 1024 * 1024),
            failed_tables: m.failed_tables.clone(),
            keyless_tables: m.keyless_tables.clone(),
        };
        out.extend(health::mirror_problems(&facts).into_iter().map(|mut p| {
            if p.scope == "table" {
                p.object = format!("{}: {}", m.name, p.object);
            }
            p
        }));
    }
    Ok(out)
}

/// Problems of the server, of the mirrors of this database and of their tables — or of one mirror —
/// one row each: `scope` (system, mirror, table), `object`, `status` (WARNING / ERROR), a stable
/// `code`, a message and a hint. No row: all is well.
#[pg_extern]
fn get_health_status(
    mirror_name: default!(Option<&str>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(scope, String),
        name!(object, String),
        name!(status, String),
        name!(code, String),
        name!(message, String),
        name!(hint, String),
    ),
> {
    let rows = problems(mirror_name).or_raise();
    TableIterator::new(
        rows.into_iter().map(|p| {
            (p.scope.to_string(), p.object, p.level.as_str().to_string(), p.code.to_string(), p.message, p.hint)
        }),
    )
}

/// Metrics as rows (metric, mirror, schema, table, value), for a Prometheus exporter's custom query:
/// per mirror `azure_cdc_mirror_up` (1 when Running), `azure_cdc_mirror_failed`, `azure_cdc_mirror_paused`,
/// `azure_cdc_lag_bytes`, `azure_cdc_lag_seconds`, `azure_cdc_wal_retained_bytes`,
/// `azure_cdc_safe_wal_bytes`, `azure_cdc_buffered_bytes`, `azure_cdc_spilled_bytes`,
/// `azure_cdc_changes_per_second`, `azure_cdc_bytes_per_second`, `azure_cdc_tables`,
/// `azure_cdc_tables_failed`; per table `azure_cdc_table_rows_replicated`,
/// `azure_cdc_table_files_published`, `azure_cdc_table_bytes_published`, `azure_cdc_table_failed`.
#[pg_extern]
fn metrics() -> TableIterator<
    'static,
    (
        name!(metric, String),
        name!(mirror_name, String),
        name!(schema_name, Option<String>),
        name!(table_name, Option<String>),
        name!(value, f64),
    ),
> {
    let rows = metric_rows().or_raise();
    TableIterator::new(rows)
}

type MetricRow = (String, String, Option<String>, Option<String>, f64);

fn metric_rows() -> Result<Vec<MetricRow>> {
    let mut out = Vec::new();
    for m in mirror_views("metrics")? {
        let mut put = |name: &str, v: Option<f64>| {
            if let Some(v) = v {
                out.push((name.to_string(), m.name.clone(), None, None, v));
            }
        };
        put("azure_cdc_mirror_up", Some(f64::from(u8::from(m.state == MirrorState::Running))));
        put("azure_cdc_mirror_failed", Some(f64::from(u8::from(m.state == MirrorState::Failed))));
        put("azure_cdc_mirror_paused", Some(f64::from(u8::from(m.state == MirrorState::Paused))));
        put("azure_cdc_lag_bytes", m.lag_bytes.map(|v| v as f64));
        put("azure_cdc_lag_seconds", m.lag_seconds);
        put("azure_cdc_wal_retained_bytes", m.wal_retained_bytes.map(|v| v as f64));
        put("azure_cdc_safe_wal_bytes", m.safe_wal_bytes.map(|v| v as f64));
        put("azure_cdc_buffered_bytes", m.buffered_bytes.map(|v| v as f64));
        put("azure_cdc_spilled_bytes", m.spilled_bytes.map(|v| v as f64));
        put("azure_cdc_changes_per_second", m.changes_per_second);
        put("azure_cdc_bytes_per_second", m.bytes_per_second);
        put("azure_cdc_tables", Some(m.tables as f64));
        put("azure_cdc_tables_failed", Some(m.tables_failed as f64));
    }
    crate::catalog::read(|| {
        Spi::connect(|c| {
            let t = c
            .select(
                "SELECT m.mirror_name, t.schema_name::text, t.table_name::text, t.rows_replicated, t.files_published, \
                        t.bytes_published, t.state \
                   FROM azure_cdc.mirror_tables t JOIN azure_cdc.mirrors m USING (mirror_id) \
                  WHERE m.state <> 'Stopped' ORDER BY 1, 2, 3",
                None,
                &[],
            )
            .map_err(spi)?;
            for r in t {
                let mirror: String = r.get(1).map_err(spi)?.unwrap_or_default();
                let schema: Option<String> = r.get(2).map_err(spi)?;
                let table: Option<String> = r.get(3).map_err(spi)?;
                let state = TableState::parse(&r.get::<String>(7).map_err(spi)?.unwrap_or_default())?;
                for (i, name) in [
                    (4, "azure_cdc_table_rows_replicated"),
                    (5, "azure_cdc_table_files_published"),
                    (6, "azure_cdc_table_bytes_published"),
                ] {
                    let v: i64 = r.get(i).map_err(spi)?.unwrap_or(0);
                    out.push((name.to_string(), mirror.clone(), schema.clone(), table.clone(), v as f64));
                }
                out.push((
                    "azure_cdc_table_failed".to_string(),
                    mirror.clone(),
                    schema.clone(),
                    table.clone(),
                    f64::from(u8::from(state == TableState::Failed)),
                ));
            }
            Ok(out)
        })
    })
}
