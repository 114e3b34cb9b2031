//! Starting a runner process with `posix_spawn` (vfork + exec, safe in a
//! multithreaded host), its shared region at fd 3 and its artifact memfd at
//! fd 4 (see [`crate::runtime::fds`]), stdin and stdout on `/dev/null`, no
//! other fd above 2 (even ones the host left inheritable), no inherited
//! ignored signals and an empty signal mask.

pub use crate::runtime::fds::{RUNNER_ARTIFACT_FD, SHM_FD};
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Signals whose ignored disposition a runner must not inherit.
const INHERITABLE_IGNORES: [libc::c_int; 9] = [
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

/// How the runner serves requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerMode {
    /// Serve requests until killed.
    Warm,
    /// Serve the one request already posted, then exit.
    Once,
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in an argument"))
}

/// `dup2` actions `(source, target)` for a child, and the temporary
/// duplicates they use (close them after the spawn).
pub(crate) type ChildFds = (Vec<(RawFd, RawFd)>, Vec<OwnedFd>);

/// The fds a child gets: `(source in this process, number in the child)`.
/// A source whose number is one of the targets is first duplicated above
/// them (close-on-exec), so that no `dup2` clobbers a later source; the
/// duplicates are closed when the returned value drops.
pub(crate) fn child_fds(pairs: &[(BorrowedFd<'_>, RawFd)]) -> io::Result<ChildFds> {
    let highest = pairs.iter().map(|&(_, dst)| dst).max().unwrap_or(0);
    let mut actions = Vec::with_capacity(pairs.len());
    let mut temporaries = Vec::new();
    for &(src, dst) in pairs {
        let mut raw = src.as_raw_fd();
        if pairs.iter().any(|&(_, d)| d == raw) {
            // SAFETY: F_DUPFD_CLOEXEC duplicates a valid fd we borrow; the
            // new fd is owned below.
            let dup = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, highest + 1) };
            if dup < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `dup` is a fresh fd nothing else owns.
            temporaries.push(unsafe { OwnedFd::from_raw_fd(dup) });
            raw = dup;
        }
        actions.push((raw, dst));
    }
    Ok((actions, temporaries))
}

/// Spawns `runner_bin` with `shm` as its fd [`SHM_FD`] and `artifact` (a
/// sealed memfd) as its fd [`RUNNER_ARTIFACT_FD`], to enter the sandbox
/// `sandbox` (a `--sandbox` value). Returns its pid; the caller must reap it.
pub fn spawn_runner(
    runner_bin: &Path,
    shm: BorrowedFd<'_>,
    artifact: BorrowedFd<'_>,
    mode: RunnerMode,
    sandbox: &str,
) -> io::Result<libc::pid_t> {
    let mode_arg = match mode {
        RunnerMode::Warm => "--warm",
        RunnerMode::Once => "--once",
    };
    let args = [
        cstring(runner_bin.as_os_str())?,
        cstring(OsStr::new("--sandbox"))?,
        cstring(OsStr::new(sandbox))?,
        cstring(OsStr::new(mode_arg))?,
    ];
    let (fds, _temporaries) = child_fds(&[(shm, SHM_FD), (artifact, RUNNER_ARTIFACT_FD)])?;
    let mut argv: Vec<*mut libc::c_char> = args.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv.push(std::ptr::null_mut());
    let program = &args[0];

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
    // for the call (CStrings and argv outlive it); the child gets each source
    // fd duplicated to its number (dup2 clears close-on-exec on the copy
    // only; `child_fds` made sure no source is another's target).
    unsafe {
        // Exec resets caught signals anyway; only ignored ones survive it.
        // Reset the ones a host may ignore (Rust ignores SIGPIPE) rather than
        // all 64, which costs a syscall each in the child.
        let mut sigs = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(sigs.as_mut_ptr());
        for sig in INHERITABLE_IGNORES {
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
            for &(src, dst) in &fds {
                check(libc::posix_spawn_file_actions_adddup2(actions, src, dst))?;
            }
            // Nothing else of the host's (fds it left inheritable).
            check(libc::posix_spawn_file_actions_addclosefrom_np(
                actions,
                RUNNER_ARTIFACT_FD.max(SHM_FD) + 1,
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
                environ_ptr(),
            ))
            .map(|()| pid)
        });
        libc::posix_spawn_file_actions_destroy(actions);
        libc::posix_spawnattr_destroy(attr);
        spawned
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

unsafe extern "C" {
    static environ: *const *mut libc::c_char;
}

fn environ_ptr() -> *const *mut libc::c_char {
    // SAFETY: reading libc's `environ` pointer; posix_spawn copies the
    // environment during the call (Rust's std guards env changes with a lock
    // we cannot take, a documented limitation of posix_spawn users).
    unsafe { environ }
}
