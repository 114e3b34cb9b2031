//! What entering the runner's sandbox costs, step by step: building the
//! policy and compiling its seccomp filter (in this process), and applying
//! it with each layer added in order (in a fresh child per sample: the
//! steps are one-way). The child is forked from this single-threaded
//! program, applies, and reports its time through a pipe.
//! `cargo run --release -p lang-isolation --example sandbox_steps [-- N]`
//! (default 200 samples; run as root to include the uid drop).

use lang_isolation::sandbox::{self, Layers, SandboxSettings, SandboxSpec, shared_namespaces};
use seccompiler::BpfProgram;
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Forks a child that applies the runner policy for `spec`; returns how
/// long `apply` took there.
fn apply_in_child(spec: &SandboxSpec) -> Duration {
    in_child(|| {
        // SAFETY: getpid has no preconditions.
        let me = u32::try_from(unsafe { libc::getpid() }).unwrap_or(0);
        let policy = sandbox::runner::policy(spec, me).unwrap();
        let t0 = Instant::now();
        sandbox::apply(&policy).is_ok().then(|| t0.elapsed())
    })
}

/// Forks a child that attaches `program` (after no_new_privs only);
/// returns how long the kernel took.
fn attach_in_child(program: &BpfProgram) -> Duration {
    in_child(|| {
        // SAFETY: integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        let t0 = Instant::now();
        seccompiler::apply_filter(program).is_ok().then(|| t0.elapsed())
    })
}

/// Forks a child that runs `measure` (`None`: it failed) and reports the
/// time through a pipe on its stderr (the only file a sandboxed runner
/// may write).
fn in_child(measure: impl FnOnce() -> Option<Duration>) -> Duration {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a writable array of two ints.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: this example is single-threaded (the namespace helper thread
    // has exited), so the child may run Rust code until it exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // The sandbox lets a runner write to stderr only: report there.
        // SAFETY: dup2 onto fd 2 of this child.
        unsafe { libc::dup2(fds[1], 2) };
        let took = measure();
        let word = took.map_or(u64::MAX, |t| u64::try_from(t.as_nanos()).unwrap_or(u64::MAX - 1));
        // SAFETY: writing 8 bytes from a local to the pipe, then exiting
        // without running destructors (write and exit_group are allowed).
        unsafe {
            libc::write(2, (&raw const word).cast(), 8);
            libc::_exit(0);
        }
    }
    let mut word = 0u64;
    // SAFETY: reading 8 bytes into a local; reaping our own child.
    unsafe {
        libc::close(fds[1]);
        libc::read(fds[0], (&raw mut word).cast(), 8);
        libc::close(fds[0]);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    assert_ne!(word, u64::MAX, "the step failed in the child");
    Duration::from_nanos(word)
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200);
    let ns = shared_namespaces();
    let spec = |layers: Layers| SandboxSpec {
        settings: SandboxSettings {
            layers,
            ..SandboxSettings::default()
        },
        netns: ns.map(|n| n.net_path.clone().into()),
        ipcns: ns.map(|n| n.ipc_path.clone().into()),
    };
    let full = spec(Layers::ALL);
    let (mut build, mut compile) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t0 = Instant::now();
        let policy = sandbox::runner::policy(&full, std::process::id()).unwrap();
        let t1 = Instant::now();
        let bpf = policy.seccomp.as_ref().unwrap().compile().unwrap();
        build.push(t1 - t0);
        compile.push(t1.elapsed());
        assert!(!bpf.is_empty());
    }
    println!(
        "runner policy: build {:?}, seccomp compile {:?} (medians of {n})",
        median(build),
        median(compile)
    );
    let none = Layers::NONE;
    let with_ns = Layers {
        namespaces: true,
        ..none
    };
    let with_landlock = Layers {
        landlock: true,
        ..with_ns
    };
    let with_identity = Layers {
        identity: true,
        ..with_landlock
    };
    let steps = [
        ("no_new_privs + not dumpable", none),
        ("+ namespaces (setns net, ipc)", with_ns),
        ("+ landlock", with_landlock),
        ("+ uid/gid, capabilities", with_identity),
        ("+ seccomp (all)", Layers::ALL),
    ];
    println!("apply in a fresh child, median of {n}:");
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); steps.len()];
    for _ in 0..n {
        for (i, (_, layers)) in steps.iter().enumerate() {
            samples[i].push(apply_in_child(&spec(*layers)));
        }
    }
    for ((label, _), s) in steps.iter().zip(samples) {
        println!("  {label:<32} {:>10.1?}", median(s));
    }
    attach_costs(n, &full);
}

/// The seccomp attach alone, in a child that set no_new_privs only: a
/// one-instruction program (the kernel's fixed cost), and each policy's
/// filter as this crate lays it out and as seccompiler does.
fn attach_costs(n: usize, spec: &SandboxSpec) {
    let allow_all = vec![seccompiler::sock_filter {
        code: 0x06,
        jt: 0,
        jf: 0,
        k: libc::SECCOMP_RET_ALLOW,
    }];
    let pid = std::process::id();
    let runner = sandbox::runner::policy(spec, pid).unwrap().seccomp.unwrap();
    let worker = sandbox::worker::policy(spec, pid, 3).unwrap().seccomp.unwrap();
    let mut programs = vec![("ret ALLOW".to_owned(), allow_all)];
    for (kind, policy) in [("runner", &runner), ("worker", &worker)] {
        let calls = policy.allowed.len();
        programs.push((
            format!("{kind}, {calls} calls, binary search"),
            policy.compile().unwrap(),
        ));
        programs.push((
            format!("{kind}, {calls} calls, seccompiler"),
            policy.compile_linear().unwrap(),
        ));
    }
    println!("seccomp attach alone in a fresh child, median of {n}:");
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); programs.len()];
    for _ in 0..n {
        for (i, (_, program)) in programs.iter().enumerate() {
            samples[i].push(attach_in_child(program));
        }
    }
    for ((label, program), s) in programs.iter().zip(samples) {
        let label = format!("{label} ({} insns)", program.len());
        println!("  {label:<48} {:>10.1?}", median(s));
    }
    let mut compiles = Vec::new();
    let mut attaches = Vec::new();
    for _ in 0..n {
        compiles.push(in_child(|| {
            let t0 = Instant::now();
            let p = runner.compile().ok()?;
            let took = t0.elapsed();
            std::hint::black_box(p);
            Some(took)
        }));
        attaches.push(in_child(|| {
            // SAFETY: integer arguments only.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            let t0 = Instant::now();
            runner.install().is_ok().then(|| t0.elapsed())
        }));
    }
    println!("  {:<48} {:>10.1?}", "runner: compile in the child", median(compiles));
    println!(
        "  {:<48} {:>10.1?}",
        "runner: compile + attach in the child",
        median(attaches)
    );
}
