//! Credentials: named sets of options (account keys, SAS tokens, service-principal secrets, access
//! keys, endpoints) that a mirror uses to reach an object-store target, and the one place where a
//! target is opened with them. Main thread of a backend or worker; calls PostgreSQL.
//!
//! Where secrets live, and who sees them:
//! - `azure_cdc.credentials` holds the options. It grants nothing to anyone, `azure_cdc_admin`
//!   included: only superusers can read it. `create_credential` and `drop_credential` are for
//!   superusers.
//! - A mirror records only the credential's name. Admins may name a credential in `start_mirror`
//!   (they then write where it grants access) but never read it: the options are read through the
//!   catalog module with the extension's rights and a pinned search path, for one fixed query
//!   (`crate::privileges::as_extension`), the way a SECURITY DEFINER function would.
//! - `list_credentials()` shows names, option names, and the values of options that are not secret.
//! - Errors that come back from a store pass through a redactor that removes the credential's
//!   values and URL query strings before they reach a message, a catalog row or the log.
//! - `create_credential` turns off the logging of its own statement text on error
//!   (`log_min_error_statement`), so a mistyped call does not write the secret into the server log.

use azure_cdc_core::cloud::{self, CloudSettings, CredentialOptions};
use azure_cdc_core::target::{Target, TargetUrl};
use azure_cdc_core::{Error, ErrorKind, Result};
use pgrx::prelude::*;
use pgrx::JsonB;

use crate::errors::OrRaise;

/// Blocks every signal in the calling thread. Run first by every thread of an object-store runtime,
/// so that PostgreSQL's signal handlers only ever run on the main thread.
fn block_signals() {
    // SAFETY: sigfillset initialises the set; pthread_sigmask changes only this thread's mask.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
}

/// The options of credential `name`; empty for None.
pub fn options_of(name: Option<&str>) -> Result<CredentialOptions> {
    let Some(name) = name else { return Ok(CredentialOptions::new()) };
    match crate::catalog::credential_options(name)? {
        Some(v) => options_from_json(&v),
        None => Err(unknown_credential(name)),
    }
}

fn unknown_credential(name: &str) -> Error {
    Error::new(ErrorKind::UndefinedObject, format!("credential \"{name}\" does not exist"))
        .with_hint("SELECT * FROM azure_cdc.list_credentials(); lists the credentials.")
}

/// A credential's options from its JSON object: strings as they are, booleans and numbers as text.
fn options_from_json(v: &serde_json::Value) -> Result<CredentialOptions> {
    let serde_json::Value::Object(map) = v else {
        return Err(Error::new(ErrorKind::InvalidParameter, "credential options must be a JSON object"));
    };
    let mut out = CredentialOptions::new();
    for (k, v) in map {
        let value = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Bool(b) => b.to_string(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidParameter,
                    format!("credential option \"{k}\" must be a string, a boolean or a number"),
                ))
            }
        };
        out.insert(k.clone(), value);
    }
    Ok(out)
}

/// Opens the target `url` names with credential `credential`. Workers pass their settings; no request
/// is made until the target is used.
pub fn open_target(url: &TargetUrl, credential: Option<&str>, settings: CloudSettings) -> Result<Target> {
    cloud::set_thread_start_hook(block_signals);
    let options = options_of(credential)?;
    Target::open(url, &options, settings)
}

/// The settings of a worker's object-store client.
pub fn worker_settings() -> CloudSettings {
    CloudSettings::worker(crate::gucs::onelake_buffer_bytes())
}

fn require_superuser(function: &str) -> Result<()> {
    // SAFETY: reads the current user's role attributes on the main thread.
    if unsafe { pg_sys::superuser() } {
        return Ok(());
    }
    Err(Error::new(ErrorKind::InsufficientPrivilege, format!("permission denied for function {function}"))
        .with_detail("Only superusers can create, replace or drop credentials."))
}

/// Keeps the text of the current statement out of the server log if it fails (it holds a secret).
fn hide_statement_on_error() {
    // SAFETY: sets a GUC for the current transaction only (GUC_ACTION_LOCAL), on the main thread,
    // with names and values that are valid NUL-terminated strings.
    unsafe {
        pg_sys::set_config_option(
            c"log_min_error_statement".as_ptr(),
            c"panic".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            0,
            false,
        );
    }
}

fn create_credential_impl(name: &str, options: JsonB) -> Result<String> {
    hide_statement_on_error();
    require_superuser("create_credential")?;
    if name.is_empty() || name.len() > 63 || name.chars().any(|c| c.is_control()) {
        return Err(Error::new(
            ErrorKind::InvalidName,
            "a credential name is 1 to 63 bytes without control characters",
        ));
    }
    let parsed = options_from_json(&options.0)?;
    let known: Vec<&str> =
        cloud::AZURE_OPTIONS.iter().chain(cloud::S3_OPTIONS).chain(cloud::GCS_OPTIONS).copied().collect();
    for k in parsed.keys() {
        if !known.contains(&k.as_str()) {
            return Err(Error::new(ErrorKind::InvalidParameter, format!("unknown credential option \"{k}\""))
                .with_hint(format!("Known options: {}.", known.join(", "))));
        }
    }
    let replaced = crate::catalog::upsert_credential(name, options.0, crate::privileges::current_user())?;
    Ok(format!(
        "credential \"{name}\" {} with {} option{}",
        if replaced { "replaced" } else { "created" },
        parsed.len(),
        if parsed.len() == 1 { "" } else { "s" }
    ))
}

/// Creates (or replaces) a named credential for object-store targets. Superusers only. `options` is a
/// JSON object; see README for the option names per kind of store. Running mirrors read it when their
/// workers next start.
#[pg_extern]
fn create_credential(credential_name: &str, options: JsonB) -> String {
    create_credential_impl(credential_name, options).or_raise()
}

fn drop_credential_impl(name: &str) -> Result<String> {
    require_superuser("drop_credential")?;
    let users = crate::catalog::mirrors_using_credential(name)?;
    if !users.is_empty() {
        return Err(Error::new(
            ErrorKind::ObjectInUse,
            format!("credential \"{name}\" is used by mirror \"{}\"", users.join("\", \"")),
        )
        .with_hint("Stop those mirrors first."));
    }
    if !crate::catalog::delete_credential(name)? {
        return Err(unknown_credential(name));
    }
    Ok(format!("credential \"{name}\" dropped"))
}

/// Drops a credential that no running mirror uses. Superusers only.
#[pg_extern]
fn drop_credential(credential_name: &str) -> String {
    drop_credential_impl(credential_name).or_raise()
}

type CredentialRow = (String, Vec<String>, JsonB, Vec<String>, Option<pgrx::datum::TimestampWithTimeZone>);

fn list_credentials_impl() -> Result<Vec<CredentialRow>> {
    crate::privileges::require_admin("list_credentials")?;
    let mut out = Vec::new();
    for (name, options, used_by, created_at) in crate::catalog::credentials()? {
        let options = options_from_json(&options)?;
        let shown: serde_json::Map<String, serde_json::Value> = options
            .iter()
            .filter(|(k, _)| cloud::option_is_public(k))
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        out.push((
            name,
            options.keys().cloned().collect(),
            JsonB(serde_json::Value::Object(shown)),
            used_by,
            created_at,
        ));
    }
    Ok(out)
}

/// One row per credential: its name, the names of its options, the values of the options that are
/// not secret (account name, endpoint, tenant and client ids, region …), the mirrors that use it and
/// when it was created. Secret values are never shown. For superusers and azure_cdc_admin.
#[pg_extern]
fn list_credentials() -> TableIterator<
    'static,
    (
        name!(credential_name, String),
        name!(option_names, Vec<String>),
        name!(public_options, JsonB),
        name!(used_by, Vec<String>),
        name!(created_at, Option<pgrx::datum::TimestampWithTimeZone>),
    ),
> {
    TableIterator::new(list_credentials_impl().or_raise())
}
