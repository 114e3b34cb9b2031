//! The file descriptors a sandboxed child of this crate inherits, at fixed
//! numbers (one place, for the spawners and for the sandbox policies).
//!
//! | process            | fd | what                                                        |
//! |--------------------|----|-------------------------------------------------------------|
//! | worker, runner     | 0-2 | stdin, stdout on `/dev/null`; stderr inherited              |
//! | worker, runner     | 3  | [`SHM_FD`]: the shared-region memfd; **closed** once mapped  |
//! | runner             | 4  | [`RUNNER_ARTIFACT_FD`]: the artifact, a sealed memfd; **closed** once mapped |
//! | runner (`--module`) | 5 | [`RUNNER_MODULE_FD`]: the function's module, a sealed memfd; **closed** once read |
//! | worker             | 4  | [`WORKER_SOCKET_FD`]: `AF_UNIX` `SOCK_SEQPACKET` socket; artifacts arrive on it as sealed memfds (`SCM_RIGHTS`, one per message) |
//!
//! Nothing else is inherited: both are spawned by `ipc::spawn::Child`
//! (`posix_spawn`), which closes every fd above the last it passes in the child
//! (`posix_spawn_file_actions_addclosefrom_np`), even ones the host left
//! inheritable. stderr (fd 2) is the host's own, shared
//! for diagnostics; the sandbox may want to replace it with a pipe. Once
//! started, a worker holds only fds 0-2, its socket, the sealed
//! artifact memfds it received (at any free number, 3 included), and its
//! own image arena (a memfd it made before its sandbox, sealed with
//! `F_SEAL_FUTURE_WRITE` once its one writable view was mapped: see
//! `super::prelinked`); a runner
//! that has loaded its function holds only 0-2. No fd a started worker or runner holds
//! is writable and mappable: the shared region is mapped before the
//! sandbox's seccomp filter matters and its fd closed, and a memfd sealed
//! with [`super::REQUIRED_SEALS`] cannot be mapped writable-shared or grown.
//! Each checks the seals of every artifact fd it receives.

use std::os::fd::RawFd;

/// Worker and runner: the shared-region memfd (closed after mapping).
pub const SHM_FD: RawFd = 3;
/// Runner: its artifact's sealed memfd (closed once mapped).
pub const RUNNER_ARTIFACT_FD: RawFd = 4;
/// Runner of a function deployed with a module: the module's sealed memfd
/// (closed once read).
pub const RUNNER_MODULE_FD: RawFd = 5;
/// Worker: the socket artifact memfds arrive on (`SCM_RIGHTS`).
pub const WORKER_SOCKET_FD: RawFd = 4;
