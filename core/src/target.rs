//! Targets: where a mirror's landing zone is written. This module parses target URLs (one function
//! for every supported form), dispatches between the two kinds of target ([`Target`]), and implements
//! the local-folder target (`file:///absolute/path`) with atomic, durable publication:
//! a data file is written under a `_`-prefixed temporary name, fsynced, then hard-linked to its final
//! name (which fails rather than overwrite an existing file), the temporary name removed and the folder
//! fsynced. A reader therefore never sees a partial file, and a published file is never replaced.
//! Object stores are in [`crate::cloud`]. Safe on any thread; never calls PostgreSQL.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use std::sync::Arc;

use crate::cloud::{self, CloudSettings, CloudTarget, CloudTempFile, CredentialOptions};
use crate::dfs::{DfsTarget, DfsTempFile};
use crate::error::{Error, ErrorKind, Result};
use crate::names;

/// The URL forms `start_mirror` accepts, for error hints.
pub const SUPPORTED_FORMS: &str = "file:///absolute/path, \
abfss://<workspace>@onelake.dfs.fabric.microsoft.com/<item>/Files/LandingZone, \
https://onelake.dfs.fabric.microsoft.com/<workspace>/<item>/Files/LandingZone, \
abfss://<container>@<account>.dfs.core.windows.net/<path>, \
https://<account>.blob.core.windows.net/<container>/<path>, az://<container>/<path>, \
s3://<bucket>/<path>, gs://<bucket>/<path>";

/// The OneLake DFS host of a OneLake host name, or None when `host` is not one. OneLake's hosts
/// (fabric-docs `docs/onelake/onelake-access-api.md`, `docs/security/
/// security-workspace-level-private-links-overview.md`): `onelake.dfs.fabric.microsoft.com`, regional
/// `<region>-onelake.dfs.fabric.microsoft.com`, a workspace's private link
/// `<workspaceid>.z<xy>.dfs.fabric.microsoft.com` or `<workspaceid>.z<xy>.onelake.fabric.microsoft.com`,
/// each also with `blob` for `dfs`. The DFS API is always used, on the DFS host.
fn onelake_dfs_host(host: &str) -> Option<String> {
    let label_ok =
        |l: &str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if let Some(first) =
        host.strip_suffix(".dfs.fabric.microsoft.com").or(host.strip_suffix(".blob.fabric.microsoft.com"))
    {
        let regional = first.strip_suffix("-onelake").is_some_and(label_ok);
        let private = first.split_once('.').is_some_and(|(ws, z)| label_ok(ws) && z.starts_with('z') && label_ok(z));
        if first == "onelake" || regional || private {
            return Some(format!("{first}.dfs.fabric.microsoft.com"));
        }
        return None;
    }
    let (ws, z) = host.strip_suffix(".onelake.fabric.microsoft.com")?.split_once('.')?;
    (label_ok(ws) && z.starts_with('z') && label_ok(z)).then(|| host.to_string())
}

/// A parsed target URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetUrl {
    /// A folder on the server's file system.
    Local(PathBuf),
    /// Azure Blob Storage through the Blob API (accounts without a hierarchical namespace, the Azurite
    /// emulator). `account` None: from the credential or the environment (`az://`). `prefix`: key
    /// prefix of the landing-zone root, no leading or trailing `/`.
    Azure {
        account: Option<String>,
        container: String,
        prefix: String,
    },
    /// A hierarchical namespace through the DFS API ([`crate::dfs`]): OneLake (`onelake`, account
    /// `onelake`, the file system is the workspace, the prefix is `<item>/Files/LandingZone`) or an
    /// ADLS Gen2 account (`abfss://`). `host`: the DFS host requests go to.
    Dfs {
        host: String,
        account: String,
        filesystem: String,
        prefix: String,
        onelake: bool,
    },
    S3 {
        bucket: String,
        prefix: String,
    },
    Gcs {
        bucket: String,
        prefix: String,
    },
}

impl TargetUrl {
    pub fn parse(url: &str) -> Result<TargetUrl> {
        let unsupported = |why: String| {
            Error::new(ErrorKind::InvalidParameter, format!("unsupported target \"{}\"", display_without_query(url)))
                .with_detail(why)
                .with_hint(format!("Supported target forms: {SUPPORTED_FORMS}."))
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(unsupported("The target is not a URL.".into()));
        };
        if rest.contains('?') || rest.contains('#') {
            return Err(unsupported(
                "A target URL takes no query string or fragment. Secrets such as SAS tokens go into a credential (azure_cdc.create_credential), never into the URL.".into(),
            ));
        }
        if rest.chars().any(|c| c.is_control()) {
            return Err(unsupported("The URL contains a control character.".into()));
        }
        let scheme = scheme.to_ascii_lowercase();
        match scheme.as_str() {
            "file" => Self::parse_file(rest).map_err(unsupported),
            "abfs" | "abfss" => {
                let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
                let Some((container, host)) = authority.split_once('@') else {
                    return Err(unsupported("An abfss URL names <container>@<account>.dfs.core.windows.net.".into()));
                };
                let host = host.to_ascii_lowercase();
                if let Some(dfs) = onelake_dfs_host(&host) {
                    return Self::onelake(dfs, container, path).map_err(unsupported);
                }
                let account = azure_account(&host).ok_or_else(|| {
                    unsupported(format!("\"{host}\" is not an Azure storage host (<account>.dfs.core.windows.net)."))
                })?;
                Self::adls(account, container, path).map_err(unsupported)
            }
            "https" => {
                let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
                let host = host.to_ascii_lowercase();
                let (first, more) = path.split_once('/').unwrap_or((path, ""));
                if let Some(dfs) = onelake_dfs_host(&host) {
                    return Self::onelake(dfs, first, more).map_err(unsupported);
                }
                let account = azure_account(&host).ok_or_else(|| {
                    unsupported(format!(
                        "\"{host}\" is not an Azure storage host (<account>.blob.core.windows.net). For an emulator, use az://<container>/<path> with a credential that sets endpoint."
                    ))
                })?;
                if host.ends_with(".dfs.core.windows.net") {
                    return Self::adls(account, first, more).map_err(unsupported);
                }
                Self::azure(Some(account), first, more).map_err(unsupported)
            }
            "az" | "azure" => {
                let (container, path) = rest.split_once('/').unwrap_or((rest, ""));
                Self::azure(None, container, path).map_err(unsupported)
            }
            "s3" | "s3a" => {
                let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
                check_bucket(bucket).map_err(unsupported)?;
                Ok(TargetUrl::S3 { bucket: bucket.to_string(), prefix: clean_prefix(path).map_err(unsupported)? })
            }
            "gs" => {
                let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
                check_bucket(bucket).map_err(unsupported)?;
                Ok(TargetUrl::Gcs { bucket: bucket.to_string(), prefix: clean_prefix(path).map_err(unsupported)? })
            }
            other => Err(unsupported(format!("The scheme \"{other}\" is not supported."))),
        }
    }

    fn parse_file(rest: &str) -> std::result::Result<TargetUrl, String> {
        let path = match rest.strip_prefix("localhost") {
            Some(p) => p,
            None => rest,
        };
        if !path.starts_with('/') {
            return Err("A file target needs an absolute path (three slashes: file:///path).".into());
        }
        if path.contains('\0') {
            return Err("The path contains a NUL byte.".into());
        }
        let p = Path::new(path);
        if path.split('/').any(|seg| seg == "." || seg == "..") {
            return Err("The path contains \".\" or \"..\" components.".into());
        }
        if p.parent().is_none() {
            return Err("The target cannot be the root folder.".into());
        }
        let normalized: PathBuf = p.components().collect();
        Ok(TargetUrl::Local(normalized))
    }

    fn onelake(host: String, workspace: &str, path: &str) -> std::result::Result<TargetUrl, String> {
        if workspace.is_empty() || workspace.contains('@') {
            return Err("A OneLake URL names a workspace (GUID or name).".into());
        }
        let prefix = clean_prefix(path)?;
        let parts: Vec<&str> = prefix.split('/').collect();
        if parts.len() != 3 || parts[1] != "Files" || parts[2] != "LandingZone" {
            return Err(
                "A OneLake target is the landing zone of a mirrored database item: <workspace>/<item>/Files/LandingZone.".into(),
            );
        }
        Ok(TargetUrl::Dfs { host, account: "onelake".into(), filesystem: workspace.to_string(), prefix, onelake: true })
    }

    fn adls(account: String, container: &str, path: &str) -> std::result::Result<TargetUrl, String> {
        let TargetUrl::Azure { container, prefix, .. } = Self::azure(None, container, path)? else {
            return Err("not a container".into());
        };
        Ok(TargetUrl::Dfs {
            host: format!("{account}.dfs.core.windows.net"),
            account,
            filesystem: container,
            prefix,
            onelake: false,
        })
    }

    fn azure(account: Option<String>, container: &str, path: &str) -> std::result::Result<TargetUrl, String> {
        let ok = (3..=63).contains(&container.len())
            && container.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !container.starts_with('-')
            && !container.ends_with('-')
            && !container.contains("--");
        if !ok {
            return Err(format!(
                "\"{container}\" is not a container name (3-63 lower-case letters, digits and single hyphens)."
            ));
        }
        Ok(TargetUrl::Azure { account, container: container.to_string(), prefix: clean_prefix(path)? })
    }

    /// The URL in canonical form (what the catalog stores and the status shows).
    pub fn to_url(&self) -> String {
        let with = |base: String, prefix: &str| if prefix.is_empty() { base } else { format!("{base}/{prefix}") };
        match self {
            TargetUrl::Local(p) => format!("file://{}", p.display()),
            TargetUrl::Dfs { host, filesystem, prefix, .. } => with(format!("abfss://{filesystem}@{host}"), prefix),
            TargetUrl::Azure { account: Some(a), container, prefix } => {
                with(format!("https://{a}.blob.core.windows.net/{container}"), prefix)
            }
            TargetUrl::Azure { account: None, container, prefix } => with(format!("az://{container}"), prefix),
            TargetUrl::S3 { bucket, prefix } => with(format!("s3://{bucket}"), prefix),
            TargetUrl::Gcs { bucket, prefix } => with(format!("gs://{bucket}"), prefix),
        }
    }

    /// Whether two targets could share objects (one's root inside the other's, or equal).
    pub fn overlaps(&self, other: &TargetUrl) -> bool {
        fn nested(a: &str, b: &str) -> bool {
            a.is_empty() || b.is_empty() || a == b || b.starts_with(&format!("{a}/")) || a.starts_with(&format!("{b}/"))
        }
        if let (Some((aa, ac, ap)), Some((ba, bc, bp))) = (self.azure_place(), other.azure_place()) {
            return (aa == ba || aa.is_none() || ba.is_none()) && ac == bc && nested(ap, bp);
        }
        match (self, other) {
            (TargetUrl::Local(a), TargetUrl::Local(b)) => a.starts_with(b) || b.starts_with(a),
            (TargetUrl::S3 { bucket: a, prefix: ap }, TargetUrl::S3 { bucket: b, prefix: bp })
            | (TargetUrl::Gcs { bucket: a, prefix: ap }, TargetUrl::Gcs { bucket: b, prefix: bp }) => {
                a == b && nested(ap, bp)
            }
            _ => false,
        }
    }
}

impl TargetUrl {
    /// Where an Azure target's objects are, whichever API reaches them: (account, container, prefix).
    fn azure_place(&self) -> Option<(Option<&str>, &str, &str)> {
        match self {
            TargetUrl::Azure { account, container, prefix } => Some((account.as_deref(), container, prefix)),
            TargetUrl::Dfs { account, filesystem, prefix, .. } => Some((Some(account.as_str()), filesystem, prefix)),
            _ => None,
        }
    }
}

/// The URL with any query string cut off, for messages.
fn display_without_query(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or("")
}

/// The account of an Azure storage host `<account>.(blob|dfs).core.windows.net`.
fn azure_account(host: &str) -> Option<String> {
    let (account, domain) = host.split_once('.')?;
    let ok = matches!(domain, "blob.core.windows.net" | "dfs.core.windows.net")
        && (3..=24).contains(&account.len())
        && account.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    ok.then(|| account.to_string())
}

fn check_bucket(bucket: &str) -> std::result::Result<(), String> {
    let ok = (3..=63).contains(&bucket.len())
        && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!("\"{bucket}\" is not a bucket name (3-63 lower-case letters, digits, '-', '.', '_')."))
    }
}

/// A key prefix from the path part of a URL: empty segments dropped, `.` and `..` refused.
fn clean_prefix(path: &str) -> std::result::Result<String, String> {
    let mut parts = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" => {}
            "." | ".." => return Err("The path contains \".\" or \"..\" components.".into()),
            s if s.starts_with('_') => {
                return Err(format!(
                    "The path component \"{s}\" starts with '_', which readers of the landing zone ignore."
                ))
            }
            s => parts.push(s),
        }
    }
    Ok(parts.join("/"))
}

/// Where a data file of a table folder is: published in the folder, or moved by the landing zone's
/// reader (Fabric's replicator moves processed files into `_ProcessedFiles`, later
/// `_FilesReadyToDelete`, purged after seven days, and leaves the newest in place: fabric-docs
/// `docs/mirroring/open-mirroring-landing-zone-format.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Place {
    Published,
    Processed,
    ReadyToDelete,
}

impl Place {
    /// The reader's folders, in the order files move through them.
    pub const CONSUMED: [Place; 2] = [Place::Processed, Place::ReadyToDelete];

    /// The subfolder of a table folder (empty for the folder itself).
    pub fn folder(self) -> &'static str {
        match self {
            Place::Published => "",
            Place::Processed => "_ProcessedFiles",
            Place::ReadyToDelete => "_FilesReadyToDelete",
        }
    }

    pub fn of_folder(name: &str) -> Option<Place> {
        Place::CONSUMED.into_iter().find(|p| p.folder() == name)
    }

    /// The path of data file `number` relative to its table folder.
    pub fn file(self, number: u64) -> String {
        match self {
            Place::Published => names::data_file_name(number),
            p => format!("{}/{}", p.folder(), names::data_file_name(number)),
        }
    }
}

/// A data file of a table folder, wherever it is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DataFile {
    pub number: u64,
    pub place: Place,
}

/// The last `len` bytes of a local file (all of it when it is shorter).
fn read_tail(path: &Path, len: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = fs::File::open(path)?;
    let size = file.metadata()?.len();
    let start = size.saturating_sub(len);
    file.seek(SeekFrom::Start(start))?;
    let mut out = Vec::with_capacity((size - start) as usize);
    file.read_to_end(&mut out)?;
    Ok(out)
}

/// The data files of a table folder by number, each once (a file seen in two places while the reader
/// moves it is taken where it was published), ascending.
pub fn by_number(mut files: Vec<DataFile>) -> Vec<DataFile> {
    files.sort();
    files.dedup_by_key(|f| f.number);
    files
}

/// Where a mirror writes: a local folder, an object store through its object API, or a hierarchical
/// namespace (OneLake, ADLS Gen2) through the DFS API. Same operations on all; see [`LocalTarget`],
/// [`CloudTarget`] and [`DfsTarget`].
#[derive(Debug)]
pub enum Target {
    Local(LocalTarget),
    Cloud(Arc<CloudTarget>),
    Dfs(Arc<DfsTarget>),
}

macro_rules! each {
    ($self:expr, $t:ident => $e:expr) => {
        match $self {
            Target::Local($t) => $e,
            Target::Cloud($t) => $e,
            Target::Dfs($t) => $e,
        }
    };
}

impl Target {
    /// Opens the target a URL names, with a credential's options (empty for none).
    pub fn open(url: &TargetUrl, options: &CredentialOptions, settings: CloudSettings) -> Result<Target> {
        match url {
            TargetUrl::Local(root) => {
                cloud::validate_options(url, options)?;
                Ok(Target::Local(LocalTarget::new(root.clone())))
            }
            TargetUrl::Dfs { .. } => Ok(Target::Dfs(Arc::new(DfsTarget::open(url, options, settings)?))),
            _ => Ok(Target::Cloud(Arc::new(CloudTarget::open(url, options, settings)?))),
        }
    }

    pub fn probe(&self) -> Result<()> {
        each!(self, t => t.probe())
    }

    pub fn is_empty(&self) -> Result<bool> {
        each!(self, t => t.is_empty())
    }

    /// Starts a data file of table folder `rel` under temporary name `temp`
    /// ([`names::temporary_file_name`]): the number it will be published as, or a staging number
    /// ([`names::staging_number`]) when that is not known yet.
    pub fn create_temp_data_file(&self, rel: &str, temp: u64) -> Result<TempFile> {
        match self {
            Target::Local(t) => t.create_temp_data_file(rel, temp).map(TempFile::Local),
            Target::Cloud(t) => t.create_temp_data_file(rel, temp).map(TempFile::Cloud),
            Target::Dfs(t) => t.create_temp_data_file(rel, temp).map(TempFile::Dfs),
        }
    }

    pub fn discard_temp_data_file(&self, rel: &str, temp: u64) -> Result<()> {
        each!(self, t => t.discard_temp_data_file(rel, temp))
    }

    /// Publishes the written temporary file `temp` as data file `number`.
    pub fn publish_temp_data_file(&self, rel: &str, temp: u64, number: u64) -> Result<()> {
        each!(self, t => t.publish_temp_data_file(rel, temp, number))
    }

    pub fn publish_data_file(&self, rel: &str, number: u64, bytes: &[u8]) -> Result<()> {
        each!(self, t => t.publish_data_file(rel, number, bytes))
    }

    pub fn put_document(&self, rel_dir: &str, name: &str, bytes: &[u8]) -> Result<()> {
        each!(self, t => t.put_document(rel_dir, name, bytes))
    }

    /// Deletes table folder `rel` itself, with everything in it: the documented way to reset one
    /// table of a landing zone (its reader tracks the folder, so files deleted inside a kept folder
    /// would not reset it). A missing folder is fine. Returns whether there was a folder.
    pub fn reset_table_folder(&self, rel: &str) -> Result<bool> {
        each!(self, t => t.reset_table_folder(rel))
    }

    pub fn remove_temporary_files(&self, rel: &str) -> Result<usize> {
        each!(self, t => t.remove_temporary_files(rel))
    }

    /// The data files of folder `rel`, wherever they are (see [`Place`]), each number once, ascending.
    pub fn data_files(&self, rel: &str) -> Result<Vec<DataFile>> {
        each!(self, t => t.data_files(rel)).map(by_number)
    }

    /// The whole content of data file `f` of folder `rel`. A file the landing zone's reader moved on
    /// since it was listed is read in its next place; None when it is gone (purged).
    pub fn read_data_file(&self, rel: &str, f: &DataFile) -> Result<Option<bytes::Bytes>> {
        self.read_placed(rel, f, None)
    }

    /// The last `len` bytes of data file `f` of folder `rel` (all of it when it is shorter), read
    /// wherever the landing zone's reader has moved it (as [`Target::read_data_file`]); None when it is
    /// gone. Reads a file's footer without downloading the file.
    pub fn read_data_file_tail(&self, rel: &str, f: &DataFile, len: u64) -> Result<Option<bytes::Bytes>> {
        self.read_placed(rel, f, Some(len))
    }

    /// Data file `f` of folder `rel` (its last `tail` bytes, or all of it), looked for in the place it
    /// was listed in and then in the places the landing zone's reader moves files to.
    fn read_placed(&self, rel: &str, f: &DataFile, tail: Option<u64>) -> Result<Option<bytes::Bytes>> {
        for place in [Place::Published, Place::Processed, Place::ReadyToDelete] {
            if place < f.place {
                continue;
            }
            let path = format!("{rel}/{}", place.file(f.number));
            let found = match self {
                Target::Local(t) => {
                    let path = t.root().join(path);
                    let read = match tail {
                        Some(len) => read_tail(&path, len),
                        None => fs::read(&path),
                    };
                    match read {
                        Ok(b) => Some(bytes::Bytes::from(b)),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                        Err(e) => return Err(Error::io("read", &path, &e)),
                    }
                }
                Target::Cloud(t) => match tail {
                    Some(len) => t.try_read_tail(&path, len)?,
                    None => t.try_read(&path)?,
                },
                Target::Dfs(t) => match tail {
                    Some(len) => t.try_read_tail(&path, len)?,
                    None => t.try_read(&path)?,
                },
            };
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }

    /// Whether the landing zone's reader still holds the table of folder `rel`: known on OneLake
    /// (the mirrored database's `Tables` folder), None elsewhere.
    pub fn table_downstream(&self, rel: &str) -> Result<Option<bool>> {
        match self {
            Target::Dfs(t) => t.table_downstream(rel),
            _ => Ok(None),
        }
    }
}

/// A data file being written under its temporary name, on either kind of target.
pub enum TempFile {
    Local(LocalTempFile),
    Cloud(CloudTempFile),
    Dfs(DfsTempFile),
}

impl TempFile {
    /// Makes the file durable under its temporary name; returns its size.
    pub fn sync(self) -> Result<u64> {
        match self {
            TempFile::Local(f) => f.sync(),
            TempFile::Cloud(f) => f.sync(),
            TempFile::Dfs(f) => f.sync(),
        }
    }
}

impl Write for TempFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            TempFile::Local(f) => f.write(buf),
            TempFile::Cloud(f) => f.write(buf),
            TempFile::Dfs(f) => f.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            TempFile::Local(f) => f.flush(),
            TempFile::Cloud(f) => f.flush(),
            TempFile::Dfs(f) => f.flush(),
        }
    }
}

/// A landing zone in a local folder.
#[derive(Debug)]
pub struct LocalTarget {
    root: PathBuf,
}

impl LocalTarget {
    pub fn new(root: PathBuf) -> Self {
        LocalTarget { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the target's folder if it is missing, but never the folders above it (as
    /// `COPY … TO 'file'` creates none): a missing parent is an error.
    fn ensure_root(&self) -> Result<()> {
        match fs::create_dir(&self.root) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(Error::io("create folder", &self.root, &e)),
        }
    }

    /// Proves the target can be written: creates the folder, writes, syncs and removes a probe file.
    pub fn probe(&self) -> Result<()> {
        self.ensure_root()?;
        let probe = self.root.join(format!("_azure_cdc_probe_{}", std::process::id()));
        write_synced(&probe, b"azure_cdc probe")?;
        fs::remove_file(&probe).map_err(|e| Error::io("remove", &probe, &e))?;
        Ok(())
    }

    /// True when the folder is missing or empty.
    pub fn is_empty(&self) -> Result<bool> {
        match fs::read_dir(&self.root) {
            Ok(mut it) => Ok(it.next().is_none()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(Error::io("read folder", &self.root, &e)),
        }
    }

    fn folder(&self, rel: &str) -> Result<PathBuf> {
        self.ensure_root()?;
        let dir = self.root.join(rel);
        fs::create_dir_all(&dir).map_err(|e| Error::io("create folder", &dir, &e))?;
        Ok(dir)
    }

    /// Opens temporary file `temp` of table folder `rel`, which a data file is written to before it is
    /// published. A leftover from an interrupted attempt is truncated.
    pub fn create_temp_data_file(&self, rel: &str, temp: u64) -> Result<LocalTempFile> {
        let dir = self.folder(rel)?;
        let path = dir.join(names::temporary_file_name(temp));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::io("create", &path, &e))?;
        Ok(LocalTempFile { out: BufWriter::with_capacity(1 << 20, file), path, written: 0 })
    }

    /// Removes temporary file `temp` (nothing was written to it).
    pub fn discard_temp_data_file(&self, rel: &str, temp: u64) -> Result<()> {
        let path = self.root.join(rel).join(names::temporary_file_name(temp));
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &path, &e)),
        }
    }

    /// Publishes the (synced) temporary file `temp` as data file `number`. Fails rather than replace a
    /// published file.
    pub fn publish_temp_data_file(&self, rel: &str, temp: u64, number: u64) -> Result<()> {
        let dir = self.root.join(rel);
        let tmp = dir.join(names::temporary_file_name(temp));
        let fin = dir.join(names::data_file_name(number));
        match fs::hard_link(&tmp, &fin) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let _ = fs::remove_file(&tmp);
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!("data file \"{}\" is already published", fin.display()),
                )
                .with_detail(
                    "A published file is never replaced: the landing zone and the mirror's bookkeeping disagree.",
                ));
            }
            Err(e) => return Err(Error::io("publish", &fin, &e)),
        }
        fs::remove_file(&tmp).map_err(|e| Error::io("remove", &tmp, &e))?;
        sync_dir(&dir)
    }

    /// Publishes data file `number` of the table folder `rel` from bytes in memory.
    pub fn publish_data_file(&self, rel: &str, number: u64, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Err(Error::new(ErrorKind::Internal, "refusing to publish an empty data file"));
        }
        let mut f = self.create_temp_data_file(rel, number)?;
        f.write_all(bytes).map_err(|e| Error::io("write", &f.path, &e))?;
        f.sync()?;
        self.publish_temp_data_file(rel, number, number)
    }

    /// Writes a small document (`_metadata.json`, `_partnerEvents.json`) atomically, replacing any
    /// previous version.
    pub fn put_document(&self, rel_dir: &str, name: &str, bytes: &[u8]) -> Result<()> {
        let dir = if rel_dir.is_empty() { self.folder("")? } else { self.folder(rel_dir)? };
        let tmp = dir.join(format!("_{name}.tmp"));
        let fin = dir.join(name);
        write_synced(&tmp, bytes)?;
        fs::rename(&tmp, &fin).map_err(|e| Error::io("rename", &fin, &e))?;
        sync_dir(&dir)
    }

    /// Deletes table folder `rel` with everything in it (a missing one is fine), and syncs its parent.
    /// Returns whether there was a folder.
    pub fn reset_table_folder(&self, rel: &str) -> Result<bool> {
        let dir = self.root.join(rel);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io("remove folder", &dir, &e)),
        }
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(true)
    }

    /// Removes temporary data files (`_<number>.parquet`) left in a table folder by a process that
    /// stopped while writing them. Published files are not touched.
    pub fn remove_temporary_files(&self, rel: &str) -> Result<usize> {
        let dir = self.root.join(rel);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(Error::io("read folder", &dir, &e)),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read folder", &dir, &e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.strip_prefix('_').and_then(names::parse_data_file_name).is_some() {
                let p = entry.path();
                fs::remove_file(&p).map_err(|e| Error::io("remove", &p, &e))?;
                removed += 1;
            }
        }
        if removed > 0 {
            sync_dir(&dir)?;
        }
        Ok(removed)
    }

    /// The data files of a table folder: published ones, and those a reader moved into its
    /// processed-files folders.
    pub fn data_files(&self, rel: &str) -> Result<Vec<DataFile>> {
        let mut v = Vec::new();
        for place in [Place::Published, Place::Processed, Place::ReadyToDelete] {
            let dir = self.root.join(rel).join(place.folder());
            match fs::read_dir(&dir) {
                Ok(entries) => {
                    for entry in entries {
                        let entry = entry.map_err(|e| Error::io("read folder", &dir, &e))?;
                        if let Some(number) = names::parse_data_file_name(&entry.file_name().to_string_lossy()) {
                            v.push(DataFile { number, place });
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("read folder", &dir, &e)),
            }
        }
        Ok(v)
    }
}

/// A data file being written under its temporary name in a local folder.
#[derive(Debug)]
pub struct LocalTempFile {
    out: BufWriter<File>,
    path: PathBuf,
    written: u64,
}

impl LocalTempFile {
    /// Flushes and fsyncs the file; returns its size.
    pub fn sync(mut self) -> Result<u64> {
        self.out.flush().map_err(|e| Error::io("write", &self.path, &e))?;
        self.out.get_ref().sync_all().map_err(|e| Error::io("sync", &self.path, &e))?;
        Ok(self.written)
    }
}

impl Write for LocalTempFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io("create", path, &e))?;
    f.write_all(bytes).map_err(|e| Error::io("write", path, &e))?;
    f.sync_all().map_err(|e| Error::io("sync", path, &e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("sync folder", dir, &e))
}

/// The folder a local target really writes to: `path` with every symbolic link in its longest
/// existing ancestor resolved (the part below does not exist yet, so it cannot be a link when the
/// check is made). `path` is absolute and has no `.` or `..` (as [`TargetUrl::parse`] makes it).
pub fn resolve_local_path(path: &Path) -> std::io::Result<PathBuf> {
    let mut existing = path.to_path_buf();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        match fs::canonicalize(&existing) {
            Ok(real) => {
                let mut out = real;
                for c in rest.iter().rev() {
                    out.push(c);
                }
                return Ok(out);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let Some(name) = existing.file_name().map(|n| n.to_os_string()) else { return Err(e) };
                rest.push(name);
                if !existing.pop() {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// A server folder a local target must keep out of: the data directory, its WAL folder, a
/// tablespace. `what` names it in errors; `path` is resolved ([`resolve_local_path`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedFolder {
    pub what: String,
    pub path: PathBuf,
}

/// The first protected folder a local target (resolved) lies in, or that lies in it. Either way the
/// mirror would write, rebuild or delete folders among the server's own files.
pub fn protected_overlap<'a>(target: &Path, protected: &'a [ProtectedFolder]) -> Option<&'a ProtectedFolder> {
    protected.iter().find(|p| target.starts_with(&p.path) || p.path.starts_with(target))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn temp_dir(tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "azure_cdc_core_{tag}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn local_targets_resolve_links_and_keep_out_of_server_folders() {
        let base = temp_dir("protected");
        let data = base.join("data");
        fs::create_dir_all(data.join("pg_wal")).unwrap();
        fs::create_dir_all(base.join("elsewhere")).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&data, base.join("link")).unwrap();
        let real = |p: &Path| resolve_local_path(p).unwrap();
        let protected = vec![ProtectedFolder { what: "the data directory".into(), path: real(&data) }];
        // A folder that does not exist yet resolves below its existing ancestor.
        assert_eq!(real(&base.join("elsewhere/new/deeper")), real(&base.join("elsewhere")).join("new/deeper"));
        assert!(protected_overlap(&real(&base.join("elsewhere/mirror")), &protected).is_none());
        for inside in [data.join("pg_replslot/x"), data.join("new"), data.clone()] {
            assert!(protected_overlap(&real(&inside), &protected).is_some(), "{inside:?}");
        }
        // The data directory inside the target (a rebuilt or cleared folder could reach it).
        assert!(protected_overlap(&real(&base), &protected).is_some());
        // Through a symbolic link to the data directory.
        #[cfg(unix)]
        assert!(protected_overlap(&real(&base.join("link/pg_wal/m")), &protected).is_some());
        // A sibling whose name starts like the data directory is not inside it.
        assert!(protected_overlap(&real(&base.join("data2/m")), &protected).is_none());
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn parses_file_urls() {
        assert_eq!(TargetUrl::parse("file:///tmp/x").unwrap(), TargetUrl::Local("/tmp/x".into()));
        assert_eq!(TargetUrl::parse("file://localhost/tmp/x/").unwrap().to_url(), "file:///tmp/x");
        assert_eq!(TargetUrl::parse("FILE:///a//b").unwrap().to_url(), "file:///a/b");
        for bad in [
            "/tmp/x",
            "file://tmp/x",
            "file:///",
            "file:///a/../b",
            "file:///a/./b",
            "ftp://host/x",
            "abfss://ws@onelake.dfs.fabric.microsoft.com/item/Tables",
            "abfss://ws@onelake.dfs.fabric.microsoft.com/item/Files/LandingZone/deeper",
            "abfss://ws@evil-onelake.dfs.fabric.microsoft.com.example.com/item/Files/LandingZone",
            "abfss://Bad_Container@acct.dfs.core.windows.net/x",
            "abfss://c0ntainer@evil.example.com/x",
            "https://example.com/c/x",
            "https://acct.blob.core.windows.net/cont/x?sv=2022&sig=SECRET",
            "az://cont/a/../b",
            "az://cont/_hidden",
            "s3://B/x",
            "gs://x",
            "",
        ] {
            let e = TargetUrl::parse(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidParameter, "{bad}");
            assert!(e.hint.unwrap().contains(SUPPORTED_FORMS));
            assert!(!e.message.contains("SECRET"), "no query string in the message: {}", e.message);
        }
    }

    #[test]
    fn parses_object_store_urls() {
        let onelake = |host: &str, ws: &str, prefix: &str| TargetUrl::Dfs {
            host: host.into(),
            account: "onelake".into(),
            filesystem: ws.into(),
            prefix: prefix.into(),
            onelake: true,
        };
        let cases = [
            (
                "abfss://ws@onelake.dfs.fabric.microsoft.com/item.MountedRelationalDatabase/Files/LandingZone",
                onelake("onelake.dfs.fabric.microsoft.com", "ws", "item.MountedRelationalDatabase/Files/LandingZone"),
                "abfss://ws@onelake.dfs.fabric.microsoft.com/item.MountedRelationalDatabase/Files/LandingZone",
            ),
            (
                "https://onelake.dfs.fabric.microsoft.com/0d2f1e5c-aaaa-bbbb-cccc-1234567890ab/7c9e6679-7425-40de-944b-e07fc1f90ae7/Files/LandingZone/",
                onelake(
                    "onelake.dfs.fabric.microsoft.com",
                    "0d2f1e5c-aaaa-bbbb-cccc-1234567890ab",
                    "7c9e6679-7425-40de-944b-e07fc1f90ae7/Files/LandingZone",
                ),
                "abfss://0d2f1e5c-aaaa-bbbb-cccc-1234567890ab@onelake.dfs.fabric.microsoft.com/7c9e6679-7425-40de-944b-e07fc1f90ae7/Files/LandingZone",
            ),
            (
                // Regional host; the Blob host name of OneLake is served by its DFS host.
                "https://westus-onelake.blob.fabric.microsoft.com/ws/db.MountedRelationalDatabase/Files/LandingZone",
                onelake("westus-onelake.dfs.fabric.microsoft.com", "ws", "db.MountedRelationalDatabase/Files/LandingZone"),
                "abfss://ws@westus-onelake.dfs.fabric.microsoft.com/db.MountedRelationalDatabase/Files/LandingZone",
            ),
            (
                // A workspace's private link.
                "abfss://ws@0d2f1e5caaaabbbbcccc1234567890ab.z0d.onelake.fabric.microsoft.com/db/Files/LandingZone",
                onelake("0d2f1e5caaaabbbbcccc1234567890ab.z0d.onelake.fabric.microsoft.com", "ws", "db/Files/LandingZone"),
                "abfss://ws@0d2f1e5caaaabbbbcccc1234567890ab.z0d.onelake.fabric.microsoft.com/db/Files/LandingZone",
            ),
            (
                "abfss://ws@0d2f1e5caaaabbbbcccc1234567890ab.z0d.dfs.fabric.microsoft.com/db/Files/LandingZone",
                onelake("0d2f1e5caaaabbbbcccc1234567890ab.z0d.dfs.fabric.microsoft.com", "ws", "db/Files/LandingZone"),
                "abfss://ws@0d2f1e5caaaabbbbcccc1234567890ab.z0d.dfs.fabric.microsoft.com/db/Files/LandingZone",
            ),
            (
                "abfss://lake@myacct.dfs.core.windows.net/mirrors//sales",
                TargetUrl::Dfs {
                    host: "myacct.dfs.core.windows.net".into(),
                    account: "myacct".into(),
                    filesystem: "lake".into(),
                    prefix: "mirrors/sales".into(),
                    onelake: false,
                },
                "abfss://lake@myacct.dfs.core.windows.net/mirrors/sales",
            ),
            (
                "https://myacct.blob.core.windows.net/lake/mirrors/sales",
                TargetUrl::Azure { account: Some("myacct".into()), container: "lake".into(), prefix: "mirrors/sales".into() },
                "https://myacct.blob.core.windows.net/lake/mirrors/sales",
            ),
            (
                "az://lake",
                TargetUrl::Azure { account: None, container: "lake".into(), prefix: "".into() },
                "az://lake",
            ),
        ("s3://my-bucket/a/b", TargetUrl::S3 { bucket: "my-bucket".into(), prefix: "a/b".into() }, "s3://my-bucket/a/b"),
            ("gs://my.bucket", TargetUrl::Gcs { bucket: "my.bucket".into(), prefix: "".into() }, "gs://my.bucket"),
        ];
        for (url, parsed, canonical) in cases {
            let p = TargetUrl::parse(url).unwrap();
            assert_eq!(p, parsed, "{url}");
            assert_eq!(p.to_url(), canonical);
            assert_eq!(TargetUrl::parse(canonical).unwrap(), p, "the canonical form parses to the same target");
        }
    }

    #[test]
    fn overlapping_targets() {
        let p = |u: &str| TargetUrl::parse(u).unwrap();
        assert!(p("az://cc1/a").overlaps(&p("az://cc1/a/b")));
        assert!(p("az://cc1").overlaps(&p("az://cc1/a")));
        assert!(!p("az://cc1/a").overlaps(&p("az://cc1/ab")));
        assert!(!p("az://cc1/a").overlaps(&p("az://dd1/a")));
        assert!(!p("abfss://cc1@one.dfs.core.windows.net/a").overlaps(&p("abfss://cc1@two.dfs.core.windows.net/a")));
        // The same account through its Blob and its DFS API.
        assert!(p("https://one.blob.core.windows.net/cc1/a").overlaps(&p("abfss://cc1@one.dfs.core.windows.net/a/b")));
        assert!(p("file:///x/y").overlaps(&p("file:///x")));
        assert!(!p("s3://bkt/a").overlaps(&p("gs://bkt/a")));
    }

    #[test]
    fn publishes_atomically_and_never_overwrites() {
        let dir = temp_dir("publish");
        let t = LocalTarget::new(dir.clone());
        assert!(t.is_empty().unwrap());
        t.probe().unwrap();
        assert!(t.is_empty().unwrap(), "the probe leaves nothing behind");
        t.publish_data_file("s.schema/t", 1, b"one").unwrap();
        t.publish_data_file("s.schema/t", 2, b"two").unwrap();
        let e = t.publish_data_file("s.schema/t", 2, b"again").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Internal);
        assert_eq!(fs::read(dir.join("s.schema/t/00000000000000000002.parquet")).unwrap(), b"two");
        assert!(t.publish_data_file("s.schema/t", 3, b"").is_err());
        let numbers = |t: &LocalTarget| {
            by_number(t.data_files("s.schema/t").unwrap()).iter().map(|f| f.number).collect::<Vec<_>>()
        };
        assert_eq!(numbers(&t), vec![1, 2]);
        assert!(!dir.join("s.schema/t/_00000000000000000002.parquet").exists());
        // A reader moved file 1 away: it is still found, in its new place.
        fs::create_dir_all(dir.join("s.schema/t/_ProcessedFiles")).unwrap();
        fs::rename(
            dir.join("s.schema/t/00000000000000000001.parquet"),
            dir.join("s.schema/t/_ProcessedFiles/00000000000000000001.parquet"),
        )
        .unwrap();
        assert_eq!(numbers(&t), vec![1, 2]);
        assert_eq!(by_number(t.data_files("s.schema/t").unwrap())[0], DataFile { number: 1, place: Place::Processed });
        t.put_document("s.schema/t", "_metadata.json", b"{}").unwrap();
        fs::write(dir.join("s.schema/t/_00000000000000000003.parquet"), b"partial").unwrap();
        assert!(t.reset_table_folder("s.schema/t").unwrap());
        assert!(!dir.join("s.schema/t").exists(), "the folder itself goes");
        assert!(dir.join("s.schema").exists());
        assert!(!t.reset_table_folder("s.schema/t").unwrap());
        fs::remove_dir_all(dir).unwrap();
    }
}
