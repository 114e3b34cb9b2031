//! Modules as deploy-time data on a raw VMM instance: the `wasm-runtime`
//! artifact (the wasmi runtime alone) is loaded and initialised once, and a
//! WebAssembly module is then handed to its `load()` (`Instance::load_module`),
//! mapped read-only past the artifact. An instance restored from a snapshot
//! of the runtime alone (the runtime base) takes a module the same way.
//! Every example module gives the same outputs as its `wasm-NAME` artifact
//! (the module embedded, loaded by `init`), cold and from the runtime
//! base. A module for an artifact without `load` and an invalid module
//! fail to load (`InitFailed`, with the reason; the instance ends, as after
//! a failed `init`); a second module and a module too large for the image
//! region are refused with typed errors before anything is written.

mod vm_common;

use std::time::{Duration, Instant};
use vm_common::{cow_copy, image};
use vmm::image::ImageError;
use vmm::{Instance, InstanceConfig, RunError, SavedState, Status, Vmm};

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

fn config() -> InstanceConfig {
    InstanceConfig {
        huge_pages: false,
        vcpu_stats: false,
        ..InstanceConfig::default()
    }
}

fn artifact(name: &str) -> Vec<u8> {
    microfaas::builtin(name).unwrap().bytes().to_vec()
}

fn module(name: &str) -> Vec<u8> {
    microfaas::builtin_module(name).unwrap().to_vec()
}

/// A booted instance with `name` loaded and initialised.
fn loaded(vmm: &Vmm, name: &str) -> Instance {
    let (mut instance, _) = Instance::boot(vmm, &config()).unwrap();
    let reply = instance.load(&artifact(name), deadline()).unwrap();
    assert_eq!(reply.status, Status::Ok, "{}", String::from_utf8_lossy(&reply.data));
    instance
}

/// The runtime base: the saved state and memory of a booted guest with the
/// runtime loaded and initialised, no module yet.
struct Base {
    saved: SavedState,
    file: std::fs::File,
    len: usize,
}

fn runtime_base(vmm: &Vmm) -> Base {
    let mut fresh = loaded(vmm, microfaas::WASM_RUNTIME);
    let saved = fresh.save().unwrap();
    // SAFETY: `fresh` is idle (no request in flight) while we copy.
    let file = image(unsafe { fresh.guest_memory() });
    let len = usize::try_from(file.metadata().unwrap().len()).unwrap();
    Base { saved, file, len }
}

fn restore(vmm: &Vmm, base: &Base) -> Instance {
    let memory = cow_copy(&base.file, base.len);
    Instance::restore(vmm, None, &config(), Box::new(memory), &base.saved).unwrap()
}

fn ok(reply: vmm::Reply) -> Vec<u8> {
    assert_eq!(reply.status, Status::Ok, "{}", String::from_utf8_lossy(&reply.data));
    reply.data
}

/// (status, output or message) of `input`s, one after another.
fn outputs(instance: &mut Instance, inputs: &[&[u8]]) -> Vec<(Status, Vec<u8>)> {
    inputs
        .iter()
        .map(|input| {
            let reply = instance.invoke(input, deadline()).unwrap();
            (reply.status, reply.data)
        })
        .collect()
}

/// `got` equals `want`; `noop` answers with the clock, so for it only the
/// statuses and lengths must agree.
fn same(name: &str, got: &[(Status, Vec<u8>)], want: &[(Status, Vec<u8>)], path: &str) {
    if name == "noop" {
        let shape = |v: &[(Status, Vec<u8>)]| v.iter().map(|(s, d)| (*s, d.len())).collect::<Vec<_>>();
        assert_eq!(shape(got), shape(want), "{name} {path}");
    } else {
        assert_eq!(got, want, "{name} {path}");
    }
}

const INPUTS: &[&[u8]] = &[b"", b"a", b"hello, module", &[7u8; 300]];

#[test]
fn every_example_module_answers_as_its_embedded_artifact_cold_and_from_the_runtime_base() {
    let Some(vmm) = vm_common::open_vmm() else { return };
    let base = runtime_base(&vmm);
    let runtime = artifact(microfaas::WASM_RUNTIME);
    // Modules whose requests end their instance (a trap is a panic) or
    // that never load are exercised below; these serve.
    for name in ["noop", "echo", "hash", "checkpointed", "fail", "large"] {
        let mut embedded = loaded(&vmm, &format!("wasm-{name}"));
        let want = outputs(&mut embedded, INPUTS);
        assert!(
            want.iter().any(|(s, _)| *s == Status::Ok || name == "fail"),
            "{name}: {want:?}"
        );

        let mut cold = loaded(&vmm, microfaas::WASM_RUNTIME);
        ok(cold.load_module(&runtime, &module(name), deadline()).unwrap());
        same(name, &outputs(&mut cold, INPUTS), &want, "cold");

        let mut restored = restore(&vmm, &base);
        ok(restored.load_module(&runtime, &module(name), deadline()).unwrap());
        same(name, &outputs(&mut restored, INPUTS), &want, "from the runtime base");
    }
}

#[test]
fn a_trapping_module_fails_as_its_embedded_artifact_does() {
    let Some(vmm) = vm_common::open_vmm() else { return };
    let base = runtime_base(&vmm);
    let mut embedded = loaded(&vmm, "wasm-trap");
    let want = embedded.invoke(b"x", deadline()).unwrap().status;
    assert_eq!(want, Status::Panicked);
    let mut restored = restore(&vmm, &base);
    ok(restored
        .load_module(&artifact(microfaas::WASM_RUNTIME), &module("trap"), deadline())
        .unwrap());
    assert_eq!(restored.invoke(b"x", deadline()).unwrap().status, want);
}

#[test]
fn an_invalid_module_fails_to_load_with_its_reason() {
    let Some(vmm) = vm_common::open_vmm() else { return };
    let mut instance = loaded(&vmm, microfaas::WASM_RUNTIME);
    let reply = instance
        .load_module(&artifact(microfaas::WASM_RUNTIME), &module("invalid"), deadline())
        .unwrap();
    assert_eq!(reply.status, Status::InitFailed);
    let message = String::from_utf8_lossy(&reply.data);
    assert!(message.contains("invalid wasm module"), "{message}");
    // A failed load ends the instance, as a failed init does.
    assert!(matches!(instance.invoke(b"x", deadline()), Err(RunError::Dead)));
    // A runtime that took no module says so.
    let mut bare = loaded(&vmm, microfaas::WASM_RUNTIME);
    let reply = bare.invoke(b"x", deadline()).unwrap();
    assert_eq!(reply.status, Status::FunctionError);
    assert!(String::from_utf8_lossy(&reply.data).contains("no wasm module is loaded"));
}

#[test]
fn a_module_for_an_artifact_that_takes_none_is_refused() {
    let Some(vmm) = vm_common::open_vmm() else { return };
    let mut instance = loaded(&vmm, "noop");
    let reply = instance
        .load_module(&artifact("noop"), &module("noop"), deadline())
        .unwrap();
    assert_eq!(reply.status, Status::InitFailed);
    let message = String::from_utf8_lossy(&reply.data);
    assert!(message.contains("takes no module"), "{message}");
    assert!(matches!(instance.invoke(b"", deadline()), Err(RunError::Dead)));
}

#[test]
fn a_second_module_and_a_module_after_a_request_are_refused() {
    let Some(vmm) = vm_common::open_vmm() else { return };
    let runtime = artifact(microfaas::WASM_RUNTIME);
    let mut instance = loaded(&vmm, microfaas::WASM_RUNTIME);
    ok(instance.load_module(&runtime, &module("echo"), deadline()).unwrap());
    let second = instance.load_module(&runtime, &module("noop"), deadline());
    assert!(matches!(second, Err(RunError::NotFreshlyLoaded)), "{second:?}");
    // The refusal changed nothing: echo still answers.
    assert_eq!(ok(instance.invoke(b"still echo", deadline()).unwrap()), b"still echo");

    let mut served = loaded(&vmm, microfaas::WASM_RUNTIME);
    let _ = served.invoke(b"", deadline()).unwrap();
    let late = served.load_module(&runtime, &module("echo"), deadline());
    assert!(matches!(late, Err(RunError::NotFreshlyLoaded)), "{late:?}");
}

#[test]
fn a_module_too_large_for_the_image_region_is_refused_before_anything_is_written() {
    let Some(vmm) = vm_common::open_vmm() else { return };
    let runtime = artifact(microfaas::WASM_RUNTIME);
    let mut instance = loaded(&vmm, microfaas::WASM_RUNTIME);
    let layout = vmm::layout::Layout::new(config().layout).unwrap();
    let huge = vec![0u8; usize::try_from(layout.image_bytes).unwrap()];
    match instance.load_module(&runtime, &huge, deadline()) {
        Err(RunError::Load(ImageError::ModuleTooLarge { len, room, image_bytes })) => {
            assert_eq!(len, layout.image_bytes);
            assert!(room < len && image_bytes == layout.image_bytes);
        }
        other => panic!("expected ModuleTooLarge, got {other:?}"),
    }
    // Nothing was written or sent: the instance still takes a module.
    ok(instance.load_module(&runtime, &module("echo"), deadline()).unwrap());
    assert_eq!(ok(instance.invoke(b"after", deadline()).unwrap()), b"after");
}
