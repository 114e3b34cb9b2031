//! The `vm` backend's start paths: deploy makes the function snapshot and
//! restores one instance from it so the first invocation is `hot`;
//! `Force(Cold)` boots a new one; `evict` tears the idle instances down so
//! the next start restores the function snapshot; timings are consistent and
//! in host `CLOCK_MONOTONIC` ns.

mod vm_common;

use microfaas::{FunctionSpec, StartPath, StartRequest};

#[test]
fn hot_cold_and_evict() {
    let Some(b) = vm_common::open_vm(vm_common::config()) else {
        return;
    };
    let echo = b
        .deploy(&FunctionSpec::new("echo", microfaas::builtin("echo").unwrap()))
        .unwrap();

    let hot = b.invoke(&echo, b"one", StartRequest::Auto).unwrap();
    assert_eq!((hot.output.as_slice(), hot.start), (&b"one"[..], StartPath::Hot));
    assert_eq!(hot.timings.start_ns, 0);

    let cold = b.invoke(&echo, b"two", StartRequest::Force(StartPath::Cold)).unwrap();
    assert_eq!((cold.output.as_slice(), cold.start), (&b"two"[..], StartPath::Cold));
    let t = cold.timings;
    assert!(
        t.start_ns > 0 && t.dispatch_ns >= t.start_ns && t.total_ns >= t.dispatch_ns + t.exec_ns,
        "{t:?}"
    );
    eprintln!("cold echo: {t:?}; hot echo: {:?}", hot.timings);

    b.evict(&echo).unwrap();
    assert_eq!(b.stats().instances, 0);
    let after = b.invoke(&echo, b"three", StartRequest::Auto).unwrap();
    assert_eq!(
        (after.output.as_slice(), after.start),
        (&b"three"[..], StartPath::Function)
    );
    let again = b.invoke(&echo, b"four", StartRequest::Auto).unwrap();
    assert_eq!(again.start, StartPath::Hot);
    let stats = b.stats();
    assert!(stats.instances >= 1 && stats.memory_bytes > 0, "{stats:?}");
}

#[test]
fn hot_force_makes_an_instance_when_none_is_idle() {
    let Some(b) = vm_common::open_vm(vm_common::config()) else {
        return;
    };
    let noop = b
        .deploy(&FunctionSpec::new("noop", microfaas::builtin("noop").unwrap()))
        .unwrap();
    b.evict(&noop).unwrap();
    let r = b.invoke(&noop, b"", StartRequest::Force(StartPath::Hot)).unwrap();
    assert_eq!(r.start, StartPath::Hot);
    assert_eq!(r.timings.start_ns, 0);
}

#[test]
fn init_failures_surface_at_deploy() {
    let Some(b) = vm_common::open_vm(vm_common::config()) else {
        return;
    };
    // A file that is not an artifact the guest can load never gets this far
    // (Artifact::load verifies), so check the good path's idempotence: the
    // same artifact deployed twice keeps its instances.
    let spec = FunctionSpec::new("echo", microfaas::builtin("echo").unwrap());
    b.deploy(&spec).unwrap();
    let before = b.stats().instances;
    b.deploy(&spec).unwrap();
    assert_eq!(b.stats().instances, before);
}

/// The backend's own pool of VM shells (for restores in this process) is
/// used by starts and made again once invocations pause: a burst of
/// in-process function starts takes shells from it, and within a few
/// seconds of the last one it is full again.
#[test]
fn the_shell_pool_refills_once_invocations_pause() {
    let mut config = vm_common::config();
    config.vm.vms_per_host = Some(0);
    config.vm.shell_pool = Some(2);
    let Some(b) = vm_common::open_vm(config) else {
        return;
    };
    let ready = |b: &dyn microfaas::Backend| b.stats().counter("vm_shells_ready").unwrap_or(u64::MAX);
    let wait_full = |b: &dyn microfaas::Backend| {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ready(b) < 2 && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        ready(b)
    };
    let noop = b
        .deploy(&FunctionSpec::new("noop", microfaas::builtin("noop").unwrap()))
        .unwrap();
    assert_eq!(wait_full(b.as_ref()), 2, "the pool is made at start");
    let taken = |b: &dyn microfaas::Backend| b.stats().counter("vm_shells_taken").unwrap_or(0);
    let before = taken(b.as_ref());
    for _ in 0..6 {
        let r = b.invoke(&noop, b"", StartRequest::Force(StartPath::Function)).unwrap();
        assert_eq!(r.start, StartPath::Function);
    }
    assert!(
        taken(b.as_ref()) >= before + 2,
        "the burst's starts took the shells made"
    );
    assert_eq!(wait_full(b.as_ref()), 2, "refilled after the burst");
}
