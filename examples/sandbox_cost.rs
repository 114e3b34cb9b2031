//! What the process sandbox costs: `noop` warm and cold on the `language`
//! and `process` backends, with the sandbox off, with each layer added in
//! the order it is entered, and with all of it.
//! `cargo run --release --example sandbox_cost [-- ROUNDS [BATCH [language|process]]]` (default
//! 10 rounds of 200 invocations per configuration and path; rounds
//! interleave the configurations, so that drift on this shared host hits all
//! of them alike, and only one backend is alive at a time). Prints median and p99 of the end-to-end time in
//! microseconds, and the change of the median against the sandbox off.
//! On a loaded two-core host the process backend's warm path depends on
//! where the scheduler puts the runner; `taskset -c 1 ... process` measures
//! it with host and runner on one core.

use hdrhistogram::Histogram;
use microfaas::{Backend, BackendKind, Config, FunctionId, FunctionSpec, SandboxConfig, StartPath, StartRequest};

struct Setup {
    label: &'static str,
    sandbox: SandboxConfig,
}

fn setups() -> Vec<Setup> {
    let off = SandboxConfig::off();
    let ns = SandboxConfig {
        namespaces: true,
        ..off
    };
    let landlock = SandboxConfig { landlock: true, ..ns };
    let identity = SandboxConfig {
        identity: true,
        ..landlock
    };
    vec![
        Setup {
            label: "off",
            sandbox: off,
        },
        Setup {
            label: "+namespaces",
            sandbox: ns,
        },
        Setup {
            label: "+landlock",
            sandbox: landlock,
        },
        Setup {
            label: "+uid/caps",
            sandbox: identity,
        },
        Setup {
            label: "all (+seccomp)",
            sandbox: SandboxConfig::default(),
        },
    ]
}

fn open(kind: BackendKind, sandbox: SandboxConfig) -> Result<(Box<dyn Backend>, FunctionId), microfaas::Error> {
    let config = Config {
        sandbox,
        language: microfaas::LanguageConfig {
            workers: Some(1),
            ..Default::default()
        },
        ..Config::default()
    };
    let backend = microfaas::open(kind, config)?;
    let noop = backend.deploy(&FunctionSpec::new("noop", microfaas::builtin("noop")?))?;
    Ok((backend, noop))
}

const PATHS: [StartPath; 2] = [StartPath::Warm, StartPath::Cold];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let batch: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let kinds = match args.next().as_deref() {
        Some("language") => vec![BackendKind::Language],
        Some("process") => vec![BackendKind::Process],
        _ => vec![BackendKind::Language, BackendKind::Process],
    };
    for kind in kinds {
        let mut hists = Vec::new();
        for _ in setups() {
            hists.push([Histogram::<u64>::new(3)?, Histogram::<u64>::new(3)?]);
        }
        for _ in 0..rounds {
            for (setup, hist) in setups().iter().zip(&mut hists) {
                // One backend alive at a time, opened afresh each round:
                // no other configuration's idle processes compete for the
                // two cores or sit where the measured ones would run.
                let (backend, noop) = open(kind, setup.sandbox)?;
                for (i, path) in PATHS.into_iter().enumerate() {
                    // Unmeasured calls to fault in code and caches.
                    for _ in 0..10 {
                        backend.invoke(&noop, b"", StartRequest::Force(path))?;
                    }
                    for _ in 0..batch {
                        let done = backend.invoke(&noop, b"", StartRequest::Force(path))?;
                        assert_eq!(done.start, path);
                        hist[i].record(done.timings.total_ns.max(1))?;
                    }
                }
            }
        }
        println!(
            "{} backend, noop, {} invocations per path and configuration (us)",
            kind.as_str(),
            rounds * batch
        );
        println!(
            "{:<16} {:>9} {:>9} {:>9}   {:>9} {:>9} {:>9}",
            "sandbox", "warm p50", "warm p99", "vs off", "cold p50", "cold p99", "vs off"
        );
        let base: Vec<f64> = (0..2).map(|i| us(hists[0][i].value_at_quantile(0.5))).collect();
        for (setup, hist) in setups().iter().zip(&hists) {
            let cell = |i: usize| {
                let p50 = us(hist[i].value_at_quantile(0.5));
                let p99 = us(hist[i].value_at_quantile(0.99));
                let change = (p50 / base[i] - 1.0) * 100.0;
                format!("{p50:>9.1} {p99:>9.1} {change:>+8.1}%")
            };
            println!("{:<16} {}   {}", setup.label, cell(0), cell(1));
        }
        println!();
    }
    Ok(())
}

fn us(ns: u64) -> f64 {
    // Latencies here are far below 2^52 ns; the conversion is exact.
    #[allow(clippy::cast_precision_loss)]
    let v = ns as f64;
    v / 1000.0
}
