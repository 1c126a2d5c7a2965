//! The object-store target: a landing zone in Azure Blob Storage / ADLS Gen2 / OneLake, Amazon S3 or
//! Google Cloud Storage, written through `object_store`. Runs on whichever thread owns the target (the
//! shipper thread, a snapshot encoder thread, a backend proving a target in `start_mirror`); never
//! calls PostgreSQL.
//!
//! Every request runs as a task on the target's own small tokio runtime; the calling thread only
//! waits for the task's result. So the runtime's threads, and the threads they start (name
//! resolution), are all created by the runtime and run its thread-start hook, through which the
//! extension keeps PostgreSQL's signals off them.
//!
//! Publication takes the fewest requests the store allows without ever showing a partial file or
//! replacing a published one. A data file that fits in one part (`part_size`, which bounds memory) is
//! one request: a PUT under its final name that only creates (one PUT is atomic on every store). A
//! larger one is uploaded in parts under its `_`-prefixed temporary name, then copied to its final
//! name with "only if absent" semantics, then the temporary object is deleted.
//!
//! Credentials come from a credential's options (a JSON object, see [`CredentialOptions`]) and, for
//! anything not given there, from the server process's environment (`AZURE_*`, `AWS_*`,
//! `GOOGLE_*`), which also covers managed and workload identities. Every message this module
//! produces passes through [`Redactor`], which removes the credential's values and URL query strings.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, MultipartUpload, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig,
};

use crate::error::{Error, ErrorKind, Result};
use crate::names;
use crate::target::{DataFile, Place, TargetUrl};

/// Called at the start of every thread of every target's runtime (set once per process).
static THREAD_START_HOOK: OnceLock<fn()> = OnceLock::new();

/// Sets the function every runtime thread runs first. The extension uses it to block signals.
pub fn set_thread_start_hook(hook: fn()) {
    let _ = THREAD_START_HOOK.set(hook);
}

/// Set once the process is ending (see [`mark_process_exiting`]).
static PROCESS_EXITING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The process is ending (PostgreSQL's exit callbacks run): threads and runtimes dropped from now
/// on (by the exit's thread-local destructors) are left to end with the process instead of being
/// waited for, which could take as long as a request to a store that does not answer.
pub fn mark_process_exiting() {
    PROCESS_EXITING.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Whether [`mark_process_exiting`] was called.
pub fn process_exiting() -> bool {
    PROCESS_EXITING.load(std::sync::atomic::Ordering::SeqCst)
}

/// Runs the thread-start hook, if one is set. Every thread a worker starts (runtimes, shipper,
/// encoder, uploaders) calls it first, so that PostgreSQL's signals reach only the worker's own thread.
pub fn run_thread_start_hook() {
    if let Some(hook) = THREAD_START_HOOK.get() {
        hook()
    }
}

/// Credential options: string values by option name, as given to `create_credential`.
pub type CredentialOptions = BTreeMap<String, String>;

/// How long requests may take and how often they are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloudSettings {
    /// Size of one uploaded part of a data file (and the most a data file holds in memory).
    pub part_size: usize,
    /// Retries of one request before its error is returned.
    pub max_retries: usize,
    /// Total time one request may spend retrying.
    pub retry_timeout: Duration,
    /// Connection establishment limit.
    pub connect_timeout: Duration,
    /// Limit for one request, body included.
    pub request_timeout: Duration,
}

impl CloudSettings {
    /// For background workers: patient, because WAL is held and nothing is lost while it retries.
    pub fn worker(part_size: usize) -> Self {
        CloudSettings {
            part_size: part_size.max(MIN_PART_SIZE),
            max_retries: 6,
            retry_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(300),
        }
    }

    /// For `start_mirror`'s probe: a user is waiting for the answer.
    pub fn probe() -> Self {
        CloudSettings {
            part_size: MIN_PART_SIZE,
            max_retries: 2,
            retry_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(20),
        }
    }
}

/// The smallest part a multipart upload accepts on every store (S3's limit).
pub const MIN_PART_SIZE: usize = 5 << 20;

/// Option names accepted in a credential, per kind of store. Values are strings.
pub const AZURE_OPTIONS: &[&str] = &[
    "account_name",
    "account_key",
    "sas_token",
    "tenant_id",
    "client_id",
    "client_secret",
    "federated_token_file",
    "msi_endpoint",
    "object_id",
    "msi_resource_id",
    "bearer_token",
    "endpoint",
    "use_emulator",
    "allow_http",
    "authority_host",
];
pub const S3_OPTIONS: &[&str] =
    &["access_key_id", "secret_access_key", "session_token", "region", "endpoint", "allow_http"];
pub const GCS_OPTIONS: &[&str] =
    &["service_account_key", "service_account_path", "application_credentials", "endpoint", "allow_http"];

/// Options whose values are not secret and may be shown (e.g. by `list_credentials`).
const PUBLIC_OPTIONS: &[&str] = &[
    "account_name",
    "tenant_id",
    "client_id",
    "msi_endpoint",
    "object_id",
    "msi_resource_id",
    "endpoint",
    "use_emulator",
    "allow_http",
    "region",
    "federated_token_file",
    "service_account_path",
    "authority_host",
];

/// True when the value of option `name` may be shown to users who are not superusers.
pub fn option_is_public(name: &str) -> bool {
    PUBLIC_OPTIONS.contains(&name)
}

/// Checks option names against the kind of store the URL names.
pub fn validate_options(url: &TargetUrl, options: &CredentialOptions) -> Result<()> {
    let (allowed, store) = match url {
        TargetUrl::Local(_) => {
            if options.is_empty() {
                return Ok(());
            }
            return Err(Error::new(ErrorKind::InvalidParameter, "a local folder target takes no credential"));
        }
        TargetUrl::Azure { .. } => (AZURE_OPTIONS, "Azure"),
        TargetUrl::Dfs { onelake: true, .. } => {
            if let Some(name) = options.keys().find(|k| crate::dfs::ONELAKE_REFUSED_OPTIONS.contains(&k.as_str())) {
                return Err(Error::new(
                    ErrorKind::InvalidParameter,
                    format!("credential option \"{name}\" does not apply to a OneLake target"),
                )
                .with_detail("OneLake accepts only Microsoft Entra tokens (its account is always \"onelake\").")
                .with_hint("Give tenant_id, client_id and client_secret (a service principal), federated_token_file (workload identity), msi_endpoint or nothing (managed identity), or bearer_token."));
            }
            (AZURE_OPTIONS, "Azure")
        }
        TargetUrl::Dfs { .. } => (AZURE_OPTIONS, "Azure"),
        TargetUrl::S3 { .. } => (S3_OPTIONS, "S3"),
        TargetUrl::Gcs { .. } => (GCS_OPTIONS, "Google Cloud Storage"),
    };
    for name in options.keys() {
        if !allowed.contains(&name.as_str()) {
            return Err(Error::new(
                ErrorKind::InvalidParameter,
                format!("credential option \"{name}\" does not apply to an {store} target"),
            )
            .with_hint(format!("Options for {store} targets: {}.", allowed.join(", "))));
        }
    }
    Ok(())
}

/// Removes secrets from text: every secret option value, and the query string of every URL (where a
/// SAS signature would travel).
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    pub fn new(options: &CredentialOptions) -> Self {
        let mut secrets: Vec<String> =
            options.iter().filter(|(k, v)| !option_is_public(k) && v.len() >= 4).map(|(_, v)| v.clone()).collect();
        // SAS tokens are also sent split into their parameters; hide each signature value too.
        for v in options.values() {
            for pair in v.trim_start_matches('?').split('&') {
                if let Some(sig) = pair.strip_prefix("sig=") {
                    if sig.len() >= 4 {
                        secrets.push(sig.to_string());
                    }
                }
            }
        }
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Redactor { secrets }
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "[redacted]");
            }
        }
        strip_url_queries(&out)
    }
}

/// Shortens a store's XML error reply inside a message to its code and the first line of its message.
fn compact_store_reply(text: &str) -> String {
    let Some(start) = text.find("<?xml") else { return text.to_string() };
    let tag = |name: &str| -> Option<String> {
        let open = format!("<{name}>");
        let from = text.find(&open)? + open.len();
        let to = text[from..].find(&format!("</{name}>"))? + from;
        Some(text[from..to].lines().next().unwrap_or("").trim().to_string())
    };
    let mut out = text[..start].trim_end().to_string();
    if let Some(code) = tag("Code") {
        out.push_str(&format!(" {code}"));
    }
    if let Some(message) = tag("Message") {
        out.push_str(&format!(": {message}"));
    }
    out
}

/// Cuts the query string off every http(s) URL in `text`.
fn strip_url_queries(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("http") {
        let (before, url_on) = rest.split_at(start);
        out.push_str(before);
        let end = url_on
            .find(|c: char| c.is_whitespace() || c == ')' || c == '"' || c == '\'' || c == ',')
            .unwrap_or(url_on.len());
        let url = &url_on[..end];
        match url.find('?') {
            Some(q) => {
                out.push_str(&url[..q]);
                out.push_str("?[redacted]");
            }
            None => out.push_str(url),
        }
        rest = &url_on[end..];
    }
    out.push_str(rest);
    out
}

/// A target's own small tokio runtime: every request runs as a task on it, the calling thread only
/// waits for the task's result. Its threads run the thread-start hook first.
pub struct IoRuntime(Option<tokio::runtime::Runtime>);

impl IoRuntime {
    pub fn new() -> Result<IoRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(4)
            .thread_name("azure_cdc io")
            .enable_all()
            .on_thread_start(run_thread_start_hook)
            .build()
            .map_err(|e| Error::new(ErrorKind::Internal, format!("could not start the I/O runtime: {e}")))?;
        Ok(IoRuntime(Some(runtime)))
    }

    /// Runs `fut` as a task on the runtime and waits for it.
    pub fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> Result<T> {
        let rt = self.0.as_ref().ok_or_else(|| Error::new(ErrorKind::Internal, "the I/O runtime is shut down"))?;
        rt.block_on(rt.spawn(fut)).map_err(|e| Error::new(ErrorKind::Internal, format!("an I/O task failed: {e}")))
    }
}

impl Drop for IoRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            if process_exiting() {
                rt.shutdown_background();
            } else {
                rt.shutdown_timeout(Duration::from_secs(5));
            }
        }
    }
}

/// A landing zone in an object store.
pub struct CloudTarget {
    store: Arc<dyn ObjectStore>,
    /// Key prefix of the landing-zone root, without leading or trailing `/` (may be empty).
    prefix: String,
    settings: CloudSettings,
    redactor: Redactor,
    runtime: IoRuntime,
    url: String,
    /// Data files small enough for one request (under the part size), written and waiting to be
    /// published, by temporary key: they are uploaded once, under their final name, with a PUT that
    /// only creates ([`CloudTarget::publish_temp_data_file`]).
    pending: std::sync::Mutex<std::collections::HashMap<String, Bytes>>,
    /// Whether a final name is looked at before the conditional PUT that creates it: on S3, whose
    /// compatible stores may ignore `If-None-Match` and replace what is there.
    head_first: bool,
}

impl std::fmt::Debug for CloudTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudTarget").field("url", &self.url).finish()
    }
}

impl CloudTarget {
    /// Builds the client for `url`. No request is made yet.
    pub fn open(url: &TargetUrl, options: &CredentialOptions, settings: CloudSettings) -> Result<CloudTarget> {
        validate_options(url, options)?;
        let redactor = Redactor::new(options);
        let client =
            ClientOptions::new().with_connect_timeout(settings.connect_timeout).with_timeout(settings.request_timeout);
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(10),
                base: 2.0,
            },
            max_retries: settings.max_retries,
            retry_timeout: settings.retry_timeout,
        };
        let config_error = |e: object_store::Error| {
            Error::new(
                ErrorKind::InvalidParameter,
                format!("invalid target configuration: {}", redactor.redact(&e.to_string())),
            )
        };
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match url {
            TargetUrl::Local(_) => {
                return Err(Error::new(ErrorKind::Internal, "a local folder is not an object-store target"))
            }
            TargetUrl::Dfs { .. } => {
                return Err(Error::new(ErrorKind::Internal, "a hierarchical-namespace target is not a Blob target"))
            }
            TargetUrl::Azure { account, container, prefix } => {
                let mut b = MicrosoftAzureBuilder::from_env()
                    .with_client_options(client)
                    .with_retry(retry)
                    .with_container_name(container.clone());
                if let Some(a) = account {
                    b = b.with_account(a.clone());
                }
                for (k, v) in options {
                    let key: AzureConfigKey = azure_key(k).parse().map_err(config_error)?;
                    b = b.with_config(key, v.clone());
                }
                (Arc::new(b.build().map_err(config_error)?), prefix.clone())
            }
            TargetUrl::S3 { bucket, prefix } => {
                let mut b = AmazonS3Builder::from_env()
                    .with_client_options(client)
                    .with_retry(retry)
                    .with_bucket_name(bucket.clone());
                for (k, v) in options {
                    let key: AmazonS3ConfigKey = s3_key(k).parse().map_err(config_error)?;
                    b = b.with_config(key, v.clone());
                }
                (Arc::new(b.build().map_err(config_error)?), prefix.clone())
            }
            TargetUrl::Gcs { bucket, prefix } => {
                let mut b = GoogleCloudStorageBuilder::from_env()
                    .with_client_options(client)
                    .with_retry(retry)
                    .with_bucket_name(bucket.clone());
                for (k, v) in options {
                    let key: GoogleConfigKey = gcs_key(k).parse().map_err(config_error)?;
                    b = b.with_config(key, v.clone());
                }
                (Arc::new(b.build().map_err(config_error)?), prefix.clone())
            }
        };
        Ok(CloudTarget {
            store,
            prefix,
            settings,
            redactor,
            runtime: IoRuntime::new()?,
            url: url.to_url(),
            pending: Default::default(),
            head_first: matches!(url, TargetUrl::S3 { .. }),
        })
    }

    /// Runs `fut` as a task on the runtime and waits for it.
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> Result<T> {
        self.runtime.run(fut)
    }

    /// The key of `rel` (a path relative to the landing-zone root).
    fn key(&self, rel: &str) -> Result<ObjectPath> {
        let joined = match (self.prefix.is_empty(), rel.is_empty()) {
            (true, _) => rel.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{rel}", self.prefix),
        };
        ObjectPath::parse(&joined)
            .map_err(|e| Error::new(ErrorKind::Internal, format!("invalid object key \"{joined}\": {e}")))
    }

    fn join(rel_dir: &str, name: &str) -> String {
        if rel_dir.is_empty() {
            name.to_string()
        } else {
            format!("{rel_dir}/{name}")
        }
    }

    /// Turns an object-store error into ours: what the caller should do follows from the kind.
    fn error(&self, action: &str, key: &ObjectPath, e: object_store::Error) -> Error {
        let text = compact_store_reply(&self.redactor.redact(&e.to_string()));
        let what = format!("could not {action} \"{key}\" in {}", self.url);
        // Some requests (listing) report HTTP failures as generic errors: classify those by status.
        let e = match e {
            object_store::Error::Generic { store, source } => {
                let path = key.to_string();
                if text.contains("401 Unauthorized") {
                    object_store::Error::Unauthenticated { path, source }
                } else if text.contains("403 Forbidden") {
                    object_store::Error::PermissionDenied { path, source }
                } else if text.contains("404 Not Found") {
                    object_store::Error::NotFound { path, source }
                } else {
                    object_store::Error::Generic { store, source }
                }
            }
            other => other,
        };
        match e {
            object_store::Error::Unauthenticated { .. } => Error::new(ErrorKind::TargetAuthentication, what)
                .with_detail(text)
                .with_hint("Check the credential's key, secret or token and that it has not expired."),
            object_store::Error::PermissionDenied { .. } => {
                let rejected =
                    ["AuthenticationFailed", "failed to authenticate", "InvalidAccessKeyId", "SignatureDoesNotMatch"];
                if rejected.iter().any(|r| text.contains(r)) {
                    Error::new(ErrorKind::TargetAuthentication, what)
                        .with_detail(text)
                        .with_hint("The target rejected the credential: check the account key, SAS token or secret.")
                } else {
                    Error::new(ErrorKind::TargetPermission, what).with_detail(text).with_hint(
                        "Grant the identity write access to the target (e.g. the Storage Blob Data Contributor role, or Contributor on the Fabric workspace).",
                    )
                }
            }
            object_store::Error::NotFound { .. } => Error::new(ErrorKind::TargetMissing, what)
                .with_detail(text)
                .with_hint("Check that the container or bucket named in the target URL exists."),
            _ => Error::new(ErrorKind::TargetIo, what).with_detail(text),
        }
    }

    /// Proves the target can be written: uploads and deletes a probe object under the root.
    pub fn probe(&self) -> Result<()> {
        let key = self.key(&format!("_azure_cdc_probe_{}", std::process::id()))?;
        let store = self.store.clone();
        let k = key.clone();
        let r = self.run(async move { store.put(&k, PutPayload::from_static(b"azure_cdc probe")).await })?;
        r.map_err(|e| self.error("write probe object", &key, e))?;
        let store = self.store.clone();
        let k = key.clone();
        self.run(async move { store.delete(&k).await })?.map_err(|e| self.error("delete probe object", &key, e))
    }

    /// True when nothing is stored under the root.
    pub fn is_empty(&self) -> Result<bool> {
        let prefix = self.key("")?;
        let store = self.store.clone();
        let p = prefix.clone();
        let listed = self.run(async move { store.list_with_delimiter(Some(&p)).await })?;
        match listed {
            Ok(l) => Ok(l.objects.is_empty() && l.common_prefixes.is_empty()),
            Err(object_store::Error::NotFound { .. }) => Ok(true),
            Err(e) => Err(self.error("list", &prefix, e)),
        }
    }

    /// Names (last key component) of the objects directly in folder `rel`.
    fn list_names(&self, rel: &str) -> Result<Vec<String>> {
        let prefix = self.key(rel)?;
        let store = self.store.clone();
        let p = prefix.clone();
        let listed = self.run(async move { store.list_with_delimiter(Some(&p)).await })?;
        match listed {
            Ok(l) => Ok(l.objects.into_iter().filter_map(|o| o.location.filename().map(str::to_string)).collect()),
            Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(self.error("list", &prefix, e)),
        }
    }

    fn delete(&self, rel: &str) -> Result<()> {
        let key = self.key(rel)?;
        let store = self.store.clone();
        let k = key.clone();
        match self.run(async move { store.delete(&k).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("delete", &key, e)),
        }
    }

    fn put(&self, rel: &str, bytes: Bytes) -> Result<()> {
        let key = self.key(rel)?;
        let store = self.store.clone();
        let k = key.clone();
        self.run(async move { store.put(&k, PutPayload::from_bytes(bytes)).await })?
            .map(|_| ())
            .map_err(|e| self.error("upload", &key, e))
    }

    /// Reads a whole object; None when there is none.
    pub fn try_read(&self, rel: &str) -> Result<Option<Bytes>> {
        match self.read(rel) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind == ErrorKind::TargetMissing => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The last `len` bytes of an object (all of it when it is shorter); None when it does not exist.
    /// Two requests: its size, then the range (suffix ranges are not taken by every store).
    pub fn try_read_tail(&self, rel: &str, len: u64) -> Result<Option<Bytes>> {
        let key = self.key(rel)?;
        let store = self.store.clone();
        let k = key.clone();
        let r = self.run(async move {
            let size = store.head(&k).await?.size;
            store.get_range(&k, size.saturating_sub(len)..size).await
        })?;
        match r {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("read", &key, e)),
        }
    }

    /// Reads a whole object.
    pub fn read(&self, rel: &str) -> Result<Bytes> {
        let key = self.key(rel)?;
        let store = self.store.clone();
        let k = key.clone();
        let r = self.run(async move {
            match store.get(&k).await {
                Ok(g) => g.bytes().await,
                Err(e) => Err(e),
            }
        })?;
        r.map_err(|e| self.error("read", &key, e))
    }

    /// Starts a data file of table folder `rel` under temporary name `temp` (forgetting a file kept
    /// back under that name and never published).
    pub fn create_temp_data_file(self: &Arc<Self>, rel: &str, temp: u64) -> Result<CloudTempFile> {
        let key = self.key(&Self::join(rel, &names::temporary_file_name(temp)))?;
        if let Ok(mut p) = self.pending.lock() {
            p.remove(key.as_ref());
        }
        Ok(CloudTempFile { target: self.clone(), key, buffer: Vec::new(), upload: None, written: 0, failed: None })
    }

    pub fn discard_temp_data_file(&self, rel: &str, temp: u64) -> Result<()> {
        let key = self.key(&Self::join(rel, &names::temporary_file_name(temp)))?;
        if let Ok(mut p) = self.pending.lock() {
            p.remove(key.as_ref());
        }
        self.delete(&Self::join(rel, &names::temporary_file_name(temp)))
    }

    /// Publishes temporary file `temp` as data file `number`, never replacing a published file. A
    /// file under the part size was kept back by [`CloudTempFile::sync`]: one PUT that only creates
    /// (Azure `If-None-Match: *`, S3 `If-None-Match: *`, GCS `x-goog-if-generation-match: 0`) uploads
    /// and publishes it at once; one PUT is atomic on every store, so no reader sees it half written.
    /// A larger file was uploaded in parts under its temporary name: it is copied to its final name,
    /// only if that name is free, and the temporary object deleted.
    pub fn publish_temp_data_file(&self, rel: &str, temp: u64, number: u64) -> Result<()> {
        let tmp = self.key(&Self::join(rel, &names::temporary_file_name(temp)))?;
        let fin = self.key(&Self::join(rel, &names::data_file_name(number)))?;
        let held = self.pending.lock().ok().and_then(|mut p| p.remove(tmp.as_ref()));
        match held {
            Some(bytes) => self.put_new(&fin, bytes),
            None => self.publish_uploaded(&tmp, &fin),
        }
    }

    /// Uploads `bytes` as the new object `fin`: one PUT that fails if the name is taken (on S3, a HEAD
    /// first: some S3-compatible stores ignore the condition). A name taken by these very bytes is a
    /// PUT whose reply was lost and that was sent again: done.
    fn put_new(&self, fin: &ObjectPath, bytes: Bytes) -> Result<()> {
        let store = self.store.clone();
        let (f, b) = (fin.clone(), bytes.clone());
        let head_first = self.head_first;
        let put = self.run(async move {
            let taken =
                || object_store::Error::AlreadyExists { path: f.to_string(), source: "the final name is taken".into() };
            if head_first {
                match store.head(&f).await {
                    Ok(_) => return Err(taken()),
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            let create = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
            match store.put_opts(&f, PutPayload::from_bytes(b.clone()), create).await {
                Err(object_store::Error::NotSupported { .. }) | Err(object_store::Error::NotImplemented { .. }) => {
                    // A store configured without conditional writes: check, then write. Numbers are
                    // taken in turn, so each name has one writer and nothing slips in between.
                    match store.head(&f).await {
                        Ok(_) => Err(taken()),
                        Err(object_store::Error::NotFound { .. }) => store.put(&f, PutPayload::from_bytes(b)).await,
                        Err(e) => Err(e),
                    }
                }
                other => other,
            }
        })?;
        match put {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) | Err(object_store::Error::Precondition { .. }) => {
                // Read what holds the name only if it has this file's size (a snapshot file can be
                // large).
                let store = self.store.clone();
                let (f, size) = (fin.clone(), bytes.len() as u64);
                let theirs = self
                    .run(async move {
                        let got = store.get(&f).await?;
                        if got.meta.size != size {
                            return Ok(None);
                        }
                        got.bytes().await.map(Some)
                    })?
                    .map_err(|e| self.error("compare", fin, e))?;
                if theirs.as_ref() != Some(&bytes) {
                    return Err(already_published(fin));
                }
                Ok(())
            }
            Err(e) => Err(self.error("publish", fin, e)),
        }
    }

    /// Copies the uploaded temporary object `tmp` to `fin`, only if that name is free, then deletes it.
    fn publish_uploaded(&self, tmp: &ObjectPath, fin: &ObjectPath) -> Result<()> {
        let store = self.store.clone();
        let (t, f) = (tmp.clone(), fin.clone());
        let copied = self.run(async move {
            match store.copy_if_not_exists(&t, &f).await {
                Err(object_store::Error::NotSupported { .. }) | Err(object_store::Error::NotImplemented { .. }) => {
                    // A store without conditional copy (plain S3): check, then copy. One writer per
                    // number, so nothing can slip in between.
                    match store.head(&f).await {
                        Ok(_) => Err(object_store::Error::AlreadyExists {
                            path: f.to_string(),
                            source: "the final name is taken".into(),
                        }),
                        Err(object_store::Error::NotFound { .. }) => store.copy(&t, &f).await,
                        Err(e) => Err(e),
                    }
                }
                other => other,
            }
        })?;
        match copied {
            Ok(()) => {}
            Err(object_store::Error::AlreadyExists { .. }) | Err(object_store::Error::Precondition { .. }) => {
                // A copy whose reply was lost and that was retried finds its own result: the same
                // bytes under the final name. Anything else is a published file we must not replace.
                if !self.same_content(tmp, fin)? {
                    return Err(already_published(fin));
                }
            }
            Err(e) => return Err(self.error("publish", fin, e)),
        }
        let store = self.store.clone();
        let t = tmp.clone();
        match self.run(async move { store.delete(&t).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("delete", tmp, e)),
        }
    }

    /// Whether two objects hold the same bytes.
    fn same_content(&self, a: &ObjectPath, b: &ObjectPath) -> Result<bool> {
        let store = self.store.clone();
        let (x, y) = (a.clone(), b.clone());
        let r = self.run(async move {
            let ma = store.head(&x).await?;
            let mb = store.head(&y).await?;
            if ma.size != mb.size {
                return Ok(false);
            }
            let ba = store.get(&x).await?.bytes().await?;
            let bb = store.get(&y).await?.bytes().await?;
            Ok::<bool, object_store::Error>(ba == bb)
        })?;
        r.map_err(|e| self.error("compare", b, e))
    }

    /// Publishes data file `number` from bytes in memory: one PUT that only creates.
    pub fn publish_data_file(&self, rel: &str, number: u64, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Err(Error::new(ErrorKind::Internal, "refusing to publish an empty data file"));
        }
        let fin = self.key(&Self::join(rel, &names::data_file_name(number)))?;
        self.put_new(&fin, Bytes::copy_from_slice(bytes))
    }

    /// Writes a small document (`_metadata.json`, `_partnerEvents.json`). One PUT is atomic on every
    /// store; a previous version is replaced.
    pub fn put_document(&self, rel_dir: &str, name: &str, bytes: &[u8]) -> Result<()> {
        self.put(&Self::join(rel_dir, name), Bytes::copy_from_slice(bytes))
    }

    /// Deletes table folder `rel` with everything in it (every object under `rel/`, one by one).
    /// Returns whether there was anything.
    pub fn reset_table_folder(&self, rel: &str) -> Result<bool> {
        let prefix = self.key(rel)?;
        let store = self.store.clone();
        let p = prefix.clone();
        let listed = self.run(async move {
            use futures_util::TryStreamExt;
            store.list(Some(&p)).map_ok(|m| m.location).try_collect::<Vec<_>>().await
        })?;
        let keys = match listed {
            Ok(k) => k,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(self.error("list", &prefix, e)),
        };
        let found = !keys.is_empty();
        for key in keys {
            let store = self.store.clone();
            let k = key.clone();
            match self.run(async move { store.delete(&k).await })? {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.error("delete", &key, e)),
            }
        }
        Ok(found)
    }

    /// Removes temporary data files left by a process that stopped while uploading them.
    pub fn remove_temporary_files(&self, rel: &str) -> Result<usize> {
        let mut removed = 0;
        for name in self.list_names(rel)? {
            if name.strip_prefix('_').and_then(names::parse_data_file_name).is_some() {
                self.delete(&Self::join(rel, &name))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The data files of folder `rel`: published ones, and those a reader moved into its
    /// processed-files folders.
    pub fn data_files(&self, rel: &str) -> Result<Vec<DataFile>> {
        let mut out: Vec<DataFile> = self
            .list_names(rel)?
            .iter()
            .filter_map(|n| names::parse_data_file_name(n))
            .map(|number| DataFile { number, place: Place::Published })
            .collect();
        for place in Place::CONSUMED {
            for n in self.list_names(&Self::join(rel, place.folder()))? {
                if let Some(number) = names::parse_data_file_name(&n) {
                    out.push(DataFile { number, place });
                }
            }
        }
        Ok(out)
    }

    pub fn part_size(&self) -> usize {
        self.settings.part_size
    }
}

/// A data file being uploaded under its temporary name. Up to one part is held in memory; larger
/// files go up as a multipart upload, part by part, as they are written.
pub struct CloudTempFile {
    target: Arc<CloudTarget>,
    key: ObjectPath,
    buffer: Vec<u8>,
    upload: Option<Box<dyn MultipartUpload>>,
    written: u64,
    /// The first upload error, kept with its kind (the `Write` interface can only carry text).
    failed: Option<Error>,
}

impl CloudTempFile {
    fn upload_part(&mut self) -> Result<()> {
        let part = std::mem::take(&mut self.buffer);
        if self.upload.is_none() {
            let store = self.target.store.clone();
            let k = self.key.clone();
            let started = self.target.run(async move { store.put_multipart(&k).await })?;
            self.upload = Some(started.map_err(|e| self.target.error("start uploading", &self.key, e))?);
        }
        let Some(upload) = self.upload.as_mut() else { return Ok(()) };
        let fut = upload.put_part(PutPayload::from(part));
        self.target.run(fut)?.map_err(|e| self.target.error("upload a part of", &self.key, e))
    }

    /// Finishes the file; returns its size. A file under the part size is not uploaded yet: it is
    /// kept for its publication, which uploads it under its final name in one request.
    pub fn sync(mut self) -> Result<u64> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        match self.upload.take() {
            None => {
                let bytes = Bytes::from(std::mem::take(&mut self.buffer));
                let mut pending = self
                    .target
                    .pending
                    .lock()
                    .map_err(|_| Error::new(ErrorKind::Internal, "the pending files' lock is poisoned"))?;
                pending.insert(self.key.to_string(), bytes);
            }
            Some(upload) => {
                self.upload = Some(upload);
                if !self.buffer.is_empty() {
                    self.upload_part()?;
                }
                let Some(mut upload) = self.upload.take() else { return Ok(self.written) };
                self.target
                    .run(async move { upload.complete().await })?
                    .map_err(|e| self.target.error("complete the upload of", &self.key, e))?;
            }
        }
        Ok(self.written)
    }

    /// The error that made a write fail, with its kind.
    pub fn take_error(&mut self) -> Option<Error> {
        self.failed.take()
    }
}

impl std::io::Write for CloudTempFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(e) = &self.failed {
            return Err(std::io::Error::other(e.clone()));
        }
        self.buffer.extend_from_slice(buf);
        self.written += buf.len() as u64;
        if self.buffer.len() >= self.target.settings.part_size {
            if let Err(e) = self.upload_part() {
                self.failed = Some(e.clone());
                return Err(std::io::Error::other(e));
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for CloudTempFile {
    fn drop(&mut self) {
        // An upload that was not completed is abandoned; its uncommitted parts expire on the store.
        if let Some(mut upload) = self.upload.take() {
            let _ = self.target.run(async move { upload.abort().await });
        }
    }
}

/// The error of a number the landing zone already holds with other content.
fn already_published(fin: &ObjectPath) -> Error {
    Error::new(ErrorKind::Internal, format!("data file \"{fin}\" is already published"))
        .with_detail("A published file is never replaced: the landing zone and the mirror's bookkeeping disagree.")
}

/// Maps a credential option name to the store's configuration key.
pub(crate) fn azure_key(name: &str) -> &str {
    match name {
        "sas_token" => "azure_storage_sas_key",
        "allow_http" => "allow_http",
        other => other,
    }
}

fn s3_key(name: &str) -> &str {
    match name {
        "session_token" => "aws_session_token",
        other => other,
    }
}

fn gcs_key(name: &str) -> &str {
    match name {
        // The storage endpoint (an S3-style "endpoint"): GCS's base URL.
        "endpoint" => "google_base_url",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_memory(part_size: usize) -> Arc<CloudTarget> {
        in_memory_with(part_size, false)
    }

    fn in_memory_with(part_size: usize, head_first: bool) -> Arc<CloudTarget> {
        let mut settings = CloudSettings::worker(MIN_PART_SIZE);
        settings.part_size = part_size;
        Arc::new(CloudTarget {
            store: Arc::new(object_store::memory::InMemory::new()),
            prefix: "root".into(),
            settings,
            redactor: Redactor::new(&CredentialOptions::new()),
            runtime: IoRuntime::new().unwrap(),
            url: "memory:///root".into(),
            pending: Default::default(),
            head_first,
        })
    }

    fn names_in(t: &CloudTarget, rel: &str) -> Vec<String> {
        let mut l = t.list_names(rel).unwrap();
        l.sort();
        l
    }

    fn write_file(t: &Arc<CloudTarget>, temp: u64, bytes: &[u8]) -> u64 {
        let mut f = t.create_temp_data_file("s.schema/t", temp).unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        f.sync().unwrap()
    }

    #[test]
    fn a_small_file_is_published_in_one_put_under_its_final_name() {
        let t = in_memory(1 << 20);
        assert_eq!(write_file(&t, 7, b"parquet bytes"), 13);
        // nothing is uploaded before it is published (no temporary object)
        assert!(names_in(&t, "s.schema/t").is_empty());
        t.publish_temp_data_file("s.schema/t", 7, 1).unwrap();
        assert_eq!(names_in(&t, "s.schema/t"), vec![names::data_file_name(1)]);
        assert_eq!(t.read("s.schema/t/00000000000000000001.parquet").unwrap(), Bytes::from_static(b"parquet bytes"));
        // a PUT whose reply was lost and that ran again finds its own bytes: done
        write_file(&t, 8, b"parquet bytes");
        t.publish_temp_data_file("s.schema/t", 8, 1).unwrap();
        // other bytes under a published number: refused, nothing replaced
        write_file(&t, 9, b"other bytes");
        let e = t.publish_temp_data_file("s.schema/t", 9, 1).unwrap_err();
        assert!(e.message.contains("already published"), "{e:?}");
        assert_eq!(t.read("s.schema/t/00000000000000000001.parquet").unwrap(), Bytes::from_static(b"parquet bytes"));
        t.publish_data_file("s.schema/t", 2, b"two").unwrap();
        assert!(t.publish_data_file("s.schema/t", 2, b"not two").is_err());
        assert_eq!(names_in(&t, "s.schema/t"), vec![names::data_file_name(1), names::data_file_name(2)]);
    }

    #[test]
    fn looking_first_where_the_condition_may_be_ignored_keeps_the_same_rules() {
        let t = in_memory_with(1 << 20, true);
        write_file(&t, 1, b"first");
        t.publish_temp_data_file("s.schema/t", 1, 1).unwrap();
        write_file(&t, 2, b"first");
        t.publish_temp_data_file("s.schema/t", 2, 1).unwrap();
        write_file(&t, 3, b"other");
        assert!(t.publish_temp_data_file("s.schema/t", 3, 1).unwrap_err().message.contains("already published"));
        assert_eq!(t.read("s.schema/t/00000000000000000001.parquet").unwrap(), Bytes::from_static(b"first"));
    }

    #[test]
    fn a_file_larger_than_a_part_is_uploaded_in_parts_then_copied() {
        let t = in_memory(64 * 1024);
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        write_file(&t, 3, &big);
        assert_eq!(names_in(&t, "s.schema/t"), vec![names::temporary_file_name(3)]);
        t.publish_temp_data_file("s.schema/t", 3, 1).unwrap();
        assert_eq!(names_in(&t, "s.schema/t"), vec![names::data_file_name(1)]);
        assert_eq!(t.read("s.schema/t/00000000000000000001.parquet").unwrap().to_vec(), big);
    }

    #[test]
    fn a_discarded_small_file_is_never_published() {
        let t = in_memory(1 << 20);
        write_file(&t, 4, b"abandoned");
        t.discard_temp_data_file("s.schema/t", 4).unwrap();
        assert!(t.publish_temp_data_file("s.schema/t", 4, 1).is_err());
        assert!(names_in(&t, "s.schema/t").is_empty());
    }

    #[test]
    fn redacts_secret_values_and_url_queries() {
        let mut o = CredentialOptions::new();
        o.insert("account_key".into(), "c2VjcmV0LWtleS12YWx1ZQ==".into());
        o.insert("account_name".into(), "acct".into());
        o.insert("sas_token".into(), "sv=2022-11-02&sig=AbCdEfGh123%3D".into());
        let r = Redactor::new(&o);
        let text = "key c2VjcmV0LWtleS12YWx1ZQ== for acct at https://acct.blob.core.windows.net/c/x?sv=1&sig=zzz) and sig=AbCdEfGh123%3D";
        let out = r.redact(text);
        assert!(!out.contains("c2VjcmV0"), "{out}");
        assert!(!out.contains("zzz"), "{out}");
        assert!(!out.contains("AbCdEfGh123"), "{out}");
        assert!(out.contains("acct"), "public options stay: {out}");
        assert!(out.contains("https://acct.blob.core.windows.net/c/x?[redacted])"), "{out}");
    }

    #[test]
    fn store_replies_are_compacted() {
        let text = "Error performing PUT http://h/x - 403 Forbidden: <?xml version=\"1.0\"?>\n<Error>\n  <Code>AuthorizationFailure</Code>\n  <Message>Server failed to authenticate the request.\nRequestId:1</Message>\n</Error>";
        assert_eq!(
            compact_store_reply(text),
            "Error performing PUT http://h/x - 403 Forbidden: AuthorizationFailure: Server failed to authenticate the request."
        );
        assert_eq!(compact_store_reply("plain"), "plain");
    }

    #[test]
    fn options_are_checked_against_the_kind_of_store() {
        let azure = TargetUrl::parse("az://lake/p").unwrap();
        let mut o = CredentialOptions::new();
        o.insert("account_key".into(), "k".into());
        validate_options(&azure, &o).unwrap();
        let s3 = TargetUrl::parse("s3://bkt/p").unwrap();
        let e = validate_options(&s3, &o).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidParameter);
        assert!(e.hint.unwrap().contains("secret_access_key"));
        let local = TargetUrl::parse("file:///tmp/x").unwrap();
        assert!(validate_options(&local, &o).is_err());
        assert!(validate_options(&local, &CredentialOptions::new()).is_ok());
        // Every option we accept is one the store's builder knows.
        for k in AZURE_OPTIONS {
            assert!(azure_key(k).parse::<AzureConfigKey>().is_ok(), "{k}");
        }
        for k in S3_OPTIONS {
            assert!(s3_key(k).parse::<AmazonS3ConfigKey>().is_ok(), "{k}");
        }
        for k in GCS_OPTIONS {
            assert!(gcs_key(k).parse::<GoogleConfigKey>().is_ok(), "{k}");
        }
    }

    #[test]
    fn keys_stay_under_the_prefix() {
        let url = TargetUrl::parse("az://lake/root/LandingZone").unwrap();
        let mut o = CredentialOptions::new();
        o.insert("account_name".into(), "devstoreaccount1".into());
        o.insert("account_key".into(), "a2V5".into());
        let t = CloudTarget::open(&url, &o, CloudSettings::probe()).unwrap();
        let folder = names::table_folder("we/ird", "..");
        let k = t.key(&CloudTarget::join(&folder, &names::data_file_name(1))).unwrap();
        assert_eq!(k.as_ref(), "root/LandingZone/we%2Fird.schema/.%2E/00000000000000000001.parquet");
        assert_eq!(t.key("").unwrap().as_ref(), "root/LandingZone");
    }
}
