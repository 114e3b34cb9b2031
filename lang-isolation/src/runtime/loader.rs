//! Loading a function artifact with `dlopen` (libloading): the ABI version
//! check and the two entry symbols.

use microfaas_sdk::{ABI_VERSION, ABI_VERSION_SYMBOL, HANDLE_SYMBOL, HandleFn, INIT_SYMBOL, InitFn};
use std::path::{Path, PathBuf};

/// Why an artifact could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `dlopen` refused the file.
    #[error("cannot load `{}`", path.display())]
    Open {
        /// The artifact.
        path: PathBuf,
        /// The loader's error.
        #[source]
        source: libloading::Error,
    },
    /// A required symbol is missing.
    #[error("`{}` has no symbol `{symbol}`", path.display())]
    MissingSymbol {
        /// The artifact.
        path: PathBuf,
        /// The symbol.
        symbol: &'static str,
        /// The loader's error.
        #[source]
        source: libloading::Error,
    },
    /// The artifact was built against another ABI version.
    #[error("`{}` has ABI version {found}, this runtime speaks {ABI_VERSION}", path.display())]
    AbiMismatch {
        /// The artifact.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
}

/// A loaded artifact and its resolved entry points. The library stays loaded
/// (and the entry pointers valid) until this value is dropped.
///
/// Note that `dlopen` of a path already loaded in this process returns the
/// same copy (shared statics); a fresh copy needs the previous one closed.
#[derive(Debug)]
pub struct LoadedFunction {
    path: PathBuf,
    init: InitFn,
    handle: HandleFn,
    // Last: dropped (dlclose) after the pointers above are gone.
    _library: libloading::Library,
}

impl LoadedFunction {
    /// Loads the artifact at `path`, checks `MICROFAAS_ABI_VERSION` and
    /// resolves `microfaas_v1_init` and `microfaas_v1_handle`.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        // SAFETY: loading runs the object's initialisers. Artifacts are built
        // and verified by `microfaas build` (no constructors beyond relative
        // relocations, no imports but the mem* allowlist), which is the trust
        // base of every runtime.
        let library = unsafe { libloading::Library::new(path) }.map_err(|source| LoadError::Open {
            path: path.to_owned(),
            source,
        })?;
        let missing = |symbol: &'static str| {
            move |source| LoadError::MissingSymbol {
                path: path.to_owned(),
                symbol,
                source,
            }
        };
        // SAFETY: the ABI declares this symbol a `u32` static.
        let version =
            unsafe { library.get::<*const u32>(ABI_VERSION_SYMBOL.as_bytes()) }.map_err(missing(ABI_VERSION_SYMBOL))?;
        // SAFETY: the symbol's address points at a live, aligned `u32` for as
        // long as the library is loaded.
        let found = unsafe { version.cast::<u32>().read() };
        if found != ABI_VERSION {
            return Err(LoadError::AbiMismatch {
                path: path.to_owned(),
                found,
            });
        }
        // SAFETY: the ABI (version checked above) gives the symbol this type.
        let init = *unsafe { library.get::<InitFn>(INIT_SYMBOL.as_bytes()) }.map_err(missing(INIT_SYMBOL))?;
        // SAFETY: as above.
        let handle = *unsafe { library.get::<HandleFn>(HANDLE_SYMBOL.as_bytes()) }.map_err(missing(HANDLE_SYMBOL))?;
        Ok(Self {
            path: path.to_owned(),
            init,
            handle,
            _library: library,
        })
    }

    /// The artifact path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The init entry point (valid while `self` lives).
    pub(crate) fn init_fn(&self) -> InitFn {
        self.init
    }

    /// The handle entry point (valid while `self` lives).
    pub(crate) fn handle_fn(&self) -> HandleFn {
        self.handle
    }
}
