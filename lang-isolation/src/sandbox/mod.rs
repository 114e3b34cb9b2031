//! The process sandbox of every process that runs function code: what each
//! kind of sandboxed process may do is data (a [`Policy`], one file per
//! kind: [`worker`], [`runner`], [`vmhost`]), and [`apply`] enters it in one fixed order.
//!
//! ```text
//!  1 namespaces   join the host's empty net + ipc namespaces (setns)
//!  2 landlock     every filesystem right handled (no rule = no filesystem), TCP bind/connect
//!                 handled, scoped: no signals or abstract unix sockets outside the domain
//!  3 identity     bounding + ambient capabilities cleared, groups dropped, setresgid/setresuid
//!                 to the sandbox uid/gid (a non-root host: a user namespace instead)
//!  4 capabilities none left: effective, permitted and inheritable checked empty
//!  5 no_new_privs PR_SET_NO_NEW_PRIVS, and PR_SET_DUMPABLE 0 (no /proc/PID/mem, no ptrace)
//!  6 seccomp      the allowlist with argument filters, last
//! ```
//!
//! Each layer can be switched off for measurements and the hostile tests'
//! control runs ([`Layers`]); serving untrusted functions needs all of them.
//!
//! Cost (`cargo run --release -p lang-isolation --example sandbox_steps`, in
//! a fresh child each, on this nested-virtualisation host, medians): about
//! 90 us in all for a runner, of which the namespaces ~10 us, Landlock
//! ~3 us, uid/caps ~25 us (one `prctl` per capability of the bounding set)
//! and the seccomp filter ~50 us: compiling it (more in a forked child,
//! whose heap is copy-on-write) and ~31 us attaching it, of which ~11 us is
//! the kernel's fixed cost; the rest grows with the program's length (~0.13
//! us per instruction to convert and JIT-compile it) and with the
//! instructions the kernel emulates per syscall number to fill its action
//! cache, which is why the program is a binary search (`bpf.rs`: 74
//! instructions for the runner, seccompiler's linear chain 130 and ~74 us).
//! It is paid once per process: on the process backend's cold path (about
//! +10% of ~1.2-1.3 ms with every layer, seccomp ~4-5% of that), on no warm
//! path.

mod apply;
mod bpf;
mod common;
mod host;
pub mod origin;
pub mod runner;
mod seccomp;
mod settings;
pub mod vmhost;
pub mod worker;

pub use apply::{Applied, SandboxError, apply};
pub use host::shared_namespaces;
pub use seccomp::{Allowed, Refused, SeccompPolicy, Violation};
pub use settings::{
    DEFAULT_SANDBOX_GID, DEFAULT_SANDBOX_UID, DEFAULT_TENANT, DEFAULT_TENANT_UIDS, Layers, SandboxSettings,
    SandboxSpec, SpecError, TenantUids, UidRangeExhausted,
};

use std::fmt;
use std::path::PathBuf;

/// Who the sandboxed process runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// User id to drop to.
    pub uid: u32,
    /// Group id to drop to (the only group).
    pub gid: u32,
}

/// The namespaces a sandboxed process ends up in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespaces {
    /// A network namespace to join (the host's shared, empty one: no
    /// interface but a down loopback).
    pub join_net: Option<PathBuf>,
    /// An IPC namespace to join (no SysV objects or POSIX queues of the host).
    pub join_ipc: Option<PathBuf>,
    /// Unshare a private mount namespace.
    pub own_mount: bool,
}

/// Landlock part of a policy. Every filesystem right is handled and no
/// rule grants one: no filesystem access at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LandlockPolicy {
    /// TCP bind and connect handled with no rule (denied).
    pub deny_tcp: bool,
    /// Signals and abstract unix sockets only within the process's own domain.
    pub scoped: bool,
}

/// Everything one kind of sandboxed process is confined to.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The kind of process ("language worker", "process runner").
    pub kind: &'static str,
    /// Namespaces, if that layer is on.
    pub namespaces: Option<Namespaces>,
    /// Landlock, if on.
    pub landlock: Option<LandlockPolicy>,
    /// Uid/gid to drop to, if the identity layer is on. Capabilities are
    /// cleared with it.
    pub identity: Option<Identity>,
    /// `PR_SET_NO_NEW_PRIVS` and `PR_SET_DUMPABLE 0` (always on: they cost
    /// nothing and take nothing the process needs).
    pub no_new_privs: bool,
    /// The seccomp allowlist, if on.
    pub seccomp: Option<SeccompPolicy>,
    /// The syscall-origin filter (language workers with protection keys and
    /// seccomp), installed just before the allowlist.
    pub origin: Option<origin::OriginFilter>,
}

impl fmt::Display for Policy {
    /// The policy as a reviewer reads it: one line per rule, in the order
    /// [`apply`] enters them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "sandbox policy of a {}", self.kind)?;
        match &self.namespaces {
            Some(ns) => {
                let show = |p: &Option<PathBuf>| p.as_ref().map_or("(stay)".to_owned(), |p| p.display().to_string());
                writeln!(f, "  1 namespaces   net: join {}", show(&ns.join_net))?;
                writeln!(f, "                 ipc: join {}", show(&ns.join_ipc))?;
                writeln!(
                    f,
                    "                 mount: {}",
                    if ns.own_mount { "own (unshare)" } else { "(stay)" }
                )?;
                writeln!(
                    f,
                    "                 pid: (stay: a process cannot change its own, and it may not fork)"
                )?;
            }
            None => writeln!(f, "  1 namespaces   OFF")?,
        }
        match &self.landlock {
            Some(l) => {
                writeln!(
                    f,
                    "  2 landlock     fs: every right handled, no rule: no filesystem access"
                )?;
                writeln!(
                    f,
                    "                 net: {}",
                    if l.deny_tcp {
                        "TCP bind and connect denied"
                    } else {
                        "not handled"
                    }
                )?;
                writeln!(
                    f,
                    "                 scope: {}",
                    if l.scoped {
                        "signals and abstract unix sockets only inside the domain"
                    } else {
                        "none"
                    }
                )?;
            }
            None => writeln!(f, "  2 landlock     OFF")?,
        }
        match &self.identity {
            Some(id) => {
                writeln!(
                    f,
                    "  3 identity     uid {} gid {}, no supplementary groups",
                    id.uid, id.gid
                )?;
                writeln!(
                    f,
                    "  4 capabilities none (bounding, ambient, effective, permitted, inheritable)"
                )?;
            }
            None => writeln!(f, "  3 identity     OFF (stays the host's)\n  4 capabilities kept")?,
        }
        writeln!(
            f,
            "  5 no_new_privs {}",
            if self.no_new_privs { "on, not dumpable" } else { "OFF" }
        )?;
        if let Some(o) = &self.origin {
            let names: Vec<&str> = origin::GUARDED.iter().map(|(n, _)| *n).collect();
            writeln!(
                f,
                "  6 origin       {} only from the {} code ranges mapped before any function",
                names.join(" "),
                o.trusted.len()
            )?;
        }
        match &self.seccomp {
            Some(s) => write!(f, "{s}"),
            None => writeln!(f, "  6 seccomp      OFF"),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A spec with every layer on and both namespaces given (shared by the
    /// policy tests of each kind of sandboxed process).
    pub(crate) fn full() -> SandboxSpec {
        SandboxSpec {
            settings: SandboxSettings::default(),
            netns: Some("/proc/1/fd/7".into()),
            ipcns: Some("/proc/1/fd/8".into()),
        }
    }

    /// Never allowed in any sandboxed process, with any arguments.
    const FORBIDDEN: &[(&str, i64)] = &[
        ("open", libc::SYS_open),
        ("openat2", libc::SYS_openat2),
        ("creat", libc::SYS_creat),
        ("socket", libc::SYS_socket),
        ("socketpair", libc::SYS_socketpair),
        ("connect", libc::SYS_connect),
        ("bind", libc::SYS_bind),
        ("kill", libc::SYS_kill),
        ("tkill", libc::SYS_tkill),
        ("ptrace", libc::SYS_ptrace),
        ("process_vm_readv", libc::SYS_process_vm_readv),
        ("process_vm_writev", libc::SYS_process_vm_writev),
        ("execve", libc::SYS_execve),
        ("execveat", libc::SYS_execveat),
        ("fork", libc::SYS_fork),
        ("vfork", libc::SYS_vfork),
        ("clone", libc::SYS_clone),
        ("clone3", libc::SYS_clone3),
        ("memfd_create", libc::SYS_memfd_create),
        ("userfaultfd", libc::SYS_userfaultfd),
        ("pidfd_open", libc::SYS_pidfd_open),
        ("pidfd_getfd", libc::SYS_pidfd_getfd),
        ("pidfd_send_signal", libc::SYS_pidfd_send_signal),
        ("bpf", libc::SYS_bpf),
        ("io_uring_setup", libc::SYS_io_uring_setup),
        ("io_uring_enter", libc::SYS_io_uring_enter),
        ("keyctl", libc::SYS_keyctl),
        ("mount", libc::SYS_mount),
        ("unshare", libc::SYS_unshare),
        ("setns", libc::SYS_setns),
        ("prctl", libc::SYS_prctl),
        ("pkey_mprotect", libc::SYS_pkey_mprotect),
        ("getrandom", libc::SYS_getrandom),
        ("seccomp", libc::SYS_seccomp),
    ];

    /// Prints each policy (`cargo test -p lang-isolation policies -- --nocapture`)
    /// and checks the lines a hostile test attacks.
    #[test]
    fn policies_print_and_forbid_the_dangerous_calls() {
        let pid = 4242;
        for policy in [
            worker::policy(&full(), pid, 4).unwrap(),
            runner::policy(&full(), pid).unwrap(),
        ] {
            let text = policy.to_string();
            println!("{text}");
            let seccomp = policy.seccomp.as_ref().expect("seccomp on");
            for (name, nr) in FORBIDDEN {
                // A worker with protection keys keys instance memory itself
                // (never executable; from its own code only: the origin filter).
                if *nr == libc::SYS_pkey_mprotect && policy.origin.is_some() {
                    assert!(
                        text.contains("pkey_mprotect    prot & 0x4 == 0") || text.contains("pkey_mprotect"),
                        "{text}"
                    );
                    continue;
                }
                assert!(!seccomp.mentions(*nr), "{}: {name} is allowed", policy.kind);
            }
            assert!(text.contains("tgid == 4242"), "{text}");
            assert!(!seccomp.compile().unwrap().is_empty());
            assert!(policy.identity.is_some() && policy.no_new_privs);
            assert_eq!(policy.landlock.map(|l| l.deny_tcp && l.scoped), Some(true));
        }
        // Neither opens or reads files; the worker receives only on its
        // catalog socket.
        let worker = worker::policy(&full(), pid, 4).unwrap();
        assert!(worker.to_string().contains("recvmsg          fd == 4"), "{worker}");
        for nr in [libc::SYS_openat, libc::SYS_read] {
            assert!(!worker.seccomp.as_ref().unwrap().mentions(nr));
        }
        let runner = runner::policy(&full(), pid).unwrap();
        let runner_seccomp = runner.seccomp.unwrap();
        for nr in [libc::SYS_openat, libc::SYS_read] {
            assert!(!runner_seccomp.mentions(nr));
        }
        assert_eq!(runner_seccomp.violation, Violation::KillProcess);
        assert!(runner.origin.is_none() && !runner_seccomp.mentions(libc::SYS_pkey_mprotect));
        let origin = worker.origin.as_ref().expect("origin filter with keys and seccomp");
        assert!(!origin.trusted.is_empty());
        assert!(
            worker
                .to_string()
                .contains("6 origin       mmap mprotect pkey_mprotect"),
            "{worker}"
        );
        assert_eq!(worker.seccomp.unwrap().violation, Violation::Trap);
    }

    #[test]
    fn layers_off_leave_only_no_new_privs() {
        let spec = SandboxSpec {
            settings: SandboxSettings::off(),
            netns: None,
            ipcns: None,
        };
        let p = runner::policy(&spec, 1).unwrap();
        assert!(p.namespaces.is_none() && p.landlock.is_none() && p.identity.is_none() && p.seccomp.is_none());
        assert!(p.no_new_privs);
        assert!(p.to_string().contains("6 seccomp      OFF"));
    }
}
