//! Builds a function crate into ONE self-contained, verified shared object
//! (the artifact every backend runs), and verifies artifacts.
//!
//! A build:
//! 1. reads the crate's resolved dependency graph (`cargo metadata`) and
//!    refuses any crate outside [`ALLOWED_CRATES`], naming it;
//! 2. hashes everything that determines the output (the crate's and its
//!    local dependencies' files, the lock file, the compiler version, the
//!    options) and returns the cached artifact of that hash if it exists;
//! 3. otherwise generates a `cdylib` wrapper crate around the function crate
//!    (the wrapper, trusted, holds the exported entry symbols via
//!    `microfaas_sdk::artifact_entry!`), compiles it with the installed
//!    stable toolchain for `x86_64-unknown-linux-gnu` with `panic = "abort"`,
//!    no start files and `-Bsymbolic`, passing `-F unsafe-code` to the
//!    function's own crate only (through a `RUSTC_WRAPPER` that matches the
//!    crate by its manifest directory);
//! 4. verifies the result ([`verify`]) and stores it in the cache.

mod build;
mod policy;
pub mod sandbox;
mod toolchain;
mod verify;

pub use build::{BuildError, BuildOptions, Built, SANDBOX_OPT_OUT_ENV, build, clean_cargo, default_cache_dir};
pub use policy::{ALLOWED_CRATES, AllowedCrate, CRATES_IO_SOURCES, DependencyReason, Refusal};
pub use toolchain::{Toolchain, sdk_dir};
pub use verify::{ArtifactInfo, LoadSegment, VerifyError, verify};

/// Hex SHA-256 of `bytes`.
pub fn digest_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
