//! Applying a [`SandboxPolicy`]: everything prepared before fork (the
//! skeleton root, mount flags, the Landlock ruleset), then one function that
//! runs in the child between fork and exec, step by step in a fixed order,
//! and the runners that spawn the sandboxed process with a time limit.

use super::{MountAccess, SandboxPolicy};
use landlock::{
    ABI, Access as _, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope,
};
use std::ffi::{CString, OsString};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

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
