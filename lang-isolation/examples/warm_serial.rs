//! Warm `noop` requests one at a time through a real worker (the
//! dispatcher's own API, no `Backend` trait), 100 functions deployed: the
//! serial round trip. (Valgrind cannot run it: it lacks a system call the
//! worker's spawn makes.)
//!
//! `cargo build --release -p lang-isolation --bins --example warm_serial &&
//!  taskset -c 0 target/release/examples/warm_serial [N]`
//!
//! Prints requests per second, the dispatch latency p50 / p99 (us), the
//! function's own time and the return leg (the function's last timestamp
//! to the caller's answer). `WATCHDOG_US=N` sets the watchdog interval
//! (the promised preemption latency) for an A/B; `FUNCTIONS=N` deploys N
//! functions instead of 100 (each its own artifact, called round robin).

use lang_isolation::language::{Dispatcher, DispatcherConfig, Start};
use lang_isolation::runtime::SealedArtifact;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    // Build products under the workspace target, not /tmp.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/warm-serial");
    let functions = Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions");
    let mut opts = microfaas_builder::BuildOptions::new(root.join("cache"));
    opts.out = Some(root.join("noop.so"));
    let built = microfaas_builder::build(&functions.join("noop"), &opts).expect("building noop");
    let bytes = std::fs::read(built.path).expect("reading noop");
    let worker = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/microfaas-worker");
    let mut config = DispatcherConfig::new(&worker);
    config.workers = Some(1);
    if let Some(us) = std::env::var("WATCHDOG_US").ok().and_then(|v| v.parse().ok()) {
        config.watchdog_interval = Duration::from_micros(us);
    }
    let d = Dispatcher::start(config).expect("dispatcher");
    let functions_n: usize = std::env::var("FUNCTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let ids: Vec<_> = (0..functions_n)
        .map(|i| {
            let a = Arc::new(SealedArtifact::create(&format!("noop-{i}"), &bytes).expect("memfd"));
            d.deploy(a, Duration::from_secs(1)).expect("deploy")
        })
        .collect();
    // Every function's first call (its instance's pages) is not measured.
    for &id in &ids {
        d.invoke(id, b"", Start::Warm).expect("warm-up");
    }
    let mut lat = Vec::with_capacity(n);
    let mut exec = Vec::with_capacity(n);
    let mut back = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let done = d.invoke(ids[i % ids.len()], b"", Start::Warm).expect("invoke");
        lat.push(done.dispatch_ns);
        exec.push(done.exec_ns);
        back.push(
            done.total_ns
                .saturating_sub(done.dispatch_ns)
                .saturating_sub(done.exec_ns),
        );
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let us = |v: &mut Vec<u64>, p: usize| {
        v.sort_unstable();
        v[(v.len() - 1) * p / 100] as f64 / 1000.0
    };
    println!(
        "{n} warm requests over {functions_n} functions: {rate:.0}/s serial, dispatch p50 {:.2} us p99 {:.2} us; function p50 {:.2} us; \
         return (function's last timestamp to the caller's answer) p50 {:.2} us p99 {:.2} us",
        us(&mut lat, 50),
        us(&mut lat, 99),
        us(&mut exec, 50),
        us(&mut back, 50),
        us(&mut back, 99),
    );
}
