//! The syscall-origin filter of a language worker with protection keys: a
//! second seccomp program (stacked on the allowlist; the stricter answer
//! wins) that traps the system calls able to undo the keys — memory layout
//! (`mmap`, `mprotect`, `pkey_mprotect`, `munmap`, `mremap`, `madvise`,
//! `brk`) and signal handling (`rt_sigaction`, `rt_sigreturn`,
//! `sigaltstack`: a function's own handler would run with the kernel's
//! default PKRU, a forged sigreturn frame restores any PKRU) — unless the
//! `syscall` instruction lies in code that was mapped before any function
//! was loaded (the worker binary, libc, the vDSO). seccomp cannot see PKRU,
//! but it sees `seccomp_data.instruction_pointer`.
//!
//! Function code is mapped later, at other addresses, so a raw `syscall`
//! in it is refused (SIGSYS, a policy violation). Residual: code reuse of
//! the runtime's own `syscall` instructions (a function with native code
//! can jump to libc's `syscall` wrapper).
//!
//! The program is built by [`program`], pure and tested against
//! [`evaluate`], a small interpreter of the instructions it emits.

use seccompiler::{BpfProgram, sock_filter};
use std::ops::Range;

/// The calls refused from outside the trusted code.
pub const GUARDED: [(&str, i64); 10] = [
    ("mmap", libc::SYS_mmap),
    ("mprotect", libc::SYS_mprotect),
    ("pkey_mprotect", libc::SYS_pkey_mprotect),
    ("munmap", libc::SYS_munmap),
    ("mremap", libc::SYS_mremap),
    ("madvise", libc::SYS_madvise),
    ("brk", libc::SYS_brk),
    ("rt_sigaction", libc::SYS_rt_sigaction),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
    ("sigaltstack", libc::SYS_sigaltstack),
];

const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const JGT_K: u16 = 0x25;
const RET_K: u16 = 0x06;
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_IP_LO: u32 = 8;
const OFF_IP_HI: u32 = 12;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// `SECCOMP_RET_ALLOW`.
pub const RET_ALLOW: u32 = 0x7fff_0000;
/// `SECCOMP_RET_TRAP`.
pub const RET_TRAP: u32 = 0x0003_0000;

/// Why the origin filter cannot be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    /// `/proc/self/maps` could not be read.
    #[error("cannot read /proc/self/maps")]
    Maps(#[source] std::io::Error),
    /// Too many trusted ranges for 8-bit jump offsets.
    #[error("{0} trusted code ranges are too many for the origin filter")]
    TooManyRanges(usize),
    /// The kernel refused the program.
    #[error("cannot install the origin filter")]
    Install(#[source] seccompiler::Error),
}

/// The origin filter of one process: trusted code ranges (addresses of the
/// byte after a `syscall` instruction: `instruction_pointer` points there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginFilter {
    /// Executable ranges mapped at the time the policy was made.
    pub trusted: Vec<Range<u64>>,
}

impl OriginFilter {
    /// The executable mappings of this process now.
    pub fn of_this_process() -> Result<Self, OriginError> {
        let maps = std::fs::read_to_string("/proc/self/maps").map_err(OriginError::Maps)?;
        Ok(Self {
            trusted: executable_ranges(&maps),
        })
    }

    /// Installs the program on the calling (only) thread.
    pub fn install(&self) -> Result<(), OriginError> {
        let program = program(&self.trusted)?;
        seccompiler::apply_filter(&program).map_err(OriginError::Install)
    }
}

/// The executable ranges listed in a `/proc/PID/maps` text. Pure.
pub fn executable_ranges(maps: &str) -> Vec<Range<u64>> {
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            if perms.as_bytes().get(2) != Some(&b'x') {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some(u64::from_str_radix(a, 16).ok()?..u64::from_str_radix(b, 16).ok()?)
        })
        .collect()
}

/// `[start, end]` (inclusive: a `syscall` in the last bytes leaves the
/// instruction pointer at `end`) cut at 4 GiB boundaries, so each piece has
/// one upper half: `(high, low_start, low_end)`.
fn pieces(ranges: &[Range<u64>]) -> Vec<(u32, u32, u32)> {
    let mut out = Vec::new();
    for r in ranges.iter().filter(|r| r.end > r.start) {
        let mut at = r.start;
        let last = r.end;
        loop {
            let high = at >> 32;
            let window_last = (high << 32) | 0xffff_ffff;
            let piece_last = last.min(window_last);
            let lo = |v: u64| u32::try_from(v & 0xffff_ffff).unwrap_or(u32::MAX);
            out.push((u32::try_from(high).unwrap_or(u32::MAX), lo(at), lo(piece_last)));
            if piece_last >= last {
                break;
            }
            at = piece_last + 1;
        }
    }
    out
}

#[derive(Clone, Copy)]
enum Target {
    Next,
    Allow,
    Trap,
    Check,
    Block(usize),
}

enum Insn {
    Load(u32),
    Jump(u16, u32, Target, Target),
    Ret(u32),
}

/// The program: other architectures and unguarded calls are allowed (the
/// allowlist judges them); a guarded call is allowed only from a trusted
/// range, else trapped. Pure.
pub fn program(trusted: &[Range<u64>]) -> Result<BpfProgram, OriginError> {
    let pieces = pieces(trusted);
    let mut code: Vec<(Option<Target>, Insn)> = vec![
        (None, Insn::Load(OFF_ARCH)),
        (None, Insn::Jump(JEQ_K, AUDIT_ARCH_X86_64, Target::Next, Target::Allow)),
        (None, Insn::Load(OFF_NR)),
    ];
    for (_, nr) in GUARDED {
        let nr = u32::try_from(nr).unwrap_or(u32::MAX);
        code.push((None, Insn::Jump(JEQ_K, nr, Target::Check, Target::Next)));
    }
    code.push((None, Insn::Ret(RET_ALLOW)));
    for (i, &(high, lo, last)) in pieces.iter().enumerate() {
        let next = if i + 1 < pieces.len() {
            Target::Block(i + 1)
        } else {
            Target::Trap
        };
        let label = if i == 0 { Target::Check } else { Target::Block(i) };
        code.push((Some(label), Insn::Load(OFF_IP_HI)));
        code.push((None, Insn::Jump(JEQ_K, high, Target::Next, next)));
        code.push((None, Insn::Load(OFF_IP_LO)));
        code.push((None, Insn::Jump(JGE_K, lo, Target::Next, next)));
        code.push((None, Insn::Jump(JGT_K, last, next, Target::Allow)));
    }
    code.push((
        if pieces.is_empty() { Some(Target::Check) } else { None },
        Insn::Ret(RET_TRAP),
    ));
    let trap_at = code.len() - 1;
    code.push((None, Insn::Ret(RET_ALLOW)));
    let allow_at = code.len() - 1;
    let check_at = code
        .iter()
        .position(|(l, _)| matches!(l, Some(Target::Check)))
        .unwrap_or(trap_at);
    let block_at = |b: usize| {
        code.iter()
            .position(|(l, _)| matches!(l, Some(Target::Block(x)) if *x == b))
            .unwrap_or(trap_at)
    };
    let mut out = Vec::with_capacity(code.len());
    for (at, (_, insn)) in code.iter().enumerate() {
        let offset = |t: Target| -> Result<u8, OriginError> {
            let to = match t {
                Target::Next => at + 1,
                Target::Allow => allow_at,
                Target::Trap => trap_at,
                Target::Check => check_at,
                Target::Block(b) => block_at(b),
            };
            u8::try_from(to - at - 1).map_err(|_| OriginError::TooManyRanges(pieces.len()))
        };
        out.push(match *insn {
            Insn::Load(k) => sock_filter {
                code: LD_W_ABS,
                jt: 0,
                jf: 0,
                k,
            },
            Insn::Jump(op, k, t, f) => sock_filter {
                code: op,
                jt: offset(t)?,
                jf: offset(f)?,
                k,
            },
            Insn::Ret(k) => sock_filter {
                code: RET_K,
                jt: 0,
                jf: 0,
                k,
            },
        });
    }
    Ok(out)
}

/// Runs `program` on a system call `nr` of x86-64 made with instruction
/// pointer `ip`: the instructions [`program`] emits only. Pure, for tests.
pub fn evaluate(program: &[sock_filter], nr: u32, arch: u32, ip: u64) -> u32 {
    let word = |off: u32| -> u32 {
        match off {
            OFF_NR => nr,
            OFF_ARCH => arch,
            OFF_IP_LO => u32::try_from(ip & 0xffff_ffff).unwrap_or(0),
            OFF_IP_HI => u32::try_from(ip >> 32).unwrap_or(0),
            _ => 0,
        }
    };
    let (mut pc, mut a) = (0usize, 0u32);
    while let Some(i) = program.get(pc) {
        let jump = |cond: bool| 1 + usize::from(if cond { i.jt } else { i.jf });
        pc += match i.code {
            LD_W_ABS => {
                a = word(i.k);
                1
            }
            JEQ_K => jump(a == i.k),
            JGE_K => jump(a >= i.k),
            JGT_K => jump(a > i.k),
            RET_K => return i.k,
            _ => return 0,
        };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MMAP: u32 = 9;

    #[test]
    fn maps_are_parsed() {
        let maps = "5555aaaa0000-5555aaab0000 r--p 00000000 00:1f 12 /w\n\
                    5555aaab0000-5555aaac0000 r-xp 00010000 00:1f 12 /w\n\
                    7fff00000000-7fff00002000 r-xp 00000000 00:00 0 [vdso]\n\
                    bad line\n";
        assert_eq!(
            executable_ranges(maps),
            vec![0x5555_aaab_0000..0x5555_aaac_0000, 0x7fff_0000_0000..0x7fff_0000_2000]
        );
    }

    #[test]
    fn guarded_calls_only_from_trusted_code() {
        let p = program(&[0x5555_0000_1000..0x5555_0000_2000, 0x7fff_ffff_f000..0x8000_0000_1000]).unwrap();
        let x86 = AUDIT_ARCH_X86_64;
        assert_eq!(evaluate(&p, MMAP, x86, 0x5555_0000_1800), RET_ALLOW);
        assert_eq!(evaluate(&p, MMAP, x86, 0x5555_0000_2000), RET_ALLOW, "end is inclusive");
        assert_eq!(evaluate(&p, MMAP, x86, 0x5555_0000_2001), RET_TRAP);
        assert_eq!(evaluate(&p, MMAP, x86, 0x5555_0000_0fff), RET_TRAP);
        assert_eq!(evaluate(&p, MMAP, x86, 0x5556_0000_1800), RET_TRAP, "other high half");
        // Across a 4 GiB boundary.
        assert_eq!(evaluate(&p, MMAP, x86, 0x7fff_ffff_ffff), RET_ALLOW);
        assert_eq!(evaluate(&p, MMAP, x86, 0x8000_0000_0000), RET_ALLOW);
        assert_eq!(evaluate(&p, MMAP, x86, 0x8000_0000_1001), RET_TRAP);
        // Unguarded calls and other architectures: not this filter's call.
        assert_eq!(evaluate(&p, 39, x86, 0x1234), RET_ALLOW);
        assert_eq!(evaluate(&p, MMAP, 0x4000_0003, 0x1234), RET_ALLOW);
        // No trusted code: every guarded call traps.
        let none = program(&[]).unwrap();
        assert_eq!(evaluate(&none, MMAP, x86, 0x5555_0000_1800), RET_TRAP);
        assert_eq!(evaluate(&none, 0, x86, 1), RET_ALLOW);
    }

    proptest! {
        /// Against the naive rule: guarded and outside every [start, end] traps.
        #[test]
        fn program_matches_the_rule(
            ranges in proptest::collection::vec((0u64..1 << 40, 1u64..1 << 34), 0..12),
            probes in proptest::collection::vec(0u64..1 << 41, 1..40),
            guarded in any::<bool>(),
        ) {
            let ranges: Vec<Range<u64>> = ranges.into_iter().map(|(s, l)| s..s + l).collect();
            let p = program(&ranges).unwrap();
            let nr = if guarded { MMAP } else { 0 };
            for ip in probes.into_iter().chain(ranges.iter().flat_map(|r| [r.start, r.end, r.end + 1])) {
                let inside = ranges.iter().any(|r| ip >= r.start && ip <= r.end);
                let want = if guarded && !inside { RET_TRAP } else { RET_ALLOW };
                prop_assert_eq!(evaluate(&p, nr, AUDIT_ARCH_X86_64, ip), want, "ip {:#x}", ip);
            }
        }
    }
}
