//! The sandbox the untrusted compile runs in, as data ([`SandboxPolicy`])
//! plus one function that applies it in a fixed order between fork and exec
//! (namespaces, mounts, Landlock, capabilities, uid/gid, no_new_privs).
//!
//! The process sees a read-only root (a skeleton directory in the build dir,
//! pivoted into) holding only the bind mounts of the policy, each at its
//! original absolute path, so path dependencies and workspace inheritance
//! resolve as on the host; no network (a new network namespace: loopback
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
pub const SANDBOX_VERSION: &str = "build-sandbox/1";

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

/// The policy for one compile (pure: a test prints it).
pub fn compile_policy(paths: &CompilePaths, layout: &HostLayout, is_root: bool) -> SandboxPolicy {
    let scratch = &paths.scratch_dir;
    let mut env: Vec<(String, OsString)> = vec![
        ("PATH".into(), "/usr/bin:/bin".into()),
        // The loader cannot expand rustc's `$ORIGIN/../lib` run path from
        // the sandbox's /proc: name the directory.
        ("LD_LIBRARY_PATH".into(), paths.toolchain.join("lib").into()),
        ("HOME".into(), scratch.join("home").into()),
        ("CARGO_HOME".into(), scratch.join("cargo-home").into()),
        ("TMPDIR".into(), scratch.join("tmp").into()),
        ("RUSTC".into(), paths.toolchain.join("bin/rustc").into()),
        ("RUSTC_WRAPPER".into(), paths.rustc_wrapper.clone().into()),
    ];
    if let Some(dir) = &paths.forbid_unsafe_dir {
        env.push(("MICROFAAS_FORBID_UNSAFE_DIR".into(), dir.clone().into()));
    }
    let same = |p: &Path, access| Bind {
        path: p.to_owned(),
        source: p.to_owned(),
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
    binds.push(Bind {
        path: paths.function_dir.clone(),
        source: paths.function_snapshot.clone(),
        access: MountAccess::Read,
    });
    if paths.sdk_dir != paths.function_dir {
        binds.push(same(&paths.sdk_dir, MountAccess::Read));
    }
    binds.extend(paths.workspace_manifests.iter().map(|m| same(m, MountAccess::Read)));
    let placeholders = paths
        .workspace_manifests
        .iter()
        .filter_map(|m| m.parent())
        .flat_map(|root| ["src/lib.rs", "src/main.rs"].map(|f| root.join(f)))
        .filter(|p| p.is_file() && !paths.workspace_manifests.is_empty())
        .filter(|p| !p.starts_with(&paths.function_dir) && !p.starts_with(&paths.sdk_dir))
        .collect();
    binds.push(same(&paths.vendor_dir, MountAccess::Read));
    binds.push(same(&paths.wrapper_dir, MountAccess::ReadExec));
    binds.push(same(&paths.out_dir, MountAccess::ReadWrite));
    SandboxPolicy {
        root: paths.root.clone(),
        binds,
        symlinks: layout.links.clone(),
        placeholders,
        user_namespace: !is_root,
        run_as: is_root.then_some(UNPRIVILEGED_ID),
        cwd: paths.wrapper_dir.clone(),
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

    fn layout() -> HostLayout {
        HostLayout {
            links: vec![("/lib64".into(), "usr/lib64".into())],
            dirs: vec![],
            etc: SYSTEM_ETC.iter().map(PathBuf::from).collect(),
        }
    }

    #[test]
    fn the_compile_policy_prints_at_a_glance() {
        let policy = compile_policy(&paths(), &layout(), true);
        let text = policy.to_string();
        println!("{text}");
        assert!(text.contains("uid/gid: 65534/65534"), "{text}");
        assert!(
            text.contains("/home/u/fns/echo (from /cache/work/echo-1/snapshot)"),
            "{text}"
        );
        let unprivileged = compile_policy(&paths(), &layout(), false);
        assert!(unprivileged.user_namespace && unprivileged.run_as.is_none());
        assert!(unprivileged.to_string().contains("user (own uid mapped)"));
    }

    #[test]
    fn only_the_out_dir_is_writable_and_etc_is_not_mounted() {
        let policy = compile_policy(&paths(), &layout(), true);
        let writable: Vec<&Path> = policy
            .binds
            .iter()
            .filter(|b| !b.access.read_only() && b.access != MountAccess::Device)
            .map(|b| b.path.as_path())
            .collect();
        assert_eq!(writable, [Path::new("/cache/work/echo-1/out")]);
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
        assert!(!exec.contains(&Path::new("/home/u/fns/echo")));
        assert!(!exec.contains(&Path::new("/cache/work/echo-1/vendor")));
    }

    #[test]
    fn the_environment_is_a_fixed_set() {
        let policy = compile_policy(&paths(), &layout(), true);
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
                    v.starts_with("/cache/work/echo-1/out"),
                    "{k} must be inside the out dir"
                );
            }
        }
        let mut p = paths();
        p.forbid_unsafe_dir = None;
        assert_eq!(compile_policy(&p, &layout(), true).env.len(), 7);
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
        let policy = compile_policy(&p, &layout(), true);
        assert_eq!(policy.placeholders, [ws.join("src/main.rs")]);
    }
}
