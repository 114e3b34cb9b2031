//! The `vm` backend's `reset` start path: a function deployed
//! `fresh_per_request` gets, for every request after the first, its used
//! instance reset to the function snapshot, and nothing one request wrote
//! (a static, the heap, the stack, the I/O window) is visible to the next;
//! the same probe on a reused (`hot`) instance does see it, so the probe
//! can fail. Runs with instances in VMM host processes (the default) and in
//! this process (`vm.vms_per_host = 0`).

mod vm_common;

use microfaas::{Artifact, Backend, Config, FunctionId, FunctionSpec, StartPath, StartRequest};
use std::path::Path;
use std::sync::Arc;

fn probe_artifact() -> Arc<Artifact> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reset-probe");
    let mut opts = microfaas_builder::BuildOptions::new(Path::new(env!("CARGO_TARGET_TMPDIR")).join("vm-fixtures"));
    opts.allow_unsafe = true;
    let built = microfaas_builder::build(&dir, &opts).unwrap_or_else(|e| panic!("building reset-probe: {e}"));
    Arc::new(Artifact::load(&built.path).unwrap())
}

const SECRET: &[u8; 16] = b"\x93reset-secret!\x07\xfe";

/// Writes the secret; returns the heap and stack addresses it used.
fn write(b: &dyn Backend, id: &FunctionId, start: StartRequest) -> (StartPath, [u8; 16]) {
    let mut input = vec![b'w'];
    input.extend_from_slice(SECRET);
    let r = b.invoke(id, &input, start).unwrap();
    assert_eq!(r.output.len(), 64 * 16 + 16, "{:?}", r.output);
    assert!(r.output[..1024].chunks(16).all(|c| c == SECRET));
    let mut addrs = [0u8; 16];
    addrs.copy_from_slice(&r.output[1024..]);
    (r.start, addrs)
}

/// Where the secret was found: static, heap, stack, I/O window.
fn scan(b: &dyn Backend, id: &FunctionId, addrs: &[u8; 16], start: StartRequest) -> (StartPath, [u32; 4]) {
    let mut input = vec![b's'];
    input.extend_from_slice(SECRET);
    input.extend_from_slice(addrs);
    let r = b.invoke(id, &input, start).unwrap();
    assert_eq!(r.output.len(), 16, "{:?}", r.output);
    let mut hits = [0u32; 4];
    for (h, c) in hits.iter_mut().zip(r.output.chunks_exact(4)) {
        *h = u32::from_le_bytes(c.try_into().unwrap());
    }
    (r.start, hits)
}

fn check(config: Config) {
    let Some(b) = vm_common::open_vm(config) else {
        return;
    };
    let artifact = probe_artifact();
    let fresh = b
        .deploy(&FunctionSpec::new("probe-fresh", Arc::clone(&artifact)).with_fresh_per_request(true))
        .unwrap();
    // The first request takes the instance deploy restored (unused: hot).
    let (first, addrs) = write(b.as_ref(), &fresh, StartRequest::Auto);
    assert_eq!(first, StartPath::Hot);
    // Every later one gets it reset.
    for round in 0..3 {
        let (path, hits) = scan(b.as_ref(), &fresh, &addrs, StartRequest::Auto);
        assert_eq!(path, StartPath::Reset, "round {round}");
        assert_eq!(
            hits, [0; 4],
            "round {round}: the secret survived a reset (static, heap, stack, window)"
        );
        let (path, again) = write(b.as_ref(), &fresh, StartRequest::Auto);
        assert_eq!(path, StartPath::Reset);
        // Same layout, same allocator state: the same addresses.
        assert_eq!(again, addrs);
    }
    // Forcing it works too, and so does a function restore after.
    let (path, hits) = scan(b.as_ref(), &fresh, &addrs, StartRequest::Force(StartPath::Reset));
    assert_eq!((path, hits), (StartPath::Reset, [0; 4]));
    assert!(b.stats().counter("reset_starts").unwrap() >= 7);

    // The control: reused without a reset, the probe finds the secret.
    let reused = b.deploy(&FunctionSpec::new("probe-reused", artifact)).unwrap();
    let (_, addrs) = write(b.as_ref(), &reused, StartRequest::Auto);
    let (path, hits) = scan(b.as_ref(), &reused, &addrs, StartRequest::Force(StartPath::Hot));
    assert_eq!(path, StartPath::Hot);
    assert!(
        hits[0] > 0 && hits[1] > 0 && hits[3] > 0,
        "the probe missed a reused instance's secret: {hits:?}"
    );
    // And a reset of that instance clears it.
    let (path, hits) = scan(b.as_ref(), &reused, &addrs, StartRequest::Force(StartPath::Reset));
    assert_eq!((path, hits), (StartPath::Reset, [0; 4]));
}

#[test]
fn reset_leaves_nothing_in_host_processes() {
    check(vm_common::config());
}

#[test]
fn reset_leaves_nothing_in_process() {
    let mut c = vm_common::config();
    c.vm.vms_per_host = Some(0);
    check(c);
}

#[test]
fn reset_output_matches_a_cold_run() {
    let Some(b) = vm_common::open_vm(vm_common::config()) else {
        return;
    };
    let spec = FunctionSpec::new("sha512", microfaas::builtin("sha512").unwrap()).with_fresh_per_request(true);
    let id = b.deploy(&spec).unwrap();
    for input in [&b"3"[..], b"17", b"1"] {
        let cold = b.invoke(&id, input, StartRequest::Force(StartPath::Cold)).unwrap();
        let reset = b.invoke(&id, input, StartRequest::Force(StartPath::Reset)).unwrap();
        assert_eq!(reset.start, StartPath::Reset);
        assert_eq!(reset.output, cold.output);
        let auto = b.invoke(&id, input, StartRequest::Auto).unwrap();
        assert_eq!(auto.output, cold.output);
        assert_ne!(
            auto.start,
            StartPath::Hot,
            "a fresh-per-request function reused an instance"
        );
    }
}
