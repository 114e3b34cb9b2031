//! The sandbox the untrusted compile runs in, as data ([`SandboxPolicy`])
//! plus one function that applies it in a fixed order between fork and exec
//! (namespaces, mounts, Landlock, capabilities, uid/gid, no_new_privs).
//!
//! The process sees a read-only root (a skeleton directory in the build dir,
//! pivoted into) holding only the bind mounts of the policy: the system and
//! the toolchain at their own paths, and everything cargo is told about (the
//! function's and the SDK's sources with their workspace manifests, the
//! wrapper, the vendored sources, the output dir) at fixed paths below
//! [`FIXED_ROOT`] ([`CompilePaths::fixed`]), the same wherever the sources
//! and the cache live, so nothing cargo derives from a path (its `-C
//! metadata` hash of a path crate, panic locations) differs between two
//! clones; the sources keep their relative layout there, so relative path
//! dependencies and workspace inheritance resolve as on the host; no network (a new network namespace: loopback
//! only, down); a fixed environment; a Landlock domain that grants exactly
//! the policy's accesses (and no TCP, no signals or abstract sockets
//! outside it); when started as root, an unprivileged uid with no
//! capabilities; otherwise a user namespace mapping the caller's own uid.

use landlock::{ABI, Access as _, AccessFs, BitFlags};
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

mod apply;

pub use apply::{SandboxError, run, run_unsandboxed};

/// Bumped whenever the policy or its application changes (part of the
/// artifact cache key).
pub const SANDBOX_VERSION: &str = "build-sandbox/2";

/// Where the compile sees everything cargo is told about (see
/// [`CompilePaths::fixed`]).
pub const FIXED_ROOT: &str = "/microfaas";

/// The uid and gid a build runs as when the builder is root (`nobody`).
pub const UNPRIVILEGED_ID: u32 = 65534;

/// What the sandboxed process may do with a bind-mounted path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountAccess {
    /// Read files and list directories.
    Read,
    /// Read and execute (toolchain, system binaries).
    ReadExec,
    /// Everything, execution included (the build output directory: the
    /// allowlisted crates' build scripts are compiled and run there).
    ReadWrite,
    /// A character device opened for reading and writing (`/dev/null`).
    Device,
}

impl MountAccess {
    fn landlock(self, abi: ABI) -> BitFlags<AccessFs> {
        let read = AccessFs::ReadFile | AccessFs::ReadDir;
        match self {
            Self::Read => read,
            Self::ReadExec => read | AccessFs::Execute,
            Self::ReadWrite => AccessFs::from_all(abi),
            Self::Device => AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate | AccessFs::IoctlDev,
        }
    }

    fn read_only(self) -> bool {
        matches!(self, Self::Read | Self::ReadExec)
    }
}

/// One path of the host made visible in the sandbox, at `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Where it appears inside the sandbox.
    pub path: PathBuf,
    /// What is mounted there (a host path; usually the same as `path`).
    pub source: PathBuf,
    /// What the process may do with it.
    pub access: MountAccess,
}

/// The sandbox of one compile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPolicy {
    /// The skeleton directory on the host that becomes `/` (read-only).
    pub root: PathBuf,
    /// The bind mounts, in mount order.
    pub binds: Vec<Bind>,
    /// Symbolic links created in the root (`/lib64 -> usr/lib64`).
    pub symlinks: Vec<(PathBuf, PathBuf)>,
    /// Empty files created in the root: a workspace root package's target
    /// roots, which cargo checks exist when it reads the manifest for
    /// inherited fields (their content stays hidden).
    pub placeholders: Vec<PathBuf>,
    /// Create a user namespace (the builder is not root).
    pub user_namespace: bool,
    /// Switch to this uid/gid (the builder is root).
    pub run_as: Option<u32>,
    /// Working directory inside the sandbox.
    pub cwd: PathBuf,
    /// The complete environment of the process.
    pub env: Vec<(String, OsString)>,
}

/// The paths a compile needs, as the pipeline found them.
#[derive(Debug, Clone)]
pub struct CompilePaths {
    /// The toolchain's sysroot (canonical).
    pub toolchain: PathBuf,
    /// The function crate's directory (canonical) and the snapshot of its
    /// files mounted there.
    pub function_dir: PathBuf,
    /// The snapshot of the function crate's files.
    pub function_snapshot: PathBuf,
    /// The SDK's directory (canonical).
    pub sdk_dir: PathBuf,
    /// The absolute path the function's manifests name the SDK by, when
    /// they do (not a relative path): cargo must find the SDK there, and the
    /// compile's wrapper patches that source to the SDK's fixed path.
    pub sdk_named_as: Option<PathBuf>,
    /// The root manifests of the workspaces the function crate and the SDK
    /// belong to (cargo reads them for inherited fields).
    pub workspace_manifests: Vec<PathBuf>,
    /// The generated wrapper crate (trusted, read-only in the sandbox).
    pub wrapper_dir: PathBuf,
    /// The vendored allowlisted sources.
    pub vendor_dir: PathBuf,
    /// The only writable directory: target dir, cargo home, temp files.
    pub out_dir: PathBuf,
    /// This compile's own directory in `out_dir` (HOME, CARGO_HOME and
    /// TMPDIR below it), fresh for every compile.
    pub scratch_dir: PathBuf,
    /// The rustc wrapper script (in the wrapper dir).
    pub rustc_wrapper: PathBuf,
    /// The crate directory to compile with `-F unsafe-code` (`None`: the
    /// test-only allow-unsafe mode).
    pub forbid_unsafe_dir: Option<PathBuf>,
    /// The skeleton root.
    pub root: PathBuf,
}

/// The paths a compile's cargo is given (its arguments, environment and
/// the wrapper's manifest): in the build sandbox fixed ones
/// ([`CompilePaths::fixed`]), unsandboxed the host's ([`CompilePaths::host`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenPaths {
    /// The function crate's directory.
    pub function_dir: PathBuf,
    /// The SDK's directory.
    pub sdk_dir: PathBuf,
    /// The source trees: `(host root, where it is seen)`, the first that
    /// holds a host path maps it ([`SeenPaths::source`]).
    pub trees: Vec<(PathBuf, PathBuf)>,
    /// The wrapper crate (its manifest names the two directories above).
    pub wrapper_dir: PathBuf,
    /// The vendored sources.
    pub vendor_dir: PathBuf,
    /// The writable output directory.
    pub out_dir: PathBuf,
    /// This compile's scratch directory (HOME, CARGO_HOME, TMPDIR).
    pub scratch_dir: PathBuf,
    /// `[patch]` the source of this path (the SDK as the function names it)
    /// with [`SeenPaths::sdk_dir`].
    pub sdk_patch: Option<PathBuf>,
}

impl SeenPaths {
    /// Where the host path `p` of a source tree is seen.
    pub fn source(&self, p: &Path) -> PathBuf {
        self.trees
            .iter()
            .find_map(|(host, seen)| {
                let rel = p.strip_prefix(host).ok()?;
                Some(if rel.as_os_str().is_empty() {
                    seen.clone()
                } else {
                    seen.join(rel)
                })
            })
            .unwrap_or_else(|| p.to_owned())
    }
}

/// The deepest directory holding all of `paths` (absolute).
fn common_ancestor(paths: &[&Path]) -> PathBuf {
    let Some((first, rest)) = paths.split_first() else {
        return PathBuf::from("/");
    };
    let mut common = first.to_path_buf();
    for p in rest {
        while !p.starts_with(&common) {
            if !common.pop() {
                break;
            }
        }
    }
    common
}

impl CompilePaths {
    /// The host's own paths: the unsandboxed opt-out's, so its artifacts
    /// still depend on where the sources and the cache live (its remapped
    /// paths aside).
    pub fn host(&self) -> SeenPaths {
        SeenPaths {
            function_dir: self.function_dir.clone(),
            sdk_dir: self.sdk_dir.clone(),
            trees: vec![],
            wrapper_dir: self.wrapper_dir.clone(),
            vendor_dir: self.vendor_dir.clone(),
            out_dir: self.out_dir.clone(),
            scratch_dir: self.scratch_dir.clone(),
            sdk_patch: None,
        }
    }

    /// The fixed paths the build sandbox shows them at: `/microfaas/wrapper`,
    /// `/microfaas/vendor`, `/microfaas/out`, `/microfaas/scratch`, and the
    /// sources below `/microfaas/src` in their host layout relative to the
    /// deepest directory holding the function, the SDK and their workspace
    /// roots (a repository's root for its own crates, so two clones see the
    /// same paths). When the function names the SDK by an absolute path (a
    /// crate outside the SDK's tree), the function's tree alone is at
    /// `/microfaas/src` and the SDK's at `/microfaas/sdk`, and the wrapper
    /// patches the named source to it; a crate outside the SDK's tree that
    /// names it by a relative path sees its host layout from `/` on, which
    /// still depends on where the two live.
    pub fn fixed(&self) -> SeenPaths {
        let fixed = Path::new(FIXED_ROOT);
        let roots: Vec<&Path> = self.workspace_manifests.iter().filter_map(|m| m.parent()).collect();
        let trees = if self.sdk_named_as.is_some() {
            let around = |dir: &Path| {
                let mut all = vec![dir];
                all.extend(roots.iter().copied().filter(|r| dir.starts_with(r)));
                common_ancestor(&all)
            };
            vec![
                (around(&self.function_dir), fixed.join("src")),
                (around(&self.sdk_dir), fixed.join("sdk")),
            ]
        } else {
            let mut all = vec![self.function_dir.as_path(), self.sdk_dir.as_path()];
            all.extend(roots.iter().copied());
            vec![(common_ancestor(&all), fixed.join("src"))]
        };
        let mut seen = SeenPaths {
            function_dir: PathBuf::new(),
            sdk_dir: PathBuf::new(),
            trees,
            wrapper_dir: fixed.join("wrapper"),
            vendor_dir: fixed.join("vendor"),
            out_dir: fixed.join("out"),
            scratch_dir: fixed.join("scratch"),
            sdk_patch: self.sdk_named_as.clone(),
        };
        seen.function_dir = seen.source(&self.function_dir);
        seen.sdk_dir = seen.source(&self.sdk_dir);
        seen
    }
}

/// Which of `/bin`, `/lib`, `/lib64`, `/sbin` are symlinks on this host
/// (merged /usr), and which are directories to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLayout {
    /// `(link, target)` pairs.
    pub links: Vec<(PathBuf, PathBuf)>,
    /// Top-level system directories that are real directories.
    pub dirs: Vec<PathBuf>,
    /// Of [`SYSTEM_ETC`], the paths this host has.
    pub etc: Vec<PathBuf>,
}

/// All of `/etc` the compile may see: the dynamic loader's cache and the
/// alternatives links (`cc` is one on Debian); each only if present.
pub const SYSTEM_ETC: &[&str] = &["/etc/ld.so.cache", "/etc/alternatives"];

impl HostLayout {
    /// Reads the host's layout.
    pub fn detect() -> Self {
        let mut layout = Self {
            links: Vec::new(),
            dirs: Vec::new(),
            etc: SYSTEM_ETC.iter().map(PathBuf::from).filter(|p| p.exists()).collect(),
        };
        for top in ["/bin", "/sbin", "/lib", "/lib64"] {
            let top = PathBuf::from(top);
            match fs::read_link(&top) {
                Ok(target) => layout.links.push((top, target)),
                Err(_) if top.is_dir() => layout.dirs.push(top),
                Err(_) => {}
            }
        }
        layout
    }
}

/// The policy for one compile (pure: a test prints it): the host's
/// `paths`, shown to the process where `seen` says (its environment and
/// working directory name those).
pub fn compile_policy(paths: &CompilePaths, seen: &SeenPaths, layout: &HostLayout, is_root: bool) -> SandboxPolicy {
    let scratch = &seen.scratch_dir;
    let rustc_wrapper = paths
        .rustc_wrapper
        .strip_prefix(&paths.wrapper_dir)
        .map_or_else(|_| paths.rustc_wrapper.clone(), |rel| seen.wrapper_dir.join(rel));
    let mut env: Vec<(String, OsString)> = vec![
        ("PATH".into(), "/usr/bin:/bin".into()),
        // The loader cannot expand rustc's `$ORIGIN/../lib` run path from
        // the sandbox's /proc: name the directory.
        ("LD_LIBRARY_PATH".into(), paths.toolchain.join("lib").into()),
        ("HOME".into(), scratch.join("home").into()),
        ("CARGO_HOME".into(), scratch.join("cargo-home").into()),
        ("TMPDIR".into(), scratch.join("tmp").into()),
        ("RUSTC".into(), paths.toolchain.join("bin/rustc").into()),
        ("RUSTC_WRAPPER".into(), rustc_wrapper.into()),
    ];
    if let Some(dir) = &paths.forbid_unsafe_dir {
        let dir = if *dir == paths.function_dir {
            seen.function_dir.clone()
        } else {
            seen.source(dir)
        };
        env.push(("MICROFAAS_FORBID_UNSAFE_DIR".into(), dir.into()));
    }
    let same = |p: &Path, access| Bind {
        path: p.to_owned(),
        source: p.to_owned(),
        access,
    };
    let at = |path: &Path, source: &Path, access| Bind {
        path: path.to_owned(),
        source: source.to_owned(),
        access,
    };
    let mut binds = vec![
        // The system: compilers' linker (cc, ld), the dynamic loader's
        // files; of /etc only the loader cache and the alternatives links.
        same(Path::new("/usr"), MountAccess::ReadExec),
        same(Path::new("/dev/null"), MountAccess::Device),
    ];
    binds.extend(layout.etc.iter().map(|p| same(p, MountAccess::Read)));
    binds.extend(layout.dirs.iter().map(|d| same(d, MountAccess::ReadExec)));
    binds.push(same(&paths.toolchain, MountAccess::ReadExec));
    binds.push(at(&seen.function_dir, &paths.function_snapshot, MountAccess::Read));
    if paths.sdk_dir != paths.function_dir {
        binds.push(at(&seen.sdk_dir, &paths.sdk_dir, MountAccess::Read));
    }
    binds.extend(
        paths
            .workspace_manifests
            .iter()
            .map(|m| at(&seen.source(m), m, MountAccess::Read)),
    );
    let host_placeholders: Vec<PathBuf> = paths
        .workspace_manifests
        .iter()
        .filter_map(|m| m.parent())
        .flat_map(|root| ["src/lib.rs", "src/main.rs"].map(|f| root.join(f)))
        .filter(|p| p.is_file() && !paths.workspace_manifests.is_empty())
        .filter(|p| !p.starts_with(&paths.function_dir) && !p.starts_with(&paths.sdk_dir))
        .collect();
    let mut placeholders: Vec<PathBuf> = host_placeholders.iter().map(|p| seen.source(p)).collect();
    // The SDK where the function names it (cargo reads that manifest, and
    // its workspace's, before applying the wrapper's patch), read-only.
    if let Some(named) = seen.sdk_patch.as_ref().filter(|n| **n != seen.sdk_dir) {
        binds.push(at(named, &paths.sdk_dir, MountAccess::Read));
        let sdk_side = |p: &Path| p.parent().is_some_and(|root| paths.sdk_dir.starts_with(root));
        binds.extend(
            paths
                .workspace_manifests
                .iter()
                .filter(|m| sdk_side(m) && seen.source(m) != **m)
                .map(|m| same(m, MountAccess::Read)),
        );
        placeholders.extend(
            host_placeholders
                .iter()
                .filter(|p| {
                    p.parent()
                        .and_then(Path::parent)
                        .is_some_and(|r| paths.sdk_dir.starts_with(r))
                })
                .filter(|p| seen.source(p) != **p)
                .cloned(),
        );
    }
    binds.push(at(&seen.vendor_dir, &paths.vendor_dir, MountAccess::Read));
    binds.push(at(&seen.wrapper_dir, &paths.wrapper_dir, MountAccess::ReadExec));
    binds.push(at(&seen.out_dir, &paths.out_dir, MountAccess::ReadWrite));
    if !seen.scratch_dir.starts_with(&seen.out_dir) {
        binds.push(at(&seen.scratch_dir, &paths.scratch_dir, MountAccess::ReadWrite));
    }
    SandboxPolicy {
        root: paths.root.clone(),
        binds,
        symlinks: layout.links.clone(),
        placeholders,
        user_namespace: !is_root,
        run_as: is_root.then_some(UNPRIVILEGED_ID),
        cwd: seen.wrapper_dir.clone(),
        env,
    }
}

impl fmt::Display for SandboxPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "build sandbox ({SANDBOX_VERSION}), applied in this order:")?;
        writeln!(
            f,
            "1. namespaces: {}mount, network (loopback only, down), ipc, uts",
            if self.user_namespace {
                "user (own uid mapped), "
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "2. mounts: read-only root {} pivoted into, with",
            self.root.display()
        )?;
        for b in &self.binds {
            let from = if b.source == b.path {
                String::new()
            } else {
                format!(" (from {})", b.source.display())
            };
            writeln!(f, "   {:<10} {}{from}", format!("{:?}", b.access), b.path.display())?;
        }
        for (link, target) in &self.symlinks {
            writeln!(f, "   symlink    {} -> {}", link.display(), target.display())?;
        }
        writeln!(
            f,
            "   proc       /proc (fresh, hidepid=invisible, subset=pid; in a user namespace the host's; no file readable)"
        )?;
        for p in &self.placeholders {
            writeln!(f, "   empty file {}", p.display())?;
        }
        writeln!(
            f,
            "3. landlock: exactly the accesses above (plus listing the root's directories); no TCP bind/connect; no signals or abstract unix sockets outside the sandbox"
        )?;
        writeln!(f, "4. capabilities: bounding set emptied, then all sets cleared")?;
        match self.run_as {
            Some(id) => writeln!(f, "5. uid/gid: {id}/{id}, no supplementary groups")?,
            None => writeln!(f, "5. uid/gid: the caller's own, mapped in the user namespace")?,
        }
        writeln!(f, "6. no_new_privs; parent-death signal SIGKILL")?;
        writeln!(f, "cwd: {}", self.cwd.display())?;
        let env: Vec<String> = self
            .env
            .iter()
            .map(|(k, v)| format!("{k}={}", v.to_string_lossy()))
            .collect();
        writeln!(f, "environment (nothing else): {}", env.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> CompilePaths {
        CompilePaths {
            toolchain: "/root/.rustup/toolchains/stable-x86_64-unknown-linux-gnu".into(),
            function_dir: "/home/u/fns/echo".into(),
            function_snapshot: "/cache/work/echo-1/snapshot".into(),
            sdk_dir: "/src/microfaas/sdk".into(),
            sdk_named_as: None,
            workspace_manifests: vec!["/home/u/fns/Cargo.toml".into(), "/src/microfaas/Cargo.toml".into()],
            wrapper_dir: "/cache/work/echo-1/wrapper".into(),
            vendor_dir: "/cache/work/echo-1/vendor".into(),
            out_dir: "/cache/work/echo-1/out".into(),
            scratch_dir: "/cache/work/echo-1/out/echo-1".into(),
            rustc_wrapper: "/cache/work/echo-1/wrapper/rustc-forbid-unsafe.sh".into(),
            forbid_unsafe_dir: Some("/home/u/fns/echo".into()),
            root: "/cache/work/echo-1/root".into(),
        }
    }

    fn policy_of(p: &CompilePaths, is_root: bool) -> SandboxPolicy {
        compile_policy(p, &p.fixed(), &layout(), is_root)
    }

    fn layout() -> HostLayout {
        HostLayout {
            links: vec![("/lib64".into(), "usr/lib64".into())],
            dirs: vec![],
            etc: SYSTEM_ETC.iter().map(PathBuf::from).collect(),
        }
    }

    #[test]
    fn the_compile_policy_prints_at_a_glance() {
        let policy = policy_of(&paths(), true);
        let text = policy.to_string();
        println!("{text}");
        assert!(text.contains("uid/gid: 65534/65534"), "{text}");
        assert!(
            text.contains("/microfaas/src/home/u/fns/echo (from /cache/work/echo-1/snapshot)"),
            "{text}"
        );
        let unprivileged = policy_of(&paths(), false);
        assert!(unprivileged.user_namespace && unprivileged.run_as.is_none());
        assert!(unprivileged.to_string().contains("user (own uid mapped)"));
    }

    #[test]
    fn only_the_out_dir_is_writable_and_etc_is_not_mounted() {
        let policy = policy_of(&paths(), true);
        let writable: Vec<&Path> = policy
            .binds
            .iter()
            .filter(|b| !b.access.read_only() && b.access != MountAccess::Device)
            .map(|b| b.path.as_path())
            .collect();
        assert_eq!(writable, [Path::new("/microfaas/out"), Path::new("/microfaas/scratch")]);
        let sources: Vec<&Path> = policy
            .binds
            .iter()
            .filter(|b| !b.access.read_only() && b.access != MountAccess::Device)
            .map(|b| b.source.as_path())
            .collect();
        assert_eq!(
            sources,
            [
                Path::new("/cache/work/echo-1/out"),
                Path::new("/cache/work/echo-1/out/echo-1")
            ]
        );
        let devices: Vec<&Path> = policy
            .binds
            .iter()
            .filter(|b| b.access == MountAccess::Device)
            .map(|b| b.path.as_path())
            .collect();
        assert_eq!(devices, [Path::new("/dev/null")]);
        for b in &policy.binds {
            if b.path.starts_with("/etc") {
                assert!(
                    b.path == Path::new("/etc/ld.so.cache") || b.path == Path::new("/etc/alternatives"),
                    "{}",
                    b.path.display()
                );
            }
            assert!(
                !b.path.starts_with("/root/.cargo"),
                "the host's cargo home is not visible"
            );
            assert!(b.path != Path::new("/"), "the host root is never mounted");
        }
        // Executable: system, toolchain, the trusted wrapper (its rustc
        // wrapper script), the out dir (allowlisted build scripts); the
        // function's files and the sources are read-only data.
        let exec: Vec<&Path> = policy
            .binds
            .iter()
            .filter(|b| matches!(b.access, MountAccess::ReadExec | MountAccess::ReadWrite))
            .map(|b| b.path.as_path())
            .collect();
        assert!(!exec.contains(&Path::new("/microfaas/src/home/u/fns/echo")));
        assert!(!exec.contains(&Path::new("/microfaas/vendor")));
    }

    #[test]
    fn the_environment_is_a_fixed_set() {
        let policy = policy_of(&paths(), true);
        let keys: Vec<&str> = policy.env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "PATH",
                "LD_LIBRARY_PATH",
                "HOME",
                "CARGO_HOME",
                "TMPDIR",
                "RUSTC",
                "RUSTC_WRAPPER",
                "MICROFAAS_FORBID_UNSAFE_DIR"
            ]
        );
        for (k, v) in &policy.env {
            let v = Path::new(v);
            if matches!(k.as_str(), "HOME" | "CARGO_HOME" | "TMPDIR") {
                assert!(
                    v.starts_with("/microfaas/scratch"),
                    "{k} must be inside the scratch dir"
                );
            }
        }
        let mut p = paths();
        p.forbid_unsafe_dir = None;
        assert_eq!(policy_of(&p, true).env.len(), 7);
    }

    #[test]
    fn placeholders_mirror_only_a_workspace_roots_target_files() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        fs::create_dir_all(ws.join("src")).unwrap();
        fs::write(ws.join("Cargo.toml"), "[workspace]\n").unwrap();
        fs::write(ws.join("src/main.rs"), "secret").unwrap();
        let mut p = paths();
        p.workspace_manifests = vec![ws.join("Cargo.toml")];
        let policy = policy_of(&p, true);
        let seen = Path::new("/microfaas/src").join(ws.strip_prefix("/").unwrap());
        assert_eq!(policy.placeholders, [seen.join("src/main.rs")]);
    }

    /// A repository (its workspace, the SDK, a member function) at `repo`.
    fn repo_paths(repo: &str, cache: &str) -> CompilePaths {
        let repo = Path::new(repo);
        let cache = Path::new(cache);
        CompilePaths {
            toolchain: "/root/.rustup/toolchains/stable-x86_64-unknown-linux-gnu".into(),
            function_dir: repo.join("functions/echo"),
            function_snapshot: cache.join("work/echo-1/snapshot"),
            sdk_dir: repo.join("sdk"),
            sdk_named_as: None,
            workspace_manifests: vec![repo.join("Cargo.toml")],
            wrapper_dir: cache.join("work/echo-1/wrapper"),
            vendor_dir: cache.join("work/vendor-1"),
            out_dir: cache.join("work/out-1"),
            scratch_dir: cache.join("work/out-1/echo-1"),
            rustc_wrapper: cache.join("work/echo-1/wrapper/rustc-forbid-unsafe.sh"),
            forbid_unsafe_dir: Some(repo.join("functions/echo")),
            root: cache.join("work/echo-1/root"),
        }
    }

    #[test]
    fn two_clones_see_the_same_paths() {
        let a = repo_paths("/src/microfaas", "/cache");
        let b = repo_paths("/home/someone/else/checkouts/microfaas-2", "/var/tmp/other-cache");
        let (fa, fb) = (a.fixed(), b.fixed());
        assert_eq!(fa.function_dir, Path::new("/microfaas/src/functions/echo"));
        assert_eq!(fa.sdk_dir, Path::new("/microfaas/src/sdk"));
        assert_eq!(
            fa.source(Path::new("/src/microfaas/Cargo.toml")),
            Path::new("/microfaas/src/Cargo.toml")
        );
        assert_eq!((&fa.function_dir, &fa.sdk_dir), (&fb.function_dir, &fb.sdk_dir));
        let (pa, pb) = (
            compile_policy(&a, &fa, &layout(), true),
            compile_policy(&b, &fb, &layout(), true),
        );
        let targets = |p: &SandboxPolicy| p.binds.iter().map(|b| b.path.clone()).collect::<Vec<_>>();
        assert_eq!(targets(&pa), targets(&pb));
        assert_eq!((&pa.env, &pa.cwd), (&pb.env, &pb.cwd));
        // Unsandboxed, the host's own paths.
        let host = a.host();
        assert_eq!(host.function_dir, a.function_dir);
        assert_eq!(host.source(&a.sdk_dir), a.sdk_dir);
    }

    #[test]
    fn an_sdk_named_by_absolute_path_is_patched_and_also_where_it_is_named() {
        let mut a = paths();
        a.workspace_manifests = vec!["/src/microfaas/Cargo.toml".into()];
        a.function_dir = "/home/u/fns/echo".into();
        a.sdk_named_as = Some("/src/microfaas/sdk".into());
        let seen = a.fixed();
        assert_eq!(seen.function_dir.as_os_str(), "/microfaas/src");
        assert_eq!(seen.sdk_dir, Path::new("/microfaas/sdk/sdk"));
        assert_eq!(
            seen.source(Path::new("/src/microfaas/Cargo.toml")),
            Path::new("/microfaas/sdk/Cargo.toml")
        );
        assert_eq!(seen.sdk_patch.as_deref(), Some(Path::new("/src/microfaas/sdk")));
        let policy = compile_policy(&a, &seen, &layout(), true);
        for (path, source) in [
            ("/microfaas/sdk/sdk", "/src/microfaas/sdk"),
            ("/src/microfaas/sdk", "/src/microfaas/sdk"),
            ("/microfaas/sdk/Cargo.toml", "/src/microfaas/Cargo.toml"),
            ("/src/microfaas/Cargo.toml", "/src/microfaas/Cargo.toml"),
        ] {
            assert!(
                policy.binds.iter().any(|b| b.path == Path::new(path)
                    && b.source == Path::new(source)
                    && b.access == MountAccess::Read),
                "{path} from {source}: {policy}"
            );
        }
    }
}
