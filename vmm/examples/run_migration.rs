//! What running a vCPU from another thread than the last one costs: the
//! same hot invocation of one instance, (a) always on the same runner
//! (`Placement::Sticky`), (b) on the next runner in turn
//! (`Placement::RoundRobin` over two runners, so every request moves the
//! vCPU to another thread: KVM sees a new task on `KVM_RUN`).
//!
//! `cargo run --release -p vmm --example run_migration -- NOOP.so [N]`

use std::time::{Duration, Instant};
use vmm::{Instance, InstanceConfig, Placement, RunnerConfig, Vmm};

fn percentile(v: &mut [u64], per_mille: usize) -> u64 {
    v.sort_unstable();
    v[(v.len() - 1) * per_mille / 1000]
}

fn measure(artifact: &[u8], placement: Placement, n: usize) -> Result<(u64, u64), Box<dyn std::error::Error>> {
    let runners = std::env::var("RUNNERS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let vmm = Vmm::with_runners(RunnerConfig {
        runners,
        placement,
        grow_to: runners,
    })?;
    let config = InstanceConfig {
        vcpu_stats: false,
        ..InstanceConfig::default()
    };
    let (mut inst, _) = Instance::boot(&vmm, &config)?;
    inst.load(artifact, Instant::now() + Duration::from_secs(10))?;
    for _ in 0..100 {
        inst.invoke(b"x", Instant::now() + Duration::from_secs(10))?;
    }
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        inst.invoke(b"x", Instant::now() + Duration::from_secs(10))?;
        lat.push(u64::try_from(t.elapsed().as_nanos())?);
    }
    Ok((percentile(&mut lat, 500), percentile(&mut lat, 990)))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: run_migration NOOP.so [N]")?;
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2000);
    let artifact = std::fs::read(path)?;
    for (name, placement) in [
        ("same runner (sticky)", Placement::Sticky),
        ("next runner each time (round robin over 2)", Placement::RoundRobin),
        ("same runner (sticky, again)", Placement::Sticky),
    ] {
        let (p50, p99) = measure(&artifact, placement, n)?;
        println!(
            "{name:44} hot invoke e2e: p50 {:7.1} us  p99 {:8.1} us  (n={n})",
            p50 as f64 / 1e3,
            p99 as f64 / 1e3
        );
    }
    Ok(())
}
