//! The `vm` backend at density: serving instances live in VMM host
//! processes (`microfaas-vmhost`), a bounded number each; idle instances
//! hold no thread (a pool of runner threads per process runs every vCPU)
//! and only the kernel objects KVM needs (a VM fd, a vCPU fd, the guest
//! memory mapping and the vCPU's `kvm_run` mapping; the channel slab is one
//! mapping per process). A host process killed mid-request fails that
//! request once with `WorkerLost` and the functions serve again.
//!
//! `many_idle_instances_hold_no_thread_and_few_kernel_objects` prestarts
//! `MICROFAAS_VM_IDLE_INSTANCES` (default 10,000) idle noop instances with
//! a 16 MiB guest (2 MiB image region) over host processes of 512 VMs (the default), checks the threads,
//! fds and mappings they add, serves a sample of them hot, and tears them
//! all down. Limit: each `KVM_CREATE_VM` walks every mapping of its
//! process (one MMU notifier per VM), so a start costs more as a process
//! fills; the figures of a run are printed (in one process, before host
//! processes, 10,000 took 224 s and hit the 20,000-fd hard limit).

mod vm_common;

use microfaas::{Backend, Config, ErrorKind, FunctionId, FunctionSpec, StartPath, StartRequest, VmConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

fn mappings(pid: &str) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).map_or(0, |m| m.lines().count())
}

/// `MemAvailable` and `Slab` of the host, in KiB.
fn meminfo() -> (u64, u64) {
    let m = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |k: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("MemAvailable:"), field("Slab:"))
}

fn rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The host processes' pids (from the backend's statistics).
fn host_pids(b: &dyn Backend) -> Vec<u64> {
    let stats = b.stats();
    (0..).map_while(|i| stats.counter(&format!("vm_host{i}_pid"))).collect()
}

/// (threads, fds, mappings, RSS KiB) of this process and the host processes.
fn usage(b: &dyn Backend) -> (usize, usize, usize, u64) {
    let mut pids = vec!["self".to_owned()];
    pids.extend(host_pids(b).iter().map(u64::to_string));
    pids.iter().fold((0, 0, 0, 0), |(t, f, m, r), pid| {
        (
            t + count(&format!("/proc/{pid}/task")),
            f + count(&format!("/proc/{pid}/fd")),
            m + mappings(pid),
            r + rss_kib(pid),
        )
    })
}

fn dense_config() -> Config {
    let base = vm_common::config();
    Config {
        vm: VmConfig {
            guest_mem_mib: Some(16),
            image_mib: Some(2),
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
        .unwrap_or(10_000);
    let Some(backend) = vm_common::open_vm(dense_config()) else {
        return;
    };
    let id = backend
        .deploy(&FunctionSpec::new("noop", microfaas::builtin("noop").unwrap()))
        .unwrap();
    // Warm up (the deploy's idle instance served once), then measure from here.
    backend.invoke(&id, b"x", StartRequest::Auto).unwrap();
    let (t0, f0, m0, r0) = usage(backend.as_ref());
    let (avail0, slab0) = meminfo();
    let started = Instant::now();
    let took = backend.prestart(&id, n).unwrap();
    let prestart = started.elapsed();
    let (t1, f1, m1, r1) = usage(backend.as_ref());
    let (avail1, slab1) = meminfo();
    let hosts = host_pids(backend.as_ref()).len();
    let per = |a: usize, b: usize| (b.saturating_sub(a)) as f64 / n as f64;
    let first = took.iter().take(10).sum::<Duration>() / 10;
    let last = took.iter().rev().take(10).sum::<Duration>() / 10;
    eprintln!(
        "{n} idle instances in {prestart:?} over {hosts} host processes: start first10 {first:?} last10 {last:?}; per instance: threads {:.4} fds {:.2} mappings {:.2} rss {:.1} KiB",
        per(t0, t1),
        per(f0, f1),
        per(m0, m1),
        r1.saturating_sub(r0) as f64 / n as f64
    );
    eprintln!(
        "host memory per instance: MemAvailable -{:.1} KiB, kernel Slab +{:.1} KiB",
        avail0.saturating_sub(avail1) as f64 / n as f64,
        slab1.saturating_sub(slab0) as f64 / n as f64
    );
    let hot_sample: Vec<u64> = (0..1000)
        .map(|_| backend.invoke(&id, b"x", StartRequest::Auto).unwrap().timings.total_ns)
        .collect();
    let mut sorted = hot_sample;
    sorted.sort_unstable();
    eprintln!(
        "1,000 hot invocations with {n} idle: median {:.1} us, p99 {:.1} us",
        sorted[500] as f64 / 1e3,
        sorted[990] as f64 / 1e3
    );
    assert!(hosts > n / 512, "{hosts} host processes for {n} instances");
    assert!(per(t0, t1) <= 0.01, "threads per idle instance: {:.4}", per(t0, t1));
    assert!(per(f0, f1) <= 2.1, "fds per idle instance: {:.2}", per(f0, f1));
    assert!(per(m0, m1) <= 2.2, "mappings per idle instance: {:.2}", per(m0, m1));
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

fn deploy(b: &dyn Backend, name: &str, budget: Duration) -> FunctionId {
    b.deploy(&FunctionSpec::new(name, microfaas::builtin(name).unwrap()).with_budget(budget))
        .unwrap_or_else(|e| panic!("deploying {name}: {e}"))
}

/// A host process SIGKILLed while a request runs in it: that request fails
/// once with `WorkerLost`; the next requests of both functions that lived
/// there are served (from their nodes, in a new host process) correctly.
#[test]
fn a_host_process_killed_mid_request_fails_it_once_then_serves_again() {
    let Some(backend) = vm_common::open_vm(vm_common::config()) else {
        return;
    };
    let backend: Arc<dyn Backend> = Arc::from(backend);
    let spin = deploy(backend.as_ref(), "spin", Duration::from_secs(3));
    let echo = deploy(backend.as_ref(), "echo", Duration::from_secs(5));
    assert_eq!(
        backend.invoke(&echo, b"before", StartRequest::Auto).unwrap().output,
        b"before"
    );
    let pids = host_pids(backend.as_ref());
    assert_eq!(pids.len(), 1, "one tenant, few instances: one host process");
    let b = Arc::clone(&backend);
    let s = spin.clone();
    let in_flight = std::thread::spawn(move || b.invoke(&s, b"", StartRequest::Auto));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!in_flight.is_finished(), "spin returned early");
    let pid = libc::pid_t::try_from(pids[0]).unwrap();
    // SAFETY: sending SIGKILL to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let t = Instant::now();
    let err = in_flight.join().unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WorkerLost, "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the failure took {:?}",
        t.elapsed()
    );
    // Served again, correctly, from a new host process.
    for i in 0..5 {
        let input = format!("after {i}");
        let r = backend.invoke(&echo, input.as_bytes(), StartRequest::Auto).unwrap();
        assert_eq!(r.output, input.as_bytes());
    }
    let again = backend.invoke(&spin, b"", StartRequest::Auto).unwrap_err();
    assert_eq!(again.kind(), ErrorKind::BudgetExceeded, "{again}");
    let stats = backend.stats();
    assert_eq!(stats.counter("vm_host_processes_spawned"), Some(2), "{stats:?}");
    assert_ne!(host_pids(backend.as_ref()), pids);
}

/// A host process killed while idle, and a restore placed on it before
/// the backend noticed (it is asked the moment after the kill): the
/// restore goes to another host process instead of failing. Each round
/// kills the process the last one landed in.
#[test]
fn a_restore_placed_on_a_host_process_that_just_died_goes_elsewhere() {
    let Some(backend) = vm_common::open_vm(vm_common::config()) else {
        return;
    };
    let echo = deploy(backend.as_ref(), "echo", Duration::from_secs(5));
    for round in 0..8 {
        let pids = host_pids(backend.as_ref());
        assert_eq!(pids.len(), 1, "round {round}: one host process");
        let pid = libc::pid_t::try_from(pids[0]).unwrap();
        // SAFETY: sending SIGKILL to our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let input = format!("round {round}");
        let r = backend
            .invoke(&echo, input.as_bytes(), StartRequest::Force(StartPath::Function))
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(r.output, input.as_bytes());
        assert_ne!(host_pids(backend.as_ref()), pids, "round {round}");
    }
}

/// With 3 VMs per host process, the deploy's instance and 10 prestarted
/// ones spread over 4 host processes, and every one serves correctly.
#[test]
fn instances_spread_over_several_host_processes_serve_correctly() {
    let mut config = vm_common::config();
    config.vm.vms_per_host = Some(3);
    let Some(backend) = vm_common::open_vm(config) else {
        return;
    };
    let echo = deploy(backend.as_ref(), "echo", Duration::from_secs(5));
    backend.prestart(&echo, 10).unwrap();
    let stats = backend.stats();
    assert_eq!(stats.counter("vm_host_processes"), Some(4), "{stats:?}");
    for i in 0..4 {
        let vms = stats.counter(&format!("vm_host{i}_vms")).unwrap();
        assert!((1..=3).contains(&vms), "host {i}: {vms} VMs: {stats:?}");
    }
    assert_eq!(stats.counter("vm_idle_instances"), Some(11), "{stats:?}");
    // Each host process is in its sandbox: seccomp filter, no new
    // privileges, no capabilities, not root.
    for pid in host_pids(backend.as_ref()) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        assert_eq!(field("Seccomp:"), "2", "host {pid}: {status}");
        assert_eq!(field("NoNewPrivs:"), "1", "host {pid}");
        assert_eq!(field("CapEff:"), "0000000000000000", "host {pid}");
        assert!(
            !field("Uid:").starts_with("0\t"),
            "host {pid} runs as root: {}",
            field("Uid:")
        );
    }
    for i in 0..11 {
        let input = format!("instance {i}");
        let r = backend.invoke(&echo, input.as_bytes(), StartRequest::Auto).unwrap();
        assert_eq!(r.start, StartPath::Hot, "invocation {i}");
        assert_eq!(r.output, input.as_bytes());
    }
}

/// A host process left with no instance exits after its grace period
/// (`vm.host_idle_exit_ms`), with its VMs, without being asked to drop
/// them one by one; the backend counts it, and the function serves again
/// from a new host process.
#[test]
fn an_empty_host_process_exits_after_its_grace_period() {
    let mut config = vm_common::config();
    config.vm.host_idle_exit_ms = Some(200);
    let Some(backend) = vm_common::open_vm(config) else {
        return;
    };
    let echo = deploy(backend.as_ref(), "echo", Duration::from_secs(5));
    backend.prestart(&echo, 3).unwrap();
    assert_eq!(backend.invoke(&echo, b"a", StartRequest::Auto).unwrap().output, b"a");
    let pids = host_pids(backend.as_ref());
    assert_eq!(pids.len(), 1, "{:?}", backend.stats());
    // Serving: it stays, past its grace period.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        host_pids(backend.as_ref()),
        pids,
        "a host process with instances exited"
    );
    backend.evict(&echo).unwrap();
    let proc = format!("/proc/{}", pids[0]);
    let until = Instant::now() + Duration::from_secs(30);
    while (!host_pids(backend.as_ref()).is_empty() || std::path::Path::new(&proc).exists()) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    let stats = backend.stats();
    assert_eq!(stats.counter("vm_host_processes"), Some(0), "{stats:?}");
    assert_eq!(stats.counter("vm_host_processes_exited"), Some(1), "{stats:?}");
    // Reaped: no such process any more.
    assert!(
        !std::path::Path::new(&proc).exists(),
        "host process {} still there",
        pids[0]
    );
    for i in 0..3 {
        let input = format!("again {i}");
        let r = backend.invoke(&echo, input.as_bytes(), StartRequest::Auto).unwrap();
        assert_eq!(r.output, input.as_bytes());
    }
    assert_eq!(backend.stats().counter("vm_host_processes_spawned"), Some(2));
}

/// A long request does not hold up the other instances of its host
/// process: with one runner per process (the default), a `spin` request
/// keeps that runner busy until its budget ends, and the process starts
/// another runner for `echo`, which is served, correctly, while `spin`
/// still runs.
#[test]
fn a_long_request_does_not_block_its_host_processs_other_instances() {
    let Some(backend) = vm_common::open_vm(vm_common::config()) else {
        return;
    };
    let backend: Arc<dyn Backend> = Arc::from(backend);
    let spin = deploy(backend.as_ref(), "spin", Duration::from_secs(4));
    let echo = deploy(backend.as_ref(), "echo", Duration::from_secs(5));
    assert_eq!(
        backend.invoke(&echo, b"warm", StartRequest::Auto).unwrap().output,
        b"warm"
    );
    assert_eq!(host_pids(backend.as_ref()).len(), 1, "one tenant: one host process");
    let b = Arc::clone(&backend);
    let s = spin.clone();
    let in_flight = std::thread::spawn(move || b.invoke(&s, b"", StartRequest::Auto));
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..5 {
        let input = format!("while spinning {i}");
        let r = backend.invoke(&echo, input.as_bytes(), StartRequest::Auto).unwrap();
        assert_eq!(r.output, input.as_bytes());
    }
    assert!(!in_flight.is_finished(), "echo was served only after spin ended");
    let err = in_flight.join().unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BudgetExceeded, "{err}");
    assert_eq!(host_pids(backend.as_ref()).len(), 1, "{:?}", backend.stats());
}
