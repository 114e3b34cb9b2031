//! The build pipeline: dependency allowlist, content-hash cache, wrapper
//! crate, compilation with unsafe code forbidden in the function's crate.

use crate::verify::{VerifyError, verify};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Crates a function may depend on (transitively, build dependencies
/// included): the SDK and well-kept `no_std` crates vetted as the trusted
/// base, as in Boucher et al. Anything else is refused by name.
pub const ALLOWED_CRATES: &[&str] = &[
    "microfaas-sdk",
    "once_cell",
    // RustCrypto SHA-2 and its dependencies.
    "sha2",
    "digest",
    "block-buffer",
    "crypto-common",
    "generic-array",
    "typenum",
    "version_check",
    "cpufeatures",
    "cfg-if",
    "hybrid-array",
];

/// The target every artifact is built for (installed with the toolchain).
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Bumped whenever the build recipe changes, so old cache entries miss.
const RECIPE_VERSION: &str = "microfaas-builder/1";

/// How to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Where artifacts, wrapper crates and the build's target dir live.
    pub cache_dir: PathBuf,
    /// Also copy the artifact here.
    pub out: Option<PathBuf>,
    /// Test-only: do not forbid unsafe code in the function's crate (used
    /// for fixture functions that must misbehave, e.g. raw syscalls).
    pub allow_unsafe: bool,
}

impl BuildOptions {
    /// Options with `cache_dir` and nothing else.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            out: None,
            allow_unsafe: false,
        }
    }
}

/// A finished build.
#[derive(Debug, Clone)]
pub struct Built {
    /// The function's package name.
    pub name: String,
    /// The artifact (in the cache, or `out` when given).
    pub path: PathBuf,
    /// Content hash of the build inputs.
    pub input_hash: String,
    /// True when the artifact came from the cache without compiling.
    pub cached: bool,
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `cargo metadata` could not read the crate.
    #[error("cannot read the crate at {}: {message}", dir.display())]
    Metadata {
        /// The crate directory.
        dir: PathBuf,
        /// Cargo's message.
        message: String,
    },
    /// The crate is not a function crate.
    #[error("{} is not a function crate: {reason}", dir.display())]
    NotAFunction {
        /// The crate directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// A dependency outside the allowlist.
    #[error("dependency `{krate}` (via {via}) is not on the allowlist of function dependencies ({})", ALLOWED_CRATES.join(", "))]
    RefusedDependency {
        /// The refused crate.
        krate: String,
        /// The dependency path that pulls it in.
        via: String,
    },
    /// The function's own crate uses unsafe code.
    #[error("function crate `{name}` uses unsafe code, which is forbidden (-F unsafe-code):\n{compiler_output}")]
    UnsafeCode {
        /// The crate.
        name: String,
        /// The compiler's message.
        compiler_output: String,
    },
    /// Compilation failed.
    #[error("compiling `{name}` failed:\n{compiler_output}")]
    Compile {
        /// The crate.
        name: String,
        /// The compiler's message.
        compiler_output: String,
    },
    /// The built file did not verify.
    #[error("the artifact built from `{name}` failed verification")]
    Verify {
        /// The crate.
        name: String,
        /// What failed.
        #[source]
        source: VerifyError,
    },
    /// A file operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> BuildError {
    let context = context.into();
    move |source| BuildError::Io { context, source }
}

/// `$MICROFAAS_BUILD_CACHE`, else `$XDG_CACHE_HOME/microfaas/build`, else
/// `~/.cache/microfaas/build`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MICROFAAS_BUILD_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("microfaas").join("build")
}

/// A `cargo` command with the environment of any enclosing cargo build (a
/// build script's variables, wrappers, flags, jobserver) removed, so the
/// nested build is exactly a fresh `cargo` run.
pub fn clean_cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let drop = (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTDOC")
            || key.starts_with("__CARGO")
            || matches!(
                key,
                "RUSTFLAGS"
                    | "OUT_DIR"
                    | "TARGET"
                    | "HOST"
                    | "PROFILE"
                    | "OPT_LEVEL"
                    | "DEBUG"
                    | "NUM_JOBS"
                    | "MAKEFLAGS"
                    | "MFLAGS"
                    | "CARGO"
            );
        if drop {
            cmd.env_remove(key);
        }
    }
    cmd
}

struct Package {
    name: String,
    lib_name: String,
    dir: PathBuf,
    workspace_root: PathBuf,
    local_dirs: BTreeSet<PathBuf>,
}

/// Reads the crate's metadata and checks every dependency against the
/// allowlist.
fn inspect(dir: &Path) -> Result<Package, BuildError> {
    let manifest = dir.join("Cargo.toml");
    let out = clean_cargo()
        .args([
            "metadata",
            "--format-version",
            "1",
            "--filter-platform",
            TARGET,
            "--manifest-path",
        ])
        .arg(&manifest)
        .output()
        .map_err(io_err("running cargo metadata"))?;
    if !out.status.success() {
        return Err(BuildError::Metadata {
            dir: dir.to_owned(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    let meta: Value = serde_json::from_slice(&out.stdout).map_err(|e| BuildError::Metadata {
        dir: dir.to_owned(),
        message: format!("unreadable cargo metadata output: {e}"),
    })?;
    let not_fn = |reason: &str| BuildError::NotAFunction {
        dir: dir.to_owned(),
        reason: reason.to_owned(),
    };
    let packages = meta["packages"].as_array().ok_or_else(|| not_fn("no packages"))?;
    let by_id: HashMap<&str, &Value> = packages.iter().filter_map(|p| Some((p["id"].as_str()?, p))).collect();
    let root = packages
        .iter()
        .find(|p| p["manifest_path"].as_str().map(Path::new) == Some(manifest.as_path()))
        .ok_or_else(|| not_fn("no package at this manifest"))?;
    let name = root["name"]
        .as_str()
        .ok_or_else(|| not_fn("package without a name"))?
        .to_owned();
    let lib = root["targets"]
        .as_array()
        .and_then(|ts| {
            ts.iter()
                .find(|t| t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "lib")))
        })
        .ok_or_else(|| not_fn("it has no library target (src/lib.rs)"))?;
    let lib_name = lib["name"].as_str().unwrap_or(&name).replace('-', "_");
    let root_id = root["id"].as_str().unwrap_or_default();

    // Walk the resolved graph from the function: normal and build deps.
    let nodes: HashMap<&str, &Value> = meta["resolve"]["nodes"]
        .as_array()
        .map(|ns| ns.iter().filter_map(|n| Some((n["id"].as_str()?, n))).collect())
        .unwrap_or_default();
    let mut local_dirs = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut uses_sdk = false;
    let mut stack: Vec<(&str, String)> = vec![(root_id, name.clone())];
    while let Some((id, via)) = stack.pop() {
        if !seen.insert(id.to_owned()) {
            continue;
        }
        if let Some(pkg) = by_id.get(id).copied()
            && pkg["source"].is_null()
            && let Some(m) = pkg["manifest_path"].as_str().and_then(|m| Path::new(m).parent())
        {
            local_dirs.insert(m.to_owned());
        }
        let Some(node) = nodes.get(id) else { continue };
        for dep in node["deps"].as_array().into_iter().flatten() {
            let is_dev_only = dep["dep_kinds"]
                .as_array()
                .is_some_and(|ks| !ks.is_empty() && ks.iter().all(|k| k["kind"] == "dev"));
            if is_dev_only {
                continue;
            }
            let Some(dep_id) = dep["pkg"].as_str() else { continue };
            let dep_name = by_id
                .get(dep_id)
                .and_then(|p| p["name"].as_str())
                .unwrap_or_default()
                .to_owned();
            let via = format!("{via} -> {dep_name}");
            if dep_name == "microfaas-sdk" {
                uses_sdk = true;
            }
            if !ALLOWED_CRATES.contains(&dep_name.as_str()) {
                return Err(BuildError::RefusedDependency { krate: dep_name, via });
            }
            stack.push((dep_id, via));
        }
    }
    if !uses_sdk {
        return Err(not_fn("it does not depend on microfaas-sdk"));
    }
    let workspace_root = PathBuf::from(meta["workspace_root"].as_str().unwrap_or_default());
    Ok(Package {
        name,
        lib_name,
        dir: dir.to_owned(),
        workspace_root,
        local_dirs,
    })
}

/// Hashes every input that determines the artifact.
fn input_hash(pkg: &Package, opts: &BuildOptions) -> Result<String, BuildError> {
    let mut h = Sha256::new();
    h.update(RECIPE_VERSION.as_bytes());
    h.update([u8::from(opts.allow_unsafe)]);
    let rustc = Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
        .arg("-vV")
        .output()
        .map_err(io_err("running rustc -vV"))?;
    h.update(&rustc.stdout);
    let lock = pkg.workspace_root.join("Cargo.lock");
    if let Ok(bytes) = fs::read(&lock) {
        h.update(&bytes);
    }
    for dir in &pkg.local_dirs {
        let mut files = Vec::new();
        collect_files(dir, dir, &mut files).map_err(io_err(format!("reading {}", dir.display())))?;
        files.sort();
        for rel in files {
            h.update(rel.to_string_lossy().as_bytes());
            h.update([0]);
            let bytes = fs::read(dir.join(&rel)).map_err(io_err(format!("reading {}", rel.display())))?;
            h.update(u64::try_from(bytes.len()).unwrap_or(u64::MAX).to_le_bytes());
            h.update(&bytes);
        }
    }
    Ok(crate::hex(&h.finalize()))
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_dir() {
            collect_files(root, &path, out)?;
        } else if kind.is_file() {
            out.push(path.strip_prefix(root).unwrap_or(&path).to_owned());
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (temp file + rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    // Unique per process and call: concurrent builds may write one path.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    fs::write(&tmp, bytes).map_err(io_err(format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io_err(format!("renaming to {}", path.display())))
}

fn toml_str(path: &Path) -> String {
    path.to_string_lossy().replace('\\', "\\\\").replace('"', "\\\"")
}

/// Builds the function crate in `dir` (see the crate docs for the steps).
pub fn build(dir: &Path, opts: &BuildOptions) -> Result<Built, BuildError> {
    let dir = dir
        .canonicalize()
        .map_err(io_err(format!("no crate at {}", dir.display())))?;
    let pkg = inspect(&dir)?;
    let hash = input_hash(&pkg, opts)?;
    let artifacts = opts.cache_dir.join("artifacts");
    fs::create_dir_all(&artifacts).map_err(io_err(format!("creating {}", artifacts.display())))?;
    let cached_path = artifacts.join(format!("{}-{}.so", pkg.name, &hash[..16]));

    let cached = cached_path.is_file();
    if !cached {
        let bytes = compile(&pkg, opts)?;
        verify(&bytes).map_err(|source| BuildError::Verify {
            name: pkg.name.clone(),
            source,
        })?;
        write_atomic(&cached_path, &bytes)?;
    }
    let path = match &opts.out {
        Some(out) => {
            if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
            }
            let bytes = fs::read(&cached_path).map_err(io_err(format!("reading {}", cached_path.display())))?;
            write_atomic(out, &bytes)?;
            out.clone()
        }
        None => cached_path,
    };
    Ok(Built {
        name: pkg.name,
        path,
        input_hash: hash,
        cached,
    })
}

/// Generates the wrapper crate and compiles it; returns the artifact bytes.
fn compile(pkg: &Package, opts: &BuildOptions) -> Result<Vec<u8>, BuildError> {
    let wrapper = opts.cache_dir.join("wrappers").join(&pkg.name);
    let src = wrapper.join("src");
    fs::create_dir_all(&src).map_err(io_err(format!("creating {}", src.display())))?;
    let sdk_dir = pkg
        .local_dirs
        .iter()
        .find(|d| d.file_name().is_some_and(|n| n == "sdk") && d.join("src/guest_support.rs").is_file());
    let sdk_dep = match sdk_dir {
        Some(d) => format!("{{ path = \"{}\" }}", toml_str(d)),
        None => "\"*\"".to_owned(),
    };
    let manifest = format!(
        "# Generated by microfaas-builder: the trusted cdylib wrapper of `{name}`.\n\
         [package]\nname = \"microfaas-artifact-{name}\"\nversion = \"0.0.0\"\nedition = \"2024\"\npublish = false\n\n\
         [lib]\ncrate-type = [\"cdylib\"]\npath = \"src/lib.rs\"\n\n\
         [dependencies]\nfunction = {{ package = \"{name}\", path = \"{dir}\" }}\nmicrofaas-sdk = {sdk_dep}\n\n\
         [workspace]\n\n\
         [profile.release]\npanic = \"abort\"\nopt-level = 3\nlto = true\ncodegen-units = 1\ndebug = false\n",
        name = pkg.name,
        dir = toml_str(&pkg.dir),
    );
    fs::write(wrapper.join("Cargo.toml"), manifest).map_err(io_err("writing the wrapper manifest"))?;
    fs::write(
        src.join("lib.rs"),
        "//! Generated by microfaas-builder.\n#![no_std]\nmicrofaas_sdk::artifact_entry!(function);\n",
    )
    .map_err(io_err("writing the wrapper source"))?;
    let lock = pkg.workspace_root.join("Cargo.lock");
    if lock.is_file() && !wrapper.join("Cargo.lock").is_file() {
        fs::copy(&lock, wrapper.join("Cargo.lock")).map_err(io_err("copying Cargo.lock"))?;
    }
    // The wrapper script adds `-F unsafe-code` to the function's crate only,
    // recognised by the manifest directory cargo exports to rustc.
    let script = opts.cache_dir.join("rustc-forbid-unsafe.sh");
    let body = "#!/bin/sh\n# Generated by microfaas-builder.\n\
                if [ -n \"$MICROFAAS_FORBID_UNSAFE_DIR\" ] && [ \"$CARGO_MANIFEST_DIR\" = \"$MICROFAAS_FORBID_UNSAFE_DIR\" ]; then\n\
                \texec \"$@\" -F unsafe-code\nfi\nexec \"$@\"\n";
    if fs::read_to_string(&script).ok().as_deref() != Some(body) {
        write_atomic(&script, body.as_bytes())?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod wrapper script"))?;
    }
    // Separate target dirs per mode: cargo does not see the env var change.
    let target_dir = opts.cache_dir.join(if opts.allow_unsafe {
        "target-unsafe-allowed"
    } else {
        "target"
    });
    let mut cmd = clean_cargo();
    cmd.current_dir(&wrapper)
        .args(["rustc", "--release", "--lib", "--target", TARGET, "--manifest-path"])
        .arg(wrapper.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .args([
            "--",
            "-C",
            "link-arg=-nostartfiles",
            "-C",
            "link-arg=-Wl,-Bsymbolic",
            "-C",
            "link-arg=-Wl,-z,now",
            "-C",
            "link-arg=-Wl,--gc-sections",
        ])
        .env("RUSTC_WRAPPER", &script);
    if !opts.allow_unsafe {
        cmd.env("MICROFAAS_FORBID_UNSAFE_DIR", &pkg.dir);
    }
    let out = cmd.output().map_err(io_err("running cargo"))?;
    if !out.status.success() {
        let compiler_output = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if compiler_output.contains("unsafe-code") || compiler_output.contains("unsafe_code") {
            return Err(BuildError::UnsafeCode {
                name: pkg.name.clone(),
                compiler_output,
            });
        }
        return Err(BuildError::Compile {
            name: pkg.name.clone(),
            compiler_output,
        });
    }
    let so = target_dir
        .join(TARGET)
        .join("release")
        .join(format!("libmicrofaas_artifact_{}.so", pkg.name.replace('-', "_")));
    let _ = &pkg.lib_name;
    fs::read(&so).map_err(io_err(format!("reading {}", so.display())))
}
