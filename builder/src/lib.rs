//! Builds a function crate into ONE self-contained, verified shared object
//! (the artifact every backend runs), and verifies artifacts. The crate's
//! author is hostile: nothing of the crate runs on the build host, and the
//! compiler reading it sees only what it needs.
//!
//! A build, trusted steps first (none runs code of the crate):
//! 1. `cargo metadata --no-deps` of the crate: a build script or proc-macro
//!    target is refused, and so is any declared dependency (normal or build,
//!    any platform) that is not the SDK (by canonical path, [`sdk_dir`]) or
//!    an allowlisted crates.io name ([`ALLOWED_CRATES`]); nothing is fetched
//!    for a refused one (a git URL is never cloned);
//! 2. generates a `cdylib` wrapper crate around it (trusted: it holds the
//!    exported entry symbols via `microfaas_sdk::artifact_entry!`) and
//!    resolves the wrapper's graph (`cargo metadata`, may fetch from
//!    crates.io): every package compiled must be the function, the SDK, or
//!    an allowlisted crate *from crates.io in its version range*;
//! 3. hashes everything that determines the output (the crate's files, the
//!    SDK's, the workspace manifests, the resolved lock file, the compiler
//!    version, the recipe and sandbox versions, the options) and returns the
//!    cached artifact of that hash if it exists;
//! 4. otherwise vendors the allowlisted sources (`cargo vendor`), snapshots
//!    the crate's files (the hashed ones: regular files, no links), and
//!    compiles the wrapper with `cargo rustc --frozen` inside the build
//!    sandbox ([`sandbox`]: no network, a fixed environment, a read-only
//!    root holding only the toolchain, `/usr`, the snapshot, the SDK and the
//!    vendored sources, these three and the wrapper at fixed paths so the
//!    artifact does not depend on where they live, one writable output
//!    directory, Landlock over it, an
//!    unprivileged uid when root, a user namespace otherwise), for
//!    `x86_64-unknown-linux-gnu` with `panic = "abort"`, no start files and
//!    `-Bsymbolic`, passing `-F unsafe-code` to the function's own crate
//!    only (a `RUSTC_WRAPPER` matching it by manifest directory);
//! 5. verifies the result ([`verify`]) and stores it in the cache.
//!
//! If the kernel refuses the sandbox the build fails, naming the step;
//! `MICROFAAS_BUILD_SANDBOX=off` ([`SANDBOX_OPT_OUT_ENV`]) is the explicit
//! opt-out for trusted sources on such machines.

mod build;
mod inputs;
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
