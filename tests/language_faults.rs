//! `language` backend: dead workers, hung workers, blacklisting, seccomp.

use microfaas::{Artifact, Backend, BackendKind, Config, ErrorKind, FunctionId, FunctionSpec, StartRequest};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn open() -> Box<dyn Backend> {
    let config = Config {
        language: microfaas::LanguageConfig {
            workers: Some(1),
            hang_grace: Duration::from_millis(100),
            ..Default::default()
        },
        ..Config::default()
    };
    microfaas::open(BackendKind::Language, config).expect("language backend")
}

fn deploy(b: &dyn Backend, name: &str, artifact: Arc<Artifact>, budget: Duration) -> FunctionId {
    b.deploy(&FunctionSpec::new(name, artifact).with_budget(budget))
        .unwrap()
}

/// Builds a fixture function with the test-only allow-unsafe flag.
fn fixture(name: &str) -> Arc<Artifact> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let mut opts =
        microfaas_builder::BuildOptions::new(Path::new(env!("CARGO_TARGET_TMPDIR")).join("language-fixtures"));
    opts.allow_unsafe = true;
    let built = microfaas_builder::build(&dir, &opts).unwrap_or_else(|e| panic!("building fixture {name}: {e}"));
    Arc::new(Artifact::load(&built.path).unwrap())
}

fn worker_pid(b: &dyn Backend) -> u64 {
    b.stats().counter("worker0_pid").unwrap()
}

/// CPU time (user + system, in clock ticks) the process `pid` has used.
fn cpu_ticks(pid: u64) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: state is the 1st, utime the 12th, stime the 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

/// Waits until the worker `pid` has burnt `ticks` more clock ticks of CPU
/// than `before`, i.e. it is running `spin` (an idle worker parks within
/// 200 us), so killing it now kills the request in flight.
fn wait_until_spinning(pid: u64, before: u64, ticks: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while cpu_ticks(pid) < before + ticks {
        assert!(Instant::now() < deadline, "worker {pid} never started running `spin`");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn stat(b: &dyn Backend, key: &str) -> u64 {
    b.stats().counter(key).unwrap_or(0)
}

fn assert_serves(b: &dyn Backend, echo: &FunctionId) {
    assert_eq!(
        b.invoke(echo, b"still here", StartRequest::Auto).unwrap().output,
        b"still here"
    );
}

#[test]
fn sigkilled_worker_is_replaced_and_its_request_gets_worker_lost() {
    let b = open();
    let echo = deploy(
        b.as_ref(),
        "echo",
        microfaas::builtin("echo").unwrap(),
        Duration::from_secs(1),
    );
    let spin = deploy(
        b.as_ref(),
        "spin",
        microfaas::builtin("spin").unwrap(),
        Duration::from_secs(30),
    );
    for round in 1..=3u64 {
        let pid = worker_pid(b.as_ref());
        assert!(pid > 1, "no worker pid");
        let killed = std::thread::scope(|s| {
            let before = cpu_ticks(pid);
            let call = s.spawn(|| b.invoke(&spin, b"", StartRequest::Auto));
            // Let the request reach the worker (it burns CPU), then kill it.
            wait_until_spinning(pid, before, 5);
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
            call.join().unwrap()
        });
        let e = killed.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WorkerLost, "{e}");
        assert!(e.to_string().contains("spin"), "{e}");
        // The replacement serves, with the preloaded functions warm.
        let out = b.invoke(&echo, b"after", StartRequest::Auto).unwrap();
        assert_eq!(out.start, microfaas::StartPath::Warm);
        assert_ne!(worker_pid(b.as_ref()), pid);
        assert_eq!(stat(b.as_ref(), "respawns"), round);
    }
    // Three workers died running `spin`: it is refused now.
    let e = b.invoke(&spin, b"", StartRequest::Auto).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Blacklisted, "{e}");
    assert_serves(b.as_ref(), &echo);
}

#[test]
fn a_function_that_refuses_to_yield_is_killed_then_blacklisted() {
    let b = open();
    let echo = deploy(
        b.as_ref(),
        "echo",
        microfaas::builtin("echo").unwrap(),
        Duration::from_secs(1),
    );
    let hang = deploy(
        b.as_ref(),
        "hang",
        fixture("masks-preemption"),
        Duration::from_millis(5),
    );
    for _ in 0..3 {
        let t = Instant::now();
        let e = b.invoke(&hang, b"", StartRequest::Auto).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WorkerLost, "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
        assert_serves(b.as_ref(), &echo);
    }
    let e = b.invoke(&hang, b"", StartRequest::Auto).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Blacklisted, "{e}");
    assert!(e.to_string().contains("hang"), "{e}");
    assert_serves(b.as_ref(), &echo);
}

#[test]
fn a_forbidden_syscall_is_caught_and_the_worker_survives() {
    let b = open();
    let echo = deploy(
        b.as_ref(),
        "echo",
        microfaas::builtin("echo").unwrap(),
        Duration::from_secs(1),
    );
    let bad = deploy(b.as_ref(), "bad", fixture("forbidden-syscall"), Duration::from_secs(1));
    assert_eq!(b.invoke(&bad, b"ok", StartRequest::Auto).unwrap().output, b"no syscall");
    let pid = worker_pid(b.as_ref());
    for start in [StartRequest::Auto, StartRequest::Force(microfaas::StartPath::Cold)] {
        for _ in 0..3 {
            let e = b.invoke(&bad, b"", start).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::PolicyViolation, "{e}");
            assert!(e.to_string().contains("system call 41"), "{e}");
            assert_serves(b.as_ref(), &echo);
        }
    }
    assert_eq!(worker_pid(b.as_ref()), pid, "the worker survived");
    assert_eq!(stat(b.as_ref(), "respawns"), 0);
}

#[test]
fn an_output_over_the_limit_is_refused_and_the_worker_goes_on() {
    let config = Config {
        output_limit_bytes: 5000,
        language: microfaas::LanguageConfig {
            workers: Some(1),
            ..Default::default()
        },
        ..Config::default()
    };
    let b = microfaas::open(BackendKind::Language, config).unwrap();
    let echo = deploy(
        b.as_ref(),
        "echo",
        microfaas::builtin("echo").unwrap(),
        Duration::from_secs(1),
    );
    assert_eq!(
        b.invoke(&echo, &[1; 5000], StartRequest::Auto).unwrap().output.len(),
        5000
    );
    for start in [StartRequest::Auto, StartRequest::Force(microfaas::StartPath::Cold)] {
        let e = b.invoke(&echo, &[1; 5001], start).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutputTooLarge, "{e}");
    }
    assert_serves(b.as_ref(), &echo);
}
