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
//!  before apply   open /dev/kvm (the only file), raise RLIMIT_NOFILE's soft limit
//!                 (it may raise it later too, up to the hard limit),
//!                 install the kick signal's handler, put the control socket at
//!                 CONTROL_FD (or pass its number to policy_on), read anything
//!                 from /proc or sysfs it will need (available_parallelism)
//!  enter          refuses if any other thread exists, then apply: namespaces,
//!                 Landlock (no filesystem), uid, no caps, no_new_privs, seccomp
//!                 (this allowlist), in apply's order
//!  after apply    spawn the vCPU thread pool (threads inherit every layer), then
//!                 serve: recvmsg memfds on the control socket, mmap them (never
//!                 executable), KVM ioctls, futex parking, tgkill kicks, stderr log;
//!                 a received fd's size by lseek(fd, 0, SEEK_END) (`Seek::seek`
//!                 with `SeekFrom::End(0)`): `File::metadata` fails with ENOSYS
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
//! Cost, once per host process (`microfaas-vmhost-probe none`, release, 41
//! fresh processes per setting, medians, on this nested 2-core host shared
//! with other builds, so two runs): `enter` with every layer 125-170 us,
//! without the seccomp layer 50-81 us, so ~75-90 us for the filter of 149
//! instructions (a runner's has 74: more calls here, and the 64-bit
//! clone-flag check); with no layer 2-21 us (the thread check reading
//! `/proc/self/task`).
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
    Allowed, FilterError, Refused, SeccompPolicy, Violation, fcntl_get_seals, futex_wait_wake, mprotect_no_exec,
    not_on_fd, on_fd, tgkill_self,
};
use super::{Applied, SandboxError, apply};
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
    policy_on(spec, pid, CONTROL_FD, None)
}

/// [`policy`] with the control socket at `control_fd` and, if the process
/// holds one, its `/proc/self/pagemap` at `pagemap_fd` (opened before the
/// sandbox for instance resets, by a process that may still have had
/// `CAP_SYS_ADMIN`, so that reading it would show physical frame numbers,
/// a help to Rowhammer-style attacks): on that fd only `PAGEMAP_SCAN`
/// (page ranges and categories, never frame numbers), and no `pread64`;
/// `PAGEMAP_SCAN` on no other fd.
pub fn policy_on(
    spec: &SandboxSpec,
    pid: u32,
    control_fd: i32,
    pagemap_fd: Option<i32>,
) -> Result<Policy, FilterError> {
    let seccomp = if spec.settings.layers.seccomp {
        Some(SeccompPolicy {
            allowed: allowlist(pid, control_fd, pagemap_fd)?,
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

/// Entering the host process's sandbox failed.
#[derive(Debug, thiserror::Error)]
pub enum EnterError {
    /// Other threads exist: Landlock and seccomp would confine only the
    /// calling one (the rest would run unconfined), so nothing is entered.
    #[error("{0} threads in the process: enter the sandbox before starting any thread")]
    Threads(usize),
    /// The thread count could not be read (`/proc/self/task`).
    #[error("cannot count this process's threads")]
    Proc(#[source] std::io::Error),
    /// The policy did not build.
    #[error("cannot build the VMM host process's policy")]
    Policy(#[source] FilterError),
    /// A layer could not be entered.
    #[error("cannot enter the VMM host process's sandbox")]
    Apply(#[source] SandboxError),
}

/// Enters [`policy_on`]`(spec, this process, control_fd, pagemap_fd)`, after checking
/// that the calling thread is the process's only one (the check reads
/// `/proc/self/task`, so it comes before Landlock). What a host process
/// calls once, after its preparations and before its thread pool.
pub fn enter(spec: &SandboxSpec, control_fd: i32, pagemap_fd: Option<i32>) -> Result<Applied, EnterError> {
    let threads = thread_count().map_err(EnterError::Proc)?;
    if threads != 1 {
        return Err(EnterError::Threads(threads));
    }
    let policy = policy_on(spec, std::process::id(), control_fd, pagemap_fd).map_err(EnterError::Policy)?;
    apply(&policy).map_err(EnterError::Apply)
}

/// The number of threads of this process.
fn thread_count() -> std::io::Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir("/proc/self/task")? {
        entry?;
        n += 1;
    }
    Ok(n)
}

/// Everything the host process does after entering the sandbox.
fn allowlist(pid: u32, control_fd: i32, pagemap_fd: Option<i32>) -> Result<Vec<Allowed>, FilterError> {
    let pread = match pagemap_fd {
        Some(fd) => not_on_fd("pread64", libc::SYS_pread64, fd, "the pagemap: frame numbers")?,
        None => Allowed::any("pread64", libc::SYS_pread64),
    };
    Ok(vec![
        // KVM: the only device, opened before; every VM and vCPU fd comes
        // from its ioctls.
        kvm_ioctl(pagemap_fd)?,
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
        // received fds: size (lseek SEEK_END; raw fstat takes no path)
        // and seals of an image or slab, closing them;
        // the vCPUs' binary statistics (`KVM_GET_STATS_FD`, read with
        // pread64: only fds it holds, none of them a file it opened)
        Allowed::any("fstat", libc::SYS_fstat),
        pread,
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
        sched_setaffinity_self()?,
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
        // its own limits (glibc's getrlimit and setrlimit: raising the fd
        // soft limit as VMs are added); with no capability left it cannot
        // raise a hard limit, and no other process's
        prlimit_own()?,
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
        // Both take a path the filter cannot read (with AT_EMPTY_PATH too:
        // a non-empty path is still resolved), and Landlock does not cover
        // stat: allowed, they would show the metadata of any host file the
        // uid can reach. std's File::metadata tries statx, then glibc's
        // fstat (which is newfstatat(fd, "", AT_EMPTY_PATH)), and returns
        // the ENOSYS instead of dying; the size of a received fd is
        // lseek(fd, 0, SEEK_END).
        Refused::enosys("statx", libc::SYS_statx, "takes a path; use lseek(SEEK_END) for a size"),
        Refused::enosys(
            "newfstatat",
            libc::SYS_newfstatat,
            "glibc's fstat; takes a path; use lseek(SEEK_END) for a size",
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

/// `PAGEMAP_SCAN`: which pages of its own memory a guest wrote, on the
/// `/proc/self/pagemap` fd the VMM opened before the sandbox (an instance
/// reset, `vmm::Instance::reset`). No other driver's ioctl has this number.
pub use ipc::pagemap::PAGEMAP_SCAN;

/// `ioctl(fd, request)` only with `_IOC_TYPE(request) == KVMIO`, or
/// exactly [`PAGEMAP_SCAN`] on `pagemap_fd`.
fn kvm_ioctl(pagemap_fd: Option<i32>) -> Result<Allowed, FilterError> {
    let mut rules = vec![rule(
        "ioctl",
        vec![cond(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(IOC_TYPE_MASK),
            KVMIO << IOC_TYPE_SHIFT,
        )?],
    )?];
    let mut note = format!("request type == {KVMIO:#x} (KVMIO: KVM's ioctls only)");
    if let Some(fd) = pagemap_fd {
        rules.push(rule(
            "ioctl",
            vec![
                cond(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, bits64(fd))?,
                cond(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, PAGEMAP_SCAN)?,
            ],
        )?);
        note.push_str(&format!(
            ", or fd == {fd} and request == {PAGEMAP_SCAN:#x} (PAGEMAP_SCAN on the pagemap)"
        ));
    }
    Ok(Allowed {
        name: "ioctl",
        nr: libc::SYS_ioctl,
        rules,
        note,
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

/// `name` only with argument 0 (a pid) == 0: the caller itself.
fn on_self(name: &'static str, nr: i64, what: &str) -> Result<Allowed, FilterError> {
    Ok(Allowed {
        name,
        nr,
        rules: vec![rule(
            name,
            vec![cond(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, 0)?],
        )?],
        note: format!("pid == 0 ({what})"),
    })
}

/// `prlimit64(0, ..)`: its own limits only.
fn prlimit_own() -> Result<Allowed, FilterError> {
    on_self("prlimit64", libc::SYS_prlimit64, "itself")
}

/// `sched_setaffinity(0, ..)`: pinning the calling pool thread only.
fn sched_setaffinity_self() -> Result<Allowed, FilterError> {
    on_self("sched_setaffinity", libc::SYS_sched_setaffinity, "the calling thread")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::tests::full;
    use crate::sandbox::{Layers, SandboxSettings};

    /// Never allowed in a VMM host process, with any arguments.
    const FORBIDDEN: &[(&str, i64)] = &[
        ("open", libc::SYS_open),
        ("openat", libc::SYS_openat),
        ("openat2", libc::SYS_openat2),
        ("creat", libc::SYS_creat),
        ("read", libc::SYS_read),
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
        ("mbind", libc::SYS_mbind),
        ("move_pages", libc::SYS_move_pages),
        ("kcmp", libc::SYS_kcmp),
        ("newfstatat", libc::SYS_newfstatat),
        ("statx", libc::SYS_statx),
        ("stat", libc::SYS_stat),
        ("lstat", libc::SYS_lstat),
        ("readlink", libc::SYS_readlink),
        ("getdents64", libc::SYS_getdents64),
        ("chdir", libc::SYS_chdir),
        ("fchdir", libc::SYS_fchdir),
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
        assert!(text.contains("prlimit64        pid == 0 (itself)"), "{text}");
        assert!(
            text.contains("sched_setaffinity pid == 0 (the calling thread)"),
            "{text}"
        );
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

    /// The test harness has threads: `enter` refuses before entering any
    /// layer (this test process stays unconfined and goes on).
    #[test]
    fn enter_refuses_a_process_with_threads() {
        let helper = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_millis(200)));
        match enter(&full(), CONTROL_FD, None) {
            Err(EnterError::Threads(n)) => assert!(n >= 2, "{n}"),
            other => panic!("entered with threads: {other:?}"),
        }
        helper.join().unwrap();
        // Still unconfined: a file opens.
        assert!(std::fs::File::open("/proc/self/status").is_ok());
    }

    #[test]
    fn control_fd_is_the_one_given() {
        let p = policy_on(&full(), 7, 9, None).unwrap();
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
