//! Starting an exec'd child with `posix_spawn` (vfork + exec: safe in a
//! multithreaded parent, nothing runs between fork and exec but libc), and
//! the parent's handle on it: a pidfd for signals and death detection that
//! cannot hit a recycled pid, reaping, and the exit status in words.
//!
//! What the child gets: the `(source, number)` fds asked for at exactly
//! those numbers, stdin and stdout on `/dev/null`, the parent's stderr, and
//! no other fd (every number above 2 not asked for is closed in the child,
//! even fds the parent left inheritable); the signals a parent commonly
//! ignores reset to their defaults ([`RESET_SIGNALS`]); an empty signal
//! mask; the parent's environment with the given variables set over it.
//!
//! Dying with the parent: `PR_SET_PDEATHSIG` fires when the parent
//! *thread* that spawned the child exits, which in a multithreaded host
//! (respawns run on short-lived threads) kills healthy children. So the
//! children of this crate instead note their parent at start-up and check
//! it whenever a futex wait times out ([`ParentWatch`]): a child parked on
//! its region exits within its park timeout of its parent's death.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

/// Signals whose ignored disposition a child must not inherit (exec resets
/// caught signals anyway; only ignored ones survive it). Rust ignores
/// `SIGPIPE`; shells and supervisors ignore the others. Not all 64: each
/// costs a system call in the child.
pub const RESET_SIGNALS: [libc::c_int; 9] = [
    libc::SIGPIPE,
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGCHLD,
];

/// `dup2` actions `(source, target)` for a child, and the temporary
/// duplicates they use (close them after the spawn).
#[derive(Debug)]
pub struct ChildFds {
    /// `(fd in this process, number in the child)`, in order.
    pub actions: Vec<(RawFd, RawFd)>,
    /// Close-on-exec duplicates the actions read from; keep them until the
    /// child has been spawned.
    pub temporaries: Vec<OwnedFd>,
    /// Numbers between 3 and the highest target that are no target: closed
    /// in the child after the `dup2`s (usually none: targets 3, 4, ...).
    pub gaps: Vec<RawFd>,
    /// The lowest fd number the child must not inherit.
    pub first_unused: RawFd,
}

/// The highest fd number a child may be given (gaps below it cost the
/// child a `close` each).
pub const MAX_CHILD_FD: RawFd = 1023;

/// The fds a child gets: `(source in this process, number in the child)`,
/// numbers distinct, 3 to [`MAX_CHILD_FD`]. A source whose number is one of the targets is first duplicated above
/// them (close-on-exec), so that no `dup2` clobbers a later source.
pub fn child_fds(pairs: &[(BorrowedFd<'_>, RawFd)]) -> io::Result<ChildFds> {
    let highest = pairs.iter().map(|&(_, dst)| dst).max().unwrap_or(2).max(2);
    let first_unused = highest
        .checked_add(1)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "fd number too large"))?;
    if pairs.iter().any(|&(_, dst)| !(3..=MAX_CHILD_FD).contains(&dst)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a child's fds are numbered 3 to MAX_CHILD_FD (0-2 are its stdin, stdout and stderr)",
        ));
    }
    for (i, &(_, dst)) in pairs.iter().enumerate() {
        if pairs.iter().skip(i + 1).any(|&(_, d)| d == dst) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fd {dst} given twice"),
            ));
        }
    }
    let gaps = (3..first_unused)
        .filter(|n| !pairs.iter().any(|&(_, d)| d == *n))
        .collect();
    let mut actions = Vec::with_capacity(pairs.len());
    let mut temporaries = Vec::new();
    for &(src, dst) in pairs {
        let mut raw = src.as_raw_fd();
        if pairs.iter().any(|&(_, d)| d == raw) {
            // SAFETY: F_DUPFD_CLOEXEC duplicates a valid fd we borrow; the
            // new fd is owned below.
            let dup = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, first_unused) };
            if dup < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `dup` is a fresh fd nothing else owns.
            temporaries.push(unsafe { OwnedFd::from_raw_fd(dup) });
            raw = dup;
        }
        actions.push((raw, dst));
    }
    Ok(ChildFds {
        actions,
        temporaries,
        gaps,
        first_unused,
    })
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in an argument"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// `KEY=VALUE` strings: the parent's environment with `overrides` set.
fn environment(overrides: &[(&OsStr, &OsStr)]) -> io::Result<Vec<CString>> {
    let mut out = Vec::new();
    for (k, v) in std::env::vars_os() {
        if overrides.iter().any(|&(o, _)| o == k.as_os_str()) {
            continue;
        }
        let mut kv = k.into_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        // A variable with a NUL byte cannot exist in an environment.
        if let Ok(c) = CString::new(kv) {
            out.push(c);
        }
    }
    for &(k, v) in overrides {
        if k.is_empty() || k.as_bytes().contains(&b'=') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad environment variable name",
            ));
        }
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        out.push(
            CString::new(kv).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in the environment"))?,
        );
    }
    Ok(out)
}

fn null_terminated(v: &[CString]) -> Vec<*mut libc::c_char> {
    v.iter()
        .map(|c| c.as_ptr().cast_mut())
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect()
}

/// The soft and hard `RLIMIT_NOFILE` of a child after
/// [`Child::raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoFileLimit {
    /// The soft limit now.
    pub soft: u64,
    /// The hard limit (the ceiling of `soft`).
    pub hard: u64,
    /// Whether the soft limit asked for was above the hard limit (and was
    /// cut to it).
    pub hard_limit_binds: bool,
}

/// One exec'd child. Dropping it kills and reaps it (blocking: hand it to a
/// reaper thread first where that matters).
#[derive(Debug)]
pub struct Child {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    status: Option<ExitStatus>,
}

impl Child {
    /// Spawns `binary` (a path, not searched in `PATH`) with `args` (after
    /// `argv[0]`, which is `binary`), the parent's environment with `env`
    /// set over it, and each `(fd, number)` of `fds` at that number (3 or
    /// more). See the module doc for everything else the child gets.
    pub fn spawn(
        binary: &Path,
        args: &[&OsStr],
        env: &[(&OsStr, &OsStr)],
        fds: &[(BorrowedFd<'_>, RawFd)],
    ) -> io::Result<Self> {
        let program = cstring(binary.as_os_str())?;
        let mut argv_c = vec![program.clone()];
        for a in args {
            argv_c.push(cstring(a)?);
        }
        let envp_c = environment(env)?;
        let argv = null_terminated(&argv_c);
        let envp = null_terminated(&envp_c);
        let child_fds = child_fds(fds)?;
        let pid = posix_spawn(&program, &argv, &envp, &child_fds)?;
        drop(child_fds);
        // SAFETY: pidfd_open on our own unreaped child: its pid cannot have
        // been recycled; the fd returned is owned below.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if raw < 0 {
            let e = io::Error::last_os_error();
            // SAFETY: killing and reaping our own child, which nothing else
            // knows of yet.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            return Err(e);
        }
        let raw = RawFd::try_from(raw).map_err(|_| io::Error::other("pidfd out of range"))?;
        // SAFETY: a fresh fd nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self {
            pid,
            pidfd,
            status: None,
        })
    }

    /// Its pid (never recycled while this value has not reaped it).
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Its pidfd: readable (`poll`) once the child has exited. Hand a
    /// duplicate to a [`crate::watch::DeathWatch`].
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// How it ended, once reaped.
    pub fn status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// Whether it is still running (non-blocking; does not reap).
    pub fn is_alive(&self) -> bool {
        self.status.is_none() && !pidfd_exited(self.pidfd.as_fd())
    }

    /// Sends `signal` through the pidfd (a no-op once reaped).
    pub fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        // SAFETY: pidfd_send_signal with our pidfd, no siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            let e = io::Error::last_os_error();
            // ESRCH: it has exited (a zombie until reaped): nothing to do.
            if e.raw_os_error() == Some(libc::ESRCH) {
                Ok(())
            } else {
                Err(e)
            }
        }
    }

    /// Reaps it if it has exited (non-blocking).
    pub fn try_reap(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = waitid(self.pidfd.as_fd(), libc::WNOHANG)?;
        }
        Ok(self.status)
    }

    /// Waits for it to exit and reaps it.
    pub fn reap(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(s) = self.status {
                return Ok(s);
            }
            self.status = waitid(self.pidfd.as_fd(), 0)?;
        }
    }

    /// Kills it (`SIGKILL`) unless reaped already, and reaps it.
    pub fn kill_and_reap(&mut self) -> io::Result<ExitStatus> {
        self.signal(libc::SIGKILL)?;
        self.reap()
    }

    /// Raises its `RLIMIT_NOFILE` soft limit to `soft` (`None`: to the hard
    /// limit), from this process (`prlimit`), so the child makes no system
    /// call for it. Call it right after the spawn, before the child is
    /// given work that needs the fds.
    pub fn raise_nofile(&self, soft: Option<u64>) -> io::Result<NoFileLimit> {
        let mut old = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reading the limit of our own child into `old`.
        if unsafe { libc::prlimit64(self.pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let want = soft.unwrap_or(old.rlim_max);
        let limit = NoFileLimit {
            soft: want.min(old.rlim_max).max(old.rlim_cur),
            hard: old.rlim_max,
            hard_limit_binds: want > old.rlim_max,
        };
        if limit.soft != old.rlim_cur {
            let new = libc::rlimit64 {
                rlim_cur: limit.soft,
                rlim_max: old.rlim_max,
            };
            // SAFETY: setting the limit of our own child from `new`.
            if unsafe { libc::prlimit64(self.pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(limit)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.kill_and_reap();
        }
    }
}

/// Whether the process behind `pidfd` has exited (a zero-timeout poll).
pub fn pidfd_exited(pidfd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on this stack, no timeout.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    rc > 0 && p.revents != 0
}

/// `waitid(P_PIDFD, WEXITED | extra)`; `None` when `WNOHANG` found it
/// running. Retries on `EINTR`.
fn waitid(pidfd: BorrowedFd<'_>, extra: libc::c_int) -> io::Result<Option<ExitStatus>> {
    let id = libc::id_t::try_from(pidfd.as_raw_fd()).map_err(|_| io::Error::other("bad pidfd"))?;
    loop {
        // SAFETY: an all-zero siginfo_t is valid (si_pid 0 = nothing).
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waiting on our own child's pidfd; `info` is writable.
        let rc = unsafe { libc::waitid(libc::P_PIDFD, id, &mut info, libc::WEXITED | extra) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        // SAFETY: waitid filled `info` (or left it zero under WNOHANG).
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        return Ok(Some(ExitStatus::from_raw(wait_status(info.si_code, status))));
    }
}

/// The `waitpid`-style status word of a `waitid` result (pure).
pub fn wait_status(si_code: libc::c_int, si_status: libc::c_int) -> libc::c_int {
    match si_code {
        libc::CLD_EXITED => (si_status & 0xff) << 8,
        libc::CLD_KILLED => si_status & 0x7f,
        libc::CLD_DUMPED => (si_status & 0x7f) | 0x80,
        _ => 0xffff,
    }
}

/// An exit status in words, with `role` naming the child ("runner killed
/// by signal 9 (Killed)", "runner exited with status 3", "runner vanished"
/// for `None`).
pub fn describe_status(role: &str, status: Option<ExitStatus>) -> String {
    match status {
        Some(s) => match (s.signal(), s.code()) {
            (Some(sig), _) => format!("{role} killed by signal {sig} ({})", signal_name(sig)),
            (None, Some(code)) => format!("{role} exited with status {code}"),
            (None, None) => format!("{role} ended with wait status {:#x}", s.into_raw()),
        },
        None => format!("{role} vanished"),
    }
}

/// The C library's description of `signal` ("Killed").
pub fn signal_name(signal: libc::c_int) -> String {
    // SAFETY: strsignal returns a pointer to a static or thread-local
    // string for any signal number; copied out at once.
    let p = unsafe { libc::strsignal(signal) };
    if p.is_null() {
        return format!("signal {signal}");
    }
    // SAFETY: non-null and NUL-terminated (strsignal's contract).
    unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// The parent as a child saw it at start-up, to notice its death (see the
/// module doc on why not `PR_SET_PDEATHSIG`): once the parent is gone the
/// child is re-parented and `getppid` changes.
#[derive(Debug, Clone, Copy)]
pub struct ParentWatch {
    parent: libc::pid_t,
}

impl ParentWatch {
    /// Notes the current parent. Call it first thing in the child.
    pub fn now() -> Self {
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() };
        Self { parent }
    }

    /// The parent's pid.
    pub fn parent(&self) -> libc::pid_t {
        self.parent
    }

    /// Whether the parent noted is still the parent.
    pub fn parent_alive(&self) -> bool {
        // SAFETY: getppid has no preconditions.
        unsafe { libc::getppid() == self.parent }
    }
}

fn posix_spawn(
    program: &CString,
    argv: &[*mut libc::c_char],
    envp: &[*mut libc::c_char],
    fds: &ChildFds,
) -> io::Result<libc::pid_t> {
    let mut actions = std::mem::MaybeUninit::<libc::posix_spawn_file_actions_t>::uninit();
    let mut attr = std::mem::MaybeUninit::<libc::posix_spawnattr_t>::uninit();
    // SAFETY: initialising the two objects in place; each is destroyed below
    // once initialised, whatever happens in between.
    unsafe {
        check(libc::posix_spawn_file_actions_init(actions.as_mut_ptr()))?;
        if let Err(e) = check(libc::posix_spawnattr_init(attr.as_mut_ptr())) {
            libc::posix_spawn_file_actions_destroy(actions.as_mut_ptr());
            return Err(e);
        }
    }
    let actions = actions.as_mut_ptr();
    let attr = attr.as_mut_ptr();
    let devnull = c"/dev/null";
    // SAFETY: `actions`/`attr` are initialised; every pointer passed is valid
    // for the call (the CStrings behind argv and envp, which are
    // NUL-terminated arrays, outlive it); the child gets each source fd
    // duplicated to its number (dup2 clears close-on-exec on the copy only;
    // `child_fds` made sure no source is another's target).
    unsafe {
        let mut sigs = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(sigs.as_mut_ptr());
        for sig in RESET_SIGNALS {
            libc::sigaddset(sigs.as_mut_ptr(), sig);
        }
        let defaults = sigs.assume_init();
        let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(empty.as_mut_ptr());
        let empty = empty.assume_init();
        let flags = libc::POSIX_SPAWN_SETSIGDEF | libc::POSIX_SPAWN_SETSIGMASK;
        let setup = (|| -> io::Result<()> {
            check(libc::posix_spawnattr_setflags(
                attr,
                libc::c_short::try_from(flags).unwrap_or(0),
            ))?;
            check(libc::posix_spawnattr_setsigdefault(attr, &defaults))?;
            check(libc::posix_spawnattr_setsigmask(attr, &empty))?;
            for &(src, dst) in &fds.actions {
                check(libc::posix_spawn_file_actions_adddup2(actions, src, dst))?;
            }
            // Nothing else of the parent's (fds it left inheritable). After
            // the dup2s, so a source at a gap number has been copied; glibc
            // ignores closing a number that is not open.
            for &gap in &fds.gaps {
                check(libc::posix_spawn_file_actions_addclose(actions, gap))?;
            }
            check(libc::posix_spawn_file_actions_addclosefrom_np(
                actions,
                fds.first_unused,
            ))?;
            check(libc::posix_spawn_file_actions_addopen(
                actions,
                0,
                devnull.as_ptr(),
                libc::O_RDONLY,
                0,
            ))?;
            check(libc::posix_spawn_file_actions_addopen(
                actions,
                1,
                devnull.as_ptr(),
                libc::O_WRONLY,
                0,
            ))?;
            Ok(())
        })();
        let spawned = setup.and_then(|()| {
            let mut pid: libc::pid_t = 0;
            check(libc::posix_spawn(
                &mut pid,
                program.as_ptr(),
                actions,
                attr,
                argv.as_ptr(),
                envp.as_ptr(),
            ))
            .map(|()| pid)
        });
        libc::posix_spawn_file_actions_destroy(actions);
        libc::posix_spawnattr_destroy(attr);
        spawned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, env: &[(&OsStr, &OsStr)]) -> Child {
        Child::spawn(Path::new("/bin/sh"), &[OsStr::new("-c"), OsStr::new(script)], env, &[]).unwrap()
    }

    #[test]
    fn exit_codes_and_signals_in_words() {
        let mut c = sh("exit 3", &[]);
        let s = c.reap().unwrap();
        assert_eq!(s.code(), Some(3));
        assert_eq!(describe_status("runner", Some(s)), "runner exited with status 3");
        assert!(!c.is_alive());
        let mut c = sh("sleep 30", &[]);
        assert!(c.is_alive());
        assert_eq!(c.try_reap().unwrap(), None);
        let s = c.kill_and_reap().unwrap();
        assert_eq!(s.signal(), Some(libc::SIGKILL));
        assert_eq!(describe_status("runner", Some(s)), "runner killed by signal 9 (Killed)");
        assert_eq!(s.to_string(), "signal: 9 (SIGKILL)");
        assert_eq!(describe_status("worker", None), "worker vanished");
        // Signalling or killing a reaped child is a no-op.
        c.signal(libc::SIGKILL).unwrap();
        assert_eq!(c.kill_and_reap().unwrap(), s);
    }

    #[test]
    fn wait_status_words() {
        assert_eq!(ExitStatus::from_raw(wait_status(libc::CLD_EXITED, 7)).code(), Some(7));
        assert_eq!(
            ExitStatus::from_raw(wait_status(libc::CLD_KILLED, 11)).signal(),
            Some(11)
        );
        let dumped = ExitStatus::from_raw(wait_status(libc::CLD_DUMPED, 6));
        assert_eq!(dumped.signal(), Some(6));
        assert!(dumped.core_dumped());
    }

    #[test]
    fn the_environment_is_inherited_with_overrides() {
        let mut c = sh(
            r#"test "$IPC_TEST_VAR" = "a b" && test -n "$PATH""#,
            &[(OsStr::new("IPC_TEST_VAR"), OsStr::new("a b"))],
        );
        assert_eq!(c.reap().unwrap().code(), Some(0));
        assert!(environment(&[(OsStr::new("A=B"), OsStr::new("x"))]).is_err());
    }

    #[test]
    fn ignored_signals_and_the_mask_are_reset() {
        // The test harness ignores SIGPIPE (Rust's runtime does): the child
        // must not. Only the standard signals count: glibc keeps its two
        // internal real-time signals (32, 33) to itself.
        let mut c = Child::spawn(Path::new("/bin/sleep"), &[OsStr::new("30")], &[], &[]).unwrap();
        let status = std::fs::read_to_string(format!("/proc/{}/status", c.pid())).unwrap();
        let mask = |name: &str| {
            let line = status.lines().find(|l| l.starts_with(name)).unwrap();
            u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
        };
        assert_eq!(mask("SigIgn:") & 0x7fff_ffff, 0, "{status}");
        assert_eq!(mask("SigBlk:"), 0, "{status}");
        c.kill_and_reap().unwrap();
    }

    #[test]
    fn fds_below_3_and_missing_binaries_are_refused() {
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(child_fds(&[(null.as_fd(), 2)]).is_err());
        assert!(Child::spawn(Path::new("/nonexistent/ipc"), &[], &[], &[]).is_err());
    }

    #[test]
    fn a_source_at_a_target_number_is_moved_out_of_the_way() {
        let a = std::fs::File::open("/dev/null").unwrap();
        let b = std::fs::File::open("/dev/null").unwrap();
        let target = a.as_raw_fd();
        let fds = child_fds(&[(b.as_fd(), 3), (a.as_fd(), target.max(4))]).unwrap();
        for &(src, _) in &fds.actions {
            assert!(!fds.actions.iter().any(|&(_, d)| d == src), "{:?}", fds.actions);
        }
        assert_eq!(fds.first_unused, target.max(4) + 1);
        assert_eq!(fds.gaps, (4..target.max(4)).collect::<Vec<_>>());
        assert!(child_fds(&[(a.as_fd(), 3), (b.as_fd(), 3)]).is_err());
        assert!(child_fds(&[(a.as_fd(), MAX_CHILD_FD + 1)]).is_err());
        assert_eq!(child_fds(&[]).unwrap().first_unused, 3);
    }

    #[test]
    fn the_nofile_limit_is_raised_to_the_hard_limit() {
        let mut c = sh("sleep 30", &[]);
        let l = c.raise_nofile(None).unwrap();
        assert_eq!(l.soft, l.hard);
        assert!(!l.hard_limit_binds);
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", c.pid())).unwrap();
        let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
        assert!(
            line.split_whitespace().filter(|w| *w == l.hard.to_string()).count() == 2,
            "{line}"
        );
        if l.hard < u64::MAX {
            assert!(c.raise_nofile(Some(l.hard + 1)).unwrap().hard_limit_binds);
        }
        c.kill_and_reap().unwrap();
    }

    #[test]
    fn a_parent_watch_sees_its_parent() {
        let w = ParentWatch::now();
        assert!(w.parent_alive());
        assert_eq!(i64::from(w.parent()), i64::from(std::os::unix::process::parent_id()));
    }
}
