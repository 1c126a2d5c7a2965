//! Who may do what, and with which rights each part of azure_cdc runs. Main thread of a backend or
//! worker; calls PostgreSQL. README "Security model" says the same for users.
//!
//! - **Callers.** The control and status functions run with the caller's rights and are for
//!   superusers and members of `azure_cdc_admin` ([`require_admin`]). A mirror belongs to the role
//!   that started it (its *owner*); only the owner (a member of it) or a superuser controls it
//!   ([`require_mirror_owner`]). The mirror's replication slot is created and dropped by the
//!   extension, for that mirror only: the owner needs no REPLICATION attribute, which would let it
//!   read every table's changes through a slot of its own. A local folder needs what
//!   `COPY … TO 'file'` needs (`pg_write_server_files`) and may not lie among the server's own files
//!   ([`check_local_target`]).
//! - **Tables.** The owner mirrors only tables it owns (Fabric's rule), and none that row-level
//!   security applies to for it ([`table_refusal`]); `verify_table` compares only tables the caller
//!   may SELECT whole ([`may_read_table`]).
//! - **The catalog belongs to the extension.** Admins are granted SELECT on it and nothing else.
//!   Every query of it runs through [`as_extension`]: as the bootstrap superuser, in a
//!   security-restricted context, with `search_path = pg_catalog, pg_temp`, so that no operator,
//!   function or table the caller created can be reached from it (what a `SECURITY DEFINER`
//!   function with a pinned search_path gives, without handing the caller's identity away).
//! - **Workers** connect as the bootstrap superuser and pin `search_path` and the settings they rely
//!   on over anything a database or role sets ([`pin_worker_settings`]), as autovacuum and logical
//!   replication workers do. They re-check the owner's standing ([`owner_standing`]) and each
//!   table ([`table_refusal`]) when they start.
//! - **User code in values.** Converting an array or a composite to JSON may call a cast the type's
//!   owner wrote; it runs as the table's owner in a security-restricted context
//!   ([`as_table_owner`]), as VACUUM runs index expressions.

use std::ffi::CStr;
use std::path::PathBuf;

use azure_cdc_core::target::{self, ProtectedFolder, TargetUrl};
use azure_cdc_core::{Error, ErrorKind, Result};
use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;

pub const ADMIN_ROLE: &str = "azure_cdc_admin";

/// The search path every query with raised rights, and every worker, runs with.
const PINNED_SEARCH_PATH: &CStr = c"pg_catalog, pg_temp";

/// The role the current statement runs as.
pub fn current_user() -> Oid {
    // SAFETY: reads the current user id, set for every backend and worker.
    unsafe { pg_sys::GetUserId() }
}

/// A role's name, or its OID in words when the role is gone.
pub fn role_name(role: Oid) -> String {
    // SAFETY: with noerr = true GetUserNameFromId returns NULL for an unknown role instead of raising;
    // the name is copied at once.
    unsafe {
        let p = pg_sys::GetUserNameFromId(role, true);
        if p.is_null() {
            format!("role with OID {}", role.to_u32())
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

fn role_exists(role: Oid) -> bool {
    // SAFETY: as in role_name.
    unsafe { !pg_sys::GetUserNameFromId(role, true).is_null() }
}

/// Whether `role` is a superuser or has the privileges of azure_cdc_admin.
pub fn is_admin(role: Oid) -> bool {
    // SAFETY: catalog look-ups on the main thread inside a transaction; get_role_oid with missing_ok
    // returns InvalidOid instead of raising.
    unsafe {
        if pg_sys::superuser_arg(role) {
            return true;
        }
        let admin = pg_sys::get_role_oid(c"azure_cdc_admin".as_ptr(), true);
        admin != pg_sys::InvalidOid && pg_sys::has_privs_of_role(role, admin)
    }
}

/// Whether the current user is a superuser or has the privileges of azure_cdc_admin.
pub fn caller_is_admin() -> bool {
    is_admin(current_user())
}

pub fn require_admin(function: &str) -> Result<()> {
    if caller_is_admin() {
        return Ok(());
    }
    Err(Error::new(ErrorKind::InsufficientPrivilege, format!("permission denied for function {function}"))
        .with_detail("Only superusers and members of azure_cdc_admin can run this function.")
        .with_hint(format!("A superuser can run: GRANT {ADMIN_ROLE} TO <user>;")))
}

/// Only the mirror's owner (or a member of it) and superusers control a mirror.
pub fn require_mirror_owner(mirror_name: &str, owner: Oid) -> Result<()> {
    let me = current_user();
    // SAFETY: a catalog look-up on the main thread inside a transaction.
    if unsafe { pg_sys::has_privs_of_role(me, owner) } {
        return Ok(());
    }
    Err(Error::new(ErrorKind::InsufficientPrivilege, format!("must be owner of mirror \"{mirror_name}\""))
        .with_detail(format!("The mirror belongs to {}.", role_name(owner))))
}

/// Whether `role` may write files on the server (superuser or pg_write_server_files), what
/// `COPY … TO 'file'` asks.
pub fn may_write_server_files(role: Oid) -> bool {
    // SAFETY: catalog look-ups on the main thread inside a transaction.
    unsafe {
        pg_sys::superuser_arg(role) || pg_sys::has_privs_of_role(role, Oid::from(pg_sys::ROLE_PG_WRITE_SERVER_FILES))
    }
}

/// Who a refusal is about: the caller of a function (42501 to the caller) or a mirror's owner seen
/// by a worker (the mirror stops until resumed).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Who {
    Caller,
    Owner,
}

impl Who {
    fn kind(self) -> ErrorKind {
        match self {
            Who::Caller => ErrorKind::InsufficientPrivilege,
            Who::Owner => ErrorKind::OwnerPrivilege,
        }
    }
}

/// The server's own folders: the data directory, its WAL folder and every tablespace, resolved.
fn protected_folders() -> Vec<ProtectedFolder> {
    // SAFETY: DataDir is set at process start and never changes; copied at once.
    let data = unsafe { CStr::from_ptr(pg_sys::DataDir).to_string_lossy().into_owned() };
    let data = PathBuf::from(data);
    let mut out = Vec::new();
    let mut add = |what: String, p: PathBuf| {
        if let Ok(path) = target::resolve_local_path(&p) {
            out.push(ProtectedFolder { what, path });
        }
    };
    add("the data directory".into(), data.clone());
    add("the WAL folder".into(), data.join("pg_wal"));
    if let Ok(entries) = std::fs::read_dir(data.join("pg_tblspc")) {
        for e in entries.flatten() {
            add(format!("tablespace {}", e.file_name().to_string_lossy()), e.path());
        }
    }
    out
}

/// A local folder target needs `role` to be allowed to write server files, and must not lie in (or
/// contain) the data directory, its WAL folder or a tablespace, wherever links lead. Other targets
/// pass.
pub fn check_local_target(url: &TargetUrl, role: Oid, who: Who) -> Result<()> {
    let TargetUrl::Local(path) = url else { return Ok(()) };
    if !may_write_server_files(role) {
        let whose = match who {
            Who::Caller => "the caller".to_string(),
            Who::Owner => format!("the mirror's owner {}", role_name(role)),
        };
        return Err(Error::new(who.kind(), format!("permission denied to write to a folder of the server as {whose}"))
            .with_detail("A file:// target writes server files, which needs what COPY … TO 'file' needs.")
            .with_hint("A superuser can run: GRANT pg_write_server_files TO <role>; or use an object-store target."));
    }
    let real = target::resolve_local_path(path).map_err(|e| {
        Error::new(ErrorKind::TargetIo, format!("could not resolve folder \"{}\": {e}", path.display()))
    })?;
    // The mirror creates its folder, never the folders above it (COPY … TO 'file' creates none).
    if !real.parent().is_some_and(|p| p.is_dir()) {
        return Err(Error::new(
            ErrorKind::InvalidParameter,
            format!("the folder above target \"{}\" does not exist", url.to_url()),
        )
        .with_hint("azure_cdc creates the target's own folder, not the folders above it; create them first."));
    }
    if let Some(p) = target::protected_overlap(&real, &protected_folders()) {
        let how = if real.starts_with(&p.path) { "lies in" } else { "contains" };
        return Err(Error::new(who.kind(), format!("target \"{}\" {how} {} of the server", url.to_url(), p.what))
            .with_detail(format!(
                "It resolves to \"{}\"; the server's own folders are never a landing zone.",
                real.display()
            ))
            .with_hint("Choose a folder outside the data directory, its WAL folder and the tablespaces."));
    }
    Ok(())
}

/// The mirror's owner must still exist and be an azure_cdc admin: checked by every worker when it
/// starts, and by `resume_mirror`.
pub fn owner_standing(owner: Oid) -> Result<()> {
    let lacks = |what: &str| {
        Err(Error::new(ErrorKind::OwnerPrivilege, format!("the mirror's owner {} {what}", role_name(owner)))
            .with_hint("Give the role back what it lacks and run azure_cdc.resume_mirror, or stop the mirror."))
    };
    if !role_exists(owner) {
        return lacks("no longer exists");
    }
    if !is_admin(owner) {
        return lacks("is no longer a member of azure_cdc_admin");
    }
    Ok(())
}

/// Why `owner` may not mirror table `relid`, if it may not: it does not own the table (or belong to
/// its owning role), or row-level security applies to it there (FORCE ROW LEVEL SECURITY). A
/// superuser may mirror any table. None also when the table does not exist (callers check that).
pub fn table_refusal(owner: Oid, relid: Oid) -> Result<Option<String>> {
    let relowner = as_extension(|| {
        Spi::get_one_with_args::<Oid>("SELECT relowner FROM pg_catalog.pg_class WHERE oid = $1", &[relid.into()])
    });
    let relowner = match relowner {
        Ok(Some(o)) => o,
        Ok(None) | Err(pgrx::spi::SpiError::InvalidPosition) => return Ok(None),
        Err(e) => return Err(crate::errors::spi(e)),
    };
    // SAFETY: catalog look-ups on the main thread inside a transaction; check_enable_rls with noError
    // reports instead of raising.
    unsafe {
        if !pg_sys::has_privs_of_role(owner, relowner) {
            return Ok(Some(format!("{} does not own it (its owner is {})", role_name(owner), role_name(relowner))));
        }
        if pg_sys::check_enable_rls(relid, owner, true) == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32 {
            return Ok(Some(format!("row-level security applies to {} on it", role_name(owner))));
        }
    }
    Ok(None)
}

/// [`table_refusal`] as the error that refuses (caller) or parks (worker) the table.
pub fn table_refusal_error(owner: Oid, relid: Oid, schema: &str, table: &str, who: Who) -> Result<Option<Error>> {
    let Some(why) = table_refusal(owner, relid)? else { return Ok(None) };
    let (kind, message) = match who {
        Who::Caller => (ErrorKind::InsufficientPrivilege, format!("cannot mirror table \"{schema}.{table}\": {why}")),
        Who::Owner => (ErrorKind::TablePrivilege, format!("the mirror's owner may no longer mirror this table: {why}")),
    };
    Ok(Some(Error::new(kind, message).with_hint(format!(
        "A mirror's owner owns the tables it mirrors: ALTER TABLE \"{schema}\".\"{table}\" OWNER TO {};",
        role_name(owner)
    ))))
}

/// Whether the current user may read all of table `relid`: SELECT on the table (not only on some
/// columns) and no row-level security applying.
pub fn may_read_table(relid: Oid) -> bool {
    let me = current_user();
    // SAFETY: catalog look-ups on the main thread inside a transaction; check_enable_rls with noError.
    unsafe {
        pg_sys::pg_class_aclcheck(relid, me, pg_sys::ACL_SELECT as pg_sys::AclMode) == pg_sys::AclResult::ACLCHECK_OK
            && pg_sys::check_enable_rls(relid, me, true) != pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32
    }
}

/// Undoes [`run_as`]: the saved user and security context, and the settings of the nest level.
struct Restore {
    user: Oid,
    context: i32,
    nest: i32,
    finished: bool,
}

impl Restore {
    fn finish(mut self) {
        // SAFETY: ends the GUC nest level opened by run_as (dropping whatever was set inside it) and
        // restores the saved user, on the main thread, in the same transaction.
        unsafe {
            pg_sys::AtEOXact_GUC(false, self.nest);
            pg_sys::SetUserIdAndSecContext(self.user, self.context);
        }
        self.finished = true;
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        if !self.finished {
            // An error is unwinding: the (sub)transaction's abort ends the GUC nest level; the user is
            // restored now so that nothing after this frame runs as `role`.
            // SAFETY: as in finish.
            unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.context) };
        }
    }
}

/// Runs `f` as `role`, in a security-restricted context, with the pinned search path; everything
/// `f` sets is undone after it.
fn run_as<T>(role: Oid, f: impl FnOnce() -> T) -> T {
    let mut user = pg_sys::InvalidOid;
    let mut context = 0;
    // SAFETY: main thread inside a transaction (callers): the save/switch sequence of PostgreSQL's
    // fmgr_security_definer and of VACUUM running index functions as the table's owner.
    let nest = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        let nest = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            PINNED_SEARCH_PATH.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        pg_sys::SetUserIdAndSecContext(
            role,
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32 | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
        nest
    };
    let restore = Restore { user, context, nest, finished: false };
    let r = f();
    restore.finish();
    r
}

/// Runs `f` with the extension's rights: as the bootstrap superuser (the catalog's owner is a
/// superuser: the extension needs one to be created), in a security-restricted context, with
/// `search_path = pg_catalog, pg_temp`. Only for the extension's own, fixed SQL with values passed as
/// parameters.
pub fn as_extension<T>(f: impl FnOnce() -> T) -> T {
    run_as(Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID), f)
}

/// Runs `f`, which may call code a table's owner wrote (a cast of their type to JSON), as that owner,
/// in a security-restricted context with the pinned search path.
pub fn as_table_owner<T>(owner: Oid, f: impl FnOnce() -> T) -> T {
    run_as(owner, f)
}

/// Settings every worker pins over what `ALTER DATABASE` / `ALTER ROLE … SET` give it (as
/// autovacuum and the logical replication workers do): the search path, no timeouts, writable
/// read-committed transactions, local commit.
const WORKER_SETTINGS: [(&CStr, &CStr); 8] = [
    (c"search_path", PINNED_SEARCH_PATH),
    (c"statement_timeout", c"0"),
    (c"lock_timeout", c"0"),
    (c"idle_in_transaction_session_timeout", c"0"),
    (c"default_transaction_read_only", c"off"),
    (c"default_transaction_isolation", c"read committed"),
    (c"default_transaction_deferrable", c"off"),
    (c"synchronous_commit", c"local"),
];

/// Pins [`WORKER_SETTINGS`] for the life of a worker (call once connected, inside a transaction
/// that commits).
pub fn pin_worker_settings() {
    for (name, value) in WORKER_SETTINGS {
        // SAFETY: sets a built-in parameter with the highest source priority on the main thread.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            )
        };
    }
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    // SAFETY: as above (transaction_timeout exists from PostgreSQL 17 on).
    unsafe {
        pg_sys::SetConfigOption(
            c"transaction_timeout".as_ptr(),
            c"0".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        )
    };
}
