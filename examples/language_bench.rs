//! The `language` backend's benchmark figures (issue 6):
//!
//! `cargo run --release --example language_bench [-- N]`
//!
//! 1. `noop`, N invocations (default 100,000), 1 worker + the dispatcher:
//!    warm median / p99 from `invoke` to the function's entry timestamp
//!    (`dispatch`), and end to end; the same for `process` warm (if that
//!    backend opens); cold (dlopen, init, call, dlclose per request).
//! 2. SHA-512 throughput relative to no preemption: the default watchdog
//!    mode with a 100 us budget enforced, and the paper's periodic timer at
//!    quanta 1000, 100, 50, 20, 10 and 5 us (Figure 2).
//!
//! Numbers on a shared 2-core host are noisy while other builds run.

use microfaas::{
    Backend, BackendKind, Config, FunctionId, FunctionSpec, LanguageConfig, LanguagePreemption, StartPath, StartRequest,
};
use std::time::{Duration, Instant};

/// The `pct`-th percentile of `sorted` nanoseconds, in microseconds.
fn percentile(sorted: &[u64], pct: usize) -> f64 {
    let last = sorted.len().saturating_sub(1);
    let rank = (last * pct + 50) / 100;
    sorted.get(rank.min(last)).copied().unwrap_or(0) as f64 / 1000.0
}

/// SHA-512 rounds of the workload that must fit a 100 us budget (~25 us
/// here when the host is quiet).
const SHORT_ROUNDS: u32 = 50;

fn language(preemption: LanguagePreemption) -> Result<Box<dyn Backend>, microfaas::Error> {
    microfaas::open(
        BackendKind::Language,
        Config {
            language: LanguageConfig {
                workers: Some(1),
                preemption,
                ..LanguageConfig::default()
            },
            ..Config::default()
        },
    )
}

/// (dispatch, total) latencies of `n` invocations of `noop` on `path`.
fn latencies(
    b: &dyn Backend,
    id: &FunctionId,
    path: StartPath,
    n: usize,
) -> Result<(Vec<u64>, Vec<u64>), microfaas::Error> {
    for _ in 0..(n / 100).clamp(20, 1000) {
        b.invoke(id, b"", StartRequest::Force(path))?;
    }
    let mut dispatch = Vec::with_capacity(n);
    let mut total = Vec::with_capacity(n);
    for _ in 0..n {
        let done = b.invoke(id, b"", StartRequest::Force(path))?;
        dispatch.push(done.timings.dispatch_ns);
        total.push(done.timings.total_ns);
    }
    dispatch.sort_unstable();
    total.sort_unstable();
    Ok((dispatch, total))
}

fn row(name: &str, dispatch: &[u64], total: &[u64]) {
    println!(
        "{name:<22} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
        percentile(dispatch, 50),
        percentile(dispatch, 99),
        percentile(total, 50),
        percentile(total, 99)
    );
}

/// Invocations per second of `sha512` with `rounds` rounds for `secs`.
fn throughput(
    preemption: LanguagePreemption,
    budget: Duration,
    rounds: u32,
    secs: f64,
) -> Result<(f64, u64), microfaas::Error> {
    let b = language(preemption)?;
    let spec = FunctionSpec::new("sha512", microfaas::builtin("sha512")?).with_budget(budget);
    let id = b.deploy(&spec)?;
    let input = rounds.to_string();
    for _ in 0..50 {
        let _ = b.invoke(&id, input.as_bytes(), StartRequest::Auto);
    }
    let start = Instant::now();
    let (mut done, mut preempted) = (0u64, 0u64);
    while start.elapsed().as_secs_f64() < secs {
        match b.invoke(&id, input.as_bytes(), StartRequest::Auto) {
            Ok(_) => done += 1,
            Err(e) if e.kind() == microfaas::ErrorKind::BudgetExceeded => preempted += 1,
            Err(e) => return Err(e),
        }
    }
    Ok((done as f64 / start.elapsed().as_secs_f64(), preempted))
}

fn main() -> Result<(), microfaas::Error> {
    // The caller plays the dispatcher: core 0, as the paper's dispatcher
    // core (the backend pins its worker to core 1 and its watchdog to 0).
    let mut core0 = nix::sched::CpuSet::new();
    core0.set(0).expect("cpu 0");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &core0).expect("pinning the caller");
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);

    println!("== noop latency, 1 worker, {n} invocations (us) ==");
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>10}",
        "", "disp p50", "disp p99", "total p50", "total p99"
    );
    let lang = language(LanguagePreemption::Watchdog)?;
    let noop = lang.deploy(&FunctionSpec::new("noop", microfaas::builtin("noop")?))?;
    let (warm_d, warm_t) = latencies(lang.as_ref(), &noop, StartPath::Warm, n)?;
    row("language warm", &warm_d, &warm_t);
    let cold_n = (n / 20).max(100);
    let (cold_d, cold_t) = latencies(lang.as_ref(), &noop, StartPath::Cold, cold_n)?;
    row(&format!("language cold (n={cold_n})"), &cold_d, &cold_t);
    drop(lang);
    match microfaas::open(BackendKind::Process, Config::default()) {
        Ok(process) => {
            let noop = process.deploy(&FunctionSpec::new("noop", microfaas::builtin("noop")?))?;
            let pn = (n / 10).max(1000);
            let (d, t) = latencies(process.as_ref(), &noop, StartPath::Warm, pn)?;
            row(&format!("process warm (n={pn})"), &d, &t);
            println!(
                "warm median ratio process/language: dispatch {:.1}x, total {:.1}x",
                percentile(&d, 50) / percentile(&warm_d, 50),
                percentile(&t, 50) / percentile(&warm_t, 50)
            );
        }
        Err(e) => println!("process backend unavailable: {e}"),
    }

    // Throughput: each configuration runs REPS times, interleaved with the
    // others, and the best run counts (the least disturbed by other load on
    // this shared host).
    const REPS: usize = 5;
    let secs = 0.6;
    let long = Duration::from_secs(1);
    println!();
    println!("== SHA-512 throughput relative to no preemption (1 worker, best of {REPS} x {secs} s) ==");
    println!(
        "{:<34} {:>8} {:>12} {:>9} {:>10}",
        "mode", "rounds", "inv/s", "relative", "preempted"
    );
    for rounds in [SHORT_ROUNDS, 2000] {
        let mut modes: Vec<(String, LanguagePreemption, Duration)> =
            vec![("none (baseline)".into(), LanguagePreemption::Disabled, long)];
        if rounds == SHORT_ROUNDS {
            modes.push((
                "watchdog (default), 100 us budget".into(),
                LanguagePreemption::Watchdog,
                Duration::from_micros(100),
            ));
        } else {
            modes.push((
                "watchdog (default), 1 s budget".into(),
                LanguagePreemption::Watchdog,
                long,
            ));
        }
        for q in [1000u64, 100, 50, 20, 10, 5] {
            let quantum = Duration::from_micros(q);
            modes.push((
                format!("periodic, quantum {q} us"),
                LanguagePreemption::Periodic { quantum },
                long,
            ));
        }
        let mut best = vec![(0.0f64, 0u64); modes.len()];
        for _ in 0..REPS {
            for (i, (_, mode, budget)) in modes.iter().enumerate() {
                let (rate, preempted) = throughput(*mode, *budget, rounds, secs)?;
                if rate > best[i].0 {
                    best[i] = (rate, preempted);
                }
            }
        }
        let base = best[0].0;
        for ((name, _, _), (rate, preempted)) in modes.iter().zip(&best) {
            println!(
                "{name:<34} {rounds:>8} {rate:>12.0} {:>8.1}% {preempted:>10}",
                100.0 * rate / base
            );
        }
    }
    Ok(())
}
