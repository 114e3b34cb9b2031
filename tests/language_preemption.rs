//! `language` backend: preemption. An over-budget invocation is stopped
//! within its budget plus about one watchdog interval and the worker serves
//! the next request; preemptions and invocations leak nothing.

use microfaas::{Backend, BackendKind, Config, ErrorKind, FunctionId, FunctionSpec, LanguagePreemption, StartRequest};
use std::time::{Duration, Instant};

fn open(language: microfaas::LanguageConfig) -> Box<dyn Backend> {
    let config = Config {
        language,
        ..Config::default()
    };
    microfaas::open(BackendKind::Language, config).expect("language backend")
}

fn one_worker() -> microfaas::LanguageConfig {
    microfaas::LanguageConfig {
        workers: Some(1),
        ..Default::default()
    }
}

fn deploy(b: &dyn Backend, name: &str, budget: Duration) -> FunctionId {
    let spec = FunctionSpec::new(name, microfaas::builtin(name).unwrap()).with_budget(budget);
    b.deploy(&spec).unwrap()
}

fn stop_spin_then_serve(b: &dyn Backend, budget: Duration, slack: Duration) {
    let spin = deploy(b, "spin", budget);
    let echo = deploy(b, "echo", Duration::from_secs(1));
    for start in [StartRequest::Auto, StartRequest::Force(microfaas::StartPath::Cold)] {
        for _ in 0..5 {
            let t = Instant::now();
            let e = b.invoke(&spin, b"", start).unwrap_err();
            let took = t.elapsed();
            assert_eq!(e.kind(), ErrorKind::BudgetExceeded, "{e}");
            assert!(took >= budget, "stopped early: {took:?}");
            // Generous: this 2-core host is shared with other builds.
            assert!(took < budget + slack, "spin stopped only after {took:?}");
            assert_eq!(b.invoke(&echo, b"next", StartRequest::Auto).unwrap().output, b"next");
        }
    }
}

#[test]
fn spin_is_stopped_by_the_watchdog_and_the_next_request_succeeds() {
    let b = open(one_worker());
    stop_spin_then_serve(b.as_ref(), Duration::from_millis(2), Duration::from_millis(50));
}

#[test]
fn spin_is_stopped_by_the_periodic_timer() {
    let b = open(microfaas::LanguageConfig {
        preemption: LanguagePreemption::Periodic {
            quantum: Duration::from_micros(100),
        },
        ..one_worker()
    });
    stop_spin_then_serve(b.as_ref(), Duration::from_millis(2), Duration::from_millis(50));
}

fn worker_rss(b: &dyn Backend) -> u64 {
    let pid = b.stats().counter("worker0_pid").expect("worker pid");
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// 100,000 invocations and 10,000 preemptions: the worker's resident set is
/// back within 1 MiB of its post-warm-up level.
#[test]
fn no_leaks_after_100k_invocations_and_10k_preemptions() {
    let b = open(one_worker());
    let noop = deploy(b.as_ref(), "noop", Duration::from_secs(1));
    let echo = deploy(b.as_ref(), "echo", Duration::from_secs(1));
    let spin = deploy(b.as_ref(), "spin", Duration::from_micros(20));
    let round = |invocations: u32, preemptions: u32| {
        let every = invocations / preemptions.max(1);
        for i in 0..invocations {
            let out = b.invoke(&noop, b"", StartRequest::Auto).unwrap();
            assert_eq!(out.output.len(), 8);
            if i % 1000 == 0 {
                let input = i.to_le_bytes();
                assert_eq!(b.invoke(&echo, &input, StartRequest::Auto).unwrap().output, input);
            }
            if every > 0 && i % every == 0 {
                let e = b.invoke(&spin, b"", StartRequest::Auto).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::BudgetExceeded, "{e}");
            }
        }
    };
    round(5_000, 500);
    let warm = worker_rss(b.as_ref());
    let preempted_before = preemptions(b.as_ref());
    let t = std::time::Instant::now();
    round(100_000, 10_000);
    let took = t.elapsed();
    let after = worker_rss(b.as_ref());
    assert_eq!(preemptions(b.as_ref()) - preempted_before, 10_000);
    eprintln!(
        "worker RSS after warm-up {warm} B, after 100k invocations + 10k preemptions {after} B \
         ({took:?})"
    );
    assert!(after <= warm + (1 << 20), "RSS grew from {warm} to {after} bytes");
}

fn preemptions(b: &dyn Backend) -> u64 {
    b.stats().counter("preemptions").unwrap_or(0)
}
