//! The SQL API of azure_cdc. Functions here validate their arguments, write catalog rows and wake the
//! launcher; the background workers do the work. Runs in the calling backend, on its main thread.
//!
//! Control and status functions are for superusers and members of `azure_cdc_admin`; anyone else gets
//! SQLSTATE 42501 with a hint naming the role. `check_prerequisites()` is open to every user, since
//! "am I an admin?" is one of its checks. The functions run with the caller's rights (no SECURITY
//! DEFINER); what they may do is decided in [`crate::privileges`], and they reach the catalog only
//! through [`crate::catalog`], which alone writes it.

use azure_cdc_core::cloud::CloudSettings;
use azure_cdc_core::lifecycle::{Event, MirrorState, TableEvent, TableState};
use azure_cdc_core::names;
use azure_cdc_core::prerequisites::{self, ServerFacts};
use azure_cdc_core::target::TargetUrl;
use azure_cdc_core::{Error, ErrorKind, Result};
use pgrx::prelude::*;
use pgrx::{register_xact_callback, JsonB, PgXactCallbackEvent};

use crate::catalog::{self, RelationInfo};
use crate::errors::{spi, OrRaise};
use crate::shmem::{self, Desired, Phase};

use crate::privileges::{self, require_admin, Who, ADMIN_ROLE};

pub(crate) fn database_oid() -> u32 {
    // SAFETY: MyDatabaseId is set once at connection start and only read here.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

fn setting_i64(name: &str) -> Result<i64> {
    Spi::get_one_with_args::<String>("SELECT pg_catalog.current_setting($1)", &[name.into()])
        .map_err(spi)?
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::new(ErrorKind::Internal, format!("setting {name} is not a number")))
}

fn count(query: &str) -> Result<i64> {
    Ok(Spi::get_one::<i64>(query).map_err(spi)?.unwrap_or(0))
}

/// The server's `output_plugin_libraries`, if it has that parameter. It is readable by superusers only;
/// the prerequisite check reads it for everyone but reports only whether azure_cdc is in it.
fn output_plugin_libraries() -> Option<String> {
    // SAFETY: GetConfigOption with missing_ok returns NULL for an unknown parameter, else a pointer to
    // the current value, valid until the next change of the setting; it is copied at once.
    unsafe {
        let v = pg_sys::GetConfigOption(c"output_plugin_libraries".as_ptr(), true, false);
        (!v.is_null()).then(|| std::ffi::CStr::from_ptr(v).to_string_lossy().into_owned())
    }
}

/// Gathers what the prerequisite rules look at.
pub(crate) fn server_facts() -> Result<ServerFacts> {
    Ok(ServerFacts {
        wal_level: Spi::get_one::<String>("SELECT pg_catalog.current_setting('wal_level')")
            .map_err(spi)?
            .unwrap_or_default(),
        preloaded: crate::preloaded(),
        max_worker_processes: setting_i64("max_worker_processes")?,
        other_static_workers: i64::from(setting_i64("max_logical_replication_workers")? > 0),
        active_mirrors: shmem::active_mirrors() as i64,
        max_fabric_mirrors: shmem::capacity() as i64,
        max_replication_slots: setting_i64("max_replication_slots")?,
        used_replication_slots: count("SELECT pg_catalog.count(*) FROM pg_catalog.pg_replication_slots")?,
        max_wal_senders: setting_i64("max_wal_senders")?,
        used_wal_senders: count("SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_replication")?,
        // SAFETY: RecoveryInProgress only reads shared state.
        in_recovery: unsafe { pg_sys::RecoveryInProgress() },
        admin_role_exists: Spi::get_one_with_args::<bool>(
            "SELECT pg_catalog.to_regrole($1) IS NOT NULL",
            &[ADMIN_ROLE.into()],
        )
        .map_err(spi)?
        .unwrap_or(false),
        caller_is_admin: privileges::caller_is_admin(),
        caller_has_create_on_database: Spi::get_one::<bool>(
            "SELECT pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE')",
        )
        .map_err(spi)?
        .unwrap_or(false),
        output_plugin_libraries: output_plugin_libraries(),
    })
}

/// One row per prerequisite of mirroring: `code`, `status` (OK / WARNING / ERROR) and `detail` (what
/// was found, what is required, and a hint).
#[pg_extern]
fn check_prerequisites() -> TableIterator<'static, (name!(code, String), name!(status, String), name!(detail, JsonB))> {
    let facts = server_facts().or_raise();
    let rows: Vec<_> = prerequisites::evaluate(&facts)
        .into_iter()
        .map(|c| (c.code.to_string(), c.status.as_str().to_string(), JsonB(c.detail)))
        .collect();
    TableIterator::new(rows)
}

/// Why a relation cannot be mirrored, if it cannot. A partitioned table is mirrored as one table
/// with the rows of all its partitions; a partition can also be named alone, but a mirror of all
/// tables leaves partitions to their partitioned table.
fn unmirrorable(rel: &RelationInfo, all_tables: bool) -> Option<&'static str> {
    let what = match rel.relkind.as_str() {
        "r" | "p" => None,
        "v" => Some("a view"),
        "m" => Some("a materialized view"),
        "f" => Some("a foreign table"),
        "S" => Some("a sequence"),
        "i" | "I" => Some("an index"),
        "c" => Some("a composite type"),
        "t" => Some("a TOAST table"),
        _ => Some("not a table"),
    };
    what.or(match rel.persistence.as_str() {
        "u" => Some("an unlogged table"),
        "t" => Some("a temporary table"),
        _ => None,
    })
    .or(if catalog::SYSTEM_SCHEMAS.contains(&format!("'{}'", rel.schema)) {
        Some("a system table")
    } else if !rel.heap && rel.relkind != "p" {
        Some("a table with a table access method other than heap")
    } else if all_tables && rel.partition {
        Some("a partition (mirrored with its partitioned table)")
    } else {
        None
    })
}

/// The tables a mirror owned by `owner` takes: those listed (each must be one it may mirror, else
/// the call fails), or with NULL every table it may mirror (the others are named in a NOTICE with the
/// reason: not a table that can be mirrored, or one `owner` does not own).
fn resolve_tables(tables: Option<Vec<Option<String>>>, owner: pg_sys::Oid) -> Result<Vec<RelationInfo>> {
    let Some(list) = tables else {
        // Mirror all data: every table that can be mirrored; the others are named with the reason.
        let mut taken = Vec::new();
        let mut skipped = Vec::new();
        for r in catalog::user_relations()? {
            if let Some(what) = unmirrorable(&r, true) {
                skipped.push(format!("{}.{} ({what})", r.schema, r.table));
            } else if let Some(why) = privileges::table_refusal(owner, r.relid)? {
                skipped.push(format!("{}.{} ({why})", r.schema, r.table));
            } else {
                taken.push(r);
            }
        }
        if !skipped.is_empty() {
            pgrx::notice!(
                "azure_cdc skips {} relation(s) that cannot be mirrored: {}",
                skipped.len(),
                skipped.join(", ")
            );
        }
        return Ok(taken);
    };
    if list.is_empty() {
        return Err(Error::new(ErrorKind::InvalidParameter, "no tables given")
            .with_hint("Pass NULL to mirror every table of the database."));
    }
    let mut out: Vec<RelationInfo> = Vec::new();
    for name in list {
        let Some(name) = name else {
            return Err(Error::new(ErrorKind::InvalidParameter, "table names cannot be NULL"));
        };
        let rel = catalog::resolve_relation(&name)?
            .ok_or_else(|| Error::new(ErrorKind::UndefinedTable, format!("relation \"{name}\" does not exist")))?;
        if let Some(what) = unmirrorable(&rel, false) {
            return Err(Error::new(ErrorKind::WrongObjectType, format!("\"{}.{}\" is {what}", rel.schema, rel.table))
                .with_hint("Only ordinary, permanent tables can be mirrored."));
        }
        if let Some(e) = privileges::table_refusal_error(owner, rel.relid, &rel.schema, &rel.table, Who::Caller)? {
            return Err(e);
        }
        if !out.iter().any(|r| r.relid == rel.relid) {
            out.push(rel);
        }
    }
    Ok(out)
}

/// The first failing prerequisite as an error of the right kind.
fn prerequisite_error(facts: &ServerFacts) -> Option<Error> {
    let checks = prerequisites::evaluate(facts);
    let failed = checks.iter().find(|c| c.is_error())?;
    let kind = match failed.code {
        "MAX_FABRIC_MIRRORS_REACHED" => ErrorKind::ConfigurationLimit,
        "USER_NOT_CDC_ADMIN" | "NO_CREATE_PRIVILEGE_ON_DATABASE" => ErrorKind::InsufficientPrivilege,
        _ => ErrorKind::PrerequisiteNotMet,
    };
    let hint = failed.detail.get("hint").and_then(|h| h.as_str()).unwrap_or_default().to_string();
    Some(
        Error::new(kind, format!("prerequisite {} is not met", failed.code))
            .with_detail(failed.detail.to_string())
            .with_hint(hint),
    )
}

fn start_mirror_impl(
    mirror_name: &str,
    target: &str,
    tables: Option<Vec<Option<String>>>,
    options: JsonB,
) -> Result<String> {
    require_admin("start_mirror")?;
    names::validate_mirror_name(mirror_name)?;
    let owner = privileges::current_user();
    if let Some(m) = catalog::mirror_by_name(mirror_name)? {
        let mut e = Error::new(ErrorKind::DuplicateObject, format!("mirror \"{mirror_name}\" already exists"));
        if m.state == MirrorState::Stopped.as_str() {
            e = e.with_hint(format!(
                "The mirror is stopped. Remove it with SELECT azure_cdc.drop_mirror('{mirror_name}'); or choose another name."
            ));
        }
        return Err(e);
    }
    let slot = names::slot_name(mirror_name);
    if crate::slot::exists(&slot)? {
        // Slot names are server-wide: another database's mirror of that name, or a slot someone
        // else created, has it. It is never taken over (nor dropped later).
        return Err(Error::new(ErrorKind::DuplicateObject, format!("replication slot \"{slot}\" already exists"))
            .with_detail("A mirror's slot is named after the mirror, and slot names are unique on the whole server.")
            .with_hint("Choose another mirror name."));
    }
    let url = TargetUrl::parse(target)?;
    privileges::check_local_target(&url, owner, Who::Caller)?;
    for (other, other_target) in catalog::active_targets()? {
        if TargetUrl::parse(&other_target).is_ok_and(|o| o.overlaps(&url)) {
            return Err(Error::new(
                ErrorKind::DuplicateObject,
                format!("target \"{}\" overlaps the target of mirror \"{other}\"", url.to_url()),
            )
            .with_hint("Give each mirror its own folder."));
        }
    }
    let credential = match &options.0 {
        serde_json::Value::Object(map) => {
            if let Some(k) = map.keys().find(|k| k.as_str() != "credential") {
                return Err(Error::new(ErrorKind::InvalidParameter, format!("unknown option \"{k}\""))
                    .with_hint("start_mirror accepts one option: {\"credential\": \"<name>\"}."));
            }
            match map.get("credential") {
                None => None,
                Some(serde_json::Value::String(c)) => Some(c.clone()),
                Some(_) => {
                    return Err(Error::new(ErrorKind::InvalidParameter, "option \"credential\" must be a string"))
                }
            }
        }
        _ => return Err(Error::new(ErrorKind::InvalidParameter, "options must be a JSON object")),
    };
    let all_tables = tables.is_none();
    let rels = resolve_tables(tables, owner)?;
    if let Some(e) = prerequisite_error(&server_facts()?) {
        return Err(e);
    }
    let remote = !matches!(url, TargetUrl::Local(_));
    let t = crate::credentials::open_target(&url, credential.as_deref(), CloudSettings::probe())?;
    if !t.is_empty()? {
        return Err(Error::new(ErrorKind::PrerequisiteNotMet, format!("target \"{}\" is not empty", url.to_url()))
            .with_hint("A new mirror writes its landing zone into an empty or missing folder."));
    }
    t.probe().map_err(|e| {
        if remote || e.hint.is_some() {
            e
        } else {
            Error {
                hint: Some("The folder must be writable by the operating-system user the server runs as.".into()),
                ..e
            }
        }
    })?;
    drop(t);

    let with_keys = keys_and_identity(rels)?;
    let id = catalog::insert_mirror(
        mirror_name,
        &url.to_url(),
        all_tables,
        options,
        credential.as_deref(),
        &slot,
        owner,
        &with_keys,
    )?;
    catalog::record_event(
        id,
        None,
        Event::Started,
        Some(&format!("{} table(s) to {}, owner {}", with_keys.len(), url.to_url(), privileges::role_name(owner))),
    )?;
    let database = database_oid();
    let Some(index) = shmem::reserve(database, id, Desired::Reserved, Phase::Snapshot) else {
        return Err(Error::new(ErrorKind::ConfigurationLimit, "all mirror places of the server are in use")
            .with_hint("Stop a mirror or raise azure_cdc.max_fabric_mirrors and restart the server."));
    };
    register_xact_callback(PgXactCallbackEvent::Commit, move || {
        shmem::set_desired(index, Desired::Run);
        shmem::wake_launcher();
    });
    register_xact_callback(PgXactCallbackEvent::Abort, move || shmem::release(index));
    Ok(format!(
        "mirror \"{mirror_name}\" of {} table{} to {} starts after commit (slot {slot})",
        with_keys.len(),
        if with_keys.len() == 1 { "" } else { "s" },
        url.to_url()
    ))
}

/// Starts mirroring `tables` (NULL: every ordinary table of the database) into `target`.
#[pg_extern]
fn start_mirror(
    mirror_name: &str,
    target: &str,
    tables: default!(Option<Vec<Option<String>>>, "NULL"),
    options: default!(JsonB, "'{}'"),
) -> String {
    start_mirror_impl(mirror_name, target, tables, options).or_raise()
}

/// Sleeps on the backend's latch for up to 100 ms, then acts on interrupts (cancel, terminate).
pub(crate) fn nap() {
    // SAFETY: waiting on our own latch from the main thread; WL_EXIT_ON_PM_DEATH ends the backend if
    // the postmaster dies.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            100,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pg_sys::check_for_interrupts!();
}

/// Asks the launcher to stop the workers of entry `index` (undone should the transaction abort) and
/// waits until they are gone.
fn stop_workers(index: usize, mirror_name: &str) -> Result<()> {
    let before = shmem::entry(index).desired;
    shmem::set_desired(index, Desired::Stop);
    register_xact_callback(PgXactCallbackEvent::Abort, move || {
        shmem::set_desired(index, before);
        shmem::wake_launcher();
    });
    shmem::wake_launcher();
    wait_for_workers_gone(index, mirror_name)
}

/// Waits until the launcher reports that no worker of entry `index` runs.
fn wait_for_workers_gone(index: usize, mirror_name: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if !shmem::workers_may_run(index) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::new(
                ErrorKind::ObjectInUse,
                format!("the workers of mirror \"{mirror_name}\" did not stop within 60 seconds"),
            )
            .with_hint("Check that the azure_cdc launcher is running (pg_stat_activity) and retry."));
        }
        nap();
    }
}

fn stop_mirror_impl(mirror_name: &str) -> Result<String> {
    require_admin("stop_mirror")?;
    let m = catalog::mirror_by_name(mirror_name)?.ok_or_else(|| unknown_mirror(mirror_name))?;
    privileges::require_mirror_owner(mirror_name, m.owner)?;
    if m.state == MirrorState::Stopped.as_str() {
        return Ok(format!("mirror \"{mirror_name}\" is already stopped"));
    }
    // Dropping the slot cannot be rolled back (nor can stopping the workers): refused inside a
    // transaction block, as DROP SUBSCRIPTION refuses when it drops a slot. A stop that rolled back
    // would leave a Running mirror without its slot.
    // SAFETY: raises an ERROR (25001) inside a transaction block; else marks the transaction to
    // commit at once. Main thread of a backend.
    unsafe { pg_sys::PreventInTransactionBlock(true, c"azure_cdc.stop_mirror()".as_ptr()) };
    let entry = shmem::find(database_oid(), m.id);
    if let Some(index) = entry {
        stop_workers(index, mirror_name)?;
    }
    let dropped = match crate::slot::find_mirror_slot(&m.name, &m.slot_name)? {
        crate::slot::SlotFound::Other(why) => {
            pgrx::notice!("replication slot \"{}\" is not this mirror's ({why}); it is left as it is", m.slot_name);
            false
        }
        _ => crate::slot::drop_mirror_slot(&m.name, &m.slot_name)?,
    };
    catalog::mirror_stopped(m.id, &format!("was {}; files kept in {}", m.state, m.target))?;
    if let Some(index) = entry {
        register_xact_callback(PgXactCallbackEvent::Commit, move || shmem::release(index));
    }
    Ok(format!(
        "mirror \"{mirror_name}\" stopped{}; its files are kept in {}",
        if dropped { format!(", slot {} dropped", m.slot_name) } else { String::new() },
        m.target
    ))
}

pub(crate) fn unknown_mirror(name: &str) -> Error {
    Error::new(ErrorKind::UndefinedObject, format!("mirror \"{name}\" does not exist"))
        .with_hint("SELECT DISTINCT mirror_name FROM azure_cdc.get_all_tables_mirror_status(); lists the mirrors.")
}

/// Stops a mirror: its workers end, its replication slot is dropped, its tables become Stopped. The
/// landing zone is kept. Not inside a transaction block (a dropped slot cannot be brought back).
#[pg_extern]
fn stop_mirror(mirror_name: &str) -> String {
    stop_mirror_impl(mirror_name).or_raise()
}

fn drop_mirror_impl(mirror_name: &str) -> Result<String> {
    require_admin("drop_mirror")?;
    let m = catalog::mirror_by_name(mirror_name)?.ok_or_else(|| unknown_mirror(mirror_name))?;
    privileges::require_mirror_owner(mirror_name, m.owner)?;
    if m.state != MirrorState::Stopped.as_str() {
        return Err(Error::new(ErrorKind::ObjectInUse, format!("mirror \"{mirror_name}\" is not stopped"))
            .with_hint(format!("Stop it first: SELECT azure_cdc.stop_mirror('{mirror_name}');")));
    }
    catalog::delete_mirror(m.id)?;
    Ok(format!("mirror \"{mirror_name}\" removed from the catalog; its files are kept in {}", m.target))
}

/// Removes a stopped mirror from the catalog (its files are kept), so that its name can be used again.
#[pg_extern]
fn drop_mirror(mirror_name: &str) -> String {
    drop_mirror_impl(mirror_name).or_raise()
}

fn pause_mirror_impl(mirror_name: &str) -> Result<String> {
    require_admin("pause_mirror")?;
    let m = catalog::mirror_by_name(mirror_name)?.ok_or_else(|| unknown_mirror(mirror_name))?;
    privileges::require_mirror_owner(mirror_name, m.owner)?;
    let state = MirrorState::parse(&m.state)?;
    if !state.wants_workers() {
        return Err(Error::new(ErrorKind::ObjectInUse, format!("mirror \"{mirror_name}\" is {}", m.state))
            .with_hint("Only a Starting or Running mirror can be paused."));
    }
    if let Some(index) = shmem::find(database_oid(), m.id) {
        stop_workers(index, mirror_name)?;
    }
    catalog::mirror_paused(m.id, state)?;
    Ok(format!(
        "mirror \"{mirror_name}\" paused; its slot {} keeps the WAL until resume_mirror('{mirror_name}')",
        m.slot_name
    ))
}

/// Pauses a mirror: its workers stop, its slot is kept and holds WAL (watch `wal_retained_bytes` and
/// `safe_wal_bytes` in `list_mirrors()`), its files stay. `resume_mirror` goes on from where it
/// stopped (a snapshot that was not finished starts over).
#[pg_extern]
fn pause_mirror(mirror_name: &str) -> String {
    pause_mirror_impl(mirror_name).or_raise()
}

fn resume_mirror_impl(mirror_name: &str) -> Result<String> {
    require_admin("resume_mirror")?;
    let m = catalog::mirror_by_name(mirror_name)?.ok_or_else(|| unknown_mirror(mirror_name))?;
    privileges::require_mirror_owner(mirror_name, m.owner)?;
    let before = MirrorState::parse(&m.state)?;
    if !matches!(before, MirrorState::Failed | MirrorState::Paused) {
        return Err(Error::new(
            ErrorKind::ObjectInUse,
            format!("mirror \"{mirror_name}\" is {}, not Paused or Failed", m.state),
        )
        .with_hint("resume_mirror resumes a paused mirror, or one its target stopped."));
    }
    // The owner's standing and the target are checked again before the workers try: a cause that
    // is still there is reported here.
    privileges::owner_standing(m.owner)?;
    let url = TargetUrl::parse(&m.target)?;
    privileges::check_local_target(&url, m.owner, Who::Owner)?;
    crate::credentials::open_target(&url, m.credential.as_deref(), CloudSettings::probe())?.probe()?;
    let completed = catalog::snapshot_completed(m.id)?;
    let state = MirrorState::resumed(completed);
    catalog::mirror_resumed(m.id, before, state)?;
    let phase = if completed { Phase::Snapshotted } else { Phase::Snapshot };
    let database = database_oid();
    let index = match shmem::find(database, m.id) {
        Some(i) => i,
        None => shmem::reserve(database, m.id, Desired::Stop, phase).ok_or_else(|| {
            Error::new(ErrorKind::ConfigurationLimit, "all mirror places of the server are in use")
                .with_hint("Stop a mirror or raise azure_cdc.max_fabric_mirrors and restart the server.")
        })?,
    };
    register_xact_callback(PgXactCallbackEvent::Commit, move || {
        shmem::resume(index, phase);
        shmem::wake_launcher();
    });
    Ok(format!("mirror \"{mirror_name}\" resumes as {} after commit", state.as_str()))
}

/// Takes a paused mirror, or one that a target error stopped (state Failed, once the cause is fixed),
/// back to work: proves the target, then its workers start again from where the slot stands. Nothing
/// is lost while a mirror is Paused or Failed: its slot holds the WAL.
#[pg_extern]
fn resume_mirror(mirror_name: &str) -> String {
    resume_mirror_impl(mirror_name).or_raise()
}

/// The key columns of tables about to be mirrored, looked up before their replica identity is set:
/// unchanged TOASTed values reach the change stream only in a FULL old row image (see decoder.rs),
/// and FULL replaces a REPLICA IDENTITY USING INDEX key. Says with a NOTICE which tables it altered.
fn keys_and_identity(rels: Vec<RelationInfo>) -> Result<Vec<(RelationInfo, Vec<String>)>> {
    let mut with_keys = Vec::with_capacity(rels.len());
    let mut unique_keys = Vec::new();
    for rel in rels {
        let (keys, source) = catalog::key_columns_with_source(rel.relid)?;
        if let catalog::KeySource::UniqueIndex(index) = source {
            unique_keys.push((rel.schema.clone(), rel.table.clone(), rel.relid, index));
        }
        with_keys.push((rel, keys));
    }
    // Only tables with key columns get FULL: a table without any is mirrored insert-only and left
    // as the user made it.
    let relids: Vec<pg_sys::Oid> = with_keys.iter().filter(|(_, k)| !k.is_empty()).map(|(r, _)| r.relid).collect();
    let altered = catalog::tables_needing_full_identity(&relids)?;
    // A key from a unique index needs the old key in the WAL of UPDATE and DELETE: that index becomes
    // the replica identity, unless FULL (which logs the whole old row) is set below anyway.
    let mut by_index = Vec::new();
    for (schema, table, _, index) in &unique_keys {
        if !altered.iter().any(|(s, t)| s == schema && t == table) {
            catalog::set_replica_identity_index(schema, table, index)?;
            by_index.push(format!("{schema}.{table} ({index})"));
        }
    }
    if !by_index.is_empty() {
        pgrx::notice!(
            "azure_cdc set REPLICA IDENTITY USING INDEX on {} table{} without a primary key, to use a unique index of NOT NULL columns as key: {}",
            by_index.len(),
            if by_index.len() == 1 { "" } else { "s" },
            by_index.join(", ")
        );
    }
    for (schema, table) in &altered {
        catalog::set_replica_identity_full(schema, table)?;
    }
    if !altered.is_empty() {
        let list: Vec<String> = altered.iter().map(|(s, t)| format!("{s}.{t}")).collect();
        pgrx::notice!(
            "azure_cdc set REPLICA IDENTITY FULL on {} table{} that can hold TOASTed values: {}",
            list.len(),
            if list.len() == 1 { "" } else { "s" },
            list.join(", ")
        );
    }
    Ok(with_keys)
}

/// After commit, tells the mirror's decoder that its tables changed in the catalog (it rereads them).
fn tables_changed_after_commit(mirror_id: i64) {
    if let Some(index) = shmem::find(database_oid(), mirror_id) {
        register_xact_callback(PgXactCallbackEvent::Commit, move || shmem::tables_changed(index));
    }
}

/// A mirror whose table list may change now: Running, Paused or Failed.
fn mirror_for_tables(function: &str, mirror_name: &str) -> Result<(catalog::MirrorRow, MirrorState)> {
    require_admin(function)?;
    let m = catalog::mirror_by_name(mirror_name)?.ok_or_else(|| unknown_mirror(mirror_name))?;
    privileges::require_mirror_owner(mirror_name, m.owner)?;
    let state = MirrorState::parse(&m.state)?;
    if matches!(state, MirrorState::Starting | MirrorState::Stopped) {
        return Err(Error::new(ErrorKind::PrerequisiteNotMet, format!("mirror \"{mirror_name}\" is {}", m.state))
            .with_hint(if state == MirrorState::Starting {
                "Its initial snapshot copies every table; wait until the mirror is Running."
            } else {
                "A stopped mirror copies nothing; start a new mirror."
            }));
    }
    Ok((m, state))
}

/// States of the mirror's tables, by relid.
fn table_states(mirror_id: i64) -> Result<std::collections::HashMap<pg_sys::Oid, TableState>> {
    catalog::tables(mirror_id)?.into_iter().map(|t| Ok((t.relid, TableState::parse(&t.state)?))).collect()
}

fn add_tables_impl(mirror_name: &str, tables: Vec<Option<String>>) -> Result<String> {
    let (m, state) = mirror_for_tables("add_tables", mirror_name)?;
    let rels = resolve_tables(Some(tables), m.owner)?;
    let states = table_states(m.id)?;
    let mut new = Vec::new();
    for rel in rels {
        match states.get(&rel.relid) {
            None => new.push(rel),
            Some(s) if s.on(TableEvent::Added).is_ok() => new.push(rel),
            Some(s) => {
                pgrx::notice!("table \"{}.{}\" is already in the mirror ({})", rel.schema, rel.table, s.as_str())
            }
        }
    }
    let with_keys = keys_and_identity(new)?;
    catalog::tables_added(m.id, &with_keys, azure_cdc_core::reseed::Reason::Added.as_str())?;
    tables_changed_after_commit(m.id);
    let when = if state == MirrorState::Running { "after commit" } else { "when the mirror is resumed" };
    Ok(format!(
        "{} table{} added to mirror \"{mirror_name}\"; copied {when} while the other tables go on",
        with_keys.len(),
        if with_keys.len() == 1 { "" } else { "s" }
    ))
}

/// Adds tables to a Running (or Paused / Failed) mirror. Each is copied into its folder (state
/// Reseeding) while the mirror's other tables go on, then followed. Tables are named as in SQL and
/// checked as by `start_mirror`; one already in the mirror is skipped with a NOTICE.
#[pg_extern]
fn add_tables(mirror_name: &str, tables: Vec<Option<String>>) -> String {
    add_tables_impl(mirror_name, tables).or_raise()
}

fn remove_tables_impl(mirror_name: &str, tables: Vec<Option<String>>) -> Result<String> {
    let (m, _) = mirror_for_tables("remove_tables", mirror_name)?;
    if tables.is_empty() {
        return Err(Error::new(ErrorKind::InvalidParameter, "no tables given"));
    }
    let states = table_states(m.id)?;
    let mut removed = Vec::new();
    for name in tables {
        let name = name.ok_or_else(|| Error::new(ErrorKind::InvalidParameter, "table names cannot be NULL"))?;
        let rel = catalog::resolve_relation(&name)?
            .ok_or_else(|| Error::new(ErrorKind::UndefinedTable, format!("relation \"{name}\" does not exist")))?;
        match states.get(&rel.relid) {
            None | Some(TableState::Stopped) => {
                return Err(Error::new(
                    ErrorKind::UndefinedTable,
                    format!("table \"{}.{}\" is not mirrored by \"{mirror_name}\"", rel.schema, rel.table),
                ))
            }
            Some(s) => {
                catalog::table_removed(m.id, &rel, s.on(TableEvent::Stopped)?)?;
                removed.push(format!("{}.{}", rel.schema, rel.table));
            }
        }
    }
    tables_changed_after_commit(m.id);
    Ok(format!("removed from mirror \"{mirror_name}\" after commit: {}; their files are kept", removed.join(", ")))
}

/// Removes tables from a mirror: their changes are no longer published (state Stopped), their files
/// are kept as they are. In a mirror of all tables, a removed table stays out. `add_tables` takes one
/// back (copied again).
#[pg_extern]
fn remove_tables(mirror_name: &str, tables: Vec<Option<String>>) -> String {
    remove_tables_impl(mirror_name, tables).or_raise()
}

fn resync_table_impl(mirror_name: &str, table_name: &str) -> Result<String> {
    let (m, mirror_state) = mirror_for_tables("resync_table", mirror_name)?;
    let rel = catalog::resolve_relation(table_name)?
        .ok_or_else(|| Error::new(ErrorKind::UndefinedTable, format!("relation \"{table_name}\" does not exist")))?;
    let state = catalog::table_state(m.id, rel.relid)?.ok_or_else(|| {
        Error::new(
            ErrorKind::UndefinedTable,
            format!("table \"{}.{}\" is not mirrored by \"{mirror_name}\"", rel.schema, rel.table),
        )
        .with_hint("See azure_cdc.get_all_tables_mirror_status() for the mirror's tables.")
    })?;
    state.on(TableEvent::ReseedRequested).map_err(|_| {
        Error::new(
            ErrorKind::PrerequisiteNotMet,
            format!("table \"{}.{}\" is {}", rel.schema, rel.table, state.as_str()),
        )
        .with_hint("Only a Replicating, Reseeding or Failed table can be copied again.")
    })?;
    if let Some(e) = privileges::table_refusal_error(m.owner, rel.relid, &rel.schema, &rel.table, Who::Caller)? {
        return Err(e);
    }
    catalog::reseed_requested(m.id, rel.relid, azure_cdc_core::reseed::Reason::Requested.as_str(), &[state])?;
    tables_changed_after_commit(m.id);
    let when = if mirror_state == MirrorState::Running { "after commit" } else { "when the mirror is resumed" };
    Ok(format!(
        "table \"{}.{}\" of mirror \"{mirror_name}\" is copied again {when}; its folder is rebuilt, the other tables go on",
        rel.schema, rel.table
    ))
}

/// Copies one table of a mirror again (state Reseeding): its folder is emptied and rebuilt from a new
/// snapshot (files numbered from 1), then its changes follow, while the mirror's other tables go on.
/// Also takes a Failed table back into the mirror once its cause is fixed.
#[pg_extern]
fn resync_table(mirror_name: &str, table_name: &str) -> String {
    resync_table_impl(mirror_name, table_name).or_raise()
}

type StatusRow = (
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    Option<pgrx::datum::TimestampWithTimeZone>,
    Option<String>,
    i64,
    Option<i64>,
    Option<f64>,
    Option<pgrx::datum::TimestampWithTimeZone>,
);

fn status_rows() -> Result<Vec<StatusRow>> {
    require_admin("get_all_tables_mirror_status")?;
    let database = database_oid();
    crate::catalog::read(|| {
        Spi::connect(|c| {
            let t = c
                .select(
                    "SELECT m.mirror_name, t.schema_name::text, t.table_name::text, t.state, t.rows_replicated, \
                        t.files_published, t.last_completed_at, t.last_error, \
                        pg_catalog.cardinality(t.key_columns) > 0, m.mirror_id, t.relid, m.state, m.last_error, \
                        t.bytes_published, \
                        (SELECT CASE WHEN pg_catalog.bool_or(c.reltuples < 0) THEN NULL \
                                     ELSE pg_catalog.sum(c.reltuples)::bigint END \
                           FROM pg_catalog.pg_class c \
                          WHERE c.relkind <> 'p' AND (c.oid = t.relid OR c.oid IN \
                                (SELECT p.relid FROM pg_catalog.pg_partition_tree(t.relid) p WHERE p.isleaf))), \
                        t.folder_deleted_at \
                   FROM azure_cdc.mirror_tables t JOIN azure_cdc.mirrors m USING (mirror_id) \
                  ORDER BY m.mirror_name, t.schema_name, t.table_name",
                    None,
                    &[],
                )
                .map_err(spi)?;
            let mut rows = Vec::new();
            for r in t {
                let state_text: String = r.get(4).map_err(spi)?.unwrap_or_default();
                let state = TableState::parse(&state_text)?;
                let mirror_id: i64 = r.get(10).map_err(spi)?.unwrap_or_default();
                let relid: pg_sys::Oid = r.get(11).map_err(spi)?.unwrap_or(pg_sys::InvalidOid);
                let mut rows_replicated: i64 = r.get(5).map_err(spi)?.unwrap_or(0);
                let copying = matches!(state, TableState::Snapshotting | TableState::Reseeding);
                if copying {
                    if let Some(live) = shmem::progress_of(database, mirror_id, relid.to_u32()) {
                        rows_replicated = live;
                    }
                }
                let mirror_state = MirrorState::parse(&r.get::<String>(12).map_err(spi)?.unwrap_or_default())?;
                // The table's own error; else, while the table follows its mirror, the mirror's (a target
                // error being retried, or the one that made the mirror Failed).
                let last_error: Option<String> = match r.get::<String>(8).map_err(spi)? {
                    Some(e) => Some(e),
                    None if matches!(
                        state,
                        TableState::Snapshotting | TableState::Replicating | TableState::Reseeding
                    ) =>
                    {
                        r.get(13).map_err(spi)?
                    }
                    None => None,
                };
                let has_key: bool = r.get(9).map_err(spi)?.unwrap_or(false);
                // While snapshotting or reseeding: the planner's row estimate and how far the copy is
                // (capped at 100: the estimate may be low).
                let (estimated, percent) = if copying {
                    let est: Option<i64> = r.get(15).map_err(spi)?;
                    let pct = est.filter(|e| *e > 0).map(|e| (rows_replicated as f64 * 100.0 / e as f64).min(100.0));
                    (est, pct)
                } else {
                    (None, None)
                };
                rows.push((
                    r.get(1).map_err(spi)?.unwrap_or_default(),
                    r.get(2).map_err(spi)?.unwrap_or_default(),
                    r.get(3).map_err(spi)?.unwrap_or_default(),
                    state_text,
                    state.health(has_key, last_error.is_some(), mirror_state).as_str().to_string(),
                    rows_replicated,
                    r.get(6).map_err(spi)?.unwrap_or(0),
                    r.get(7).map_err(spi)?,
                    last_error,
                    r.get(14).map_err(spi)?.unwrap_or(0),
                    estimated,
                    percent,
                    r.get(16).map_err(spi)?,
                ));
            }
            Ok(rows)
        })
    })
}

/// One row per mirrored table: mirror, schema, table, state (Snapshotting, Replicating, Reseeding,
/// Stopped, Failed, Dropped), status (OK / WARNING / ERROR), rows replicated (live while snapshotting), files published,
/// when the last file was completed, the last error (with its hint), bytes published, while
/// snapshotting the estimated row count and the percentage done, and while its folder is reset, when
/// the folder was deleted (on OneLake the new copy waits until Fabric has dropped the table).
#[pg_extern]
fn get_all_tables_mirror_status() -> TableIterator<
    'static,
    (
        name!(mirror_name, String),
        name!(schema_name, String),
        name!(table_name, String),
        name!(state, String),
        name!(status, String),
        name!(rows_replicated, i64),
        name!(files_published, i64),
        name!(last_completed_at, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(last_error, Option<String>),
        name!(bytes_published, i64),
        name!(snapshot_rows_estimated, Option<i64>),
        name!(snapshot_percent, Option<f64>),
        name!(folder_deleted_at, Option<pgrx::datum::TimestampWithTimeZone>),
    ),
> {
    TableIterator::new(status_rows().or_raise())
}
