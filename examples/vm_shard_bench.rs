//! The `vm` backend with and without VMM host processes (a benchmark, not
//! a timed test): `cargo run --release --example vm_shard_bench [MAX]`.
//!
//! 1. Hot `noop` (total and dispatch), instances in host processes vs in
//!    this process (`vms_per_host = 0`).
//! 2. `function` start (restore from the function node) with 10, 1,000,
//!    ... up to MAX (default 10,000) idle instances alive, in host processes
//!    of `VMS_PER_HOST` (default 2048) VMs. `SKIP_HOT=1` skips part 1.

#[path = "../tests/vm_common/mod.rs"]
mod vm_common;

use microfaas::{Backend, Config, FunctionSpec, StartPath, StartRequest, VmConfig};

fn percentile(sorted: &[u64], per_mille: usize) -> u64 {
    sorted[(sorted.len() - 1) * per_mille / 1000]
}

fn summary(name: &str, mut ns: Vec<u64>) {
    ns.sort_unstable();
    eprintln!(
        "{name}: n={} median {:.1} us, p99 {:.1} us",
        ns.len(),
        percentile(&ns, 500) as f64 / 1e3,
        percentile(&ns, 990) as f64 / 1e3
    );
}

fn config(vms_per_host: usize) -> Config {
    let base = vm_common::config();
    Config {
        vm: VmConfig {
            vms_per_host: Some(vms_per_host),
            host_runners: std::env::var("HOST_RUNNERS").ok().and_then(|v| v.parse().ok()),
            guest_mem_mib: Some(16),
            image_mib: Some(2),
            idle_per_function: Some(1),
            arguments_per_function: Some(0),
            ..base.vm
        },
        input_limit_bytes: 64 << 10,
        output_limit_bytes: 64 << 10,
        ..base
    }
}

fn hot(label: &str, b: &dyn Backend) {
    let noop = b
        .deploy(&FunctionSpec::new("noop", microfaas::builtin("noop").unwrap()))
        .unwrap();
    for _ in 0..300 {
        b.invoke(&noop, b"", StartRequest::Auto).unwrap();
    }
    let (mut total, mut dispatch) = (Vec::new(), Vec::new());
    for _ in 0..5000 {
        let r = b.invoke(&noop, b"", StartRequest::Auto).unwrap();
        assert_eq!(r.start, StartPath::Hot);
        total.push(r.timings.total_ns);
        dispatch.push(r.timings.dispatch_ns);
    }
    summary(&format!("{label}: hot noop total"), total);
    summary(&format!("{label}: hot noop dispatch"), dispatch);
}

fn main() {
    let max: usize = std::env::args().nth(1).and_then(|v| v.parse().ok()).unwrap_or(10_000);
    if std::env::var("SKIP_HOT").is_err() {
        let Some(b) = vm_common::open_vm(config(2048)) else {
            return;
        };
        hot("host processes", b.as_ref());
        drop(b);
        let Some(b) = vm_common::open_vm(config(0)) else {
            return;
        };
        hot("in-process", b.as_ref());
        drop(b);
    }
    let per_host: usize = std::env::var("VMS_PER_HOST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let Some(b) = vm_common::open_vm(config(per_host)) else {
        return;
    };
    let noop = b
        .deploy(&FunctionSpec::new("noop", microfaas::builtin("noop").unwrap()))
        .unwrap();
    let mut alive = 1;
    let mut step = 10;
    while step <= max {
        b.prestart(&noop, step - alive).unwrap();
        alive = step;
        let mut starts = Vec::new();
        for _ in 0..50 {
            let r = b.invoke(&noop, b"", StartRequest::Force(StartPath::Function)).unwrap();
            starts.push(r.timings.start_ns);
        }
        let stats = b.stats();
        summary(
            &format!(
                "function start with {alive} idle ({} host processes, {} threads)",
                stats.counter("vm_host_processes").unwrap_or(0),
                stats.counter("vm_host_threads").unwrap_or(0)
            ),
            starts,
        );
        step *= 10;
    }
}
