//! The policy of a VMM host process (`microfaas-vmhost`): one process of
//! the `vm` backend holding up to a few thousand KVM VMs of one tenant and
//! running their vCPUs from a small pool of threads. It handles
//! guest-controlled data (MMIO and port exits, guest memory), so a VM escape
//! (a KVM or VMM bug exploited by hostile guest code) lands here, and this
//! policy is what confines it.
//!
//! Entered once, on the process's only thread, after everything that needs
//! the filesystem or privilege is done:
//!
//! ```text
//!  before apply   open /dev/kvm (the only file), raise RLIMIT_NOFILE's soft limit,
//!                 install the kick signal's handler, put the control socket at
//!                 CONTROL_FD (or pass its number to policy_on), read anything
//!                 from /proc or sysfs it will need (available_parallelism)
//!  apply          namespaces, Landlock (no filesystem), uid, no caps, no_new_privs,
//!                 seccomp (this allowlist), in apply's order
//!  after apply    spawn the vCPU thread pool (threads inherit every layer), then
//!                 serve: recvmsg memfds on the control socket, mmap them (never
//!                 executable), KVM ioctls, futex parking, tgkill kicks, stderr log
//! ```
//!
//! What it can do after that is the allowlist below. What matters most:
//! - `ioctl` only with KVM's ioctl type (`_IOC_TYPE(request) == KVMIO`, 0xAE),
//!   whatever the number: the set of KVM ioctls the VMM uses changes with
//!   the VMM (each new one would otherwise be a kill in production), all of
//!   KVM is reachable by the guest anyway, and no other driver defines type
//!   0xAE (Documentation/userspace-api/ioctl/ioctl-number.rst), so on any
//!   fd but a KVM one such a request is `ENOTTY`. What it excludes is every
//!   terminal, socket, block, file-system and other driver ioctl (TIOCSTI,
//!   FIONREAD, BTRFS_*, ...), the usual ioctl attack surface.
//! - `mmap`/`mprotect` never with `PROT_EXEC` (the process maps guest
//!   memory, snapshot images and kvm_run areas; it never needs new code).
//! - `clone` only with the thread flags glibc's `pthread_create` passes
//!   (no new process, no new namespace); `clone3`, whose flags live in
//!   memory seccomp cannot read, fails with `ENOSYS`, on which glibc (2.34
//!   and later, 2.36 here) falls back to `clone`.
//! - `recvmsg`/`sendmsg` only on the control socket (a fixed fd number),
//!   no `socket`, `connect`, `open*`, `exec*`, `ptrace`, `process_vm_*`,
//!   `kill`, `memfd_create`; `tgkill` only to its own threads.
//!
//! A violation kills the process (`SECCOMP_RET_KILL_PROCESS`), as for a
//! process runner. Its VMs die with it, but a violation means native code
//! of an attacker runs in the VMM, and a trap handler would run in that
//! same compromised process: nothing it reported could be trusted, and it
//! could not stop the attacker from carrying on. The kill is a verdict the
//! code inside cannot catch, mask or forge. The backend sees the death
//! (pidfd), fails the in-flight requests of that process once with
//! `WorkerLost`, respawns it and restores its instances from their
//! snapshots; every VM in it belongs to the same tenant (the process runs
//! as the tenant's uid), so an attacker can only cost its own tenant.

use super::common::confined;
use super::seccomp::{
    Allowed, FilterError, Refused, SeccompPolicy, Violation, fcntl_get_seals, futex_wait_wake, mprotect_no_exec, on_fd,
    tgkill_self,
};
use super::{Policy, SandboxSpec};
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// The fd number of the control socket (the SOCK_SEQPACKET socketpair end
/// the backend talks to it on) that [`policy`] allows `recvmsg`/`sendmsg`
/// on: the first fd after stdin, stdout and stderr, where the backend's
/// spawn places it.
pub const CONTROL_FD: i32 = 3;

/// `KVMIO`: the ioctl type of every KVM ioctl (`linux/kvm.h`).
pub const KVMIO: u64 = 0xAE;

/// `_IOC_TYPESHIFT`: the type is bits 8..16 of the request.
const IOC_TYPE_SHIFT: u64 = 8;
/// `_IOC_TYPEMASK << _IOC_TYPESHIFT`.
const IOC_TYPE_MASK: u64 = 0xff << IOC_TYPE_SHIFT;

/// The flags glibc's `pthread_create` (`create_thread`) passes to `clone`
/// that must all be set: a thread shares the address space, the file
/// table, the fs information and the signal handlers, and is in this
/// thread group.
const CLONE_THREAD_REQUIRED: u64 =
    bits64(libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_FILES | libc::CLONE_SIGHAND | libc::CLONE_THREAD);
/// The flags that may be set besides: TLS and the tid words glibc uses,
/// and SysV semaphore undo sharing (which, in a private empty IPC
/// namespace, shares nothing).
const CLONE_THREAD_OPTIONAL: u64 = bits64(
    libc::CLONE_SYSVSEM
        | libc::CLONE_SETTLS
        | libc::CLONE_PARENT_SETTID
        | libc::CLONE_CHILD_CLEARTID
        | libc::CLONE_CHILD_SETTID,
);

const fn bits64(v: libc::c_int) -> u64 {
    v.unsigned_abs() as u64
}

/// The host process's policy for `spec`, for the process `pid` (itself),
/// whose control socket is [`CONTROL_FD`].
pub fn policy(spec: &SandboxSpec, pid: u32) -> Result<Policy, FilterError> {
    policy_on(spec, pid, CONTROL_FD)
}

/// [`policy`] with the control socket at `control_fd`.
pub fn policy_on(spec: &SandboxSpec, pid: u32, control_fd: i32) -> Result<Policy, FilterError> {
    let seccomp = if spec.settings.layers.seccomp {
        Some(SeccompPolicy {
            allowed: allowlist(pid, control_fd)?,
            violation: Violation::KillProcess,
            refused: refused(),
        })
    } else {
        None
    };
    // No mount namespace of its own: with no filesystem access it adds
    // nothing (as for a runner).
    Ok(confined("VMM host process", spec, false, seccomp))
}

/// Everything the host process does after entering the sandbox.
fn allowlist(pid: u32, control_fd: i32) -> Result<Vec<Allowed>, FilterError> {
    Ok(vec![
        // KVM: the only device, opened before; every VM and vCPU fd comes
        // from its ioctls.
        kvm_ioctl()?,
        // memory: guest RAM on the slab memfd (MAP_SHARED) and on snapshot
        // images (MAP_PRIVATE), kvm_run areas, heaps, thread stacks and
        // their guards; never executable
        mprotect_no_exec("mmap", libc::SYS_mmap)?,
        mprotect_no_exec("mprotect", libc::SYS_mprotect)?,
        Allowed::any("munmap", libc::SYS_munmap),
        Allowed::any("mremap", libc::SYS_mremap),
        Allowed::any("madvise", libc::SYS_madvise),
        Allowed::any("mincore", libc::SYS_mincore),
        Allowed::any("brk", libc::SYS_brk),
        // the control socket: requests, memfds (SCM_RIGHTS) and replies
        on_fd("recvmsg", libc::SYS_recvmsg, control_fd, "the control socket")?,
        on_fd("sendmsg", libc::SYS_sendmsg, control_fd, "the control socket")?,
        Allowed::any("poll", libc::SYS_poll),
        Allowed::any("ppoll", libc::SYS_ppoll),
        // received fds: size and seals of an image or slab, closing them
        Allowed::any("fstat", libc::SYS_fstat),
        Allowed::any("lseek", libc::SYS_lseek),
        fcntl_get_seals()?,
        Allowed::any("close", libc::SYS_close),
        // the vCPU thread pool: threads, their names, parking, kicks
        clone_thread()?,
        Allowed::any("set_robust_list", libc::SYS_set_robust_list),
        // glibc 2.36 registers restartable sequences in every new thread
        // once the main thread has, and aborts the process if that fails
        // ("Fatal glibc error: rseq registration failed"); it registers
        // only a struct in the thread's own memory
        Allowed::any("rseq", libc::SYS_rseq),
        prctl_set_name()?,
        futex_wait_wake()?,
        tgkill_self(pid)?,
        Allowed::any("sched_yield", libc::SYS_sched_yield),
        Allowed::any("sched_getaffinity", libc::SYS_sched_getaffinity),
        Allowed::any("exit", libc::SYS_exit),
        // signals: the kick handler, masks, signal stacks of new threads
        Allowed::any("rt_sigaction", libc::SYS_rt_sigaction),
        Allowed::any("rt_sigprocmask", libc::SYS_rt_sigprocmask),
        Allowed::any("rt_sigreturn", libc::SYS_rt_sigreturn),
        Allowed::any("sigaltstack", libc::SYS_sigaltstack),
        Allowed::any("restart_syscall", libc::SYS_restart_syscall),
        // clocks (CPU-time clocks of vCPU threads fall back to the system
        // call), sleeps, ids
        Allowed::any("clock_gettime", libc::SYS_clock_gettime),
        Allowed::any("clock_nanosleep", libc::SYS_clock_nanosleep),
        Allowed::any("nanosleep", libc::SYS_nanosleep),
        Allowed::any("getpid", libc::SYS_getpid),
        Allowed::any("gettid", libc::SYS_gettid),
        Allowed::any("getppid", libc::SYS_getppid),
        // std's per-thread hash seeds (a HashMap made on a pool thread)
        Allowed::any("getrandom", libc::SYS_getrandom),
        // reading its own limits (glibc's getrlimit), never setting any
        prlimit_read_own()?,
        // the guest log, exit
        on_fd("write", libc::SYS_write, libc::STDERR_FILENO, "stderr")?,
        Allowed::any("exit_group", libc::SYS_exit_group),
    ])
}

/// Calls that fail with `ENOSYS` instead of killing: a library probes for
/// them and falls back.
fn refused() -> Vec<Refused> {
    vec![
        Refused::enosys(
            "clone3",
            libc::SYS_clone3,
            "glibc's pthread_create falls back to clone, whose flags the filter reads",
        ),
        Refused::enosys(
            "statx",
            libc::SYS_statx,
            "std's File::metadata falls back to fstat, which takes no path",
        ),
    ]
}

fn cond(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, FilterError> {
    SeccompCondition::new(arg, len, op, value).map_err(|source| FilterError::Rule {
        name: "condition",
        source,
    })
}

fn rule(name: &'static str, conditions: Vec<SeccompCondition>) -> Result<SeccompRule, FilterError> {
    SeccompRule::new(conditions).map_err(|source| FilterError::Rule { name, source })
}

/// `ioctl(fd, request)` only with `_IOC_TYPE(request) == KVMIO`.
fn kvm_ioctl() -> Result<Allowed, FilterError> {
    Ok(Allowed {
        name: "ioctl",
        nr: libc::SYS_ioctl,
        rules: vec![rule(
            "ioctl",
            vec![cond(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(IOC_TYPE_MASK),
                KVMIO << IOC_TYPE_SHIFT,
            )?],
        )?],
        note: format!("request type == {KVMIO:#x} (KVMIO: KVM's ioctls only)"),
    })
}

/// `clone(flags, ..)` only for a thread: every flag of
/// [`CLONE_THREAD_REQUIRED`], none but those and [`CLONE_THREAD_OPTIONAL`]
/// (no exit signal, no namespace, no pidfd, no vfork, no ptrace), all 64
/// bits compared.
fn clone_thread() -> Result<Allowed, FilterError> {
    let mask = !CLONE_THREAD_OPTIONAL;
    Ok(Allowed {
        name: "clone",
        nr: libc::SYS_clone,
        rules: vec![rule(
            "clone",
            vec![cond(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(mask),
                CLONE_THREAD_REQUIRED,
            )?],
        )?],
        note: format!(
            "flags & !{CLONE_THREAD_OPTIONAL:#x} == {CLONE_THREAD_REQUIRED:#x} (a thread: VM FS FILES SIGHAND THREAD)"
        ),
    })
}

/// `prctl(PR_SET_NAME, ..)` only (std names its threads from inside them).
fn prctl_set_name() -> Result<Allowed, FilterError> {
    Ok(Allowed {
        name: "prctl",
        nr: libc::SYS_prctl,
        rules: vec![rule(
            "prctl",
            vec![cond(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                bits64(libc::PR_SET_NAME),
            )?],
        )?],
        note: "PR_SET_NAME only".to_owned(),
    })
}

/// `prlimit64(0, resource, NULL, old)`: reading its own limits only.
fn prlimit_read_own() -> Result<Allowed, FilterError> {
    Ok(Allowed {
        name: "prlimit64",
        nr: libc::SYS_prlimit64,
        rules: vec![rule(
            "prlimit64",
            vec![
                cond(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, 0)?,
                cond(2, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0)?,
            ],
        )?],
        note: "pid == 0 (itself), new limit NULL (read only)".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{Layers, SandboxSettings};

    fn full() -> SandboxSpec {
        SandboxSpec {
            settings: SandboxSettings::default(),
            netns: Some("/proc/1/fd/7".into()),
            ipcns: Some("/proc/1/fd/8".into()),
        }
    }

    /// Never allowed in a VMM host process, with any arguments.
    const FORBIDDEN: &[(&str, i64)] = &[
        ("open", libc::SYS_open),
        ("openat", libc::SYS_openat),
        ("openat2", libc::SYS_openat2),
        ("creat", libc::SYS_creat),
        ("read", libc::SYS_read),
        ("pread64", libc::SYS_pread64),
        ("socket", libc::SYS_socket),
        ("socketpair", libc::SYS_socketpair),
        ("connect", libc::SYS_connect),
        ("bind", libc::SYS_bind),
        ("accept4", libc::SYS_accept4),
        ("sendto", libc::SYS_sendto),
        ("kill", libc::SYS_kill),
        ("tkill", libc::SYS_tkill),
        ("rt_sigqueueinfo", libc::SYS_rt_sigqueueinfo),
        ("rt_tgsigqueueinfo", libc::SYS_rt_tgsigqueueinfo),
        ("ptrace", libc::SYS_ptrace),
        ("process_vm_readv", libc::SYS_process_vm_readv),
        ("process_vm_writev", libc::SYS_process_vm_writev),
        ("execve", libc::SYS_execve),
        ("execveat", libc::SYS_execveat),
        ("fork", libc::SYS_fork),
        ("vfork", libc::SYS_vfork),
        ("memfd_create", libc::SYS_memfd_create),
        ("userfaultfd", libc::SYS_userfaultfd),
        ("pidfd_open", libc::SYS_pidfd_open),
        ("pidfd_getfd", libc::SYS_pidfd_getfd),
        ("pidfd_send_signal", libc::SYS_pidfd_send_signal),
        ("bpf", libc::SYS_bpf),
        ("perf_event_open", libc::SYS_perf_event_open),
        ("io_uring_setup", libc::SYS_io_uring_setup),
        ("io_uring_enter", libc::SYS_io_uring_enter),
        ("keyctl", libc::SYS_keyctl),
        ("add_key", libc::SYS_add_key),
        ("mount", libc::SYS_mount),
        ("unshare", libc::SYS_unshare),
        ("setns", libc::SYS_setns),
        ("setuid", libc::SYS_setuid),
        ("setresuid", libc::SYS_setresuid),
        ("pkey_mprotect", libc::SYS_pkey_mprotect),
        ("seccomp", libc::SYS_seccomp),
        ("dup2", libc::SYS_dup2),
        ("dup3", libc::SYS_dup3),
        ("eventfd2", libc::SYS_eventfd2),
        ("ftruncate", libc::SYS_ftruncate),
        ("fchmod", libc::SYS_fchmod),
        ("setrlimit", libc::SYS_setrlimit),
        ("sched_setaffinity", libc::SYS_sched_setaffinity),
        ("mbind", libc::SYS_mbind),
        ("move_pages", libc::SYS_move_pages),
        ("kcmp", libc::SYS_kcmp),
    ];

    #[test]
    fn policy_prints_and_forbids_the_dangerous_calls() {
        let p = policy(&full(), 4242).unwrap();
        let text = p.to_string();
        println!("{text}");
        let seccomp = p.seccomp.as_ref().expect("seccomp on");
        for (name, nr) in FORBIDDEN {
            assert!(!seccomp.mentions(*nr), "{name} is allowed");
        }
        assert_eq!(seccomp.violation, Violation::KillProcess);
        assert!(text.contains("tgid == 4242"), "{text}");
        assert!(text.contains("ioctl            request type == 0xae"), "{text}");
        assert!(text.contains("recvmsg          fd == 3 (the control socket)"), "{text}");
        assert!(text.contains("sendmsg          fd == 3 (the control socket)"), "{text}");
        assert!(text.contains("write            fd == 2 (stderr)"), "{text}");
        assert!(text.contains("mmap             prot without PROT_EXEC"), "{text}");
        assert!(text.contains("clone3           refused: errno 38"), "{text}");
        assert!(p.identity.is_some() && p.no_new_privs && p.origin.is_none());
        assert_eq!(p.landlock.map(|l| l.deny_tcp && l.scoped), Some(true));
        let ns = p.namespaces.as_ref().expect("namespaces on");
        assert!(ns.join_net.is_some() && ns.join_ipc.is_some() && !ns.own_mount);
        assert!(!seccomp.compile().unwrap().is_empty());
        // Every refusal is ENOSYS, never also allowed.
        for r in &seccomp.refused {
            assert_eq!(i32::from(r.errno), libc::ENOSYS);
            assert!(!seccomp.mentions(r.nr), "{} both refused and allowed", r.name);
        }
    }

    #[test]
    fn control_fd_is_the_one_given() {
        let p = policy_on(&full(), 7, 9).unwrap();
        let text = p.to_string();
        assert!(text.contains("recvmsg          fd == 9"), "{text}");
        assert!(!text.contains("fd == 3"), "{text}");
    }

    #[test]
    fn tenant_uid_and_layer_switches_carry_over() {
        let mut spec = full();
        spec.settings.uid = 65_000;
        spec.settings.gid = 65_001;
        let p = policy(&spec, 1).unwrap();
        assert_eq!(p.identity.map(|i| (i.uid, i.gid)), Some((65_000, 65_001)));
        spec.settings.layers = Layers {
            seccomp: false,
            ..Layers::ALL
        };
        let p = policy(&spec, 1).unwrap();
        assert!(p.seccomp.is_none() && p.landlock.is_some() && p.identity.is_some());
        spec.settings = SandboxSettings::off();
        let p = policy(&spec, 1).unwrap();
        assert!(p.namespaces.is_none() && p.landlock.is_none() && p.identity.is_none() && p.seccomp.is_none());
        assert!(p.no_new_privs);
    }

    #[test]
    fn clone_flags_of_a_glibc_thread_and_nothing_else() {
        // What glibc 2.36's create_thread passes.
        let glibc = bits64(
            libc::CLONE_VM
                | libc::CLONE_FS
                | libc::CLONE_FILES
                | libc::CLONE_SIGHAND
                | libc::CLONE_THREAD
                | libc::CLONE_SYSVSEM
                | libc::CLONE_SETTLS
                | libc::CLONE_PARENT_SETTID
                | libc::CLONE_CHILD_CLEARTID,
        );
        let ok = |flags: u64| flags & !CLONE_THREAD_OPTIONAL == CLONE_THREAD_REQUIRED;
        assert!(ok(glibc));
        // fork (SIGCHLD exit signal, nothing shared), a vfork, a thread in a
        // new namespace, a thread with a pidfd, a clone3-only flag.
        assert!(!ok(bits64(libc::SIGCHLD)));
        assert!(!ok(bits64(libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD)));
        assert!(!ok(glibc | bits64(libc::CLONE_NEWNET)));
        assert!(!ok(glibc | bits64(libc::CLONE_NEWUSER)));
        assert!(!ok(glibc | bits64(libc::CLONE_PIDFD)));
        assert!(!ok(glibc | bits64(libc::CLONE_PTRACE)));
        assert!(!ok(glibc | 0x1_0000_0000));
        assert!(!ok(glibc & !bits64(libc::CLONE_THREAD)));
        assert!(!ok(glibc & !bits64(libc::CLONE_VM)));
    }

    #[test]
    fn kvm_ioctl_type_is_bits_8_to_16() {
        // KVM_RUN = _IO(KVMIO, 0x80), KVM_CREATE_VM = _IO(KVMIO, 0x01),
        // KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, 32 bytes),
        // TCGETS = 0x5401 (type 'T').
        let kvm = |req: u64| req & IOC_TYPE_MASK == KVMIO << IOC_TYPE_SHIFT;
        assert!(kvm(0xae80));
        assert!(kvm(0xae01));
        assert!(kvm(0x4020_ae46));
        assert!(!kvm(0x5401));
        assert!(!kvm(0x8008_af00));
    }
}
