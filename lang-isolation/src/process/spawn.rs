//! Starting a runner process through `microfaas-ipc`'s spawner
//! (`posix_spawn`: vfork + exec, safe in a multithreaded host), its shared
//! region at fd 3 and its artifact memfd at fd 4 (see
//! [`crate::runtime::fds`]), stdin and stdout on `/dev/null`, no other fd
//! above 2 (even ones the host left inheritable), no inherited ignored
//! signals and an empty signal mask.

pub use crate::runtime::fds::{RUNNER_ARTIFACT_FD, SHM_FD};
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
/// sealed memfd) as its fd [`RUNNER_ARTIFACT_FD`], to enter the sandbox
/// `sandbox` (a `--sandbox` value). The caller must reap it.
pub fn spawn_runner(
    runner_bin: &Path,
    shm: BorrowedFd<'_>,
    artifact: BorrowedFd<'_>,
    mode: RunnerMode,
    sandbox: &str,
) -> io::Result<Child> {
    let mode_arg = match mode {
        RunnerMode::Warm => "--warm",
        RunnerMode::Once => "--once",
    };
    let args = [OsStr::new("--sandbox"), OsStr::new(sandbox), OsStr::new(mode_arg)];
    Child::spawn(runner_bin, &args, &[], &[(shm, SHM_FD), (artifact, RUNNER_ARTIFACT_FD)])
}
