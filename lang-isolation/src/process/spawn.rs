//! Starting a runner process through `microfaas-ipc`'s spawner
//! (`posix_spawn`: vfork + exec, safe in a multithreaded host), its shared
//! region at fd 3, its artifact memfd at fd 4 and its module's at fd 5, if
//! the function has one (see
//! [`crate::runtime::fds`]), stdin and stdout on `/dev/null`, no other fd
//! above 2 (even ones the host left inheritable), no inherited ignored
//! signals and an empty signal mask.

pub use crate::runtime::fds::{RUNNER_ARTIFACT_FD, RUNNER_MODULE_FD, SHM_FD};
use ipc::spawn::Child;
use std::ffi::OsStr;
use std::io;
use std::os::fd::BorrowedFd;
use std::path::Path;

/// How the runner serves requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerMode {
    /// Serve requests until killed.
    Warm,
    /// Serve the one request already posted, then exit.
    Once,
}

/// Spawns `runner_bin` with `shm` as its fd [`SHM_FD`] and `artifact` (a
/// sealed memfd) as its fd [`RUNNER_ARTIFACT_FD`] (and `module`, if given,
/// as [`RUNNER_MODULE_FD`], with `--module`), to enter the sandbox
/// `sandbox` (a `--sandbox` value). The caller must reap it.
pub fn spawn_runner(
    runner_bin: &Path,
    shm: BorrowedFd<'_>,
    artifact: BorrowedFd<'_>,
    module: Option<BorrowedFd<'_>>,
    mode: RunnerMode,
    sandbox: &str,
) -> io::Result<Child> {
    let mode_arg = match mode {
        RunnerMode::Warm => "--warm",
        RunnerMode::Once => "--once",
    };
    let mut args = vec![OsStr::new("--sandbox"), OsStr::new(sandbox)];
    let mut fds = vec![(shm, SHM_FD), (artifact, RUNNER_ARTIFACT_FD)];
    if let Some(module) = module {
        args.push(OsStr::new("--module"));
        fds.push((module, RUNNER_MODULE_FD));
    }
    args.push(OsStr::new(mode_arg));
    Child::spawn(runner_bin, &args, &[], &fds)
}
