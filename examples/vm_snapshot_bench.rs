//! Start latency of the `vm` backend by snapshot level, argument snapshots
//! against full runs, private memory of idle restored instances, and node
//! sizes (issue 4's benchmark targets). A benchmark, not a test:
//!
//! ```text
//! cargo run --release --example vm_snapshot_bench [-- INSTANCES]
//! ```
//!
//! Uses a fresh store in a temporary directory. INSTANCES (default 1000)
//! idle instances of `noop` are restored for the memory figures.
//! `VMHOST=PATH` runs another build of the VMM host process (e.g. an
//! older one, to compare its restore path).

use microfaas::{Backend, BackendKind, Config, FunctionId, FunctionSpec, StartPath, StartRequest, VmConfig};
use std::time::{Duration, Instant};

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn p99(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[(v.len() - 1) * 99 / 100]
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Medians of `n` invocations forced onto `path`: (end to end, start) ns.
fn measure(b: &dyn Backend, id: &FunctionId, input: &[u8], path: StartPath, n: usize) -> (u64, u64, u64) {
    let mut total = Vec::with_capacity(n);
    let mut start = Vec::with_capacity(n);
    for _ in 0..n {
        let r = b
            .invoke(id, input, StartRequest::Force(path))
            .unwrap_or_else(|e| panic!("{id} {path}: {e}"));
        assert_eq!(r.start, path);
        total.push(r.timings.total_ns);
        start.push(r.timings.start_ns);
        // Let the reaper tear instances down and refill its shells off the
        // clock (2 cores here).
        std::thread::sleep(Duration::from_millis(10));
    }
    (median(total.clone()), p99(total), median(start))
}

fn kernel_kib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .filter(|l| {
            ["Slab:", "KernelStack:", "PageTables:", "SecPageTables:"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

fn self_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let instances: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let store = tempfile::Builder::new()
        .prefix("microfaas-bench-store")
        .tempdir()
        .expect("temp store");
    let config = |idle: usize| Config {
        vm: VmConfig {
            store_dir: Some(store.path().to_owned()),
            idle_per_function: Some(idle),
            host_binary: std::env::var_os("VMHOST").map(std::path::PathBuf::from),
            ..VmConfig::default()
        },
        ..Config::default()
    };
    let b = microfaas::open(BackendKind::Vm, config(4)).expect("vm backend");
    let deploy = |name: &str| {
        let t = Instant::now();
        let id = b
            .deploy(&FunctionSpec::new(name, microfaas::builtin(name).expect("builtin")))
            .expect("deploy");
        println!(
            "deploy {name}: {:.2} ms (base/function snapshots made on first use)",
            t.elapsed().as_secs_f64() * 1e3
        );
        id
    };
    let noop = deploy("noop");
    let heavy = deploy("init-heavy");
    let cp = deploy("checkpointed");
    let echo = deploy("echo");
    let sha = deploy("sha512");

    println!("\n== start to first reply (end-to-end invoke), median / p99 ms; start_ns median ==");
    let mut rows = Vec::new();
    for (name, id) in [("noop", &noop), ("init-heavy", &heavy)] {
        for (path, n) in [
            (StartPath::Cold, 20),
            (StartPath::Base, 20),
            (StartPath::Function, 100),
            (StartPath::Hot, 100),
        ] {
            let (med, p, st) = measure(b.as_ref(), id, b"x", path, n);
            println!(
                "{name:>12} {path:>9}: median {:7.3} ms  p99 {:7.3} ms  start {:7.3} ms  (n={n})",
                ms(med),
                ms(p),
                ms(st)
            );
            rows.push((name, path, med));
        }
    }
    let get = |name: &str, path: StartPath| {
        rows.iter()
            .find(|r| r.0 == name && r.1 == path)
            .map(|r| r.2)
            .unwrap_or(1)
    };
    for name in ["noop", "init-heavy"] {
        let (cold, func) = (get(name, StartPath::Cold), get(name, StartPath::Function));
        println!(
            "{name}: function start {:.3} ms vs cold {:.3} ms = {:.1}x faster",
            ms(func),
            ms(cold),
            cold as f64 / func as f64
        );
    }

    println!("\n== checkpointed: argument snapshot vs full run ==");
    let input = b"bench-input";
    // First invocation of the input reaches checkpoint(): makes the node.
    let first = b.invoke(&cp, input, StartRequest::Auto).expect("checkpointed");
    println!(
        "first run (makes the argument node): {:.3} ms via {}",
        ms(first.timings.total_ns),
        first.start
    );
    let (arg, arg_p99, arg_start) = measure(b.as_ref(), &cp, input, StartPath::Argument, 30);
    let (full_fn, full_fn_p99, _) = measure(b.as_ref(), &cp, input, StartPath::Function, 30);
    let (full_hot, _, _) = measure(b.as_ref(), &cp, input, StartPath::Hot, 30);
    println!(
        "argument start: median {:.3} ms p99 {:.3} ms (start {:.3} ms)",
        ms(arg),
        ms(arg_p99),
        ms(arg_start)
    );
    println!(
        "full run from the function snapshot: median {:.3} ms p99 {:.3} ms",
        ms(full_fn),
        ms(full_fn_p99)
    );
    println!("full run on a hot instance: median {:.3} ms", ms(full_hot));

    for (name, id, inp) in [("echo", &echo, &b"hello"[..]), ("sha512", &sha, b"100")] {
        let (f, _, _) = measure(b.as_ref(), id, inp, StartPath::Function, 30);
        println!("{name} function start: median {:.3} ms", ms(f));
    }

    println!("\n== memory: {instances} idle instances of noop restored from its function snapshot ==");
    for id in [&noop, &heavy, &cp, &echo, &sha] {
        b.evict(id).expect("evict");
    }
    drop(b);
    // A backend that keeps every instance idle, on the same store.
    let b = microfaas::open(BackendKind::Vm, config(instances)).expect("vm backend");
    let noop = b
        .deploy(&FunctionSpec::new("noop", microfaas::builtin("noop").expect("builtin")))
        .expect("deploy");
    b.evict(&noop).expect("evict");
    std::thread::sleep(Duration::from_millis(1000));
    let (kernel_before, rss_before) = (kernel_kib(), self_rss_kib());
    let t = Instant::now();
    for _ in 0..instances {
        b.invoke(&noop, b"", StartRequest::Force(StartPath::Function))
            .expect("noop");
    }
    assert_eq!(b.stats().instances, instances);
    let made = t.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let stats = b.stats();
    let extra = |k: &str| stats.counter(k).unwrap_or(0);
    let restored = extra("restored_idle_instances").max(1);
    let private = extra("restored_idle_private_bytes");
    let (kernel_after, rss_after) = (kernel_kib(), self_rss_kib());
    let kernel_per = (kernel_after.saturating_sub(kernel_before)) * 1024 / restored;
    let rss_per = (rss_after.saturating_sub(rss_before)) * 1024 / restored;
    println!(
        "{restored} idle restored instances made in {:.2} s ({:.3} ms each, one invocation each)",
        made.as_secs_f64(),
        made.as_secs_f64() * 1e3 / restored as f64
    );
    println!(
        "guest private memory (smaps, stats()): {} KiB total, {:.1} KiB per instance",
        private / 1024,
        private as f64 / 1024.0 / restored as f64
    );
    println!(
        "host kernel (Slab+KernelStack+PageTables delta): {:.1} KiB per instance",
        kernel_per as f64 / 1024.0
    );
    println!(
        "process RSS delta (guest pages + vCPU threads + VMM): {:.1} KiB per instance",
        rss_per as f64 / 1024.0
    );
    println!(
        "=> per idle restored instance: {:.1} KiB (private guest + kernel) / {:.1} KiB (RSS delta + kernel)",
        (private / restored + kernel_per) as f64 / 1024.0,
        (rss_per + kernel_per) as f64 / 1024.0
    );
    println!("stats(): {stats:?}");
    b.evict(&noop).expect("evict");

    println!("\n== snapshot nodes (own pages) ==");
    let s = snapshots::Store::open(store.path()).expect("store");
    let mut nodes = s.nodes();
    nodes.sort_by_key(|n| (n.level(), n.created_unix_ms()));
    for n in nodes {
        println!(
            "{:>8} {:<40} own pages {:6}  node file {:8} bytes",
            n.level().to_string(),
            n.label().to_string(),
            n.own_page_count(),
            n.file_len()
        );
    }
}
