//! Targets: where a mirror's landing zone is written. This module parses target URLs and implements
//! the local-folder target (`file:///absolute/path`) with atomic, durable publication:
//! a data file is written under a `_`-prefixed temporary name, fsynced, then hard-linked to its final
//! name (which fails rather than overwrite an existing file), the temporary name removed and the folder
//! fsynced. A reader therefore never sees a partial file, and a published file is never replaced.
//! Pure: plain file-system calls, safe on any thread.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::names;

/// The URL forms `start_mirror` accepts, for error hints.
pub const SUPPORTED_FORMS: &str = "file:///absolute/path";

/// A parsed target URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetUrl {
    /// A folder on the server's file system.
    Local(PathBuf),
}

impl TargetUrl {
    pub fn parse(url: &str) -> Result<TargetUrl> {
        let unsupported = |why: String| {
            Error::new(ErrorKind::InvalidParameter, format!("unsupported target \"{url}\""))
                .with_detail(why)
                .with_hint(format!("Supported target forms: {SUPPORTED_FORMS}."))
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(unsupported("The target is not a URL.".into()));
        };
        if !scheme.eq_ignore_ascii_case("file") {
            return Err(unsupported(format!("The scheme \"{scheme}\" is not supported.")));
        }
        let path = match rest.strip_prefix("localhost") {
            Some(p) => p,
            None => rest,
        };
        if !path.starts_with('/') {
            return Err(unsupported("A file target needs an absolute path (three slashes: file:///path).".into()));
        }
        if path.contains('\0') {
            return Err(unsupported("The path contains a NUL byte.".into()));
        }
        let p = Path::new(path);
        if path.split('/').any(|seg| seg == "." || seg == "..") {
            return Err(unsupported("The path contains \".\" or \"..\" components.".into()));
        }
        if p.parent().is_none() {
            return Err(unsupported("The target cannot be the root folder.".into()));
        }
        let normalized: PathBuf = p.components().collect();
        Ok(TargetUrl::Local(normalized))
    }

    /// The URL in canonical form (what the catalog stores and the status shows).
    pub fn to_url(&self) -> String {
        match self {
            TargetUrl::Local(p) => format!("file://{}", p.display()),
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

    /// Proves the target can be written: creates the folder, writes, syncs and removes a probe file.
    pub fn probe(&self) -> Result<()> {
        fs::create_dir_all(&self.root).map_err(|e| Error::io("create folder", &self.root, &e))?;
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
        let dir = self.root.join(rel);
        fs::create_dir_all(&dir).map_err(|e| Error::io("create folder", &dir, &e))?;
        Ok(dir)
    }

    /// Opens the temporary file that data file `number` of table folder `rel` is written to before it
    /// is published. A leftover from an interrupted attempt is truncated.
    pub fn create_temp_data_file(&self, rel: &str, number: u64) -> Result<TempFile> {
        let dir = self.folder(rel)?;
        let path = dir.join(names::temporary_file_name(number));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::io("create", &path, &e))?;
        Ok(TempFile { out: BufWriter::with_capacity(1 << 20, file), path, written: 0 })
    }

    /// Removes the temporary file of data file `number` (nothing was written to it).
    pub fn discard_temp_data_file(&self, rel: &str, number: u64) -> Result<()> {
        let path = self.root.join(rel).join(names::temporary_file_name(number));
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &path, &e)),
        }
    }

    /// Publishes the (synced) temporary file of data file `number` under its final name. Fails rather
    /// than replace a published file.
    pub fn publish_temp_data_file(&self, rel: &str, number: u64) -> Result<()> {
        let dir = self.root.join(rel);
        let tmp = dir.join(names::temporary_file_name(number));
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
        self.publish_temp_data_file(rel, number)
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

    /// Removes every file azure_cdc writes in a table folder (data files, temporary files, metadata),
    /// so that the table can be snapshotted again from file number 1. Other files are left alone.
    pub fn clear_table_folder(&self, rel: &str) -> Result<()> {
        let dir = self.root.join(rel);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("read folder", &dir, &e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read folder", &dir, &e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = names::parse_data_file_name(&name).is_some()
                || name.strip_prefix('_').and_then(names::parse_data_file_name).is_some()
                || name == crate::landing_zone::METADATA_FILE
                || name == format!("_{}.tmp", crate::landing_zone::METADATA_FILE);
            if ours {
                let p = entry.path();
                fs::remove_file(&p).map_err(|e| Error::io("remove", &p, &e))?;
            }
        }
        sync_dir(&dir)
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

    /// Numbers of the data files published in a table folder, ascending.
    pub fn data_file_numbers(&self, rel: &str) -> Result<Vec<u64>> {
        let dir = self.root.join(rel);
        let mut v = Vec::new();
        match fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(|e| Error::io("read folder", &dir, &e))?;
                    if let Some(n) = names::parse_data_file_name(&entry.file_name().to_string_lossy()) {
                        v.push(n);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("read folder", &dir, &e)),
        }
        v.sort_unstable();
        Ok(v)
    }
}

/// A data file being written under its temporary name.
#[derive(Debug)]
pub struct TempFile {
    out: BufWriter<File>,
    path: PathBuf,
    written: u64,
}

impl TempFile {
    /// Flushes and fsyncs the file; returns its size.
    pub fn sync(mut self) -> Result<u64> {
        self.out.flush().map_err(|e| Error::io("write", &self.path, &e))?;
        self.out.get_ref().sync_all().map_err(|e| Error::io("sync", &self.path, &e))?;
        Ok(self.written)
    }
}

impl Write for TempFile {
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
            "s3://bucket/x",
            "abfss://ws@onelake.dfs.fabric.microsoft.com/item/Files/LandingZone",
            "",
        ] {
            let e = TargetUrl::parse(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidParameter, "{bad}");
            assert!(e.hint.unwrap().contains(SUPPORTED_FORMS));
        }
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
        assert_eq!(t.data_file_numbers("s.schema/t").unwrap(), vec![1, 2]);
        assert!(!dir.join("s.schema/t/_00000000000000000002.parquet").exists());
        t.put_document("s.schema/t", "_metadata.json", b"{}").unwrap();
        fs::write(dir.join("s.schema/t/_00000000000000000003.parquet"), b"partial").unwrap();
        fs::write(dir.join("s.schema/t/notes.txt"), b"user file").unwrap();
        t.clear_table_folder("s.schema/t").unwrap();
        let left: Vec<_> = fs::read_dir(dir.join("s.schema/t")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("notes.txt")]);
        fs::remove_dir_all(dir).unwrap();
    }
}
