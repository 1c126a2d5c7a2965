//! The hierarchical-namespace target: a landing zone in OneLake or in an Azure Data Lake Storage Gen2
//! account, written through the DFS REST API ("Data Lake Storage Gen2 — Path" operations) with only
//! the operations those services document and allow:
//!
//! - a data file is created under its `_`-prefixed temporary name (Path Create `resource=file`),
//!   its bytes appended part by part (Path Update `action=append&position=…`, so memory stays bounded
//!   by the part size), then flushed with its MD5 (`action=flush`, `x-ms-content-md5`, which the
//!   service stores with the file);
//! - it is published by an atomic rename to its final name that refuses to overwrite (Path Create
//!   with `x-ms-rename-source` and `If-None-Match: *`, answered 409 `PathAlreadyExists` when the name
//!   is taken), which is how Microsoft's open-mirroring best practices tell producers to publish;
//! - single paths are deleted one by one (Path Delete), a table's folder is deleted with everything in
//!   it (`recursive=true`, following `x-ms-continuation`), folders are listed with List Paths;
//! - never Blob Batch, Copy Blob or Put Block, which OneLake refuses or does not document
//!   (apache/arrow-rs-object-store issue 701: object_store's Azure delete goes through Blob Batch and
//!   OneLake answers 400). This is why this module exists beside [`crate::cloud`]: object_store's Azure
//!   client speaks only the Blob API. Its credential providers and request signing are reused
//!   (service principal, managed identity, workload identity, a given token; shared key and SAS on
//!   ADLS Gen2 accounts), and its HTTP client (timeouts, TLS, proxies from the same options).
//!
//! Retry rule of publication: before publishing a number again after a failure, look at the final
//! name: if it holds the same bytes (the MD5 the flush stored matches the one this process computed)
//! it is this batch, published by a request whose reply was lost, and publication moves on; if it
//! holds other bytes the landing zone and the mirror disagree, and publication stops with an error.
//! A published file is never overwritten.
//!
//! OneLake (fabric-docs `docs/onelake/onelake-api-parity.md`, `onelake-access-api.md`): the account is
//! always `onelake`, the file system is the workspace, paths start at the item; only Microsoft Entra
//! tokens (audience `https://storage.azure.com/`); the item folder and its `Files` and `Tables` folders
//! cannot be created, renamed or deleted, so the landing zone root is never created here, only what
//! lies below it.
//!
//! Runs on whichever thread owns the target; never calls PostgreSQL. Requests run on the target's own
//! tokio runtime ([`crate::cloud::IoRuntime`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH};
use http::{Method, StatusCode};
use md5::{Digest, Md5};
use object_store::azure::{
    AzureAuthorizer, AzureConfigKey, AzureCredential, AzureCredentialProvider, MicrosoftAzureBuilder,
};
use object_store::client::{HttpClient, HttpConnector, HttpRequest, HttpRequestBody, ReqwestConnector};
use object_store::ClientOptions;

use crate::cloud::{self, CloudSettings, CredentialOptions, IoRuntime, Redactor};
use crate::error::{Error, ErrorKind, Result};
use crate::names;
use crate::target::{DataFile, Place, TargetUrl};

/// Options a OneLake target refuses: OneLake takes Microsoft Entra tokens only (and its account is
/// always `onelake`).
pub const ONELAKE_REFUSED_OPTIONS: &[&str] = &["account_key", "sas_token", "use_emulator", "account_name"];

/// A landing zone in a hierarchical namespace (OneLake, ADLS Gen2), over the DFS API.
pub struct DfsTarget {
    inner: Arc<Inner>,
    /// Key prefix of the landing-zone root inside the file system, no leading or trailing `/`.
    prefix: String,
    /// OneLake: the item (first component of the prefix), whose `Tables` folder shows the tables
    /// the mirrored database holds.
    item: Option<String>,
    settings: CloudSettings,
    runtime: IoRuntime,
    url: String,
    /// Folders known to exist (created or seen by this process).
    folders: Mutex<HashSet<String>>,
    /// MD5 (base64) of each temporary file this process flushed and has not published yet.
    flushed: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for DfsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DfsTarget").field("url", &self.url).finish()
    }
}

/// What requests need, shared with the runtime's tasks.
struct Inner {
    http: HttpClient,
    credentials: AzureCredentialProvider,
    /// Storage account (signing with a shared key); `onelake` for OneLake.
    account: String,
    /// `https://host` (or the `endpoint` option), without a trailing `/`.
    base: String,
    filesystem: String,
    onelake: bool,
    redactor: Redactor,
    max_retries: usize,
    retry_timeout: Duration,
}

/// One request: method, path inside the file system (not encoded), query, headers, body.
struct Request {
    method: Method,
    path: String,
    query: Vec<(&'static str, String)>,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
    /// A rename's source (`/{filesystem}/{path}`, encoded): sent as `x-ms-rename-source`, with the
    /// SAS token appended when the credential is one (the service authorizes the source with it).
    rename_source: Option<String>,
}

impl Request {
    fn new(method: Method, path: &str) -> Request {
        Request {
            method,
            path: path.to_string(),
            query: Vec::new(),
            headers: Vec::new(),
            body: Bytes::new(),
            rename_source: None,
        }
    }
    fn query(mut self, k: &'static str, v: impl Into<String>) -> Request {
        self.query.push((k, v.into()));
        self
    }
    fn header(mut self, k: &'static str, v: impl Into<String>) -> Request {
        self.headers.push((k, v.into()));
        self
    }
    fn body(mut self, b: Bytes) -> Request {
        self.body = b;
        self
    }
}

/// A reply with its status (any status: the caller decides what is an error).
struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    /// The service's error code: the `x-ms-error-code` header, else the JSON body's `error.code`.
    fn code(&self) -> String {
        if let Some(c) = self.headers.get("x-ms-error-code").and_then(|v| v.to_str().ok()) {
            return c.to_string();
        }
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_default()
    }
    fn message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(|m| m.lines().next().unwrap_or("").to_string()))
            .unwrap_or_default()
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
    }
    fn ok(&self) -> bool {
        self.status.is_success()
    }
}

/// A request that got no reply (after its retries), and why.
#[derive(Debug)]
enum NoReply {
    /// No token: refused by the identity provider (a wrong secret, an unknown client), or a
    /// credential OneLake does not take.
    Refused(String),
    /// No token for another reason (the identity provider unreachable), or no reply from the
    /// service: worth trying again later.
    Unreachable(String),
}

impl NoReply {
    /// Whether another attempt may get a reply.
    fn transient(&self) -> bool {
        matches!(self, NoReply::Unreachable(_))
    }
}

/// Whether the text of a failed token request says the identity provider refused the credential for
/// good (OAuth 2.0 errors of RFC 6749 section 5.2, and the Microsoft Entra codes for a wrong or
/// expired secret, an unknown application or tenant, and an unmatched federated credential). Other
/// failures, such as Entra's AADSTS90033 "a transient error has occurred", are retried.
fn token_refused(text: &str) -> bool {
    [
        "invalid_client",
        "unauthorized_client",
        "invalid_grant",
        "AADSTS7000215",
        "AADSTS7000222",
        "AADSTS700016",
        "AADSTS70021",
        "AADSTS90002",
        "401 Unauthorized",
        "403 Forbidden",
    ]
    .iter()
    .any(|m| text.contains(m))
}

/// Percent-encodes a path for a URL or `x-ms-rename-source`, keeping `/` between components.
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn encode_query_value(v: &str) -> String {
    encode_path(v).replace('/', "%2F")
}

/// Whether a reply's status is worth another attempt.
fn transient(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

impl Inner {
    fn url(&self, r: &Request) -> String {
        let mut url = format!("{}/{}", self.base, encode_path(&self.filesystem));
        if !r.path.is_empty() {
            url.push('/');
            url.push_str(&encode_path(&r.path));
        }
        for (i, (k, v)) in r.query.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(k);
            url.push('=');
            url.push_str(&encode_query_value(v));
        }
        url
    }

    /// Sends `r`, retrying transport errors and transient statuses with back-off (200 ms doubling to
    /// 10 s, within `max_retries` and `retry_timeout`). Any reply is returned as it is.
    async fn send(&self, r: &Request) -> std::result::Result<Reply, NoReply> {
        let started = Instant::now();
        let mut attempt = 0usize;
        let mut backoff = Duration::from_millis(200);
        loop {
            let outcome = self.send_once(r).await;
            let retry = match &outcome {
                Ok(reply) => transient(reply.status),
                Err(e) => e.transient(),
            };
            if !retry || attempt >= self.max_retries || started.elapsed() + backoff > self.retry_timeout {
                return outcome;
            }
            attempt += 1;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn send_once(&self, r: &Request) -> std::result::Result<Reply, NoReply> {
        let credential = self.credentials.get_credential().await.map_err(|e| {
            let text = format!("could not get a token: {}", self.redactor.redact(&e.to_string()));
            if token_refused(&text) {
                NoReply::Refused(text)
            } else {
                NoReply::Unreachable(text)
            }
        })?;
        if self.onelake && !matches!(*credential, AzureCredential::BearerToken(_)) {
            return Err(NoReply::Refused(
                "OneLake accepts only Microsoft Entra tokens, and the credential is not one".to_string(),
            ));
        }
        let invalid = |what: String| NoReply::Refused(self.redactor.redact(&what));
        let mut req: HttpRequest = http::Request::builder()
            .method(r.method.clone())
            .uri(self.url(r))
            .body(HttpRequestBody::from(r.body.clone()))
            .map_err(|e| invalid(format!("invalid request: {e}")))?;
        let headers = req.headers_mut();
        for (k, v) in &r.headers {
            let value = HeaderValue::from_str(v).map_err(|e| invalid(format!("invalid header {k}: {e}")))?;
            headers.insert(HeaderName::from_static(k), value);
        }
        headers.insert(CONTENT_LENGTH, HeaderValue::from(r.body.len()));
        if let Some(source) = &r.rename_source {
            let source = match &*credential {
                AzureCredential::SASToken(pairs) => {
                    let query: Vec<String> =
                        pairs.iter().map(|(k, v)| format!("{k}={}", encode_query_value(v))).collect();
                    format!("{source}?{}", query.join("&"))
                }
                _ => source.clone(),
            };
            let value = HeaderValue::from_str(&source).map_err(|e| invalid(format!("invalid rename source: {e}")))?;
            headers.insert(HeaderName::from_static("x-ms-rename-source"), value);
        }
        AzureAuthorizer::new(&credential, &self.account)
            .try_authorize(&mut req)
            .map_err(|e| invalid(format!("could not sign the request: {e}")))?;
        let unreachable = |e: String| NoReply::Unreachable(self.redactor.redact(&e));
        let response = self.http.execute(req).await.map_err(|e| unreachable(e.to_string()))?;
        let (parts, body) = response.into_parts();
        let body = body.bytes().await.map_err(|e| unreachable(e.to_string()))?;
        Ok(Reply { status: parts.status, headers: parts.headers, body })
    }
}

/// One entry of a folder listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Last path component.
    pub name: String,
    pub is_dir: bool,
}

impl DfsTarget {
    /// Builds the client for `url` (a [`TargetUrl::Dfs`]). No request is made yet.
    pub fn open(url: &TargetUrl, options: &CredentialOptions, settings: CloudSettings) -> Result<DfsTarget> {
        let TargetUrl::Dfs { host, account, filesystem, prefix, onelake } = url else {
            return Err(Error::new(ErrorKind::Internal, "not a hierarchical-namespace target"));
        };
        cloud::validate_options(url, options)?;
        let redactor = Redactor::new(options);
        let config_error = |e: object_store::Error| {
            Error::new(
                ErrorKind::InvalidParameter,
                format!("invalid target configuration: {}", redactor.redact(&e.to_string())),
            )
        };
        let allow_http = options.get("allow_http").is_some_and(|v| matches!(v.as_str(), "true" | "1" | "yes" | "on"));
        let client = ClientOptions::new()
            .with_connect_timeout(settings.connect_timeout)
            .with_timeout(settings.request_timeout)
            .with_allow_http(allow_http);
        // object_store's builder only for its credential chain (options, then the environment).
        let mut b = MicrosoftAzureBuilder::from_env()
            .with_client_options(client.clone())
            .with_account(account.clone())
            .with_container_name(filesystem.clone());
        for (k, v) in options {
            if k == "endpoint" {
                continue;
            }
            let key: AzureConfigKey = cloud::azure_key(k).parse().map_err(config_error)?;
            b = b.with_config(key, v.clone());
        }
        let store = b.build().map_err(config_error)?;
        let credentials = store.credentials().clone();
        let http = ReqwestConnector::default().connect(&client).map_err(config_error)?;
        let base = match options.get("endpoint") {
            Some(e) => e.trim_end_matches('/').to_string(),
            None => format!("https://{host}"),
        };
        let inner = Inner {
            http,
            credentials,
            account: account.clone(),
            base,
            filesystem: filesystem.clone(),
            onelake: *onelake,
            redactor,
            max_retries: settings.max_retries,
            retry_timeout: settings.retry_timeout,
        };
        let item = onelake.then(|| prefix.split('/').next().unwrap_or_default().to_string());
        Ok(DfsTarget {
            inner: Arc::new(inner),
            prefix: prefix.clone(),
            item,
            settings,
            runtime: IoRuntime::new()?,
            url: url.to_url(),
            folders: Mutex::new(HashSet::new()),
            flushed: Mutex::new(HashMap::new()),
        })
    }

    /// The path of `rel` (relative to the landing-zone root) inside the file system.
    fn path(&self, rel: &str) -> String {
        match (self.prefix.is_empty(), rel.is_empty()) {
            (true, _) => rel.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{rel}", self.prefix),
        }
    }

    fn join(rel_dir: &str, name: &str) -> String {
        if rel_dir.is_empty() {
            name.to_string()
        } else {
            format!("{rel_dir}/{name}")
        }
    }

    /// Sends one request and waits for its reply.
    fn call(&self, r: Request) -> Result<Reply> {
        let inner = self.inner.clone();
        let what = format!("{} {}", r.method, r.path);
        match self.runtime.run(async move { inner.send(&r).await })? {
            Ok(reply) => Ok(reply),
            Err(NoReply::Unreachable(why)) => {
                Err(Error::new(ErrorKind::TargetIo, format!("no reply to {what} from {}", self.url)).with_detail(why))
            }
            Err(NoReply::Refused(why)) => Err(Error::new(
                ErrorKind::TargetAuthentication,
                format!("could not authenticate {what} to {}", self.url),
            )
            .with_detail(why)
            .with_hint("Check the credential: OneLake takes a Microsoft Entra token for https://storage.azure.com/ (tenant_id, client_id and client_secret of a service principal; a managed or workload identity; or bearer_token).")),
        }
    }

    /// Turns a reply that is not a success into our error: what the caller should do follows from the
    /// kind.
    fn error(&self, action: &str, path: &str, reply: &Reply) -> Error {
        let code = reply.code();
        let message = reply.message();
        let text = self.inner.redactor.redact(&format!("{} {code}: {message}", reply.status));
        let what = format!("could not {action} \"{path}\" in {}", self.url);
        match (reply.status.as_u16(), code.as_str()) {
            (401, _) | (403, "AuthenticationFailed" | "InvalidAuthenticationInfo") => {
                Error::new(ErrorKind::TargetAuthentication, what).with_detail(text).with_hint(
                    "Check the credential: OneLake takes a Microsoft Entra token for https://storage.azure.com/ (service principal, managed identity, workload identity or bearer_token), and a given token must not have expired.",
                )
            }
            (403, _) => Error::new(ErrorKind::TargetPermission, what).with_detail(text).with_hint(
                "Give the identity write access: on OneLake, the Contributor role on the workspace or Read and write on the mirrored database; on an ADLS Gen2 account, Storage Blob Data Contributor.",
            ),
            (400, "OperationNotAllowedOnThePath") => Error::new(ErrorKind::TargetPermission, what)
                .with_detail(text)
                .with_hint("OneLake protects the item, Files and Tables folders; the target must be <workspace>/<item>/Files/LandingZone."),
            (404, "FilesystemNotFound" | "ContainerNotFound" | "WorkspaceNotFound" | "ItemNotFound" | "ArtifactNotFound") => {
                Error::new(ErrorKind::TargetMissing, what)
                    .with_detail(text)
                    .with_hint("Check that the workspace (file system) and the item named in the target URL exist.")
            }
            _ => Error::new(ErrorKind::TargetIo, what).with_detail(text),
        }
    }

    fn expect(&self, action: &str, path: &str, reply: Reply) -> Result<Reply> {
        if reply.ok() {
            Ok(reply)
        } else {
            Err(self.error(action, path, &reply))
        }
    }

    /// Creates folder `rel` and the folders above it up to the landing-zone root (which must exist on
    /// OneLake, and is created elsewhere). Folders seen before are not asked for again.
    fn ensure_folder(&self, rel: &str) -> Result<()> {
        let mut wanted: Vec<String> = Vec::new();
        let mut acc = String::new();
        if self.item.is_none() && !self.prefix.is_empty() {
            for part in self.prefix.split('/') {
                acc = Self::join(&acc, part);
                wanted.push(acc.clone());
            }
        }
        let mut rel_acc = String::new();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            rel_acc = Self::join(&rel_acc, part);
            wanted.push(self.path(&rel_acc));
        }
        for path in wanted {
            if self.folders.lock().map(|f| f.contains(&path)).unwrap_or(false) {
                continue;
            }
            let reply = self
                .call(Request::new(Method::PUT, &path).query("resource", "directory").header("if-none-match", "*"))?;
            if !(reply.ok() || reply.status == StatusCode::CONFLICT && reply.code() == "PathAlreadyExists") {
                return Err(self.error("create folder", &path, &reply));
            }
            if let Ok(mut f) = self.folders.lock() {
                f.insert(path);
            }
        }
        Ok(())
    }

    /// Forgets folders at or below `path` (deleted).
    fn forget_folders(&self, path: &str) {
        if let Ok(mut f) = self.folders.lock() {
            let below = format!("{path}/");
            f.retain(|p| p != path && !p.starts_with(&below));
        }
    }

    /// Lists folder `rel` (not recursively): None when it does not exist.
    pub fn list(&self, rel: &str) -> Result<Option<Vec<Entry>>> {
        let dir = self.path(rel);
        let mut out = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let mut r = Request::new(Method::GET, "").query("resource", "filesystem").query("recursive", "false");
            if !dir.is_empty() {
                r = r.query("directory", dir.clone());
            }
            if let Some(c) = &continuation {
                r = r.query("continuation", c.clone());
            }
            let reply = self.call(r)?;
            if reply.status == StatusCode::NOT_FOUND && reply.code() == "PathNotFound" {
                return Ok(None);
            }
            let reply = self.expect("list", &dir, reply)?;
            let doc: serde_json::Value = serde_json::from_slice(&reply.body).map_err(|e| {
                Error::new(ErrorKind::TargetIo, format!("could not read the listing of \"{dir}\" in {}", self.url))
                    .with_detail(e.to_string())
            })?;
            for p in doc["paths"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                let name = p["name"].as_str().unwrap_or_default();
                // isDirectory is the string "true" for folders and absent for files (the service's
                // replies; the specification declares a boolean, so both are read).
                let is_dir = p["isDirectory"].as_str() == Some("true") || p["isDirectory"].as_bool() == Some(true);
                let last = name.rsplit('/').next().unwrap_or(name).to_string();
                out.push(Entry { name: last, is_dir });
            }
            continuation = reply.header("x-ms-continuation").filter(|c| !c.is_empty());
            if continuation.is_none() {
                return Ok(Some(out));
            }
        }
    }

    /// Properties of a path: None when it does not exist; else (is a folder, length, Content-MD5).
    fn head(&self, path: &str) -> Result<Option<(bool, u64, Option<String>)>> {
        let reply = self.call(Request::new(Method::HEAD, path))?;
        if reply.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let reply = self.expect("look up", path, reply)?;
        let is_dir = reply.header("x-ms-resource-type").as_deref() == Some("directory");
        let len = reply.header("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
        Ok(Some((is_dir, len, reply.header("content-md5"))))
    }

    /// Deletes one file or an empty folder; a missing one is fine.
    fn delete_path(&self, path: &str) -> Result<()> {
        let reply = self.call(Request::new(Method::DELETE, path))?;
        if reply.ok() || reply.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        Err(self.error("delete", path, &reply))
    }

    /// Creates (or truncates) file `path`.
    fn create_file(&self, path: &str) -> Result<()> {
        let reply = self.call(Request::new(Method::PUT, path).query("resource", "file"))?;
        self.expect("create", path, reply).map(|_| ())
    }

    fn append(&self, path: &str, position: u64, bytes: Bytes) -> Result<()> {
        let reply = self.call(
            Request::new(Method::PATCH, path)
                .query("action", "append")
                .query("position", position.to_string())
                .body(bytes),
        )?;
        self.expect("append to", path, reply).map(|_| ())
    }

    fn flush(&self, path: &str, position: u64, md5: &str) -> Result<()> {
        let reply = self.call(
            Request::new(Method::PATCH, path)
                .query("action", "flush")
                .query("position", position.to_string())
                .query("close", "true")
                .header("x-ms-content-md5", md5),
        )?;
        self.expect("flush", path, reply).map(|_| ())
    }

    /// Renames `from` to `to` (both inside the file system). `exclusive`: refuse an existing `to`.
    fn rename(&self, from: &str, to: &str, exclusive: bool) -> Result<Reply> {
        let mut r = Request::new(Method::PUT, to);
        r.rename_source = Some(format!("/{}/{}", encode_path(&self.inner.filesystem), encode_path(from)));
        if exclusive {
            r = r.header("if-none-match", "*");
        }
        self.call(r)
    }

    /// Writes a whole small file under a temporary name, then renames it over `path`.
    fn put_whole(&self, dir: &str, name: &str, bytes: &[u8]) -> Result<()> {
        self.ensure_folder(dir)?;
        let fin = self.path(&Self::join(dir, name));
        let tmp = self.path(&Self::join(dir, &format!("_{name}.tmp")));
        self.create_file(&tmp)?;
        let md5 = md5_base64(bytes);
        if !bytes.is_empty() {
            self.append(&tmp, 0, Bytes::copy_from_slice(bytes))?;
        }
        self.flush(&tmp, bytes.len() as u64, &md5)?;
        let reply = self.rename(&tmp, &fin, false)?;
        if reply.status == StatusCode::NOT_FOUND && reply.code() == "SourcePathNotFound" {
            // The rename ran and its reply was lost (the retry found no source): the document is in
            // place if it holds these bytes.
            if let Some((false, _, Some(theirs))) = self.head(&fin)? {
                if theirs == md5 {
                    return Ok(());
                }
            }
        }
        self.expect("publish", &fin, reply).map(|_| ())
    }

    /// Proves the target can be written: creates, renames and deletes a probe file under the root.
    pub fn probe(&self) -> Result<()> {
        if self.item.is_some() {
            // OneLake: Fabric creates Files/LandingZone with the mirrored database.
            let root = self.path("");
            match self.head(&root)? {
                Some((true, _, _)) => {}
                _ => {
                    return Err(Error::new(
                        ErrorKind::TargetMissing,
                        format!("the landing zone \"{root}\" does not exist in {}", self.url),
                    )
                    .with_hint("The target must be the Files/LandingZone folder of a mirrored database item (Fabric creates it with the item)."))
                }
            }
        }
        let name = format!("_azure_cdc_probe_{}", std::process::id());
        self.put_whole("", &name, b"azure_cdc probe")?;
        self.delete_path(&self.path(&name))
    }

    /// True when nothing is stored under the root.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.list("")?.is_none_or(|l| l.is_empty()))
    }

    /// Starts a data file of table folder `rel` under temporary name `temp`.
    pub fn create_temp_data_file(self: &Arc<Self>, rel: &str, temp: u64) -> Result<DfsTempFile> {
        self.ensure_folder(rel)?;
        Ok(DfsTempFile {
            target: self.clone(),
            path: self.path(&Self::join(rel, &names::temporary_file_name(temp))),
            buffer: Vec::new(),
            position: 0,
            created: false,
            md5: Md5::new(),
            failed: None,
        })
    }

    pub fn discard_temp_data_file(&self, rel: &str, temp: u64) -> Result<()> {
        let path = self.path(&Self::join(rel, &names::temporary_file_name(temp)));
        if let Ok(mut f) = self.flushed.lock() {
            f.remove(&path);
        }
        self.delete_path(&path)
    }

    /// Publishes the flushed temporary file `temp` as data file `number` by renaming it to its final
    /// name, which must be free, or hold this very file already (see the module's retry rule).
    pub fn publish_temp_data_file(&self, rel: &str, temp: u64, number: u64) -> Result<()> {
        let tmp = self.path(&Self::join(rel, &names::temporary_file_name(temp)));
        let fin = self.path(&Self::join(rel, &names::data_file_name(number)));
        let ours = self.flushed.lock().ok().and_then(|f| f.get(&tmp).cloned());
        let reply = self.rename(&tmp, &fin, true)?;
        let taken = reply.status == StatusCode::CONFLICT && reply.code() == "PathAlreadyExists";
        let source_gone = reply.status == StatusCode::NOT_FOUND && reply.code() == "SourcePathNotFound";
        if !reply.ok() && !taken && !source_gone {
            return Err(self.error("publish", &fin, &reply));
        }
        if !reply.ok() {
            // The final name is taken, or the temporary file is gone: either an earlier attempt of this
            // very publication succeeded (a reply lost, the request retried) or the landing zone holds
            // another file under this number.
            let fin_md5 = self.head(&fin)?;
            let same = match (&fin_md5, &ours) {
                (Some((false, _, Some(theirs))), Some(ours)) => theirs == ours,
                _ => false,
            };
            if fin_md5.is_none() {
                return Err(Error::new(
                    ErrorKind::TargetIo,
                    format!("the temporary file of data file \"{fin}\" disappeared before it was published"),
                ));
            }
            if !same {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!("data file \"{fin}\" is already published with other content"),
                )
                .with_detail(
                    "A published file is never replaced: the landing zone and the mirror's bookkeeping disagree.",
                ));
            }
            if taken {
                self.delete_path(&tmp)?;
            }
        }
        if let Ok(mut f) = self.flushed.lock() {
            f.remove(&tmp);
        }
        Ok(())
    }

    /// Publishes data file `number` from bytes in memory.
    pub fn publish_data_file(self: &Arc<Self>, rel: &str, number: u64, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Err(Error::new(ErrorKind::Internal, "refusing to publish an empty data file"));
        }
        let mut f = self.create_temp_data_file(rel, number)?;
        std::io::Write::write_all(&mut f, bytes).map_err(|e| {
            f.take_error().unwrap_or_else(|| Error::new(ErrorKind::TargetIo, format!("could not write: {e}")))
        })?;
        f.sync()?;
        self.publish_temp_data_file(rel, number, number)
    }

    /// Writes a small document (`_metadata.json`, `_partnerEvents.json`) atomically (written under a
    /// temporary name, renamed over the previous version).
    pub fn put_document(&self, rel_dir: &str, name: &str, bytes: &[u8]) -> Result<()> {
        self.put_whole(rel_dir, name, bytes)
    }

    /// Deletes table folder `rel` itself, with everything in it (recursive Path Delete, continued
    /// while the service returns a continuation). A missing folder is fine. Returns whether there was
    /// a folder.
    pub fn reset_table_folder(&self, rel: &str) -> Result<bool> {
        let path = self.path(rel);
        let mut continuation: Option<String> = None;
        let mut found = true;
        loop {
            let mut r = Request::new(Method::DELETE, &path).query("recursive", "true");
            if let Some(c) = &continuation {
                r = r.query("continuation", c.clone());
            }
            let reply = self.call(r)?;
            if reply.status == StatusCode::NOT_FOUND {
                // Nothing there; after a continuation: the last page ran and its reply was lost.
                found &= continuation.is_some();
                break;
            }
            let reply = self.expect("delete folder", &path, reply)?;
            continuation = reply.header("x-ms-continuation").filter(|c| !c.is_empty());
            if continuation.is_none() {
                break;
            }
        }
        self.forget_folders(&path);
        Ok(found)
    }

    /// Removes temporary data files left by a process that stopped while writing them.
    pub fn remove_temporary_files(&self, rel: &str) -> Result<usize> {
        let mut removed = 0;
        for e in self.list(rel)?.unwrap_or_default() {
            if !e.is_dir && e.name.strip_prefix('_').and_then(names::parse_data_file_name).is_some() {
                self.delete_path(&self.path(&Self::join(rel, &e.name)))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The data files of folder `rel`: published ones, and those the replicator moved into its
    /// processed-files folders.
    pub fn data_files(&self, rel: &str) -> Result<Vec<DataFile>> {
        let mut out = Vec::new();
        let Some(entries) = self.list(rel)? else { return Ok(out) };
        for e in &entries {
            if let Some(n) = names::parse_data_file_name(&e.name).filter(|_| !e.is_dir) {
                out.push(DataFile { number: n, place: Place::Published });
            }
        }
        // In the order the reader moves files, so that a file moved from one to the next between
        // two listings is seen in the second.
        for place in Place::CONSUMED {
            if !entries.iter().any(|e| e.is_dir && e.name == place.folder()) {
                continue;
            }
            for inner in self.list(&Self::join(rel, place.folder()))?.unwrap_or_default() {
                if let Some(n) = names::parse_data_file_name(&inner.name).filter(|_| !inner.is_dir) {
                    out.push(DataFile { number: n, place });
                }
            }
        }
        Ok(out)
    }

    /// Reads a whole file (`rel` relative to the root); None when there is none.
    pub fn try_read(&self, rel: &str) -> Result<Option<Bytes>> {
        let path = self.path(rel);
        let reply = self.call(Request::new(Method::GET, &path))?;
        if reply.status == StatusCode::NOT_FOUND && reply.code() == "PathNotFound" {
            return Ok(None);
        }
        self.expect("read", &path, reply).map(|r| Some(r.body))
    }

    /// The last `len` bytes of file `rel` (all of it when it is shorter); None when it does not exist.
    /// Two requests: its size (HEAD), then a read with a `Range` of the form `bytes=start-end` (the
    /// form the service documents; it does not document suffix ranges).
    pub fn try_read_tail(&self, rel: &str, len: u64) -> Result<Option<Bytes>> {
        let path = self.path(rel);
        let Some((_, size, _)) = self.head(&path)? else { return Ok(None) };
        if size == 0 {
            return Ok(Some(Bytes::new()));
        }
        let start = size.saturating_sub(len);
        let reply =
            self.call(Request::new(Method::GET, &path).header("range", format!("bytes={start}-{}", size - 1)))?;
        if reply.status == StatusCode::NOT_FOUND && reply.code() == "PathNotFound" {
            return Ok(None);
        }
        let body = self.expect("read", &path, reply)?.body;
        // A reply without the range (200) carries the whole file.
        let skip = body.len().saturating_sub((size - start) as usize);
        Ok(Some(body.slice(skip..)))
    }

    /// OneLake: whether the mirrored database still holds the table whose landing-zone folder is
    /// `rel` (`<schema>.schema/<table>`): its folder `Tables/<schema>/<table>` of the item exists.
    /// None for other targets (nothing downstream is known).
    pub fn table_downstream(&self, rel: &str) -> Result<Option<bool>> {
        let Some(item) = &self.item else { return Ok(None) };
        let (schema, table) = rel.split_once('/').unwrap_or(("", rel));
        let schema = schema.strip_suffix(names::SCHEMA_FOLDER_SUFFIX).unwrap_or(schema);
        let path = format!("{item}/Tables/{schema}/{table}");
        Ok(Some(self.head(&path)?.is_some()))
    }

    pub fn part_size(&self) -> usize {
        self.settings.part_size
    }
}

/// MD5 of `bytes`, base64 (the form of `Content-MD5`).
fn md5_base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(bytes))
}

/// A data file being written under its temporary name: created at the first part, appended part by
/// part (at most one part held in memory), flushed with its MD5 by [`DfsTempFile::sync`].
pub struct DfsTempFile {
    target: Arc<DfsTarget>,
    path: String,
    buffer: Vec<u8>,
    /// Bytes appended so far.
    position: u64,
    created: bool,
    md5: Md5,
    failed: Option<Error>,
}

impl DfsTempFile {
    fn append_buffer(&mut self) -> Result<()> {
        if !self.created {
            self.target.create_file(&self.path)?;
            self.created = true;
        }
        if self.buffer.is_empty() {
            return Ok(());
        }
        let part = Bytes::from(std::mem::take(&mut self.buffer));
        let len = part.len() as u64;
        self.target.append(&self.path, self.position, part)?;
        self.position += len;
        Ok(())
    }

    /// Appends what is buffered and flushes; returns the file's size.
    pub fn sync(mut self) -> Result<u64> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        self.append_buffer()?;
        let md5 = base64::engine::general_purpose::STANDARD.encode(self.md5.clone().finalize());
        self.target.flush(&self.path, self.position, &md5)?;
        if let Ok(mut f) = self.target.flushed.lock() {
            f.insert(self.path.clone(), md5);
        }
        Ok(self.position)
    }

    /// The error that made a write fail, with its kind.
    pub fn take_error(&mut self) -> Option<Error> {
        self.failed.take()
    }
}

impl std::io::Write for DfsTempFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(e) = &self.failed {
            return Err(std::io::Error::other(e.clone()));
        }
        self.buffer.extend_from_slice(buf);
        self.md5.update(buf);
        if self.buffer.len() >= self.target.settings.part_size {
            if let Err(e) = self.append_buffer() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_encoded_per_component() {
        assert_eq!(
            encode_path("item/Files/LandingZone/Sales Dept.schema/..%2FOrders ü"),
            "item/Files/LandingZone/Sales%20Dept.schema/..%252FOrders%20%C3%BC"
        );
        assert_eq!(encode_query_value("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn md5_is_base64() {
        assert_eq!(md5_base64(b""), "1B2M2Y8AsgTpgAmY7PhCfg==");
    }

    #[test]
    fn onelake_targets_take_tokens_only() {
        let url = TargetUrl::parse(
            "abfss://ws@onelake.dfs.fabric.microsoft.com/item.MountedRelationalDatabase/Files/LandingZone",
        )
        .unwrap();
        let mut o = CredentialOptions::new();
        o.insert("account_key".into(), "a2V5".into());
        let e = DfsTarget::open(&url, &o, CloudSettings::probe()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidParameter);
        let mut o = CredentialOptions::new();
        o.insert("bearer_token".into(), "t0ken".into());
        let t = DfsTarget::open(&url, &o, CloudSettings::probe()).unwrap();
        assert_eq!(t.path("s.schema/t"), "item.MountedRelationalDatabase/Files/LandingZone/s.schema/t");
        assert_eq!(t.item.as_deref(), Some("item.MountedRelationalDatabase"));
        assert_eq!(t.inner.base, "https://onelake.dfs.fabric.microsoft.com");
    }
}
