//! The policy of a language-backend worker (`microfaas-worker`): one
//! process per core running preloaded functions of one host as native calls.
//! Entered at the start of the worker, before any function is loaded or
//! initialised. The worker needs no filesystem at all: artifacts arrive as
//! sealed memfds over its catalog socket (`recvmsg` on that one fd), whose
//! seals it checks (`fcntl(F_GET_SEALS)`) before reading (`lseek`,
//! `pread64`) and mapping them with the runtime's loader.

use super::common::{base_allowlist, confined, worker_extras};
use super::origin::OriginFilter;
use super::seccomp::{
    Allowed, FilterError, SeccompPolicy, Violation, fcntl_get_seals, ioctl_on_fd, mprotect_no_exec, not_on_fd, on_fd,
};
use super::{Policy, SandboxSpec};
use crate::runtime::pagescan::PAGEMAP_SCAN;

/// The worker's policy for `spec`, for the process `pid` (itself), whose
/// catalog socket is `catalog_fd`.
pub fn policy(spec: &SandboxSpec, pid: u32, catalog_fd: i32) -> Result<Policy, FilterError> {
    policy_with_pagemap(spec, pid, catalog_fd, None)
}

/// [`policy`] for a worker that also holds `/proc/self/pagemap` open at
/// `pagemap_fd` (opened before the sandbox, by a process that may still
/// have had `CAP_SYS_ADMIN`: see `crate::runtime::pagescan`): on that fd
/// only `ioctl(PAGEMAP_SCAN)` (which reports page ranges and categories of
/// its own address space, never frame numbers, and with the flags the
/// worker uses changes nothing; write-protecting needs a userfaultfd
/// registration the worker cannot make), and no `pread64` (which would
/// read the pagemap's entries, frame numbers included for such an opener).
pub fn policy_with_pagemap(
    spec: &SandboxSpec,
    pid: u32,
    catalog_fd: i32,
    pagemap_fd: Option<i32>,
) -> Result<Policy, FilterError> {
    let layers = spec.settings.layers;
    let mut allowed = base_allowlist(pid)?;
    allowed.extend(worker_extras());
    allowed.extend([
        on_fd("recvmsg", libc::SYS_recvmsg, catalog_fd, "the catalog socket")?,
        fcntl_get_seals()?,
        Allowed::any("lseek", libc::SYS_lseek),
        Allowed::any("close", libc::SYS_close),
    ]);
    match pagemap_fd {
        Some(fd) => allowed.extend([
            not_on_fd("pread64", libc::SYS_pread64, fd, "the pagemap")?,
            ioctl_on_fd(
                "ioctl",
                libc::SYS_ioctl,
                fd,
                PAGEMAP_SCAN,
                "the pagemap, PAGEMAP_SCAN only",
            )?,
        ]),
        None => allowed.push(Allowed::any("pread64", libc::SYS_pread64)),
    }
    if layers.pkeys {
        // Keying an instance's memory (never executable, like mprotect).
        allowed.push(mprotect_no_exec("pkey_mprotect", libc::SYS_pkey_mprotect)?);
    }
    // A trap: the worker's SIGSYS handler ends the running function with
    // a policy violation and the worker serves on (the instance is
    // reloaded). The forbidden call never runs whatever the function
    // does with the signal (it may even install its own handler: that
    // only spoils its own request). The worker is not discarded: the
    // attacker had native code in it before the violation and could do
    // anything a violation would show without making one, so killing
    // the worker would stop only careless attackers; what holds is that
    // the worker serves one host and its sandbox, not its integrity, is
    // the boundary.
    let seccomp = layers.seccomp.then_some(SeccompPolicy {
        allowed,
        violation: Violation::Trap,
        refused: Vec::new(),
    });
    // With keys and seccomp: memory-layout and signal calls only from the
    // code mapped now (before any function), see `super::origin`. If
    // /proc/self/maps is unreadable the worker goes without (and says so
    // in its policy text).
    let origin = (layers.pkeys && layers.seccomp)
        .then(OriginFilter::of_this_process)
        .and_then(Result::ok);
    // A private mount namespace: once per worker, off every request's path.
    let mut policy = confined("language worker", spec, true, seccomp);
    policy.origin = origin;
    Ok(policy)
}
