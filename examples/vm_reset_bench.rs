//! The `vm` backend's `reset` start against `hot` and `function` (a
//! benchmark, not a timed test):
//! `cargo run --release --example vm_reset_bench [N] [FUNCTION]`.
//!
//! For instances in VMM host processes (the default) and in this process
//! (`vms_per_host = 0`), in the same run: N (default 2,000) invocations of
//! FUNCTION (default `noop`) per row, the rows interleaved round by round
//! so that the machine's noise falls on all of them alike: `hot`; a forced
//! `reset` (the reset on the request path); a `fresh_per_request` copy
//! invoked with `Auto` (its instance's reset queued when the previous
//! request gave it back, waited for on the next); `function`. Prints the
//! end to end and start (reset / restore) medians and percentiles. The backend's
//! default guest (80 MiB) unless `GUEST_MIB` is set; `SHELL_POOL` sets
//! `vm.shell_pool` (which also sets the shells each host process makes in
//! advance, up to 2; 0: every restore makes its own VM).

#[path = "../tests/vm_common/mod.rs"]
mod vm_common;

use microfaas::{Backend, Config, FunctionSpec, StartPath, StartRequest, VmConfig};
use std::sync::Arc;

fn percentile(sorted: &[u64], per_mille: usize) -> f64 {
    sorted[(sorted.len() - 1) * per_mille / 1000] as f64 / 1e3
}

fn line(name: &str, what: &str, mut ns: Vec<u64>) {
    ns.sort_unstable();
    println!(
        "{name:<50} {what:<6} median {:>8.1} us  p99 {:>8.1} us  p99.9 {:>8.1} us  (n={})",
        percentile(&ns, 500),
        percentile(&ns, 990),
        percentile(&ns, 999),
        ns.len()
    );
}

fn config(vms_per_host: usize) -> Config {
    let base = vm_common::config();
    Config {
        vm: VmConfig {
            vms_per_host: Some(vms_per_host),
            guest_mem_mib: std::env::var("GUEST_MIB").ok().and_then(|v| v.parse().ok()),
            idle_per_function: Some(1),
            shell_pool: std::env::var("SHELL_POOL").ok().and_then(|v| v.parse().ok()),
            arguments_per_function: Some(0),
            ..base.vm
        },
        ..base
    }
}

fn run(label: &str, b: &dyn Backend, function: &str, n: usize) {
    let artifact = microfaas::builtin(function).expect("builtin function");
    let plain = b
        .deploy(&FunctionSpec::new(function, Arc::clone(&artifact)))
        .expect("deploy");
    let fresh_name = format!("{function}-fresh");
    let fresh = b
        .deploy(&FunctionSpec::new(fresh_name.clone(), artifact).with_fresh_per_request(true))
        .expect("deploy");
    // (label, function, request, the path it must take)
    let rows = [
        ("hot", &plain, StartRequest::Force(StartPath::Hot), StartPath::Hot),
        (
            "reset (forced, synchronous)",
            &plain,
            StartRequest::Force(StartPath::Reset),
            StartPath::Reset,
        ),
        (
            "reset (fresh, on release)",
            &fresh,
            StartRequest::Auto,
            StartPath::Reset,
        ),
        (
            "function",
            &plain,
            StartRequest::Force(StartPath::Function),
            StartPath::Function,
        ),
    ];
    let mut total: Vec<Vec<u64>> = vec![Vec::new(); rows.len()];
    let mut start: Vec<Vec<u64>> = vec![Vec::new(); rows.len()];
    // Warm up every row twice.
    for _ in 0..2 {
        for (_, id, req, _) in &rows {
            b.invoke(id, b"", *req).expect("warm-up");
        }
    }
    for _ in 0..n {
        for (i, (what, id, req, path)) in rows.iter().enumerate() {
            let r = b.invoke(id, b"", *req).expect("invoke");
            assert_eq!(r.start, *path, "{what}");
            total[i].push(r.timings.total_ns);
            start[i].push(r.timings.start_ns);
        }
    }
    for (i, (what, _, _, path)) in rows.iter().enumerate() {
        let name = format!("{label} {function} {what}");
        line(&name, "e2e", std::mem::take(&mut total[i]));
        if *path != StartPath::Hot {
            line(&name, "start", std::mem::take(&mut start[i]));
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let function = args.next().unwrap_or_else(|| "noop".to_owned());
    for (label, vms_per_host) in [("host-process", 512), ("in-process", 0)] {
        let Some(b) = vm_common::open_vm(config(vms_per_host)) else {
            return;
        };
        run(label, b.as_ref(), &function, n);
    }
}
