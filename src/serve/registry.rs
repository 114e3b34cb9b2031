//! The function registry: every deployed function's configuration and code,
//! in a directory that all nodes of a cluster share.
//!
//! ```text
//! DIR/functions/NAME.json    the configuration (FunctionMeta), replaced whole
//! DIR/code/SHA256.so         verified artifacts, content-addressed, immutable
//! DIR/code/SHA256.module     modules (deploy-time data for an artifact's load), likewise
//! DIR/tmp/                   files being written (same filesystem)
//! ```
//!
//! The filesystem operations relied upon, so that any node may write while
//! others read (a local filesystem, or NFS/CephFS/EFS with close-to-open
//! consistency; an object store offers the same four as PUT-if-absent, PUT,
//! GET and DELETE):
//! * `link(2)` of a complete temporary file onto a name that fails with
//!   `EEXIST` if the name exists: create-if-absent (`CreateFunction`);
//! * `rename(2)` of a complete temporary file over a name: atomic replace
//!   (`UpdateFunctionCode`; readers see the old or the new file, whole);
//! * `unlink(2)`: delete; `readdir(3)` + whole-file reads for the rest.
//!
//! Nothing read from the directory is trusted more than an upload: code is
//! re-verified (and its digest checked against the configuration) by every
//! node that loads it.

use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest configuration file read.
const MAX_META_BYTES: u64 = 64 << 10;

/// A deployed function's configuration, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionMeta {
    /// Its name.
    pub name: String,
    /// The tenant that created it (the credentials profile): only it sees
    /// and runs the function, in its own trust domain.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// `microfaas-vm`, `microfaas-language` or `microfaas-process`.
    pub runtime: String,
    /// The role ARN the client sent (kept, not used).
    pub role: String,
    /// The handler the client sent (kept, not used).
    pub handler: String,
    /// The description.
    pub description: String,
    /// Budget in seconds.
    pub timeout_s: u64,
    /// Heap limit in MiB.
    pub memory_mib: u64,
    /// Hex SHA-256 of the artifact.
    pub code_sha256: String,
    /// Artifact size in bytes.
    pub code_size: u64,
    /// Hex SHA-256 of the function's module, if it was uploaded with one
    /// (a `.wasm` entry beside the artifact in the zip).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_sha256: Option<String>,
    /// Module size in bytes (0 without one).
    #[serde(default)]
    pub module_size: u64,
    /// When it was last changed, ISO 8601.
    pub last_modified: String,
    /// Changes on every create and update.
    pub revision_id: String,
}

fn default_tenant() -> String {
    crate::Tenant::DEFAULT.to_owned()
}

/// What a registry operation failed with.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// `CreateFunction` of a name that exists.
    #[error("function `{0}` already exists")]
    Exists(String),
    /// No such function.
    #[error("function `{0}` not found")]
    NotFound(String),
    /// A stored file is not what this server writes.
    #[error("registry file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A filesystem operation failed.
    #[error("registry: {context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RegistryError {
    let context = context.into();
    move |source| RegistryError::Io { context, source }
}

/// Identity of a configuration file's current version (changes on every
/// replace, since a replace is a new inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    dev: u64,
    ino: u64,
    mtime_ns: i128,
    len: u64,
}

/// The registry directory.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    tmp_seq: AtomicU64,
}

impl Registry {
    /// Opens (creating) the registry at `dir`.
    pub fn open(dir: &Path) -> Result<Self, RegistryError> {
        for sub in ["functions", "code", "tmp"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io(format!("creating {}", p.display())))?;
        }
        Ok(Self {
            dir: dir.to_owned(),
            tmp_seq: AtomicU64::new(0),
        })
    }

    /// Where the configuration of `name` is stored.
    pub fn meta_path(&self, name: &str) -> PathBuf {
        self.dir.join("functions").join(format!("{name}.json"))
    }

    /// Where the artifact of digest `sha256` is stored.
    pub fn code_path(&self, sha256: &str) -> PathBuf {
        self.dir.join("code").join(format!("{sha256}.so"))
    }

    /// Where the module of digest `sha256` is stored.
    pub fn module_path(&self, sha256: &str) -> PathBuf {
        self.dir.join("code").join(format!("{sha256}.module"))
    }

    /// A new temporary file in `tmp/` holding `bytes`, synced.
    pub fn write_temp(&self, bytes: &[u8]) -> Result<PathBuf, RegistryError> {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        // Unique among this directory's writers (create_new refuses a clash).
        let path = self
            .dir
            .join("tmp")
            .join(format!("{}-{nanos}-{seq}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io(format!("creating {}", path.display())))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(io(format!("writing {}", path.display())))?;
        Ok(path)
    }

    /// Moves a temporary module file to its content address.
    pub fn store_module(&self, temp: &Path, sha256: &str) -> Result<PathBuf, RegistryError> {
        let dest = self.module_path(sha256);
        std::fs::rename(temp, &dest).map_err(io(format!("storing module {}", dest.display())))?;
        Ok(dest)
    }

    /// Moves a verified temporary artifact to its content address.
    pub fn store_code(&self, temp: &Path, sha256: &str) -> Result<PathBuf, RegistryError> {
        let dest = self.code_path(sha256);
        std::fs::rename(temp, &dest).map_err(io(format!("storing code {}", dest.display())))?;
        Ok(dest)
    }

    fn meta_temp(&self, meta: &FunctionMeta) -> Result<PathBuf, RegistryError> {
        let json = serde_json::to_vec_pretty(meta).map_err(|e| RegistryError::Corrupt {
            path: self.meta_path(&meta.name),
            reason: e.to_string(),
        })?;
        self.write_temp(&json)
    }

    /// Creates the function; fails with [`RegistryError::Exists`] if a
    /// function of that name exists (on any node).
    pub fn create(&self, meta: &FunctionMeta) -> Result<(), RegistryError> {
        let temp = self.meta_temp(meta)?;
        let dest = self.meta_path(&meta.name);
        let linked = std::fs::hard_link(&temp, &dest);
        let _ = std::fs::remove_file(&temp);
        match linked {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(RegistryError::Exists(meta.name.clone())),
            Err(e) => Err(io(format!("creating {}", dest.display()))(e)),
        }
    }

    /// Replaces the configuration of an existing function.
    pub fn replace(&self, meta: &FunctionMeta) -> Result<(), RegistryError> {
        let temp = self.meta_temp(meta)?;
        let dest = self.meta_path(&meta.name);
        std::fs::rename(&temp, &dest).map_err(io(format!("replacing {}", dest.display())))
    }

    /// Deletes the function.
    pub fn delete(&self, name: &str) -> Result<(), RegistryError> {
        match std::fs::remove_file(self.meta_path(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(RegistryError::NotFound(name.to_owned())),
            Err(e) => Err(io(format!("deleting {name}"))(e)),
        }
    }

    /// The current version of the function's configuration (one `stat`).
    pub fn version(&self, name: &str) -> Result<Version, RegistryError> {
        match std::fs::metadata(self.meta_path(name)) {
            Ok(m) => Ok(Version {
                dev: m.dev(),
                ino: m.ino(),
                mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
                len: m.len(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(RegistryError::NotFound(name.to_owned())),
            Err(e) => Err(io(format!("reading {name}"))(e)),
        }
    }

    /// The function's configuration.
    pub fn get(&self, name: &str) -> Result<FunctionMeta, RegistryError> {
        let path = self.meta_path(name);
        let bytes = read_capped(&path, MAX_META_BYTES).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => RegistryError::NotFound(name.to_owned()),
            _ => io(format!("reading {}", path.display()))(e),
        })?;
        let meta: FunctionMeta = serde_json::from_slice(&bytes).map_err(|e| RegistryError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if meta.name != name {
            return Err(RegistryError::Corrupt {
                path,
                reason: format!("it names `{}`", meta.name.escape_debug()),
            });
        }
        Ok(meta)
    }

    /// Every function, sorted by name (files that vanish while listing are
    /// skipped).
    pub fn list(&self) -> Result<Vec<FunctionMeta>, RegistryError> {
        let dir = self.dir.join("functions");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io(format!("listing {}", dir.display())))? {
            let entry = entry.map_err(io(format!("listing {}", dir.display())))?;
            let file = entry.file_name();
            if let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".json"))
                && super::api::valid_function_name(name)
            {
                names.push(name.to_owned());
            }
        }
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            match self.get(&name) {
                Ok(m) => out.push(m),
                Err(RegistryError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

/// Reads at most `cap` bytes of `path`; longer files are an error.
pub fn read_capped(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let f = std::fs::File::open(path)?;
    let mut out = Vec::new();
    f.take(cap.saturating_add(1)).read_to_end(&mut out)?;
    if u64::try_from(out.len()).unwrap_or(u64::MAX) > cap {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("longer than {cap} bytes"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, rev: &str) -> FunctionMeta {
        FunctionMeta {
            name: name.into(),
            tenant: "default".into(),
            runtime: "microfaas-process".into(),
            role: String::new(),
            handler: String::new(),
            description: String::new(),
            timeout_s: 3,
            memory_mib: 128,
            code_sha256: "00".into(),
            code_size: 1,
            module_sha256: None,
            module_size: 0,
            last_modified: String::new(),
            revision_id: rev.into(),
        }
    }

    #[test]
    fn create_is_exclusive_replace_is_whole_delete_is_once() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path()).unwrap();
        r.create(&meta("f", "1")).unwrap();
        assert!(matches!(r.create(&meta("f", "2")), Err(RegistryError::Exists(_))));
        let v1 = r.version("f").unwrap();
        r.replace(&meta("f", "3")).unwrap();
        assert_ne!(r.version("f").unwrap(), v1, "a replace is a new version");
        assert_eq!(r.get("f").unwrap().revision_id, "3");
        r.create(&meta("a", "1")).unwrap();
        let names: Vec<String> = r.list().unwrap().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["a", "f"]);
        r.delete("f").unwrap();
        assert!(matches!(r.delete("f"), Err(RegistryError::NotFound(_))));
        assert!(matches!(r.get("f"), Err(RegistryError::NotFound(_))));
        assert!(matches!(r.version("f"), Err(RegistryError::NotFound(_))));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0,
            "no temporaries left"
        );
    }

    #[test]
    fn a_file_naming_another_function_or_too_large_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path()).unwrap();
        r.create(&meta("f", "1")).unwrap();
        std::fs::copy(dir.path().join("functions/f.json"), dir.path().join("functions/g.json")).unwrap();
        assert!(matches!(r.get("g"), Err(RegistryError::Corrupt { .. })));
        std::fs::write(dir.path().join("functions/h.json"), vec![b' '; 70 << 10]).unwrap();
        assert!(matches!(r.get("h"), Err(RegistryError::Io { .. })));
    }
}
