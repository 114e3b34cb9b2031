//! The policy of a language-backend worker (`microfaas-worker`): one
//! process per core running preloaded functions of one host as native calls.
//! Entered at the start of the worker, before any function is loaded or
//! initialised.
//!
//! Stage one (until artifacts arrive as sealed memfds): the worker still
//! `dlopen`s artifacts on cold starts and deploys, so it may open files
//! read-only, where Landlock allows reading regular files and the sandbox
//! uid decides which (not the host's private files).

use super::common::base_allowlist;
use super::seccomp::{Allowed, FilterError, SeccompPolicy, Violation, openat_read_only};
use super::{FsAccess, Identity, LandlockPolicy, Namespaces, Policy, SandboxSpec};

/// The worker's policy for `spec`, for the process `pid` (itself).
pub fn policy(spec: &SandboxSpec, pid: u32) -> Result<Policy, FilterError> {
    let layers = spec.settings.layers;
    let mut allowed = base_allowlist(pid)?;
    // dlopen / dlclose of artifacts after start (stage one).
    allowed.extend([
        openat_read_only()?,
        Allowed::any("read", libc::SYS_read),
        Allowed::any("pread64", libc::SYS_pread64),
        Allowed::any("lseek", libc::SYS_lseek),
        Allowed::any("fstat", libc::SYS_fstat),
        Allowed::any("newfstatat", libc::SYS_newfstatat),
        Allowed::any("statx", libc::SYS_statx),
        Allowed::any("close", libc::SYS_close),
    ]);
    Ok(Policy {
        kind: "language worker",
        namespaces: layers.namespaces.then(|| Namespaces {
            join_net: spec.netns.clone(),
            join_ipc: spec.ipcns.clone(),
            own_mount: true,
        }),
        landlock: layers.landlock.then_some(LandlockPolicy {
            fs: FsAccess::ReadFilesOnly,
            deny_tcp: true,
            scoped: true,
        }),
        identity: layers.identity.then_some(Identity {
            uid: spec.settings.uid,
            gid: spec.settings.gid,
        }),
        no_new_privs: true,
        // A trap: the worker's SIGSYS handler ends the running function with
        // a policy violation and the worker serves on.
        seccomp: layers.seccomp.then_some(SeccompPolicy {
            allowed,
            violation: Violation::Trap,
        }),
    })
}
