//! Benchmarks of the `vm` backend (a benchmark, not a timed test; run with
//! `cargo run --release --example vm_bench`):
//! hot `noop` latency, cold boot to first reply with where the time goes,
//! and `sha512` throughput in the guest against native code.

#[path = "../tests/vm_common/mod.rs"]
mod vm_common;

use microfaas::{BackendKind, FunctionSpec, StartPath, StartRequest};
use sha2::{Digest, Sha512};
use std::time::{Duration, Instant};
use vmm::{Instance, InstanceConfig};

/// The `per_mille`-th value of `sorted` (nearest rank).
fn percentile(sorted: &[u64], per_mille: usize) -> u64 {
    sorted[(sorted.len() - 1) * per_mille / 1000]
}

fn summary(name: &str, mut ns: Vec<u64>) -> u64 {
    ns.sort_unstable();
    let (p50, p99) = (percentile(&ns, 500), percentile(&ns, 990));
    eprintln!(
        "{name}: n={} median {:.1} us, p99 {:.1} us, min {:.1} us",
        ns.len(),
        p50 as f64 / 1e3,
        p99 as f64 / 1e3,
        ns[0] as f64 / 1e3
    );
    p50
}

fn bench_hot_noop() {
    let Some(b) = vm_common::open_vm(vm_common::config()) else {
        return;
    };
    let noop = b
        .deploy(&FunctionSpec::new("noop", microfaas::builtin("noop").unwrap()))
        .unwrap();
    for _ in 0..200 {
        b.invoke(&noop, b"", StartRequest::Auto).unwrap();
    }
    let mut total = Vec::new();
    let mut dispatch = Vec::new();
    for _ in 0..5000 {
        let r = b.invoke(&noop, b"", StartRequest::Auto).unwrap();
        assert_eq!(r.start, StartPath::Hot);
        total.push(r.timings.total_ns);
        dispatch.push(r.timings.dispatch_ns);
    }
    let stats = b.stats();
    eprintln!(
        "idle instances: {}, host memory resident for their guest RAM: {} KiB each",
        stats.instances,
        stats.memory_bytes / 1024 / u64::try_from(stats.instances.max(1)).unwrap()
    );
    summary("hot noop total (trait invoke)", total);
    summary("hot noop dispatch (invoke -> function entry)", dispatch);

    // The same with the guest spinning between requests.
    let mut config = vm_common::config();
    config.vm.hot_spin_us = Some(1000);
    let Some(b) = vm_common::open_vm(config) else {
        return;
    };
    let noop = b
        .deploy(&FunctionSpec::new("noop", microfaas::builtin("noop").unwrap()))
        .unwrap();
    let mut total = Vec::new();
    for _ in 0..5000 {
        total.push(b.invoke(&noop, b"", StartRequest::Auto).unwrap().timings.total_ns);
    }
    summary("hot noop total, hot_spin_us = 1000", total);
}

fn bench_cold_boot() {
    let Some(vmm) = vm_common::open_vmm() else {
        return;
    };
    let noop = microfaas::builtin("noop").unwrap();
    let config = InstanceConfig::default();
    let deadline = || Instant::now() + Duration::from_secs(10);
    let mut fields: [Vec<u64>; 8] = Default::default();
    let mut keep = Vec::new();
    for i in 0..60 {
        let t = Instant::now();
        let (mut inst, boot) = Instance::boot(&vmm, &config).unwrap();
        let booted = t.elapsed();
        inst.load(noop.bytes(), deadline()).unwrap();
        let loaded = t.elapsed();
        inst.invoke(b"", deadline()).unwrap();
        let first = t.elapsed();
        if i >= 10 {
            let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap();
            for (v, f) in [
                boot.create_vm_ns,
                boot.memory_ns,
                boot.setup_ns,
                boot.vcpu_ns,
                boot.guest_boot_ns,
                ns(loaded - booted),
                ns(first - loaded),
                ns(first),
            ]
            .into_iter()
            .zip(fields.iter_mut())
            {
                f.push(v);
            }
        }
        // Teardown off the measured path (as the backend does).
        keep.push(inst);
    }
    let names = [
        "KVM_CREATE_VM",
        "guest memory + slots",
        "kernel ELF + page tables + GDT/IDT/TSS",
        "vCPU create + CPL3 state + boot info",
        "guest start (first KVM_RUN -> doorbell)",
        "function load + init (1 request)",
        "first invoke (1 request)",
        "cold boot -> first reply, total",
    ];
    for (name, v) in names.iter().zip(fields) {
        summary(name, v);
    }
    let t = Instant::now();
    drop(keep);
    eprintln!("teardown of 60 instances: {:?}", t.elapsed());

    // The same through the trait.
    let Some(b) = vm_common::open_vm(vm_common::config()) else {
        return;
    };
    let id = b.deploy(&FunctionSpec::new("noop", noop)).unwrap();
    let mut cold = Vec::new();
    for _ in 0..50 {
        cold.push(
            b.invoke(&id, b"", StartRequest::Force(StartPath::Cold))
                .unwrap()
                .timings
                .total_ns,
        );
    }
    summary("cold noop via the trait (Force(Cold), total)", cold);
}

fn bench_sha512_throughput() {
    let Some(b) = vm_common::open_vm(vm_common::config()) else {
        return;
    };
    let rounds = 100_000u32;
    let input = rounds.to_string();
    let spec = FunctionSpec::new("sha512", microfaas::builtin("sha512").unwrap());
    let sha = b.deploy(&spec).unwrap();
    let lang = microfaas::open(BackendKind::Language, vm_common::config())
        .inspect_err(|e| eprintln!("language backend unavailable for comparison: {e}"))
        .ok();
    let lang_id = lang.as_ref().map(|l| l.deploy(&spec).unwrap());
    let native_run = || {
        let t = Instant::now();
        let mut block = [0u8; 64];
        for _ in 0..rounds {
            let d = Sha512::digest(block);
            block.copy_from_slice(&d);
        }
        std::hint::black_box(block);
        u64::try_from(t.elapsed().as_nanos()).unwrap()
    };
    // Interleaved, so that the load of this shared machine hits all alike.
    let (mut guest, mut native, mut language) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..31 {
        let g = b
            .invoke(&sha, input.as_bytes(), StartRequest::Auto)
            .unwrap()
            .timings
            .exec_ns;
        let n = native_run();
        let l = lang.as_ref().zip(lang_id.as_ref()).map(|(l, id)| {
            l.invoke(id, input.as_bytes(), StartRequest::Auto)
                .unwrap()
                .timings
                .exec_ns
        });
        if i > 0 {
            guest.push(g);
            native.push(n);
            language.extend(l);
        }
    }
    // Per-round ratios cancel most of the load swings between rounds.
    let median_ratio = |a: &[u64], b: &[u64]| {
        let mut r: Vec<f64> = a.iter().zip(b).map(|(x, y)| *x as f64 / *y as f64).collect();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    eprintln!(
        "guest / native, median of per-round ratios: {:.3}",
        median_ratio(&guest, &native)
    );
    if !language.is_empty() {
        eprintln!(
            "guest / language, median of per-round ratios: {:.3}",
            median_ratio(&guest, &language)
        );
    }
    let min = |v: &[u64]| *v.iter().min().unwrap();
    let (gmin, nmin) = (min(&guest), min(&native));
    let g = summary("sha512 x100000 in the guest (exec)", guest);
    let n = summary("sha512 x100000 native (sha2 crate, this process)", native);
    eprintln!(
        "guest / native: median {:.3}, min {:.3}",
        g as f64 / n as f64,
        gmin as f64 / nmin as f64
    );
    if !language.is_empty() {
        let lmin = min(&language);
        let l = summary("sha512 x100000 on language (exec)", language);
        eprintln!(
            "guest / language: median {:.3}, min {:.3}",
            g as f64 / l as f64,
            gmin as f64 / lmin as f64
        );
    }
}

/// CPU time of the calling thread, in ns.
fn thread_cpu_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
    u64::try_from(ts.tv_sec()).unwrap() * 1_000_000_000 + u64::try_from(ts.tv_nsec()).unwrap()
}

/// The same comparison in CPU time rather than wall time, which the load of
/// a shared machine disturbs far less: the vCPU thread's CPU time for one
/// guest invocation against this thread's for the same work natively.
fn bench_sha512_cpu_time() {
    let Some(vmm) = vm_common::open_vmm() else { return };
    let sha = microfaas::builtin("sha512").unwrap();
    let (mut inst, _) = Instance::boot(&vmm, &InstanceConfig::default()).unwrap();
    let deadline = || Instant::now() + Duration::from_secs(30);
    inst.load(sha.bytes(), deadline()).unwrap();
    let rounds = 100_000u32;
    let input = rounds.to_string();
    inst.invoke(input.as_bytes(), deadline()).unwrap();
    let (mut guest, mut native) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let before = inst.vcpu_cpu_time_ns().unwrap();
        inst.invoke(input.as_bytes(), deadline()).unwrap();
        guest.push(inst.vcpu_cpu_time_ns().unwrap() - before);
        let before = thread_cpu_ns();
        let mut block = [0u8; 64];
        for _ in 0..rounds {
            let d = Sha512::digest(block);
            block.copy_from_slice(&d);
        }
        std::hint::black_box(block);
        native.push(thread_cpu_ns() - before);
    }
    let g = summary("sha512 x100000 in the guest (vCPU thread CPU time)", guest);
    let n = summary("sha512 x100000 native (thread CPU time)", native);
    eprintln!("guest / native CPU time: {:.3}", g as f64 / n as f64);
}

fn main() {
    bench_hot_noop();
    bench_cold_boot();
    bench_sha512_throughput();
    bench_sha512_cpu_time();
}
