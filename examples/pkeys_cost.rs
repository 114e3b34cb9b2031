//! What memory protection keys cost the `language` backend end to end:
//! `noop` with `SandboxConfig::pkeys` off and on (one worker), warm median
//! and p99 dispatch (invoke to the function's entry timestamp) and end to
//! end, warm throughput (one caller, back to back), and cold end to end.
//! `cargo run --release --example pkeys_cost [-- ROUNDS [BATCH]]` (default 10
//! rounds of 2,000 warm and 200 cold invocations; rounds interleave the two
//! configurations). Prints the worker's `pkeys_state` (0 disabled by
//! config, 1 enabled, 2 unavailable on this host: the origin filter is then
//! the only part that runs). The per-call cost of the gate itself, without
//! dispatcher noise: `cargo run --release -p lang-isolation --example pkeys_bench`.

use hdrhistogram::Histogram;
use microfaas::{Backend, BackendKind, Config, FunctionId, FunctionSpec, SandboxConfig, StartPath, StartRequest};
use std::time::Instant;

fn open(pkeys: bool) -> Result<(Box<dyn Backend>, FunctionId), microfaas::Error> {
    let config = Config {
        sandbox: SandboxConfig {
            pkeys,
            ..SandboxConfig::default()
        },
        language: microfaas::LanguageConfig {
            workers: Some(1),
            ..Default::default()
        },
        ..Config::default()
    };
    let backend = microfaas::open(BackendKind::Language, config)?;
    let noop = backend.deploy(&FunctionSpec::new("noop", microfaas::builtin("noop")?))?;
    Ok((backend, noop))
}

struct Hists {
    dispatch: Histogram<u64>,
    total: Histogram<u64>,
    cold: Histogram<u64>,
    rate: Vec<f64>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let batch: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let mut hists: Vec<Hists> = (0..2)
        .map(|_| -> Result<Hists, Box<dyn std::error::Error>> {
            Ok(Hists {
                dispatch: Histogram::new(3)?,
                total: Histogram::new(3)?,
                cold: Histogram::new(3)?,
                rate: Vec::new(),
            })
        })
        .collect::<Result<_, _>>()?;
    let mut states = [0u64; 2];
    for _ in 0..rounds {
        for (i, pkeys) in [false, true].into_iter().enumerate() {
            let (backend, noop) = open(pkeys)?;
            states[i] = backend.stats().counter("pkeys_state").unwrap_or(u64::MAX);
            let h = &mut hists[i];
            for _ in 0..100 {
                backend.invoke(&noop, b"", StartRequest::Force(StartPath::Warm))?;
            }
            let t = Instant::now();
            for _ in 0..batch {
                let done = backend.invoke(&noop, b"", StartRequest::Force(StartPath::Warm))?;
                h.dispatch.record(done.timings.dispatch_ns.max(1))?;
                h.total.record(done.timings.total_ns.max(1))?;
            }
            h.rate.push(batch as f64 / t.elapsed().as_secs_f64());
            for _ in 0..batch / 10 {
                let done = backend.invoke(&noop, b"", StartRequest::Force(StartPath::Cold))?;
                h.cold.record(done.timings.total_ns.max(1))?;
            }
        }
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    println!("language backend, noop, 1 worker, {rounds} rounds x {batch} warm (us)");
    println!(
        "{:<6} {:>6} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10}",
        "pkeys", "state", "disp p50", "disp p99", "e2e p50", "e2e p99", "warm/s med", "cold p50"
    );
    for (i, h) in hists.iter_mut().enumerate() {
        h.rate.sort_by(f64::total_cmp);
        println!(
            "{:<6} {:>6} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>12.0} {:>10.1}",
            ["off", "on"][i],
            states[i],
            us(h.dispatch.value_at_quantile(0.5)),
            us(h.dispatch.value_at_quantile(0.99)),
            us(h.total.value_at_quantile(0.5)),
            us(h.total.value_at_quantile(0.99)),
            h.rate[h.rate.len() / 2],
            us(h.cold.value_at_quantile(0.5)),
        );
    }
    Ok(())
}
