//! The laid-out program against seccompiler's own: a classic-BPF
//! interpreter (only the opcodes the two programs use) runs both on the
//! same `seccomp_data`, for the worker's and the runner's policies and for
//! random ones; the kernel attaches it in a forked child.

use super::*;
use crate::sandbox::seccomp::{Allowed, SeccompPolicy, Violation};
use crate::sandbox::{SandboxSettings, SandboxSpec, runner, worker};
use proptest::prelude::*;
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition};

/// `AUDIT_ARCH_I386` (`EM_386 | __AUDIT_ARCH_LE`).
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
/// The syscall numbers the kernel's action cache covers on x86-64 (the
/// table has fewer; every number here is emulated at attach).
const NATIVE_NRS: i32 = 512;
const PID: u32 = 4242;
const CATALOG_FD: i32 = 4;
/// The pagemap fd of a worker with a page scan.
const PAGEMAP_FD: i32 = 5;

/// `struct seccomp_data`.
#[derive(Debug, Clone, Copy)]
struct Data {
    nr: i32,
    arch: u32,
    ip: u64,
    args: [u64; 6],
}

impl Data {
    fn new(nr: i32, arch: u32, args: [u64; 6]) -> Self {
        Self {
            nr,
            arch,
            ip: 0x7f00_1234_5678,
            args,
        }
    }

    /// The 32-bit word at byte `offset`, as `BPF_LD | BPF_W | BPF_ABS`
    /// reads it (the kernel fills `seccomp_data` in native byte order).
    fn word(&self, offset: u32) -> Result<u32, String> {
        let mut bytes = Vec::with_capacity(64);
        bytes.extend(self.nr.to_ne_bytes());
        bytes.extend(self.arch.to_ne_bytes());
        bytes.extend(self.ip.to_ne_bytes());
        for a in self.args {
            bytes.extend(a.to_ne_bytes());
        }
        let at = usize::try_from(offset).map_err(|e| e.to_string())?;
        if at % 4 != 0 {
            return Err(format!("unaligned load at {offset}"));
        }
        let w = bytes
            .get(at..at + 4)
            .ok_or(format!("load past seccomp_data at {offset}"))?;
        Ok(u32::from_ne_bytes([w[0], w[1], w[2], w[3]]))
    }
}

/// Runs `program` on `data`; fails on any opcode outside the set the two
/// layouts use, a jump out of the program or running off its end.
fn run(program: &[sock_filter], data: &Data) -> Result<u32, String> {
    let mut a: u32 = 0;
    let mut pc = 0usize;
    for _ in 0..=program.len() {
        let insn = program.get(pc).ok_or(format!("pc {pc} outside the program"))?;
        let next = pc + 1;
        let taken = |cond: bool| next + usize::from(if cond { insn.jt } else { insn.jf });
        pc = match insn.code {
            LD_W_ABS => {
                a = data.word(insn.k)?;
                next
            }
            ALU_AND_K => {
                a &= insn.k;
                next
            }
            JMP_JA => next + usize::try_from(insn.k).map_err(|e| e.to_string())?,
            JMP_JEQ_K => taken(a == insn.k),
            JMP_JGT_K => taken(a > insn.k),
            JMP_JGE_K => taken(a >= insn.k),
            RET_K => return Ok(insn.k),
            other => return Err(format!("opcode {other:#06x} at {pc}")),
        };
    }
    Err("no return (jumps are forward, so this cannot loop)".to_owned())
}

/// How many instructions the kernel's attach-time emulation
/// (`seccomp_is_const_allow`) runs for syscall `nr` of `arch`: until a
/// return, or a load of anything but the number and the architecture (it
/// gives up there).
fn emulated(program: &[sock_filter], nr: i32, arch: u32) -> usize {
    let data = Data::new(nr, arch, [0; 6]);
    let mut a = 0u32;
    let mut pc = 0usize;
    let mut steps = 0;
    while let Some(insn) = program.get(pc) {
        steps += 1;
        let next = pc + 1;
        let taken = |cond: bool| next + usize::from(if cond { insn.jt } else { insn.jf });
        pc = match insn.code {
            LD_W_ABS if insn.k < 8 => {
                a = data.word(insn.k).unwrap();
                next
            }
            LD_W_ABS | RET_K => return steps,
            ALU_AND_K => {
                a &= insn.k;
                next
            }
            JMP_JA => next + usize::try_from(insn.k).unwrap(),
            JMP_JEQ_K => taken(a == insn.k),
            JMP_JGT_K => taken(a > insn.k),
            JMP_JGE_K => taken(a >= insn.k),
            other => panic!("opcode {other:#x}"),
        };
    }
    panic!("ran off the program");
}

fn spec() -> SandboxSpec {
    SandboxSpec {
        settings: SandboxSettings::default(),
        netns: None,
        ipcns: None,
    }
}

fn policies() -> Vec<SeccompPolicy> {
    vec![
        worker::policy(&spec(), PID, CATALOG_FD).unwrap().seccomp.unwrap(),
        worker::policy_with_pagemap(&spec(), PID, CATALOG_FD, Some(PAGEMAP_FD))
            .unwrap()
            .seccomp
            .unwrap(),
        runner::policy(&spec(), PID).unwrap().seccomp.unwrap(),
    ]
}

fn both(policy: &SeccompPolicy) -> (BpfProgram, BpfProgram) {
    (policy.compile().unwrap(), policy.compile_linear().unwrap())
}

/// Values near the policies' constants and masks (prot, map and futex
/// bits, fcntl commands, the pid and fds).
fn interesting() -> Vec<u64> {
    let mut v = vec![
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0x0f, 0x10, 0x20, 0x21, 0x22, 0x23, 0x2f,
    ];
    v.extend([0x80, 0x81, 0x89, 0x8a, 0x100, 0x101, 0x180, 0x189, 1033, 1034, 1035]);
    v.extend([u64::from(PID), u64::from(PID) + 1, u64::from(CATALOG_FD.unsigned_abs())]);
    let scan = crate::runtime::pagescan::PAGEMAP_SCAN;
    v.extend([
        u64::from(PAGEMAP_FD.unsigned_abs()),
        scan,
        scan + 1,
        scan - 1,
        scan | (1 << 32),
    ]);
    v.extend([u64::from(u32::MAX), u64::MAX, 1 << 32, (1 << 32) | 2, (1 << 32) | 4]);
    v
}

fn arg() -> impl Strategy<Value = u64> {
    let pick = prop::sample::select(interesting());
    prop_oneof![
        any::<u64>(),
        0u64..0x400,
        pick.clone(),
        (pick.clone(), any::<u32>()).prop_map(|(v, hi)| v | (u64::from(hi) << 32)),
        (pick, 0u32..64).prop_map(|(v, bit)| v ^ (1u64 << bit)),
    ]
}

fn nr() -> impl Strategy<Value = i32> {
    prop_oneof![0i32..=600, (0i32..=600).prop_map(|n| n | 0x4000_0000), any::<i32>(),]
}

fn arch() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => Just(AUDIT_ARCH_X86_64),
        1 => Just(AUDIT_ARCH_I386),
        1 => any::<u32>(),
    ]
}

fn data() -> impl Strategy<Value = Data> {
    (nr(), arch(), prop::array::uniform6(arg())).prop_map(|(nr, arch, args)| Data::new(nr, arch, args))
}

#[test]
fn opcodes_are_the_kernels() {
    let code = |c: u32| u16::try_from(c).unwrap();
    assert_eq!(LD_W_ABS, code(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS));
    assert_eq!(ALU_AND_K, code(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K));
    assert_eq!(JMP_JA, code(libc::BPF_JMP | libc::BPF_JA));
    assert_eq!(JMP_JEQ_K, code(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K));
    assert_eq!(JMP_JGT_K, code(libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K));
    assert_eq!(JMP_JGE_K, code(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K));
    assert_eq!(RET_K, code(libc::BPF_RET | libc::BPF_K));
    assert_eq!(BPF_MAXINSNS, usize::try_from(libc::BPF_MAXINSNS).unwrap());
}

/// Every number of both ABIs and beyond, with arguments from the policies'
/// constants in every position: the same action from both programs.
#[test]
fn policies_match_seccompiler_on_every_number() {
    let values = interesting();
    for policy in policies() {
        let (ours, linear) = both(&policy);
        assert!(ours.len() < BPF_MAXINSNS, "{} instructions", ours.len());
        let mut allowed = 0;
        for nr in (0..=600)
            .chain(0x4000_0000..=0x4000_0000 + 600)
            .chain([-1, i32::MAX, i32::MIN])
        {
            for arch in [AUDIT_ARCH_X86_64, AUDIT_ARCH_I386] {
                for v in &values {
                    let d = Data::new(nr, arch, [*v; 6]);
                    let want = run(&linear, &d).unwrap();
                    assert_eq!(run(&ours, &d).unwrap(), want, "{d:?}");
                    allowed += usize::from(want == libc::SECCOMP_RET_ALLOW);
                }
            }
        }
        // The comparison saw allowed calls, argument-checked ones denied,
        // other numbers and the other ABIs.
        assert!(allowed > 0);
        let i386 = run(
            &ours,
            &Data::new(libc::SYS_getpid.try_into().unwrap(), AUDIT_ARCH_I386, [0; 6]),
        );
        assert_eq!(i386, Ok(libc::SECCOMP_RET_KILL_PROCESS));
        let x32 = Data::new(
            0x4000_0000 | i32::try_from(libc::SYS_getpid).unwrap(),
            AUDIT_ARCH_X86_64,
            [0; 6],
        );
        assert_ne!(run(&ours, &x32), Ok(libc::SECCOMP_RET_ALLOW));
        let write1 = Data::new(
            libc::SYS_write.try_into().unwrap(),
            AUDIT_ARCH_X86_64,
            [1, 0, 0, 0, 0, 0],
        );
        assert_ne!(run(&ours, &write1), Ok(libc::SECCOMP_RET_ALLOW));
        let write2 = Data::new(
            libc::SYS_write.try_into().unwrap(),
            AUDIT_ARCH_X86_64,
            [2, 0, 0, 0, 0, 0],
        );
        assert_eq!(run(&ours, &write2), Ok(libc::SECCOMP_RET_ALLOW));
    }
}

/// What the kernel emulates at attach: every native number through the
/// whole program, against a few steps of the search.
#[test]
fn attach_emulation_is_logarithmic() {
    for policy in policies() {
        let (ours, linear) = both(&policy);
        let n = policy.allowed.len();
        // At most 2n + 1 ranges.
        let depth = usize::try_from((2 * n + 1).next_power_of_two().trailing_zeros()).unwrap();
        let (mut ours_steps, mut linear_steps) = (0, 0);
        for nr in 0..NATIVE_NRS {
            let steps = emulated(&ours, nr, AUDIT_ARCH_X86_64);
            // arch (2), nr, x32, the nodes (1 or 2 each), the leaf, the
            // block's first load.
            assert!(steps <= 4 + 2 * depth + 2, "nr {nr}: {steps} steps");
            ours_steps += steps;
            linear_steps += emulated(&linear, nr, AUDIT_ARCH_X86_64);
        }
        println!(
            "{} calls allowed: attach emulates {ours_steps} instructions (seccompiler's layout: {linear_steps})",
            n
        );
        assert!(ours_steps * 2 < linear_steps);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn policies_match_seccompiler_on_random_data(cases in prop::collection::vec(data(), 16)) {
        for policy in policies() {
            let (ours, linear) = both(&policy);
            for d in &cases {
                prop_assert_eq!(run(&ours, d), run(&linear, d), "{:?}", d);
            }
        }
    }
}

fn small_value() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..8, (0u64..8).prop_map(|v| v | (1 << 32)), Just(u64::MAX)]
}

fn condition() -> impl Strategy<Value = SeccompCondition> {
    let op = prop_oneof![
        Just(SeccompCmpOp::Eq),
        Just(SeccompCmpOp::Ne),
        Just(SeccompCmpOp::Lt),
        Just(SeccompCmpOp::Le),
        Just(SeccompCmpOp::Gt),
        Just(SeccompCmpOp::Ge),
        small_value().prop_map(SeccompCmpOp::MaskedEq),
    ];
    (0u8..6, any::<bool>(), op, small_value()).prop_map(|(arg, qword, op, value)| {
        let len = if qword {
            SeccompCmpArgLen::Qword
        } else {
            SeccompCmpArgLen::Dword
        };
        SeccompCondition::new(arg, len, op, value).unwrap()
    })
}

fn rules() -> impl Strategy<Value = Vec<SeccompRule>> {
    let rule = prop::collection::vec(condition(), 1..4).prop_map(|c| SeccompRule::new(c).unwrap());
    prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(rule, 1..3)]
}

/// Random allowlists (up to 150 calls: the search's jumps then need `ja`
/// trampolines) with random argument rules.
fn policy() -> impl Strategy<Value = SeccompPolicy> {
    let calls = prop::collection::btree_map(0i64..600, rules(), 0..150);
    let violation = prop_oneof![Just(Violation::Trap), Just(Violation::KillProcess)];
    (calls, violation).prop_map(|(calls, violation)| SeccompPolicy {
        allowed: calls
            .into_iter()
            .map(|(nr, rules)| Allowed {
                name: "random",
                nr,
                rules,
                note: String::new(),
            })
            .collect(),
        violation,
        refused: Vec::new(),
    })
}

fn random_data(policy: &SeccompPolicy) -> BoxedStrategy<Vec<Data>> {
    let nrs: Vec<i32> = policy.allowed.iter().map(|a| i32::try_from(a.nr).unwrap()).collect();
    let nr = if nrs.is_empty() {
        nr().boxed()
    } else {
        prop_oneof![3 => prop::sample::select(nrs), 1 => nr()].boxed()
    };
    let one = (nr, arch(), prop::array::uniform6(small_value())).prop_map(|(nr, arch, args)| Data::new(nr, arch, args));
    prop::collection::vec(one, 32).boxed()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_policies_match_seccompiler(
        (policy, cases) in policy().prop_flat_map(|p| { let d = random_data(&p); (Just(p), d) })
    ) {
        let linear = match policy.compile_linear() {
            Ok(p) => p,
            // seccompiler refuses it as too long: nothing to compare.
            Err(_) => return Ok(()),
        };
        let ours = match policy.compile() {
            Ok(p) => p,
            Err(crate::sandbox::seccomp::FilterError::Layout(LayoutError::TooLong(n))) => {
                prop_assert!(n > BPF_MAXINSNS);
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("{e:?}"))),
        };
        for d in &cases {
            prop_assert_eq!(run(&ours, d), run(&linear, d), "{:?}", d);
        }
    }
}

/// The real policies get the compact search (nodes jump straight to the
/// shared returns and the blocks: no instruction per range), shorter than
/// seccompiler's program.
#[test]
fn policies_get_the_compact_search() {
    for policy in policies() {
        let (ours, linear) = both(&policy);
        let leaves = ours.iter().filter(|i| i.code == JMP_JA).count();
        assert_eq!(leaves, 0, "{ours:?}");
        println!(
            "{} calls: {} instructions (seccompiler: {})",
            policy.allowed.len(),
            ours.len(),
            linear.len()
        );
        assert!(ours.len() * 10 < linear.len() * 8);
    }
}

/// Too many ranges for the compact search's 8-bit jumps: a leaf per range
/// and `ja` trampolines over long halves.
#[test]
fn long_searches_use_trampolines() {
    let policy = SeccompPolicy {
        allowed: (0..300).map(|nr| Allowed::any("any", nr * 2)).collect(),
        violation: Violation::Trap,
        refused: Vec::new(),
    };
    let (ours, linear) = both(&policy);
    let trampolines = ours
        .windows(2)
        .filter(|w| w[0].code == JMP_JGE_K && w[0].jt == 0 && w[0].jf == 1 && w[1].code == JMP_JA)
        .count();
    // The root's lower half and the next level's are over 255 long (the
    // first is the x32 check, not a trampoline).
    assert!(trampolines >= 3, "{trampolines}");
    for nr in 0..=620 {
        let d = Data::new(nr, AUDIT_ARCH_X86_64, [0; 6]);
        assert_eq!(run(&ours, &d), run(&linear, &d), "{nr}");
    }
}

#[test]
fn empty_allowlist_denies_everything() {
    let policy = SeccompPolicy {
        allowed: Vec::new(),
        violation: Violation::KillProcess,
        refused: Vec::new(),
    };
    let ours = policy.compile().unwrap();
    for nr in [0, 1, 60, 231, 0x4000_0001] {
        let d = Data::new(nr, AUDIT_ARCH_X86_64, [0; 6]);
        assert_eq!(run(&ours, &d), Ok(libc::SECCOMP_RET_KILL_PROCESS));
    }
}

#[test]
fn refuses_numbers_outside_the_native_abi() {
    for nr in [-1, 0x4000_0000 | libc::SYS_read, 1 << 33] {
        let rules = BTreeMap::from([(nr, Vec::new())]);
        assert_eq!(layout(rules, libc::SECCOMP_RET_TRAP), Err(LayoutError::Number(nr)));
    }
}

#[test]
fn foreign_code_is_refused() {
    let ret = || stmt(RET_K, 0);
    let ld = || stmt(LD_W_ABS, 16);
    assert_eq!(self_contained(&[ld(), ret()]), Ok(()));
    // a jump past the end, conditional or not
    assert_eq!(self_contained(&[jump(JMP_JEQ_K, 1, 0, 1), ret()]), Err(0));
    assert_eq!(self_contained(&[ld(), stmt(JMP_JA, 1), ret()]), Err(1));
    // loads of the number or arch, or past seccomp_data, or unaligned
    for k in [0, 4, 8, 64, 17] {
        assert_eq!(self_contained(&[stmt(LD_W_ABS, k), ret()]), Err(0), "{k}");
    }
    // another opcode (BPF_LDX | BPF_W | BPF_MEM), no final return
    assert_eq!(self_contained(&[stmt(0x61, 0), ret()]), Err(0));
    assert_eq!(self_contained(&[ret(), ld()]), Err(1));
    assert_eq!(self_contained(&[]), Err(0));
}

/// seccompiler's rules are entered at their checks; anything else it
/// might emit is refused, not laid out wrongly.
#[test]
fn rules_are_lifted_only_as_straight_checks() {
    let cond = |op| SeccompCondition::new(1, SeccompCmpArgLen::Qword, op, 7).unwrap();
    let rule = SeccompRule::new(vec![cond(SeccompCmpOp::Ne), cond(SeccompCmpOp::Le)]).unwrap();
    let compiled = BpfProgram::from(rule.clone());
    let checks = rule_checks(&compiled).unwrap();
    assert_eq!(checks.len() + 2, compiled.len());
    assert!(checks.iter().all(|i| i.code != JMP_JA && i.code != RET_K));
    // Not starting with seccompiler's two jumps, or with a jump in the
    // checks, or one landing past the next rule.
    assert!(rule_checks(&compiled[1..]).is_none());
    let mut bad = compiled.clone();
    bad[3] = stmt(JMP_JA, 0);
    assert!(rule_checks(&bad).is_none());
    let mut far = compiled.clone();
    let last = far.len() - 1;
    far[last] = jump(JMP_JEQ_K, 7, 0, 2);
    assert!(rule_checks(&far).is_none());
    far[last] = jump(JMP_JEQ_K, 7, 0, 1);
    assert!(rule_checks(&far).is_some());
    // A rule too long for 8-bit jumps gets helper jumps from seccompiler:
    // refused with a typed error.
    let many = (0..43).map(|_| cond(SeccompCmpOp::MaskedEq(1))).collect();
    let rules = BTreeMap::from([(libc::SYS_write, vec![SeccompRule::new(many).unwrap()])]);
    assert!(matches!(
        layout(rules, libc::SECCOMP_RET_TRAP),
        Err(LayoutError::ForeignRule { nr: 1, .. })
    ));
    let rules = BTreeMap::from([(libc::SYS_write, vec![rule])]);
    assert!(layout(rules, libc::SECCOMP_RET_TRAP).is_ok());
}

/// Runs of numbers allowed with any arguments are one range: one leaf.
#[test]
fn runs_share_a_leaf() {
    let policy = SeccompPolicy {
        allowed: (100..140).map(|nr| Allowed::any("any", nr)).collect(),
        violation: Violation::KillProcess,
        refused: Vec::new(),
    };
    let (ours, linear) = both(&policy);
    // the preamble (6), two nodes, the two shared returns
    assert_eq!(ours.len(), 6 + 2 + 2, "{ours:?}");
    for nr in 0..=200 {
        let d = Data::new(nr, AUDIT_ARCH_X86_64, [0; 6]);
        assert_eq!(run(&ours, &d), run(&linear, &d), "{nr}");
    }
}

/// Forks a child that attaches `program` and then runs `then`; returns its
/// wait status. The child makes only async-signal-safe calls (this test
/// binary has other threads).
fn attach_in_child(program: &BpfProgram, then: fn()) -> libc::c_int {
    // SAFETY: the child calls only prctl, seccomp (no allocation in
    // seccompiler::apply_filter) and raw system calls, then _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: integer arguments; no core file from the SIGSYS deaths.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
        if seccompiler::apply_filter(program).is_err() {
            // SAFETY: ends the child.
            unsafe { libc::_exit(100) };
        }
        then();
        // SAFETY: ends the child.
        unsafe { libc::_exit(7) };
    }
    let mut status = 0;
    // SAFETY: reaping our own child into a local.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    status
}

fn killed_by_sigsys(status: libc::c_int) -> bool {
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
}

/// The kernel accepts both policies' programs; allowed calls pass (with
/// allowed arguments), others and other arguments die of SIGSYS.
#[test]
fn kernel_attaches_and_enforces() {
    for policy in policies() {
        let ours = policy.compile().unwrap();
        let allowed = attach_in_child(&ours, || {
            // SAFETY: getppid, a zero-length write to stderr and
            // clock_gettime into a local only.
            unsafe {
                libc::syscall(libc::SYS_getppid);
                libc::syscall(libc::SYS_write, 2, c"".as_ptr(), 0);
                let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
                libc::syscall(libc::SYS_clock_gettime, libc::CLOCK_MONOTONIC, &mut ts);
            }
        });
        assert!(
            libc::WIFEXITED(allowed) && libc::WEXITSTATUS(allowed) == 7,
            "{allowed:#x}"
        );
        let denied: [fn(); 4] = [socket, write_stdout, x32_getpid, getuid];
        for (i, call) in denied.into_iter().enumerate() {
            let status = attach_in_child(&ours, call);
            assert!(
                killed_by_sigsys(status),
                "{:?}: call {i}: status {status:#x}",
                policy.violation
            );
        }
    }
}

fn socket() {
    // SAFETY: a forbidden call: the filter stops it before the kernel reads
    // any argument.
    unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
}

fn write_stdout() {
    // SAFETY: a zero-length write from a static; forbidden on fd 1.
    unsafe { libc::syscall(libc::SYS_write, 1, c"".as_ptr(), 0) };
}

fn x32_getpid() {
    // SAFETY: getpid through the x32 ABI, integer arguments only.
    unsafe { libc::syscall(0x4000_0000 | libc::SYS_getpid) };
}

fn getuid() {
    // SAFETY: no arguments; not on either allowlist.
    unsafe { libc::syscall(libc::SYS_getuid) };
}

/// The VMM host process's program: its refused calls return their errno
/// (x86-64 only: an x32 or i386 number is still the violation or the
/// kill), every other call exactly what seccompiler's program of its
/// allowlist returns.
#[test]
fn refused_calls_return_their_errno_and_nothing_else_changes() {
    let policy = crate::sandbox::vmhost::policy(&spec(), PID).unwrap().seccomp.unwrap();
    assert!(!policy.refused.is_empty());
    let (ours, linear) = both(&policy);
    let values = interesting();
    let mut refused_seen = 0;
    for nr in (0..=600).chain(0x4000_0000..=0x4000_0000 + 600).chain([-1, i32::MAX]) {
        for arch in [AUDIT_ARCH_X86_64, AUDIT_ARCH_I386] {
            for v in &values {
                let d = Data::new(nr, arch, [*v; 6]);
                let got = run(&ours, &d).unwrap();
                let refusal = policy
                    .refused
                    .iter()
                    .find(|r| arch == AUDIT_ARCH_X86_64 && i64::from(nr) == r.nr);
                match refusal {
                    Some(r) => {
                        assert_eq!(got, libc::SECCOMP_RET_ERRNO | u32::from(r.errno), "{d:?}");
                        refused_seen += 1;
                    }
                    None => assert_eq!(got, run(&linear, &d).unwrap(), "{d:?}"),
                }
            }
        }
    }
    assert_eq!(refused_seen, policy.refused.len() * values.len());
    // Refusing numbers outside the native ABI is an error, as allowing them.
    assert_eq!(
        layout_refusing(BTreeMap::new(), &[(0x4000_0001, 0)], libc::SECCOMP_RET_TRAP),
        Err(LayoutError::Number(0x4000_0001))
    );
}
