//! The `vm` backend at density: idle instances hold no thread (a pool of
//! runner threads runs every vCPU) and only the kernel objects KVM needs
//! (a VM fd, a vCPU fd, the guest memory mapping and the vCPU's `kvm_run`
//! mapping; the channel slab is one mapping for all of them).
//!
//! `many_idle_instances_hold_no_thread_and_few_kernel_objects` prestarts
//! `MICROFAAS_VM_IDLE_INSTANCES` (default 3,000) idle noop instances with a
//! 24 MiB guest, checks the threads, fds and mappings they add, serves a
//! sample of them hot, and tears them all down. Limit: every VM of this
//! process registers an MMU notifier on its address space, so each
//! `KVM_CREATE_VM` walks every mapping (`mm_take_all_locks`): the cost of
//! one start grows with the instances already alive, and 3,000 keep the
//! test to about a minute on the 2-core CI host (10,000 take several).

mod vm_common;

use microfaas::{Config, FunctionSpec, StartPath, StartRequest, VmConfig};
use std::time::{Duration, Instant};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps").map_or(0, |m| m.lines().count())
}

fn threads() -> usize {
    count("/proc/self/task")
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn dense_config() -> Config {
    let base = vm_common::config();
    Config {
        vm: VmConfig {
            guest_mem_mib: Some(24),
            idle_per_function: Some(1),
            shell_pool: Some(0),
            arguments_per_function: Some(0),
            ..base.vm
        },
        input_limit_bytes: 64 << 10,
        output_limit_bytes: 64 << 10,
        ..base
    }
}

#[test]
fn many_idle_instances_hold_no_thread_and_few_kernel_objects() {
    let n: usize = std::env::var("MICROFAAS_VM_IDLE_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let Some(backend) = vm_common::open_vm(dense_config()) else {
        return;
    };
    let id = backend
        .deploy(&FunctionSpec::new("noop", microfaas::builtin("noop").unwrap()))
        .unwrap();
    // Warm up (the deploy's idle instance served once), then measure from here.
    backend.invoke(&id, b"x", StartRequest::Auto).unwrap();
    let (t0, f0, m0, r0) = (threads(), count("/proc/self/fd"), mappings(), rss_kib());
    let started = Instant::now();
    let took = backend.prestart(&id, n).unwrap();
    let prestart = started.elapsed();
    let (t1, f1, m1, r1) = (threads(), count("/proc/self/fd"), mappings(), rss_kib());
    let per = |a: usize, b: usize| (b.saturating_sub(a)) as f64 / n as f64;
    let first = took.iter().take(10).sum::<Duration>() / 10;
    let last = took.iter().rev().take(10).sum::<Duration>() / 10;
    eprintln!(
        "{n} idle instances in {prestart:?}: start first10 {first:?} last10 {last:?}; per instance: threads {:.4} fds {:.2} mappings {:.2} rss {:.1} KiB",
        per(t0, t1),
        per(f0, f1),
        per(m0, m1),
        r1.saturating_sub(r0) as f64 / n as f64
    );
    assert!(t1 <= t0 + 2, "threads grew from {t0} to {t1} with {n} idle instances");
    assert!(per(f0, f1) <= 2.05, "fds per idle instance: {:.2}", per(f0, f1));
    assert!(per(m0, m1) <= 2.05, "mappings per idle instance: {:.2}", per(m0, m1));
    let stats = backend.stats();
    assert!(
        stats.instances >= n,
        "{} instances alive, {n} prestarted",
        stats.instances
    );
    // A sample served hot, each correctly.
    for _ in 0..200 {
        let r = backend.invoke(&id, b"x", StartRequest::Auto).unwrap();
        assert_eq!(r.start, StartPath::Hot);
    }
    let t = Instant::now();
    backend.evict(&id).unwrap();
    drop(backend);
    eprintln!("teardown of {n} instances: {:?}", t.elapsed());
}
