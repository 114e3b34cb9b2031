//! The layout of the seccomp program: the architecture check, the x32
//! refusal, a balanced binary search on the system call number over the
//! ranges of numbers with one action, and each allowed call's argument
//! checks as seccompiler compiles its rules.
//!
//! Why not seccompiler's own program: it tests the number against every
//! allowed call in turn (one `jeq` per call, plus one hop per rule), and
//! when a filter is attached the kernel runs the program once for every
//! system call number of the native ABI to fill its action cache
//! (`seccomp_cache_prepare_bitmap` emulating `seccomp_is_const_allow`), so
//! attaching costs (system calls x allowed calls). That is paid on the cold
//! path of every process runner. A binary search costs (system calls x
//! log2 ranges), and the program is shorter (the kernel also converts and
//! JIT-compiles it, ~0.13 us per instruction here). It accepts exactly the
//! same calls with the same arguments (proved against seccompiler's program
//! in the tests).
//!
//! ```text
//!        ld  arch
//!        jeq AUDIT_ARCH_X86_64 ? +1 : +0
//!        ret KILL_PROCESS                  any other ABI (i386 through int 0x80)
//!        ld  nr
//!        jge 0x4000_0000 ? +0 : +1
//!        ret VIOLATION                     the x32 ABI (and negative numbers)
//!  node  jge lo[mid] ? high : low          ranges [lo[i], lo[i+1]) split in halves;
//!  low   <node: ranges ..mid>              a half of one range is not emitted: the
//!  high  <node: ranges mid..>              node jumps to its action instead
//!        ...
//!  ALLOW ret ALLOW
//!  DENY  ret VIOLATION
//! BLOCK_i  checks of rule 1, ret ALLOW, checks of rule 2, ret ALLOW, ...,
//!          ret VIOLATION          (a rule's failed check jumps to the next rule)
//! ```
//!
//! A search too long for 8-bit jumps to those targets (over ~120 ranges)
//! gets a leaf instruction per range instead (`ret ALLOW`, `ret VIOLATION`
//! or `ja BLOCK_i`) and a `jge lo[mid] ? +0 : +1; ja high` trampoline over
//! any low half over 255 instructions long.

use seccompiler::{BpfProgram, SeccompRule, sock_filter};
use std::collections::BTreeMap;

/// `BPF_LD | BPF_W | BPF_ABS`: load a word of `seccomp_data`.
pub(super) const LD_W_ABS: u16 = 0x20;
/// `BPF_ALU | BPF_AND | BPF_K`.
pub(super) const ALU_AND_K: u16 = 0x54;
/// `BPF_JMP | BPF_JA`: jump by `k`.
pub(super) const JMP_JA: u16 = 0x05;
/// `BPF_JMP | BPF_JEQ | BPF_K`.
pub(super) const JMP_JEQ_K: u16 = 0x15;
/// `BPF_JMP | BPF_JGT | BPF_K`.
pub(super) const JMP_JGT_K: u16 = 0x25;
/// `BPF_JMP | BPF_JGE | BPF_K`.
pub(super) const JMP_JGE_K: u16 = 0x35;
/// `BPF_RET | BPF_K`.
pub(super) const RET_K: u16 = 0x06;

/// `offsetof(struct seccomp_data, nr)`.
const NR_OFFSET: u32 = 0;
/// `offsetof(struct seccomp_data, arch)`.
const ARCH_OFFSET: u32 = 4;
/// `offsetof(struct seccomp_data, args)`.
const ARGS_OFFSET: u32 = 16;
/// `sizeof(struct seccomp_data)`.
pub(super) const SECCOMP_DATA_LEN: u32 = 64;
/// `AUDIT_ARCH_X86_64` (`EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`).
pub(super) const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// `__X32_SYSCALL_BIT`: set in the number of every x32 system call.
pub(super) const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// `BPF_MAXINSNS`: the longest program the kernel attaches.
pub(super) const BPF_MAXINSNS: usize = 4096;

/// Laying out the program failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A system call number outside the native x86-64 range.
    #[error("system call number {0} is not an x86-64 system call")]
    Number(i64),
    /// seccompiler's code for a syscall's rules jumps outside them, has an
    /// instruction this layout does not know, or does not end in a return.
    #[error("the compiled rules of system call {nr} are not self-contained (instruction {at})")]
    ForeignRule {
        /// The system call.
        nr: u32,
        /// The offending instruction, counted from the start of its block.
        at: usize,
    },
    /// Longer than the kernel accepts.
    #[error("the program has {0} instructions, more than the kernel's {BPF_MAXINSNS}")]
    TooLong(usize),
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// What the numbers of one range get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Allowed with any arguments.
    Allow,
    /// The violation.
    Deny,
    /// The argument checks in block `n`.
    Block(usize),
}

/// Where a node of the compact search goes.
#[derive(Debug, Clone, Copy)]
enum To {
    /// Its subtree, this far ahead.
    Skip(u8),
    /// A range's action: a shared return or a block.
    Leaf(Action),
}

/// One instruction of the search, before the returns and blocks after it
/// are placed.
#[derive(Debug)]
enum Slot {
    Insn(sock_filter),
    /// `jge k` of the compact search.
    Node {
        k: u32,
        jt: To,
        jf: To,
    },
    /// `ja` to a block.
    Goto(usize),
}

/// The program allowing each syscall of `rules` (any arguments if its rules
/// are empty, else if any of its rules matches), `violation` for any other
/// x86-64 or x32 call, `SECCOMP_RET_KILL_PROCESS` for any other ABI: what
/// seccompiler's `SeccompFilter::new(rules, violation, Allow, x86_64)`
/// returns, laid out for a cheap attach. (The policies compile through
/// [`layout_refusing`]; this is its form without refusals, for the tests.)
#[cfg(test)]
pub fn layout(rules: BTreeMap<i64, Vec<SeccompRule>>, violation: u32) -> Result<BpfProgram, LayoutError> {
    layout_refusing(rules, &[], violation)
}

/// [`layout`], with each `(nr, ret)` of `refused` returning `ret` (an
/// errno return, `SECCOMP_RET_ERRNO | errno`) before the search: one `jeq
/// nr ? +0 : +1; ret` pair per refused call, right after the x32 check
/// (the accumulator holds the number there), so its number never reaches
/// the search, whose range for it is the violation.
pub fn layout_refusing(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    refused: &[(i64, u32)],
    violation: u32,
) -> Result<BpfProgram, LayoutError> {
    let mut refusals = Vec::with_capacity(refused.len() * 2);
    for &(nr, ret) in refused {
        let native = u32::try_from(nr)
            .ok()
            .filter(|n| *n < X32_SYSCALL_BIT)
            .ok_or(LayoutError::Number(nr))?;
        refusals.push(jump(JMP_JEQ_K, native, 0, 1));
        refusals.push(stmt(RET_K, ret));
    }
    // The number line from 0 cut into ranges [start, next start) of one
    // action each; the last range runs to the x32 bit.
    let mut ranges: Vec<(u32, Action)> = Vec::new();
    let mut blocks = Vec::new();
    let mut next = 0u32;
    for (nr, chain) in rules {
        let native = u32::try_from(nr)
            .ok()
            .filter(|n| *n < X32_SYSCALL_BIT)
            .ok_or(LayoutError::Number(nr))?;
        if native > next {
            push_range(&mut ranges, next, Action::Deny);
        }
        let action = if chain.is_empty() {
            Action::Allow
        } else {
            blocks.push(block(native, chain, violation)?);
            Action::Block(blocks.len() - 1)
        };
        push_range(&mut ranges, native, action);
        // `native` < X32_SYSCALL_BIT: no overflow.
        next = native + 1;
    }
    push_range(&mut ranges, next, Action::Deny);

    let preamble = || {
        let mut slots = vec![
            Slot::Insn(stmt(LD_W_ABS, ARCH_OFFSET)),
            Slot::Insn(jump(JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0)),
            Slot::Insn(stmt(RET_K, libc::SECCOMP_RET_KILL_PROCESS)),
            Slot::Insn(stmt(LD_W_ABS, NR_OFFSET)),
            Slot::Insn(jump(JMP_JGE_K, X32_SYSCALL_BIT, 0, 1)),
            Slot::Insn(stmt(RET_K, violation)),
        ];
        slots.extend(refusals.iter().cloned().map(Slot::Insn));
        slots
    };
    // Compact where every jump reaches (the search no longer than ~250
    // instructions: up to ~120 ranges), else with a leaf per range.
    if ranges.len() >= 2 {
        let mut slots = preamble();
        if compact(&ranges, &mut slots).is_some()
            && let Some(program) = assemble(slots, &blocks, violation, true)?
        {
            return Ok(program);
        }
    }
    let mut slots = preamble();
    search(&ranges, violation, &mut slots)?;
    assemble(slots, &blocks, violation, false)?.ok_or(LayoutError::TooLong(BPF_MAXINSNS))
}

/// Appends the range starting at `start`, merged into the previous one if
/// that has the same action (runs of numbers allowed with any arguments).
fn push_range(ranges: &mut Vec<(u32, Action)>, start: u32, action: Action) {
    if ranges.last().is_none_or(|(_, last)| *last != action) {
        ranges.push((start, action));
    }
}

/// Appends the compact search over `ranges` (at least two) to `out`: a
/// node whose half is one range jumps straight to its action (`ret ALLOW`
/// and `ret VIOLATION` once after the search, or the block). `None` when a
/// half is too long to jump over with an 8-bit offset.
fn compact(ranges: &[(u32, Action)], out: &mut Vec<Slot>) -> Option<()> {
    let (low, high) = ranges.split_at(ranges.len() / 2);
    let mut below = Vec::new();
    let jf = match low {
        [(_, action)] => To::Leaf(*action),
        _ => {
            compact(low, &mut below)?;
            To::Skip(0)
        }
    };
    let jt = match high {
        [(_, action)] => To::Leaf(*action),
        _ => To::Skip(u8::try_from(below.len()).ok()?),
    };
    out.push(Slot::Node { k: high[0].0, jt, jf });
    out.extend(below);
    if high.len() > 1 {
        compact(high, out)?;
    }
    Some(())
}

/// Appends the search over `ranges` (ascending starts) to `out`, with a
/// leaf instruction per range.
fn search(ranges: &[(u32, Action)], violation: u32, out: &mut Vec<Slot>) -> Result<(), LayoutError> {
    match ranges {
        [] | [(_, Action::Deny)] => out.push(Slot::Insn(stmt(RET_K, violation))),
        [(_, Action::Allow)] => out.push(Slot::Insn(stmt(RET_K, libc::SECCOMP_RET_ALLOW))),
        [(_, Action::Block(b))] => out.push(Slot::Goto(*b)),
        _ => {
            let (low, high) = ranges.split_at(ranges.len() / 2);
            let pivot = high[0].0;
            let mut below = Vec::new();
            search(low, violation, &mut below)?;
            match u8::try_from(below.len()) {
                Ok(skip) => out.push(Slot::Insn(jump(JMP_JGE_K, pivot, skip, 0))),
                Err(_) => {
                    let skip = u32::try_from(below.len()).map_err(|_| LayoutError::TooLong(below.len()))?;
                    out.push(Slot::Insn(jump(JMP_JGE_K, pivot, 0, 1)));
                    out.push(Slot::Insn(stmt(JMP_JA, skip)));
                }
            }
            out.extend(below);
            search(high, violation, out)?;
        }
    }
    Ok(())
}

/// The program: the search's `slots`, with `shared` the two shared returns,
/// then the blocks, every jump resolved. `None` when a node cannot reach
/// its target with an 8-bit offset.
fn assemble(
    slots: Vec<Slot>,
    blocks: &[Vec<sock_filter>],
    violation: u32,
    shared: bool,
) -> Result<Option<BpfProgram>, LayoutError> {
    let allow_at = slots.len();
    let deny_at = allow_at + 1;
    let mut starts = Vec::with_capacity(blocks.len());
    let mut total = if shared { allow_at + 2 } else { allow_at };
    for b in blocks {
        starts.push(total);
        total = total.saturating_add(b.len());
    }
    if total > BPF_MAXINSNS {
        return Err(LayoutError::TooLong(total));
    }
    // All targets lie ahead (the returns and blocks follow the search), and
    // `total` <= BPF_MAXINSNS bounds every distance.
    let position = |action: Action| match action {
        Action::Allow => shared.then_some(allow_at),
        Action::Deny => shared.then_some(deny_at),
        Action::Block(b) => starts.get(b).copied(),
    };
    let offset = |at: usize, to: To| match to {
        To::Skip(skip) => Some(skip),
        To::Leaf(action) => u8::try_from(position(action)? - (at + 1)).ok(),
    };
    let mut program = Vec::with_capacity(total);
    for (at, slot) in slots.into_iter().enumerate() {
        program.push(match slot {
            Slot::Insn(insn) => insn,
            Slot::Node { k, jt, jf } => {
                let (Some(jt), Some(jf)) = (offset(at, jt), offset(at, jf)) else {
                    return Ok(None);
                };
                jump(JMP_JGE_K, k, jt, jf)
            }
            Slot::Goto(b) => {
                let Some(target) = starts.get(b) else {
                    return Ok(None);
                };
                stmt(
                    JMP_JA,
                    u32::try_from(target - (at + 1)).map_err(|_| LayoutError::TooLong(total))?,
                )
            }
        });
    }
    if shared {
        program.push(stmt(RET_K, libc::SECCOMP_RET_ALLOW));
        program.push(stmt(RET_K, violation));
    }
    for b in blocks {
        program.extend_from_slice(b);
    }
    Ok(Some(program))
}

/// The argument checks of syscall `nr`, entered at its first instruction:
/// each rule's checks as seccompiler compiles them, followed by `ret
/// ALLOW` (as in `SeccompFilter`'s chain), then `ret violation`, where the
/// last rule's failed check lands.
fn block(nr: u32, rules: Vec<SeccompRule>, violation: u32) -> Result<Vec<sock_filter>, LayoutError> {
    let mut code = Vec::new();
    for rule in rules {
        let compiled = BpfProgram::from(rule);
        let foreign = LayoutError::ForeignRule { nr, at: code.len() };
        let checks = rule_checks(&compiled).ok_or(foreign)?;
        code.extend_from_slice(checks);
        code.push(stmt(RET_K, libc::SECCOMP_RET_ALLOW));
    }
    code.push(stmt(RET_K, violation));
    match self_contained(&code) {
        Ok(()) => Ok(code),
        Err(at) => Err(LayoutError::ForeignRule { nr, at }),
    }
}

/// The checks of one rule compiled by seccompiler, without its first two
/// instructions: `ja 1` (enter the rule) and `ja <past it>` (the skip chain
/// its linear layout hops along when the number did not match; entering
/// each rule at its checks needs neither). `None` unless the rest is
/// straight-line checks whose jumps all land within them, on the `ret
/// ALLOW` that follows them (`len`) or on the next rule (`len + 1`).
fn rule_checks(compiled: &[sock_filter]) -> Option<&[sock_filter]> {
    let [enter, skip, checks @ ..] = compiled else {
        return None;
    };
    if (enter.code, enter.k) != (JMP_JA, 1) || skip.code != JMP_JA {
        return None;
    }
    let lands = |at: usize, off: u8| at + 1 + usize::from(off) <= checks.len() + 1;
    checks
        .iter()
        .enumerate()
        .all(|(at, insn)| match insn.code {
            JMP_JEQ_K | JMP_JGT_K | JMP_JGE_K => lands(at, insn.jt) && lands(at, insn.jf),
            LD_W_ABS | ALU_AND_K => true,
            _ => false,
        })
        .then_some(checks)
}

/// Checks that every instruction of `code` is one this layout knows, loads
/// only a syscall argument, jumps only within `code`, and that `code` ends
/// in a return (so, all jumps being forward, every path from anywhere in it
/// ends in one of its returns). Returns the first instruction that fails.
fn self_contained(code: &[sock_filter]) -> Result<(), usize> {
    let inside = |at: usize, skip: usize| {
        at.checked_add(1)
            .and_then(|n| n.checked_add(skip))
            .is_some_and(|t| t < code.len())
    };
    for (at, insn) in code.iter().enumerate() {
        let ok = match insn.code {
            LD_W_ABS => (ARGS_OFFSET..SECCOMP_DATA_LEN).contains(&insn.k) && insn.k % 4 == 0,
            ALU_AND_K | RET_K => true,
            JMP_JA => usize::try_from(insn.k).is_ok_and(|k| inside(at, k)),
            JMP_JEQ_K | JMP_JGT_K | JMP_JGE_K => inside(at, insn.jt.into()) && inside(at, insn.jf.into()),
            _ => false,
        };
        if !ok {
            return Err(at);
        }
    }
    match code.last() {
        Some(last) if last.code == RET_K => Ok(()),
        _ => Err(code.len().saturating_sub(1)),
    }
}

#[cfg(test)]
mod tests;
