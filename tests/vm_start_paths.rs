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
