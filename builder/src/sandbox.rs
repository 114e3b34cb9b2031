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

use landlock::{
    ABI, Access as _, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope,
};
use std::ffi::{CString, OsString};
use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

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
}

impl HostLayout {
    /// Reads the host's layout.
    pub fn detect() -> Self {
        let mut layout = Self {
            links: Vec::new(),
            dirs: Vec::new(),
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
        same(Path::new("/etc/ld.so.cache"), MountAccess::Read),
        same(Path::new("/etc/alternatives"), MountAccess::Read),
        same(Path::new("/dev/null"), MountAccess::Device),
    ];
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

/// Why the sandbox could not be set up. The build never runs unsandboxed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Preparing the skeleton root or the policy's paths failed.
    #[error("preparing the build sandbox: {context}")]
    Prepare {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Landlock is unavailable or refused the ruleset.
    #[error(
        "the build sandbox needs Landlock (Linux 5.13+, enabled at boot); builds do not run unsandboxed unless MICROFAAS_BUILD_SANDBOX=off is set (trusted sources only)"
    )]
    Landlock(#[source] landlock::RulesetError),
    /// A step in the child failed (the kernel refused it).
    #[error(
        "the build sandbox could not be applied: {step} failed (this kernel or container may forbid it); builds do not run unsandboxed unless MICROFAAS_BUILD_SANDBOX=off is set (trusted sources only)"
    )]
    Apply {
        /// The step.
        step: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// Spawning failed for another reason.
    #[error("starting the sandboxed build")]
    Spawn(#[source] io::Error),
    /// The compile ran past its time limit; it and everything it started
    /// were killed.
    #[error("the compile did not finish within {seconds} s and was killed")]
    TimedOut {
        /// The limit.
        seconds: u64,
    },
}

fn prep(context: impl Into<String>) -> impl FnOnce(io::Error) -> SandboxError {
    let context = context.into();
    move |source| SandboxError::Prepare { context, source }
}

/// The steps of [`Prepared::apply`], named for errors.
const STEPS: &[&str] = &[
    "setting the parent-death signal",
    "creating the namespaces (user, mount, network, ipc, uts)",
    "mapping the uid/gid in the user namespace",
    "making the mounts private",
    "bind-mounting the sandbox root",
    "bind-mounting a path into the sandbox",
    "remounting a path read-only",
    "pivoting into the sandbox root",
    "entering the working directory",
    "applying Landlock",
    "emptying the capability bounding set",
    "switching to the unprivileged uid/gid",
    "clearing capabilities",
    "setting no_new_privs",
    "mounting /proc",
];

struct PreparedBind {
    source: CString,
    target: CString,
    remount_flags: libc::c_ulong,
}

/// Everything the child needs, prepared before fork so that applying it
/// only makes system calls (async-signal-safe).
struct Prepared {
    user_namespace: bool,
    uid_map: CString,
    gid_map: CString,
    root: CString,
    proc_dir: CString,
    binds: Vec<PreparedBind>,
    cwd: CString,
    run_as: Option<u32>,
    ruleset: Option<RulesetCreated>,
    root_remount_flags: libc::c_ulong,
    error_pipe: OwnedFd,
}

fn cstr(p: &Path) -> Result<CString, SandboxError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| SandboxError::Prepare {
        context: format!("path {} contains a NUL byte", p.display()),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

/// Joins an absolute path below `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// The mount flags a read-only or read-write remount of `source` must carry
/// (the flags a user namespace may not drop, plus ours).
fn remount_flags(source: &Path, access: MountAccess) -> Result<libc::c_ulong, SandboxError> {
    let c = cstr(source)?;
    // SAFETY: statvfs is zero-initialised plain data; the call writes it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path, `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(prep(format!("statvfs {}", source.display()))(io::Error::last_os_error()));
    }
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID;
    if access != MountAccess::Device {
        flags |= libc::MS_NODEV;
    }
    if access.read_only() {
        flags |= libc::MS_RDONLY;
    }
    for (st_flag, ms_flag) in [
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
        (libc::ST_RDONLY, libc::MS_RDONLY),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    Ok(flags)
}

/// Lays out the skeleton root: a mount point for every bind (a directory,
/// or an empty file for a file), the symlinks; nothing else.
fn build_skeleton(policy: &SandboxPolicy) -> Result<(), SandboxError> {
    let root = &policy.root;
    if root.exists() {
        fs::remove_dir_all(root).map_err(prep(format!("removing {}", root.display())))?;
    }
    fs::create_dir_all(root).map_err(prep(format!("creating {}", root.display())))?;
    for b in &policy.binds {
        let at = under(root, &b.path);
        if b.source.is_dir() {
            fs::create_dir_all(&at).map_err(prep(format!("creating {}", at.display())))?;
        } else {
            if let Some(parent) = at.parent() {
                fs::create_dir_all(parent).map_err(prep(format!("creating {}", parent.display())))?;
            }
            fs::write(&at, b"").map_err(prep(format!("creating {}", at.display())))?;
        }
    }
    fs::create_dir_all(root.join("proc")).map_err(prep("creating the /proc mount point"))?;
    for p in &policy.placeholders {
        let at = under(root, p);
        if let Some(parent) = at.parent() {
            fs::create_dir_all(parent).map_err(prep(format!("creating {}", parent.display())))?;
        }
        fs::write(&at, b"").map_err(prep(format!("creating {}", at.display())))?;
    }
    for (link, target) in &policy.symlinks {
        let at = under(root, link);
        std::os::unix::fs::symlink(target, &at).map_err(prep(format!("linking {}", at.display())))?;
    }
    Ok(())
}

fn ruleset(policy: &SandboxPolicy) -> Result<RulesetCreated, SandboxError> {
    // Rights of ABI 6 are handled (the filesystem rights of ABI 5, TCP,
    // signal and abstract-socket scoping); on an older kernel whatever it
    // supports is enforced, but Landlock itself is required (checked when
    // applied).
    let abi = ABI::V6;
    let mut rs = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.handle_access(AccessNet::from_all(abi)))
        .and_then(|r| r.scope(Scope::from_all(abi)))
        .and_then(Ruleset::create)
        .map_err(SandboxError::Landlock)?
        .no_new_privs(false);
    let fd = |p: &Path| {
        PathFd::new(p).map_err(|e| SandboxError::Prepare {
            context: format!("opening {} for Landlock: {e}", p.display()),
            source: io::Error::other(e.to_string()),
        })
    };
    // Listing the root's directories (mount points); files below it are
    // readable only through the binds' own rules.
    rs = rs
        .add_rule(PathBeneath::new(fd(&policy.root)?, AccessFs::ReadDir))
        .map_err(SandboxError::Landlock)?;
    for b in &policy.binds {
        let access = if b.source.is_dir() {
            b.access.landlock(abi)
        } else {
            b.access.landlock(abi) & AccessFs::from_file(abi)
        };
        rs = rs
            .add_rule(PathBeneath::new(fd(&b.source)?, access))
            .map_err(SandboxError::Landlock)?;
    }
    Ok(rs)
}

impl Prepared {
    fn new(policy: &SandboxPolicy) -> Result<(Self, OwnedFd), SandboxError> {
        build_skeleton(policy)?;
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let mut binds = Vec::with_capacity(policy.binds.len());
        for b in &policy.binds {
            binds.push(PreparedBind {
                source: cstr(&b.source)?,
                target: cstr(&under(&policy.root, &b.path))?,
                remount_flags: remount_flags(&b.source, b.access)?,
            });
        }
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid two-int out array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(prep("creating the error pipe")(io::Error::last_os_error()));
        }
        // SAFETY: pipe2 returned two fresh fds we own.
        let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let prepared = Self {
            user_namespace: policy.user_namespace,
            uid_map: CString::new(format!("{uid} {uid} 1\n")).unwrap_or_default(),
            gid_map: CString::new(format!("{gid} {gid} 1\n")).unwrap_or_default(),
            root: cstr(&policy.root)?,
            proc_dir: cstr(&policy.root.join("proc"))?,
            binds,
            cwd: cstr(&policy.cwd)?,
            run_as: policy.run_as,
            ruleset: Some(ruleset(policy)?),
            root_remount_flags: remount_flags(&policy.root, MountAccess::Read)?,
            error_pipe: write_end,
        };
        Ok((prepared, read_end))
    }
}

/// `_LINUX_CAPABILITY_VERSION_3`.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EPERM)
}

/// A step of the child's setup failed: its index in [`STEPS`] and errno.
type StepError = (u8, i32);

fn check(step: u8, ret: libc::c_long) -> Result<(), StepError> {
    if ret < 0 { Err((step, errno())) } else { Ok(()) }
}

/// `prctl(option, arg, 0, 0, 0)` as step `step`.
fn prctl(step: u8, option: libc::c_int, arg: libc::c_int) -> Result<(), StepError> {
    // SAFETY: prctl with integer arguments only.
    check(step, unsafe { libc::prctl(option, arg, 0, 0, 0) }.into())
}

/// Writes `data` to the file at `path` (the user-namespace maps).
fn write_file(step: u8, path: &std::ffi::CStr, data: &std::ffi::CStr) -> Result<(), StepError> {
    // SAFETY: `path` is NUL-terminated; open is async-signal-safe.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    check(step, fd.into())?;
    let bytes = data.to_bytes();
    // SAFETY: `bytes` is valid for its length; `fd` is open.
    let written = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    // SAFETY: `fd` is ours to close.
    unsafe { libc::close(fd) };
    if usize::try_from(written).ok() == Some(bytes.len()) {
        Ok(())
    } else {
        Err((step, errno()))
    }
}

impl Prepared {
    /// Applies the sandbox to the calling (forked, single-threaded) process,
    /// in the policy's fixed order. Only system calls on prepared data.
    fn apply(&mut self) -> Result<(), StepError> {
        let null = std::ptr::null::<libc::c_char>();
        let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if self.user_namespace {
            flags |= libc::CLONE_NEWUSER;
        }
        // 1. Namespaces.
        // SAFETY: unshare affects only this process.
        check(1, unsafe { libc::unshare(flags) }.into())?;
        if self.user_namespace {
            write_file(2, c"/proc/self/setgroups", c"deny")?;
            write_file(2, c"/proc/self/uid_map", &self.uid_map)?;
            write_file(2, c"/proc/self/gid_map", &self.gid_map)?;
        }
        // 2. Mounts: nothing propagates back; the skeleton becomes a mount,
        // every bind lands on its mount point, then the skeleton is `/`.
        // SAFETY: every mount/chdir/pivot_root call below takes
        // NUL-terminated paths prepared before fork and changes only this
        // process's private mount namespace.
        unsafe {
            check(
                3,
                libc::mount(
                    null,
                    c"/".as_ptr(),
                    null,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
                .into(),
            )?;
            check(
                4,
                libc::mount(
                    self.root.as_ptr(),
                    self.root.as_ptr(),
                    null,
                    libc::MS_BIND,
                    std::ptr::null(),
                )
                .into(),
            )?;
            for b in &self.binds {
                check(
                    5,
                    libc::mount(
                        b.source.as_ptr(),
                        b.target.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    )
                    .into(),
                )?;
                check(
                    6,
                    libc::mount(null, b.target.as_ptr(), null, b.remount_flags, std::ptr::null()).into(),
                )?;
            }
            // /proc: the loader and rust-lld read /proc/self/exe. A fresh
            // instance showing only the sandbox uid's processes; in a user
            // namespace (no pid namespace of its own) the host's, read-only.
            // Landlock grants no file in it either way.
            let fresh = libc::mount(
                c"proc".as_ptr(),
                self.proc_dir.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"hidepid=invisible,subset=pid".as_ptr().cast(),
            );
            if fresh != 0 {
                check(
                    14,
                    libc::mount(
                        c"/proc".as_ptr(),
                        self.proc_dir.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    )
                    .into(),
                )?;
            }
            check(7, libc::chdir(self.root.as_ptr()).into())?;
            check(7, libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()))?;
            check(7, libc::umount2(c".".as_ptr(), libc::MNT_DETACH).into())?;
            check(
                6,
                libc::mount(null, c"/".as_ptr(), null, self.root_remount_flags, std::ptr::null()).into(),
            )?;
            check(8, libc::chdir(self.cwd.as_ptr()).into())?;
        }
        // 3. Landlock.
        let ruleset = self.ruleset.take().ok_or((9, libc::EINVAL))?;
        match ruleset.restrict_self() {
            Ok(status) if status.ruleset != RulesetStatus::NotEnforced => {}
            Ok(_) => return Err((9, libc::ENOSYS)),
            Err(_) => return Err((9, libc::EPERM)),
        }
        // 4. Capabilities: empty the bounding set while CAP_SETPCAP is held.
        for cap in 0..64 {
            // SAFETY: prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
                let e = errno();
                if e == libc::EINVAL {
                    break; // past the last capability
                }
                return Err((10, e));
            }
        }
        // 5. uid/gid.
        if let Some(id) = self.run_as {
            // SAFETY: plain credential system calls.
            unsafe {
                check(11, libc::setgroups(0, std::ptr::null()).into())?;
                check(11, libc::setresgid(id, id, id).into())?;
                check(11, libc::setresuid(id, id, id).into())?;
            }
        }
        let header = CapHeader {
            version: CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        // SAFETY: capset reads the header and two data structs, both valid.
        check(12, unsafe {
            libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr())
        })?;
        prctl(12, libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL)?;
        // 6. no_new_privs, and die with the builder (after the uid change,
        // which clears the parent-death signal).
        prctl(13, libc::PR_SET_NO_NEW_PRIVS, 1)?;
        prctl(0, libc::PR_SET_PDEATHSIG, libc::SIGKILL)?;
        Ok(())
    }

    /// Runs in the child between fork and exec: applies the sandbox, and on
    /// failure reports the failed step through the error pipe.
    fn apply_in_child(&mut self) -> io::Result<()> {
        self.apply().map_err(|(step, e)| {
            let byte = [step];
            // SAFETY: writes one byte from a valid buffer to our pipe.
            unsafe { libc::write(self.error_pipe.as_raw_fd(), byte.as_ptr().cast(), 1) };
            io::Error::from_raw_os_error(e)
        })
    }
}

/// Spawns `cmd` in its own process group, collects its output, and kills
/// the whole group (cargo and every compiler it started) when `timeout`
/// passes first.
fn output_within(cmd: &mut Command, timeout: Duration) -> Result<std::process::Output, SandboxError> {
    use std::io::Read as _;
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().map_err(SandboxError::Spawn)?;
    let drain = |pipe: Option<Box<dyn io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn io::Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn io::Read + Send>));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(SandboxError::Spawn)? {
            break Some(status);
        }
        if start.elapsed() >= timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let status = match status {
        Some(status) => status,
        None => {
            // The child is not reaped yet, so its pid still names the group.
            if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: signals the process group we created for it.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
            let _ = child.wait();
            let _ = (stdout.join(), stderr.join());
            return Err(SandboxError::TimedOut {
                seconds: timeout.as_secs(),
            });
        }
    };
    Ok(std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Runs `program` with only the policy's environment and working directory,
/// without isolation: the explicit opt-out for kernels that refuse the
/// sandbox, for trusted sources.
pub fn run_unsandboxed(
    policy: &SandboxPolicy,
    program: &Path,
    args: &[OsString],
    timeout: Duration,
) -> Result<std::process::Output, SandboxError> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(policy.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&policy.cwd)
        .stdin(std::process::Stdio::null());
    output_within(&mut cmd, timeout)
}

/// Runs `program` with `args` in the sandbox of `policy`, collecting its
/// output; kills it and everything it started after `timeout`. Never runs
/// it unsandboxed: if any step fails, nothing is run.
pub fn run(
    policy: &SandboxPolicy,
    program: &Path,
    args: &[OsString],
    timeout: Duration,
) -> Result<std::process::Output, SandboxError> {
    let (mut prepared, read_end) = Prepared::new(policy)?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(policy.env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and only
    // makes system calls on data prepared above (paths as CStrings, the
    // Landlock ruleset fd, the error pipe).
    unsafe {
        cmd.pre_exec(move || prepared.apply_in_child());
    }
    let result = output_within(&mut cmd, timeout);
    drop(cmd); // closes our copy of the error pipe's write end
    match result {
        Err(SandboxError::Spawn(source)) => {
            let mut byte = [u8::MAX];
            // SAFETY: reads at most one byte into a valid buffer; the write
            // end is closed everywhere, so this does not block.
            let n = unsafe { libc::read(read_end.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
            match STEPS.get(usize::from(byte[0])) {
                Some(step) if n == 1 => Err(SandboxError::Apply { step, source }),
                _ => Err(SandboxError::Spawn(source)),
            }
        }
        other => other,
    }
}
