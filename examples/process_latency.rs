//! Warm and cold latency of `noop` on the `process` backend:
//! `cargo run --release --example process_latency [-- N]` (default 10,000
//! invocations per path). Prints median and p99 of the end-to-end time and
//! of the dispatch time (invoke to the function's entry timestamp).

use microfaas::{BackendKind, Config, FunctionSpec, StartPath, StartRequest};

/// The `percent`-th percentile of `sorted` (nearest rank), in microseconds
/// with one decimal.
fn percentile_us(sorted: &[u64], percent: usize) -> String {
    let rank = (sorted.len().saturating_sub(1) * percent).div_ceil(100);
    let ns = sorted.get(rank).copied().unwrap_or(0);
    format!("{}.{}", ns / 1000, ns % 1000 / 100)
}

fn main() -> Result<(), microfaas::Error> {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let backend = microfaas::open(BackendKind::Process, Config::default())?;
    let noop = backend.deploy(&FunctionSpec::new("noop", microfaas::builtin("noop")?))?;
    println!("noop on process, {n} invocations per path (us)");
    println!(
        "{:<6} {:>12} {:>12} {:>14} {:>14}",
        "path", "total p50", "total p99", "dispatch p50", "dispatch p99"
    );
    for path in [StartPath::Warm, StartPath::Cold] {
        // A few unmeasured rounds to fault in code and caches.
        for _ in 0..20 {
            backend.invoke(&noop, b"", StartRequest::Force(path))?;
        }
        let mut total = Vec::with_capacity(n);
        let mut dispatch = Vec::with_capacity(n);
        for _ in 0..n {
            let done = backend.invoke(&noop, b"", StartRequest::Force(path))?;
            assert_eq!(done.start, path);
            total.push(done.timings.total_ns);
            dispatch.push(done.timings.dispatch_ns);
        }
        total.sort_unstable();
        dispatch.sort_unstable();
        println!(
            "{:<6} {:>12} {:>12} {:>14} {:>14}",
            path.as_str(),
            percentile_us(&total, 50),
            percentile_us(&total, 99),
            percentile_us(&dispatch, 50),
            percentile_us(&dispatch, 99)
        );
    }
    Ok(())
}
