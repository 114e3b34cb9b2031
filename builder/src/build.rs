//! The build pipeline: trusted steps (metadata and allowlist checks, the
//! content-hash cache, the wrapper crate, vendoring the allowlisted
//! sources) around one untrusted step, the compile, run in the build
//! sandbox with unsafe code forbidden in the function's crate.

use crate::inputs::{input_hash, snapshot_files, write_snapshot};
use crate::policy::{self, FunctionCrate, NotAFunction, Refusal};
use crate::sandbox::{self, CompilePaths, HostLayout, SandboxError, SeenPaths, UNPRIVILEGED_ID};
use crate::toolchain::{Toolchain, sdk_dir};
use crate::verify::{VerifyError, verify};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The target every artifact is built for (installed with the toolchain).
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Bumped whenever the build recipe changes, so old cache entries miss.
pub(crate) const RECIPE_VERSION: &str = "microfaas-builder/4";

/// `MICROFAAS_BUILD_SANDBOX=off` turns the build sandbox off (see
/// [`BuildOptions::sandboxed`]); any other value, or none, keeps it.
pub const SANDBOX_OPT_OUT_ENV: &str = "MICROFAAS_BUILD_SANDBOX";

/// How long a compile may take by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

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
    /// Compile in the build sandbox (the default). `false` only where the
    /// kernel refuses the sandbox (no namespaces or Landlock) and the sources
    /// are trusted: set by `MICROFAAS_BUILD_SANDBOX=off` in the environment
    /// of [`BuildOptions::new`]. The checks before compiling and the
    /// cleared environment still apply; artifacts are cached apart. Such a
    /// compile sees the host's paths, not the sandbox's fixed ones, so its
    /// artifacts may differ between two clones of the same sources (cargo's
    /// crate hashes derive from those paths).
    pub sandboxed: bool,
    /// The compile is killed (with everything it started) after this long.
    pub timeout: Duration,
}

impl BuildOptions {
    /// Options with `cache_dir` and nothing else.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            out: None,
            allow_unsafe: false,
            sandboxed: std::env::var_os(SANDBOX_OPT_OUT_ENV).is_none_or(|v| v != "off"),
            timeout: DEFAULT_TIMEOUT,
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
    /// The crate is not a function crate.
    #[error("{} is not a function crate: {reason}", dir.display())]
    NotAFunction {
        /// The crate directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// Refused before compiling (a build script, a proc-macro, a dependency
    /// outside the allowlist), naming what was refused.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The toolchain could not be found or run.
    #[error("cannot use the Rust toolchain: {0}")]
    Toolchain(String),
    /// A trusted cargo step (metadata, vendor) failed.
    #[error("`cargo {step}` failed for {}:\n{message}", dir.display())]
    Cargo {
        /// The step.
        step: &'static str,
        /// The crate or wrapper directory.
        dir: PathBuf,
        /// Cargo's message.
        message: String,
    },
    /// The build sandbox could not be set up (the build did not run).
    #[error("compiling `{name}` in the build sandbox")]
    Sandbox {
        /// The crate.
        name: String,
        /// Why.
        #[source]
        source: SandboxError,
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

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> BuildError {
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
    strip_outer_build_env(&mut cmd);
    cmd
}

/// Removes from `cmd` the environment of an enclosing cargo build.
pub(crate) fn strip_outer_build_env(cmd: &mut Command) {
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
}

/// Builds the function crate in `dir` (see the crate docs for the steps).
pub fn build(dir: &Path, opts: &BuildOptions) -> Result<Built, BuildError> {
    let dir = dir
        .canonicalize()
        .map_err(io_err(format!("no crate at {}", dir.display())))?;
    fs::create_dir_all(&opts.cache_dir).map_err(io_err(format!("creating {}", opts.cache_dir.display())))?;
    let cache_dir = opts
        .cache_dir
        .canonicalize()
        .map_err(io_err(format!("no cache dir at {}", opts.cache_dir.display())))?;
    let toolchain = Toolchain::locate(&cache_dir)?;
    let sdk = sdk_dir()?;

    // 1. The function crate as declared, before anything is resolved or
    //    fetched: no build script, no proc-macro, only the SDK and
    //    allowlisted crates.io names.
    let manifest = dir.join("Cargo.toml");
    let declared = toolchain.metadata(&cache_dir, &["--no-deps", "--offline"], &manifest)?;
    let func = match policy::check_function(&declared, &manifest, &sdk, &|p| p.canonicalize().ok()) {
        Err(NotAFunction(reason)) => return Err(BuildError::NotAFunction { dir, reason }),
        Ok(Err(refusal)) => return Err(describe(&toolchain, &cache_dir, refusal).into()),
        Ok(Ok(func)) => func,
    };
    let sdk_named_as = sdk_named_absolutely(&declared, &manifest, &func, &sdk);
    let mut workspace_manifests = vec![];
    if func.workspace_root != dir {
        workspace_manifests.push(func.workspace_root.join("Cargo.toml"));
    }
    if let Some(sdk_root) = sdk.parent().map(|p| p.join("Cargo.toml")).filter(|m| m.is_file())
        && !workspace_manifests.contains(&sdk_root)
    {
        workspace_manifests.push(sdk_root);
    }

    // 2. The wrapper crate and its resolved graph, checked by source, name
    //    and version. Everything lives in a work dir of this crate, locked.
    let key = format!("{}-{}", func.name, &crate::digest_hex(dir.as_os_str().as_bytes())[..12]);
    let work = cache_dir.join("work").join(key);
    fs::create_dir_all(&work).map_err(io_err(format!("creating {}", work.display())))?;
    let lock = fs::File::create(work.join(".lock")).map_err(io_err("creating the work dir lock"))?;
    // A signal (e.g. a caller's preemption timer) may interrupt the wait
    // while another build holds the lock: wait again.
    while let Err(e) = lock.lock() {
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(io_err("locking the work dir")(e));
        }
    }
    let wrapper = work.join("wrapper");
    write_wrapper(
        &wrapper,
        &func,
        &dir,
        &sdk,
        None,
        &func.workspace_root.join("Cargo.lock"),
    )?;
    let wrapper_manifest = wrapper.join("Cargo.toml");
    let resolved = toolchain.metadata(&wrapper, &["--filter-platform", TARGET], &wrapper_manifest)?;
    let graph = policy::check_graph(&resolved, &wrapper_manifest, &dir, &sdk)?;

    // 3. The cache key; a hit returns at once.
    let files = snapshot_files(&dir)?;
    let hash = input_hash(&toolchain, &wrapper, &dir, &files, &graph, &workspace_manifests, opts)?;
    let artifacts = cache_dir.join("artifacts");
    fs::create_dir_all(&artifacts).map_err(io_err(format!("creating {}", artifacts.display())))?;
    let cached_path = artifacts.join(format!("{}-{}.so", func.name, &hash[..16]));
    let cached = cached_path.is_file();
    if !cached {
        let sources = Sources {
            dir: &dir,
            files: &files,
            sdk: &sdk,
            sdk_named_as,
            workspace_manifests: &workspace_manifests,
        };
        let bytes = compile(&toolchain, &func, &sources, &work, opts)?;
        verify(&bytes).map_err(|source| BuildError::Verify {
            name: func.name.clone(),
            source,
        })?;
        write_atomic(&cached_path, &bytes)?;
    }
    drop(lock);
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
        name: func.name,
        path,
        input_hash: hash,
        cached,
    })
}

/// Adds to a refused path dependency what build-time code it carries (its
/// own manifest, read without resolving anything).
fn describe(toolchain: &Toolchain, cwd: &Path, refusal: Refusal) -> Refusal {
    let Refusal::Dependency {
        krate,
        source_desc,
        via,
        reason,
        runs_at_build: None,
    } = refusal
    else {
        return refusal;
    };
    let runs_at_build = source_desc.strip_prefix("path ").and_then(|path| {
        let manifest = Path::new(path).join("Cargo.toml").canonicalize().ok()?;
        let meta = toolchain.metadata(cwd, &["--no-deps", "--offline"], &manifest).ok()?;
        let pkg = meta["packages"]
            .as_array()?
            .iter()
            .find(|p| p["manifest_path"].as_str().map(Path::new) == Some(manifest.as_path()))?;
        policy::build_time_code(pkg)
    });
    Refusal::Dependency {
        krate,
        source_desc,
        via,
        reason,
        runs_at_build,
    }
}

/// Writes the trusted wrapper crate (manifest, source, the rustc wrapper
/// script) depending on the function at `dir` and the SDK at `sdk` (and
/// patching the source `sdk_patch`, the SDK as the function names it, to
/// `sdk`), and copies its lock file from `lock` if there is one.
fn write_wrapper(
    wrapper: &Path,
    func: &FunctionCrate,
    dir: &Path,
    sdk: &Path,
    sdk_patch: Option<&Path>,
    lock: &Path,
) -> Result<(), BuildError> {
    let src = wrapper.join("src");
    fs::create_dir_all(&src).map_err(io_err(format!("creating {}", src.display())))?;
    let patch = sdk_patch.map_or_else(String::new, |named| {
        format!(
            "[patch.\"file://{named}\"]\nmicrofaas-sdk = {{ path = \"{sdk}\" }}\n\n",
            named = toml_str(named),
            sdk = toml_str(sdk),
        )
    });
    let manifest = format!(
        "# Generated by microfaas-builder: the trusted cdylib wrapper of `{name}`.\n\
         [package]\nname = \"microfaas-artifact-{name}\"\nversion = \"0.0.0\"\nedition = \"2024\"\npublish = false\n\n\
         [lib]\ncrate-type = [\"cdylib\"]\npath = \"src/lib.rs\"\n\n\
         [dependencies]\nfunction = {{ package = \"{name}\", path = \"{dir}\" }}\nmicrofaas-sdk = {{ path = \"{sdk}\" }}\n\n\
         {patch}[workspace]\n\n\
         [profile.release]\npanic = \"abort\"\nopt-level = 3\nlto = true\ncodegen-units = 1\ndebug = false\n",
        name = func.name,
        dir = toml_str(dir),
        sdk = toml_str(sdk),
    );
    write_if_changed(&wrapper.join("Cargo.toml"), manifest.as_bytes())?;
    write_if_changed(
        &src.join("lib.rs"),
        b"//! Generated by microfaas-builder.\n#![no_std]\nmicrofaas_sdk::artifact_entry!(function);\n",
    )?;
    // Adds `-F unsafe-code` to the function's crate only, recognised by the
    // manifest directory cargo exports to rustc.
    let script = wrapper.join(RUSTC_WRAPPER_SCRIPT);
    let body = "#!/bin/sh\n# Generated by microfaas-builder.\n\
                if [ -n \"$MICROFAAS_FORBID_UNSAFE_DIR\" ] && [ \"$CARGO_MANIFEST_DIR\" = \"$MICROFAAS_FORBID_UNSAFE_DIR\" ]; then\n\
                \texec \"$@\" -F unsafe-code\nfi\nexec \"$@\"\n";
    write_if_changed(&script, body.as_bytes())?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod wrapper script"))?;
    if lock.is_file() {
        fs::copy(lock, wrapper.join("Cargo.lock")).map_err(io_err("copying Cargo.lock"))?;
    }
    Ok(())
}

const RUSTC_WRAPPER_SCRIPT: &str = "rustc-forbid-unsafe.sh";

fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    if fs::read(path).ok().as_deref() == Some(bytes) {
        return Ok(());
    }
    write_atomic(path, bytes)
}

/// Writes `bytes` to `path` atomically (temp file + rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    // Unique per process and call: concurrent builds may write one path.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    // Never through a link planted at the temporary name (`out` may be in
    // a directory the function's author controls): remove whatever is
    // there, then create exclusively.
    let _ = fs::remove_file(&tmp);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| io::Write::write_all(&mut f, bytes))
        .map_err(io_err(format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io_err(format!("renaming to {}", path.display())))
}

/// A digest of the registry packages a `Cargo.lock` pins (name, version,
/// checksum of every package with a checksum, in order): what `cargo
/// vendor` of that lock writes, whatever its path packages are.
fn registry_packages_key(lock: &str) -> String {
    let mut key = String::new();
    for block in lock.split("[[package]]").skip(1) {
        let field = |name: &str| {
            block.lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
            })
        };
        if let (Some(name), Some(version), Some(sum)) = (field("name"), field("version"), field("checksum")) {
            key.push_str(&format!("{name} {version} {sum}\n"));
        }
    }
    crate::digest_hex(key.as_bytes())
}

/// A `build.rustflags` setting that maps every path a compile sees (the
/// function's and the SDK's sources, the vendored crates, the wrapper, and
/// the output dir with each compile's cargo home) to a short fixed name,
/// for every crate of the build: panic locations, `file!()` and
/// build-script outputs then name `/microfaas/function/...` and the like.
/// In the build sandbox the paths are fixed already ([`CompilePaths::fixed`]:
/// cargo's `-C metadata` hash of a path crate derives from its path, and
/// with LTO moved code in some artifacts, which no remapping undoes); for
/// the unsandboxed opt-out, which compiles at the host's paths, this keeps
/// them out of the bytes, but its artifacts still depend on where the
/// sources and the cache live (string lengths once moved the code enough
/// to put a chance `WRPKRU` byte sequence into one clone's artifact and not
/// the other's).
fn remap_path_flags(seen: &SeenPaths) -> OsString {
    // rustc applies the last matching prefix: the most specific go last.
    let flags: Vec<String> = [
        (&seen.out_dir, "/microfaas/out"),
        (&seen.scratch_dir, "/microfaas/scratch"),
        (&seen.vendor_dir, "/microfaas/vendor"),
        (&seen.wrapper_dir, "/microfaas/wrapper"),
        (&seen.sdk_dir, "/microfaas/sdk"),
        (&seen.function_dir, "/microfaas/function"),
    ]
    .iter()
    .map(|(from, to)| format!("\"--remap-path-prefix={}={to}\"", toml_str(from)))
    .collect();
    OsString::from(format!("build.rustflags=[{}]", flags.join(", ")))
}

fn toml_str(path: &Path) -> String {
    path.to_string_lossy().replace('\\', "\\\\").replace('"', "\\\"")
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The sources of one compile, as the pipeline found them on the host.
struct Sources<'a> {
    /// The function crate's directory (canonical).
    dir: &'a Path,
    /// Its files that are compiled.
    files: &'a [PathBuf],
    /// The SDK's directory (canonical).
    sdk: &'a Path,
    /// The absolute path the function names the SDK by, if it does.
    sdk_named_as: Option<PathBuf>,
    /// The workspace root manifests cargo reads.
    workspace_manifests: &'a [PathBuf],
}

/// The path the function's declared dependency on the SDK names, when it
/// is written as that absolute path in the function's manifest or its
/// workspace's (a quoted string of it there): cargo then looks for the SDK
/// exactly there, wherever the sandbox shows the rest. A relative path is
/// `None` (it resolves in the sources' layout, which the sandbox keeps).
fn sdk_named_absolutely(
    declared: &serde_json::Value,
    manifest: &Path,
    func: &FunctionCrate,
    sdk: &Path,
) -> Option<PathBuf> {
    let pkg = declared["packages"]
        .as_array()?
        .iter()
        .find(|p| p["manifest_path"].as_str().map(Path::new) == Some(manifest))?;
    let manifests = [manifest.to_owned(), func.workspace_root.join("Cargo.toml")];
    let texts: Vec<String> = manifests.iter().filter_map(|m| fs::read_to_string(m).ok()).collect();
    pkg["dependencies"]
        .as_array()?
        .iter()
        .filter_map(|d| d["path"].as_str().map(PathBuf::from))
        .filter(|p| p.canonicalize().ok().as_deref() == Some(sdk))
        .find(|p| {
            let quoted = [format!("\"{}\"", toml_str(p)), format!("'{}'", p.display())];
            texts.iter().any(|t| quoted.iter().any(|q| t.contains(q.as_str())))
        })
}

/// Vendors the allowlisted sources, snapshots the crate, and runs the
/// compile in the build sandbox; returns the artifact bytes.
fn compile(
    toolchain: &Toolchain,
    func: &FunctionCrate,
    sources: &Sources<'_>,
    work: &Path,
    opts: &BuildOptions,
) -> Result<Vec<u8>, BuildError> {
    let Sources {
        dir,
        files,
        sdk,
        workspace_manifests,
        ..
    } = *sources;
    let wrapper = work.join("wrapper");
    let workspace = &crate::digest_hex(func.workspace_root.as_os_str().as_bytes())[..12];
    // Vendored once per set of registry packages (the stamp is written
    // last), shared by the crates of one workspace that lock the same
    // packages: cargo checks a vendored dependency's freshness by its
    // files' paths and times, so a copy per crate made every crate's
    // compile rebuild all its dependencies (wasmi ten times over).
    let lock_text =
        fs::read_to_string(wrapper.join("Cargo.lock")).map_err(io_err("reading the wrapper's Cargo.lock"))?;
    let packages = registry_packages_key(&lock_text);
    let shared = work.parent().unwrap_or(work);
    let vendor = shared.join(format!("vendor-{workspace}-{}", &packages[..16]));
    let stamp = shared.join(format!("vendor-{workspace}-{}.stamp", &packages[..16]));
    {
        let guard = fs::File::create(shared.join(format!("vendor-{workspace}-{}.lock", &packages[..16])))
            .map_err(io_err("creating the vendor dir lock"))?;
        while let Err(e) = guard.lock() {
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io_err("locking the vendor dir")(e));
            }
        }
        if fs::read_to_string(&stamp).ok().as_deref() != Some(packages.as_str()) || !vendor.is_dir() {
            let _ = fs::remove_file(&stamp);
            toolchain.vendor(&wrapper, &vendor)?;
            write_atomic(&stamp, packages.as_bytes())?;
        }
    }
    let snapshot = work.join("snapshot");
    write_snapshot(dir, files, &snapshot)?;
    // The only directory the compile may write: one per workspace, so the
    // crates of one source tree share compiled dependencies while unrelated
    // crates (each its own workspace) never see each other's outputs.
    let out = shared.join(format!("out-{workspace}"));
    // Fresh per compile: nothing a previous compile left in its cargo home
    // (a config file) or temp dir carries over.
    let scratch = out.join(work.file_name().unwrap_or_default());
    if scratch.exists() {
        fs::remove_dir_all(&scratch).map_err(io_err(format!("removing {}", scratch.display())))?;
    }
    for d in [out.clone(), scratch.clone()]
        .into_iter()
        .chain(["home", "cargo-home", "tmp"].map(|d| scratch.join(d)))
    {
        fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
        if is_root() {
            std::os::unix::fs::lchown(&d, Some(UNPRIVILEGED_ID), Some(UNPRIVILEGED_ID))
                .map_err(io_err(format!("chown {}", d.display())))?;
        }
    }
    // Separate target dirs per mode: cargo does not see the env var change.
    let target_name = match (opts.allow_unsafe, opts.sandboxed) {
        (false, true) => "target",
        (true, true) => "target-unsafe-allowed",
        (false, false) => "target-unsandboxed",
        (true, false) => "target-unsafe-allowed-unsandboxed",
    };
    let target_dir = out.join(target_name);
    let mut paths = CompilePaths {
        toolchain: toolchain.sysroot.clone(),
        function_dir: dir.to_owned(),
        function_snapshot: snapshot,
        sdk_dir: sdk.to_owned(),
        sdk_named_as: sources.sdk_named_as.clone(),
        workspace_manifests: workspace_manifests.to_vec(),
        wrapper_dir: wrapper.clone(),
        vendor_dir: vendor.clone(),
        out_dir: out.clone(),
        scratch_dir: scratch,
        rustc_wrapper: wrapper.join(RUSTC_WRAPPER_SCRIPT),
        forbid_unsafe_dir: (!opts.allow_unsafe).then(|| dir.to_owned()),
        root: work.join("root"),
    };
    // In the sandbox cargo sees every path at a fixed place, through a
    // wrapper of its own naming those (its lock file the one resolved
    // above: path packages are locked without their paths).
    let seen = if opts.sandboxed {
        let seen = paths.fixed();
        let fixed_wrapper = work.join("sandbox-wrapper");
        let lock = wrapper.join("Cargo.lock");
        let sdk_patch = seen.sdk_patch.as_deref().filter(|named| *named != seen.sdk_dir);
        write_wrapper(
            &fixed_wrapper,
            func,
            &seen.function_dir,
            &seen.sdk_dir,
            sdk_patch,
            &lock,
        )?;
        paths.rustc_wrapper = fixed_wrapper.join(RUSTC_WRAPPER_SCRIPT);
        paths.wrapper_dir = fixed_wrapper;
        seen
    } else {
        // The opt-out has no mount namespace to show fixed paths in: it
        // compiles at the host's, so its artifacts still depend on where
        // the sources and the cache live.
        paths.host()
    };
    let remap = remap_path_flags(&seen);
    let policy = sandbox::compile_policy(&paths, &seen, &HostLayout::detect(), is_root());
    let args: Vec<OsString> = [
        "rustc",
        "--frozen",
        "--release",
        "--lib",
        "--target",
        TARGET,
        "--config",
        "source.crates-io.replace-with=\"microfaas-vendored\"",
        "--config",
    ]
    .iter()
    .map(OsString::from)
    .chain([
        OsString::from(format!(
            "source.microfaas-vendored.directory=\"{}\"",
            toml_str(&seen.vendor_dir)
        )),
        "--config".into(),
        remap,
        "--manifest-path".into(),
        seen.wrapper_dir.join("Cargo.toml").into(),
        "--target-dir".into(),
        seen.out_dir.join(target_name).into(),
    ])
    .chain(
        [
            "--",
            "-C",
            "link-arg=-nostartfiles",
            "-C",
            "link-arg=-Wl,-Bsymbolic",
            "-C",
            "link-arg=-Wl,-z,now",
            "-C",
            "link-arg=-Wl,--gc-sections",
            // No static symbol table: nothing loads by it (loaders use the
            // dynamic symbols), and its names carry cargo's per-crate hashes,
            // which depend on where the function's sources live.
            "-C",
            "strip=symbols",
        ]
        .iter()
        .map(OsString::from),
    )
    .collect();
    let output = if opts.sandboxed {
        sandbox::run(&policy, &toolchain.cargo, &args, opts.timeout)
    } else {
        sandbox::run_unsandboxed(&policy, &toolchain.cargo, &args, opts.timeout)
    }
    .map_err(|source| BuildError::Sandbox {
        name: func.name.clone(),
        source,
    })?;
    if !output.status.success() {
        let compiler_output = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if compiler_output.contains("unsafe-code") || compiler_output.contains("unsafe_code") {
            return Err(BuildError::UnsafeCode {
                name: func.name.clone(),
                compiler_output,
            });
        }
        return Err(BuildError::Compile {
            name: func.name.clone(),
            compiler_output,
        });
    }
    let so = target_dir
        .join(TARGET)
        .join("release")
        .join(format!("libmicrofaas_artifact_{}.so", func.name.replace('-', "_")));
    // The sandbox wrote this directory: do not follow a link it planted.
    let mut bytes = Vec::new();
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&so)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err(format!("reading {}", so.display())))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::registry_packages_key;

    const LOCK: &str = r#"version = 4

[[package]]
name = "microfaas-artifact-a"
version = "0.1.0"
dependencies = ["wasmi"]

[[package]]
name = "wasmi"
version = "2.0.0"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "aaaa"
"#;

    #[test]
    fn the_vendor_key_is_the_registry_packages_only() {
        let other_path_package = LOCK.replace("microfaas-artifact-a", "microfaas-artifact-b");
        assert_eq!(registry_packages_key(LOCK), registry_packages_key(&other_path_package));
        let other_version = LOCK.replace("2.0.0", "2.0.1");
        assert_ne!(registry_packages_key(LOCK), registry_packages_key(&other_version));
        let other_sum = LOCK.replace("aaaa", "aaab");
        assert_ne!(registry_packages_key(LOCK), registry_packages_key(&other_sum));
        let no_registry = "version = 4\n\n[[package]]\nname = \"x\"\nversion = \"0.1.0\"\n";
        assert_ne!(registry_packages_key(LOCK), registry_packages_key(no_registry));
    }
}
