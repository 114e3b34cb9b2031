//! Seccomp allowlists as data: each allowed system call with its argument
//! filters (seccompiler's rule types) and a note a reviewer reads, plus the
//! argument filters the policies share (W^X for mmap/mprotect, signals only
//! to oneself, writes only to stderr).

use super::bpf;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::fmt;

/// What happens on a system call outside the allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// `SECCOMP_RET_TRAP`: SIGSYS to the caller, whose handler reports it.
    Trap,
    /// `SECCOMP_RET_KILL_PROCESS`: the kernel kills the process at once; the
    /// host sees a death by SIGSYS.
    KillProcess,
}

/// One allowed system call.
#[derive(Debug, Clone)]
pub struct Allowed {
    /// Its name.
    pub name: &'static str,
    /// Its number (x86-64).
    pub nr: i64,
    /// Allowed if any rule matches; each rule's conditions must all hold.
    /// Empty: allowed with any arguments.
    pub rules: Vec<SeccompRule>,
    /// The rules in words ("" for any arguments).
    pub note: String,
}

impl Allowed {
    /// `name` with any arguments.
    pub fn any(name: &'static str, nr: i64) -> Self {
        Self {
            name,
            nr,
            rules: Vec::new(),
            note: String::new(),
        }
    }
}

/// A seccomp allowlist.
#[derive(Debug, Clone)]
pub struct SeccompPolicy {
    /// The allowed calls.
    pub allowed: Vec<Allowed>,
    /// What anything else does.
    pub violation: Violation,
    /// Calls refused with an error instead of the violation (a library
    /// that probes for a call and falls back when it is missing: glibc's
    /// `clone3` before `clone`). Checked before the allowlist.
    pub refused: Vec<Refused>,
}

/// A system call that fails with an errno instead of being a violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Its name.
    pub name: &'static str,
    /// Its number (x86-64).
    pub nr: i64,
    /// The errno it returns (`ENOSYS`: "not implemented", the answer
    /// callers fall back on).
    pub errno: u16,
    /// Why, for a reviewer.
    pub note: &'static str,
}

impl Refused {
    /// `name` fails with `ENOSYS`.
    pub fn enosys(name: &'static str, nr: i64, note: &'static str) -> Self {
        Self {
            name,
            nr,
            // ENOSYS (38) fits the 16-bit errno of SECCOMP_RET_ERRNO.
            errno: 38,
            note,
        }
    }
}

/// Building or installing a filter failed.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// A rule was rejected.
    #[error("invalid seccomp rule for `{name}`")]
    Rule {
        /// The system call.
        name: &'static str,
        /// The cause.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The rule set was rejected or did not compile.
    #[error("cannot compile the seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    /// The program could not be laid out.
    #[error("cannot lay out the seccomp program")]
    Layout(#[source] bpf::LayoutError),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

impl SeccompPolicy {
    /// Whether `nr` is allowed with some arguments.
    pub fn mentions(&self, nr: i64) -> bool {
        self.allowed.iter().any(|a| a.nr == nr)
    }

    /// The merged rules per syscall number and the violation's return value.
    fn rules(&self) -> (BTreeMap<i64, Vec<SeccompRule>>, SeccompAction) {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for a in &self.allowed {
            rules.entry(a.nr).or_default().extend(a.rules.iter().cloned());
        }
        let mismatch = match self.violation {
            Violation::Trap => SeccompAction::Trap,
            Violation::KillProcess => SeccompAction::KillProcess,
        };
        (rules, mismatch)
    }

    /// The compiled BPF program: a binary search on the syscall number
    /// (`bpf::layout`; the kernel emulates the program for every syscall
    /// number when it attaches it), each call's argument checks compiled by
    /// seccompiler.
    pub fn compile(&self) -> Result<BpfProgram, FilterError> {
        let (rules, mismatch) = self.rules();
        let refused: Vec<(i64, u32)> = self
            .refused
            .iter()
            .map(|r| (r.nr, libc::SECCOMP_RET_ERRNO | u32::from(r.errno)))
            .collect();
        bpf::layout_refusing(rules, &refused, u32::from(mismatch)).map_err(FilterError::Layout)
    }

    /// The same filter as seccompiler lays it out (a linear chain of
    /// syscall numbers): the reference [`compile`](Self::compile) is proved
    /// equivalent to, and the baseline of the attach-cost measurements.
    /// Without [`refused`](Self::refused) (seccompiler has one action per
    /// filter): those calls are violations here.
    pub fn compile_linear(&self) -> Result<BpfProgram, FilterError> {
        let (rules, mismatch) = self.rules();
        let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
            .map_err(FilterError::Compile)?;
        filter.try_into().map_err(FilterError::Compile)
    }

    /// Compiles and installs the filter on the calling (only) thread.
    pub fn install(&self) -> Result<(), FilterError> {
        let program = self.compile()?;
        seccompiler::apply_filter(&program).map_err(FilterError::Install)
    }
}

impl fmt::Display for SeccompPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match self.violation {
            Violation::Trap => "SECCOMP_RET_TRAP (SIGSYS, reported as a policy violation)",
            Violation::KillProcess => "SECCOMP_RET_KILL_PROCESS (death by SIGSYS = policy violation)",
        };
        writeln!(f, "  6 seccomp      anything else: {action}")?;
        for a in &self.allowed {
            if a.note.is_empty() {
                writeln!(f, "                 {:<16} any arguments", a.name)?;
            } else {
                writeln!(f, "                 {:<16} {}", a.name, a.note)?;
            }
        }
        for r in &self.refused {
            writeln!(
                f,
                "                 {:<16} refused: errno {} ({})",
                r.name, r.errno, r.note
            )?;
        }
        Ok(())
    }
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

fn bits(v: libc::c_int) -> u64 {
    u64::from(v.unsigned_abs())
}

/// `mmap`: without `PROT_EXEC` anything; with it only a private file
/// mapping (`MAP_PRIVATE`, not `MAP_ANONYMOUS`) that is not also writable.
pub fn mmap_w_xor_x() -> Result<Allowed, FilterError> {
    use SeccompCmpArgLen::Dword;
    let exec = bits(libc::PROT_EXEC);
    let write_exec = bits(libc::PROT_EXEC | libc::PROT_WRITE);
    // MAP_TYPE (shared / private / shared-validate) and MAP_ANONYMOUS.
    let kind_mask = 0x0f | bits(libc::MAP_ANONYMOUS);
    Ok(Allowed {
        name: "mmap",
        nr: libc::SYS_mmap,
        rules: vec![
            rule("mmap", vec![cond(2, Dword, SeccompCmpOp::MaskedEq(exec), 0)?])?,
            rule(
                "mmap",
                vec![
                    cond(2, Dword, SeccompCmpOp::MaskedEq(write_exec), exec)?,
                    cond(3, Dword, SeccompCmpOp::MaskedEq(kind_mask), bits(libc::MAP_PRIVATE))?,
                ],
            )?,
        ],
        note: "prot without PROT_EXEC; or PROT_EXEC without PROT_WRITE, MAP_PRIVATE, not MAP_ANONYMOUS".to_owned(),
    })
}

/// `mprotect` / `pkey_mprotect`: never `PROT_EXEC`.
pub fn mprotect_no_exec(name: &'static str, nr: i64) -> Result<Allowed, FilterError> {
    Ok(Allowed {
        name,
        nr,
        rules: vec![rule(
            name,
            vec![cond(
                2,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(bits(libc::PROT_EXEC)),
                0,
            )?],
        )?],
        note: "prot without PROT_EXEC".to_owned(),
    })
}

/// `futex` for waiting and waking only (plain or bitset, private or
/// shared): no PI, requeue or wake-op operations on words another process
/// (the host) may hold.
pub fn futex_wait_wake() -> Result<Allowed, FilterError> {
    // FUTEX_CMD_MASK: the operation without FUTEX_PRIVATE_FLAG and
    // FUTEX_CLOCK_REALTIME.
    let cmd = !u64::from((libc::FUTEX_PRIVATE_FLAG | libc::FUTEX_CLOCK_REALTIME).unsigned_abs()) & 0xffff_ffff;
    let ops = [
        libc::FUTEX_WAIT,
        libc::FUTEX_WAKE,
        libc::FUTEX_WAIT_BITSET,
        libc::FUTEX_WAKE_BITSET,
    ];
    let mut rules = Vec::new();
    for op in ops {
        rules.push(rule(
            "futex",
            vec![cond(1, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(cmd), bits(op))?],
        )?);
    }
    Ok(Allowed {
        name: "futex",
        nr: libc::SYS_futex,
        rules,
        note: "FUTEX_WAIT, FUTEX_WAKE and their _BITSET forms only".to_owned(),
    })
}

/// `tgkill(tgid, ..)` only with `tgid == pid` (this process's own threads).
pub fn tgkill_self(pid: u32) -> Result<Allowed, FilterError> {
    Ok(Allowed {
        name: "tgkill",
        nr: libc::SYS_tgkill,
        rules: vec![rule(
            "tgkill",
            vec![cond(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, u64::from(pid))?],
        )?],
        note: format!("tgid == {pid} (itself)"),
    })
}

/// `name` only on file descriptor `fd` (argument 0).
pub fn on_fd(name: &'static str, nr: i64, fd: i32, what: &str) -> Result<Allowed, FilterError> {
    Ok(Allowed {
        name,
        nr,
        rules: vec![rule(
            name,
            vec![cond(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, bits(fd))?],
        )?],
        note: format!("fd == {fd} ({what})"),
    })
}

/// `name` on any file descriptor but `fd` (argument 0).
pub fn not_on_fd(name: &'static str, nr: i64, fd: i32, what: &str) -> Result<Allowed, FilterError> {
    Ok(Allowed {
        name,
        nr,
        rules: vec![rule(
            name,
            vec![cond(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, bits(fd))?],
        )?],
        note: format!("fd != {fd} ({what})"),
    })
}

/// `name` (an `ioctl`) only on file descriptor `fd` with request `request`
/// (the kernel reads the request as a 32-bit `unsigned int`).
pub fn ioctl_on_fd(name: &'static str, nr: i64, fd: i32, request: u64, what: &str) -> Result<Allowed, FilterError> {
    Ok(Allowed {
        name,
        nr,
        rules: vec![rule(
            name,
            vec![
                cond(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, bits(fd))?,
                cond(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request & 0xffff_ffff)?,
            ],
        )?],
        note: format!("fd == {fd}, request == {request:#x} ({what})"),
    })
}

/// `fcntl(fd, F_GET_SEALS)` (checking a delivered artifact) and
/// `fcntl(fd, F_GETFD)` (std's check, in builds with debug assertions, that
/// an `OwnedFd` it closes is open) only: both just read.
pub fn fcntl_get_seals() -> Result<Allowed, FilterError> {
    let only = |cmd: libc::c_int| -> Result<SeccompRule, FilterError> {
        rule(
            "fcntl",
            vec![cond(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, bits(cmd))?],
        )
    };
    Ok(Allowed {
        name: "fcntl",
        nr: libc::SYS_fcntl,
        rules: vec![only(libc::F_GET_SEALS)?, only(libc::F_GETFD)?],
        note: "F_GET_SEALS and F_GETFD only".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_rules_compile() {
        let p = SeccompPolicy {
            allowed: vec![
                mmap_w_xor_x().unwrap(),
                futex_wait_wake().unwrap(),
                mprotect_no_exec("mprotect", libc::SYS_mprotect).unwrap(),
                tgkill_self(42).unwrap(),
                on_fd("write", libc::SYS_write, 2, "stderr").unwrap(),
                fcntl_get_seals().unwrap(),
                Allowed::any("exit_group", libc::SYS_exit_group),
            ],
            violation: Violation::KillProcess,
            refused: Vec::new(),
        };
        assert!(!p.compile().unwrap().is_empty());
        assert!(p.mentions(libc::SYS_tgkill));
        assert!(!p.mentions(libc::SYS_kill));
        let text = p.to_string();
        assert!(text.contains("tgid == 42"), "{text}");
    }
}
