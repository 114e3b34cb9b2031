//! The Rust toolchain the builder uses, found once per build independently
//! of the function crate's directory (a `rust-toolchain.toml` there could
//! otherwise name any local "toolchain" for the rustup proxy to run), and
//! the trusted cargo steps that never run build code (`metadata`, `vendor`).

use crate::build::{BuildError, strip_outer_build_env};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A toolchain: its sysroot and the real `cargo` and `rustc` in it (not
/// the rustup proxies).
#[derive(Debug, Clone)]
pub struct Toolchain {
    /// Canonical sysroot.
    pub sysroot: PathBuf,
    /// `sysroot/bin/cargo`.
    pub cargo: PathBuf,
    /// `sysroot/bin/rustc`.
    pub rustc: PathBuf,
    /// `rustc -vV` (part of the cache key).
    pub version: Vec<u8>,
}

fn toolchain_err(what: impl Into<String>) -> BuildError {
    BuildError::Toolchain(what.into())
}

impl Toolchain {
    /// Asks `$RUSTC` (else `rustc`) for its sysroot from a directory the
    /// function does not control: the builder's own source directory (the
    /// project's pinned toolchain), else `fallback_cwd`.
    pub fn locate(fallback_cwd: &Path) -> Result<Self, BuildError> {
        let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        let own = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cwd = if own.is_dir() { own } else { fallback_cwd };
        let out = Command::new(&rustc)
            .args(["--print", "sysroot"])
            .current_dir(cwd)
            .output()
            .map_err(|e| toolchain_err(format!("running {} --print sysroot: {e}", rustc.to_string_lossy())))?;
        if !out.status.success() {
            return Err(toolchain_err(format!(
                "{} --print sysroot: {}",
                rustc.to_string_lossy(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let printed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let sysroot = Path::new(&printed)
            .canonicalize()
            .map_err(|e| toolchain_err(format!("sysroot {printed}: {e}")))?;
        let cargo = sysroot.join("bin/cargo");
        let rustc = sysroot.join("bin/rustc");
        for bin in [&cargo, &rustc] {
            if !bin.is_file() {
                return Err(toolchain_err(format!("{} does not exist", bin.display())));
            }
        }
        let version = Command::new(&rustc)
            .arg("-vV")
            .current_dir(cwd)
            .output()
            .map_err(|e| toolchain_err(format!("running {} -vV: {e}", rustc.display())))?
            .stdout;
        Ok(Self {
            sysroot,
            cargo,
            rustc,
            version,
        })
    }

    /// A trusted cargo command of this toolchain, run in `cwd` (a directory
    /// the builder owns, so no cargo config of the function applies).
    pub fn cargo(&self, cwd: &Path) -> Command {
        let mut cmd = Command::new(&self.cargo);
        strip_outer_build_env(&mut cmd);
        cmd.current_dir(cwd).env("RUSTC", &self.rustc);
        cmd
    }

    /// `cargo metadata --format-version 1 ARGS --manifest-path MANIFEST`,
    /// parsed.
    pub fn metadata(&self, cwd: &Path, args: &[&str], manifest: &Path) -> Result<Value, BuildError> {
        let dir = manifest.parent().unwrap_or(manifest).to_owned();
        let out = self
            .cargo(cwd)
            .args(["metadata", "--format-version", "1"])
            .args(args)
            .arg("--manifest-path")
            .arg(manifest)
            .output()
            .map_err(|e| toolchain_err(format!("running cargo metadata: {e}")))?;
        if !out.status.success() {
            return Err(BuildError::Cargo {
                step: "metadata",
                dir,
                message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        serde_json::from_slice(&out.stdout).map_err(|e| BuildError::Cargo {
            step: "metadata",
            dir,
            message: format!("unreadable output: {e}"),
        })
    }

    /// `cargo vendor` of the wrapper's locked graph into `into`.
    pub fn vendor(&self, wrapper_dir: &Path, into: &Path) -> Result<(), BuildError> {
        let out = self
            .cargo(wrapper_dir)
            .args(["vendor", "--locked", "--versioned-dirs", "--quiet", "--manifest-path"])
            .arg(wrapper_dir.join("Cargo.toml"))
            .arg(into)
            .stdout(std::process::Stdio::null())
            .output()
            .map_err(|e| toolchain_err(format!("running cargo vendor: {e}")))?;
        if !out.status.success() {
            return Err(BuildError::Cargo {
                step: "vendor",
                dir: wrapper_dir.to_owned(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(())
    }
}

/// The directory of the SDK this builder was built with, canonical: the one
/// path dependency a function may have, identified by where it is.
pub fn sdk_dir() -> Result<PathBuf, BuildError> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    dir.canonicalize()
        .map_err(|e| toolchain_err(format!("the builder's SDK is not at {}: {e}", dir.display())))
}
