//! Verified function artifacts, and the example functions the workspace
//! build compiled.

use crate::Error;
use lang_isolation::runtime::SealedArtifact;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// A verified function artifact: one self-contained shared object built by
/// `microfaas build`. The same bytes run in every backend.
#[derive(Debug)]
pub struct Artifact {
    path: PathBuf,
    bytes: Arc<[u8]>,
    digest: String,
    /// The bytes in a sealed memfd, made on first use (see [`Artifact::sealed`]).
    sealed: OnceLock<Arc<SealedArtifact>>,
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
            sealed: OnceLock::new(),
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

    /// Its bytes in a memfd sealed against writes, growth, shrinking and
    /// unsealing: what the `language` and `process` backends hand their
    /// worker and runner processes (which map it with their own loader, no
    /// filesystem). Made once per `Artifact` and shared by every deployment
    /// of it (functions deployed from one `Artifact` share one loaded image
    /// in a language worker); it lives while any of them does.
    pub fn sealed(&self) -> Result<Arc<SealedArtifact>, Error> {
        if let Some(sealed) = self.sealed.get() {
            return Ok(Arc::clone(sealed));
        }
        let made = SealedArtifact::create(&self.path.display().to_string(), &self.bytes).map_err(|e| {
            Error::io(
                format!("sealing artifact {} into a memfd", self.path.display()),
                std::io::Error::other(e),
            )
        })?;
        Ok(Arc::clone(self.sealed.get_or_init(|| Arc::new(made))))
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

/// The artifact every interpreted example with a deploy-time module runs
/// on: the wasmi runtime alone (`functions/wasm/runtime.rs`).
pub const WASM_RUNTIME: &str = "wasm-runtime";

/// Directory holding the compiled modules of the interpreted examples
/// (`NAME.wasm`, for `functions/wasm/NAME.wat` and the generated `large`).
pub fn builtin_modules_dir() -> &'static Path {
    Path::new(env!("MICROFAAS_MODULES_DIR"))
}

/// Names of the interpreted examples' modules (`noop`, `echo`, ...), sorted:
/// each runs on [`WASM_RUNTIME`] with [`builtin_module`] as its module, as
/// the `wasm-NAME` artifact runs it embedded.
pub fn builtin_module_names() -> Vec<String> {
    builtin_names()
        .iter()
        .filter_map(|n| n.strip_prefix("wasm-"))
        .filter(|n| format!("wasm-{n}") != WASM_RUNTIME)
        .map(str::to_owned)
        .collect()
}

/// The compiled WebAssembly module of the interpreted example `name` (as in
/// [`builtin_module_names`]).
pub fn builtin_module(name: &str) -> Result<Arc<[u8]>, Error> {
    if !builtin_module_names().iter().any(|n| n == name) {
        return Err(Error::UnknownFunction {
            name: format!("module {name}"),
        });
    }
    let path = builtin_modules_dir().join(format!("{name}.wasm"));
    std::fs::read(&path)
        .map(Arc::from)
        .map_err(|e| Error::io(format!("reading module {}", path.display()), e))
}
