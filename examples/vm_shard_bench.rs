//! The `vm` backend with and without VMM host processes (a benchmark, not
//! a timed test): `cargo run --release --example vm_shard_bench [MAX]`.
//!
//! 1. Hot `noop` (total and dispatch), instances in host processes vs in
//!    this process (`vms_per_host = 0`).
//! 2. `function` start (restore from the function node) with 10, 1,000,
//!    ... up to MAX (default 10,000) idle instances alive, in host processes
//!    of `VMS_PER_HOST` (default 2048) VMs. `SKIP_HOT=1` skips part 1.
//!
//! Knobs for A/B runs of the hot path: `HOST_RUNNERS` (`vm.host_runners`),
//! `HOT_SPIN_US` (`vm.hot_spin_us`: the guest polls its mailbox after a
//! reply and the caller polls for the reply), `DEFAULT_LAYOUT=1` (table1's
//! guest layout instead of the density run's 16 MiB guest and 64 KiB
//! window), `HOST_POLL_US` (`vm.host_poll_us`), `CALLER_SPIN_US`
//! (`vm.caller_spin_us`), `SHELL_POOL` (`vm.shell_pool`, which also sets
//! the shells each host process makes in advance, up to 2), `FUNCTIONS=N` (N noop functions picked at random, as table1
//! does with 100), `PIN=caller` (the calling thread pinned to core 0 for
//! the hot part, as table1 pins its vm latency caller: caller and runner
//! then share a core, the fast mode here).

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
    if std::env::var("DEFAULT_LAYOUT").is_ok() {
        // table1's layout (the defaults: an 80 MiB guest, a 4 MiB window).
        return Config {
            vm: VmConfig {
                vms_per_host: Some(vms_per_host),
                host_runners: std::env::var("HOST_RUNNERS").ok().and_then(|v| v.parse().ok()),
                hot_spin_us: std::env::var("HOT_SPIN_US").ok().and_then(|v| v.parse().ok()),
                host_poll_us: std::env::var("HOST_POLL_US").ok().and_then(|v| v.parse().ok()),
                caller_spin_us: std::env::var("CALLER_SPIN_US").ok().and_then(|v| v.parse().ok()),
                shell_pool: std::env::var("SHELL_POOL").ok().and_then(|v| v.parse().ok()),
                ..base.vm
            },
            ..base
        };
    }
    Config {
        vm: VmConfig {
            vms_per_host: Some(vms_per_host),
            host_runners: std::env::var("HOST_RUNNERS").ok().and_then(|v| v.parse().ok()),
            hot_spin_us: std::env::var("HOT_SPIN_US").ok().and_then(|v| v.parse().ok()),
            host_poll_us: std::env::var("HOST_POLL_US").ok().and_then(|v| v.parse().ok()),
            caller_spin_us: std::env::var("CALLER_SPIN_US").ok().and_then(|v| v.parse().ok()),
            shell_pool: std::env::var("SHELL_POOL").ok().and_then(|v| v.parse().ok()),
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
    // `FUNCTIONS=N`: N noop functions invoked in turn (table1 picks among
    // 100 at random: every request then runs another VM).
    let n: usize = std::env::var("FUNCTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let ids: Vec<_> = (0..n.max(1))
        .map(|i| {
            b.deploy(&FunctionSpec::new(
                format!("noop-{i}"),
                microfaas::builtin("noop").unwrap(),
            ))
            .unwrap()
        })
        .collect();
    for i in 0..300 {
        b.invoke(&ids[i % ids.len()], b"", StartRequest::Auto).unwrap();
    }
    let (mut total, mut dispatch) = (Vec::new(), Vec::new());
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..5000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let noop = &ids[usize::try_from(x % ids.len() as u64).unwrap_or(0)];
        let r = b.invoke(noop, b"", StartRequest::Auto).unwrap();
        assert_eq!(r.start, StartPath::Hot);
        total.push(r.timings.total_ns);
        dispatch.push(r.timings.dispatch_ns);
    }
    summary(&format!("{label}: hot noop total"), total);
    summary(&format!("{label}: hot noop dispatch"), dispatch);
}

/// Pins the calling thread to core 0; returns the mask it had.
fn pin_caller() -> Option<nix::sched::CpuSet> {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    let me = nix::unistd::Pid::from_raw(0);
    let previous = sched_getaffinity(me).ok()?;
    let mut only0 = CpuSet::new();
    only0.set(0).ok()?;
    sched_setaffinity(me, &only0).ok()?;
    Some(previous)
}

fn main() {
    let max: usize = std::env::args().nth(1).and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let pinned = (std::env::var("PIN").as_deref() == Ok("caller"))
        .then(pin_caller)
        .flatten();
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
    if let Some(previous) = pinned {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &previous);
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
