//! Verified function artifacts, and the example functions the workspace
//! build compiled.

use crate::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A verified function artifact: one self-contained shared object built by
/// `microfaas build`. The same bytes run in every backend.
#[derive(Debug)]
pub struct Artifact {
    path: PathBuf,
    bytes: Arc<[u8]>,
    digest: String,
}

impl Artifact {
    /// Reads and verifies the artifact at `path` (ELF `ET_DYN`, only relative
    /// relocations, allowlisted imports, entry and ABI symbols present).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(format!("reading artifact {}", path.display()), e))?;
        microfaas_builder::verify(&bytes).map_err(|e| Error::InvalidArtifact {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let digest = microfaas_builder::digest_hex(&bytes);
        let path = path
            .canonicalize()
            .map_err(|e| Error::io(format!("resolving {}", path.display()), e))?;
        Ok(Self {
            path,
            bytes: bytes.into(),
            digest,
        })
    }

    /// The file it was loaded from (absolute).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its bytes.
    pub fn bytes(&self) -> &Arc<[u8]> {
        &self.bytes
    }

    /// Hex SHA-256 of its bytes.
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

/// Directory holding the example functions the workspace build compiled.
pub fn builtin_dir() -> &'static Path {
    Path::new(env!("MICROFAAS_FUNCTIONS_DIR"))
}

/// Names of the example functions in `functions/`, sorted.
pub fn builtin_names() -> Vec<String> {
    let mut names: Vec<String> = env!("MICROFAAS_FUNCTION_NAMES")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    names.sort();
    names
}

/// The example function `name` from `functions/`, verified.
pub fn builtin(name: &str) -> Result<Arc<Artifact>, Error> {
    if !builtin_names().iter().any(|n| n == name) {
        return Err(Error::UnknownFunction { name: name.to_owned() });
    }
    Artifact::load(&builtin_dir().join(format!("{name}.so"))).map(Arc::new)
}
