//! The part of the seccomp allowlist every sandboxed process needs: parking
//! and clocks, its own signal handling, its own memory under W^X, stderr,
//! exit. Each allowed call lengthens the filter every sandboxed start
//! attaches (a few instructions, ~0.13 us each), so a process gets only
//! what it makes after entering the sandbox.

use super::seccomp::{
    Allowed, FilterError, SeccompPolicy, futex_wait_wake, mmap_w_xor_x, mprotect_no_exec, on_fd, tgkill_self,
};
use super::{Identity, LandlockPolicy, Namespaces, Policy, SandboxSpec};

/// The calls both kinds of sandboxed process make after start-up.
pub(super) fn base_allowlist(pid: u32) -> Result<Vec<Allowed>, FilterError> {
    Ok(vec![
        // parking on shared memory, clocks (the vDSO falls back to the
        // system call on some clock sources), the parent check
        futex_wait_wake()?,
        Allowed::any("clock_gettime", libc::SYS_clock_gettime),
        Allowed::any("getppid", libc::SYS_getppid),
        Allowed::any("getpid", libc::SYS_getpid),
        Allowed::any("gettid", libc::SYS_gettid),
        // its own signals: handlers, masks, re-raising a fatal one at itself
        Allowed::any("rt_sigreturn", libc::SYS_rt_sigreturn),
        Allowed::any("rt_sigprocmask", libc::SYS_rt_sigprocmask),
        Allowed::any("rt_sigaction", libc::SYS_rt_sigaction),
        Allowed::any("restart_syscall", libc::SYS_restart_syscall),
        tgkill_self(pid)?,
        // memory: heaps, stacks, the loader's mappings, W^X
        mmap_w_xor_x()?,
        mprotect_no_exec("mprotect", libc::SYS_mprotect)?,
        Allowed::any("munmap", libc::SYS_munmap),
        Allowed::any("madvise", libc::SYS_madvise),
        Allowed::any("brk", libc::SYS_brk),
        // diagnostics, exit
        on_fd("write", libc::SYS_write, libc::STDERR_FILENO, "stderr")?,
        Allowed::any("exit_group", libc::SYS_exit_group),
    ])
}

/// What a language worker adds: it loads artifacts after start (a thread's
/// signal stack for new instances, realloc of the catalog's maps) and
/// sleeps or yields while idle.
pub(super) fn worker_extras() -> Vec<Allowed> {
    vec![
        Allowed::any("sigaltstack", libc::SYS_sigaltstack),
        Allowed::any("mremap", libc::SYS_mremap),
        Allowed::any("clock_nanosleep", libc::SYS_clock_nanosleep),
        Allowed::any("nanosleep", libc::SYS_nanosleep),
        Allowed::any("sched_yield", libc::SYS_sched_yield),
        Allowed::any("exit", libc::SYS_exit),
    ]
}

/// A policy of `kind` with the layers every sandboxed process shares, each
/// on as `spec` says: the host's net and ipc namespaces (plus a private mount
/// namespace if `own_mount`), Landlock with no filesystem, no TCP and scoped
/// signals, the sandbox uid/gid, no_new_privs, and `seccomp` (already
/// filtered by the seccomp switch).
pub(super) fn confined(
    kind: &'static str,
    spec: &SandboxSpec,
    own_mount: bool,
    seccomp: Option<SeccompPolicy>,
) -> Policy {
    let layers = spec.settings.layers;
    Policy {
        kind,
        namespaces: layers.namespaces.then(|| Namespaces {
            join_net: spec.netns.clone(),
            join_ipc: spec.ipcns.clone(),
            own_mount,
        }),
        landlock: layers.landlock.then_some(LandlockPolicy {
            deny_tcp: true,
            scoped: true,
        }),
        identity: layers.identity.then_some(Identity {
            uid: spec.settings.uid,
            gid: spec.settings.gid,
        }),
        no_new_privs: true,
        seccomp,
        origin: None,
    }
}
