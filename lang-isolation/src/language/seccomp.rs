//! The worker's seccomp allowlist: exactly what its warm and cold paths
//! need after start-up (polling shared memory, parking on a futex, receiving
//! and mapping artifact memfds, the heap's mmap/madvise). Anything else traps
//! (`SECCOMP_RET_TRAP`) into the SIGSYS handler in [`super::signals`].

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::collections::BTreeMap;

/// Building or installing the filter failed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rule set was rejected.
    #[error("invalid seccomp rules")]
    Rules(#[source] seccompiler::BackendError),
    /// Compiling to BPF failed.
    #[error("cannot compile the seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// System calls a worker may make after start-up.
pub const ALLOWED: &[i64] = &[
    // shared-memory queues: parking and the clock
    libc::SYS_futex,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getppid,
    // signals: returning from handlers, re-raising fatal ones
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    // memory: heaps, stacks, loader mappings
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    // artifacts deployed after start: sealed memfds over the catalog socket
    // (recvmsg), their seals checked (fcntl F_GET_SEALS), read (lseek,
    // pread64), mapped by the runtime's loader (mmap/mprotect above) and
    // closed. No open, stat or read: the worker needs no filesystem.
    libc::SYS_recvmsg,
    libc::SYS_fcntl,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_close,
    // diagnostics on stderr, exit
    libc::SYS_write,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The compiled filter.
pub fn program() -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(SeccompError::Rules)?;
    filter.try_into().map_err(SeccompError::Compile)
}

/// Installs the filter on the calling (only) thread, for good.
pub fn install() -> Result<(), SeccompError> {
    let program = program()?;
    seccompiler::apply_filter(&program).map_err(SeccompError::Install)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_and_excludes_dangerous_calls() {
        assert!(!program().unwrap().is_empty());
        for nr in [
            libc::SYS_openat,
            libc::SYS_open,
            libc::SYS_execve,
            libc::SYS_socket,
            libc::SYS_fork,
            libc::SYS_ptrace,
            libc::SYS_kill,
        ] {
            assert!(!ALLOWED.contains(&nr));
        }
    }
}
