//! The interpreted (WebAssembly, wasmi) example functions on every backend
//! and every start path it has: the same output as a reference computed
//! here, for fixed and generated inputs, and the same typed errors as the
//! native functions for traps, an endless loop, `fail`, linear memory
//! beyond the heap limit and a module that is not valid WebAssembly.
//!
//! Each example runs in two forms: its `wasm-NAME` artifact (the module
//! embedded, compiled by `init`) and `wasm-runtime` deployed with the
//! module as deploy-time data (compiled by `load`; on `vm` its function
//! node hangs off the runtime base, the runtime loaded and initialised
//! once; on `language` its pre-linked image and post-init snapshot are of
//! the runtime with that module loaded). Both give the same outputs and
//! errors, on every backend.
//!
//! KVM is required as in the conformance suite (`MICROFAAS_REQUIRE_KVM=1`
//! makes an unusable `/dev/kvm` a failure rather than a skip).

mod conformance_cases;

use conformance_cases::open;
use conformance_cases::wasm::{checkpointed_reference, hash_reference, large_reference};
use microfaas::{Backend, BackendKind, ErrorKind, FunctionId, FunctionSpec, StartPath, StartRequest};
use proptest::prelude::*;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The start paths each backend serves the interpreted examples from.
fn start_paths(kind: BackendKind) -> &'static [StartPath] {
    match kind {
        BackendKind::Process | BackendKind::Language => &[StartPath::Cold, StartPath::Warm],
        BackendKind::Vm => &[StartPath::Cold, StartPath::Base, StartPath::Function, StartPath::Hot],
    }
}

/// How an interpreted example is deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// Its `wasm-NAME` artifact, the module embedded.
    Embedded,
    /// `wasm-runtime` with the module as deploy-time data.
    Module,
}

/// The spec of example `name` (`wasm-NAME`) in `form`.
fn spec(name: &str, form: Form) -> FunctionSpec {
    match form {
        Form::Embedded => FunctionSpec::new(name, microfaas::builtin(name).expect("example function")),
        Form::Module => {
            let module = name.strip_prefix("wasm-").expect("a wasm- example");
            FunctionSpec::new(
                format!("{name}-module"),
                microfaas::builtin(microfaas::WASM_RUNTIME).expect("the wasm runtime"),
            )
            .with_module(microfaas::builtin_module(module).expect("example module"))
        }
    }
}

fn deploy_as(b: &dyn Backend, name: &str, form: Form) -> FunctionId {
    b.deploy(&spec(name, form))
        .unwrap_or_else(|e| panic!("deploying {name} ({form:?}) on {}: {e}", b.kind()))
}

fn deploy(b: &dyn Backend, name: &str) -> FunctionId {
    deploy_as(b, name, Form::Embedded)
}

/// Invokes `id` with `input` from `path` and returns the output, checking
/// that `path` served it.
fn run(b: &dyn Backend, id: &FunctionId, input: &[u8], path: StartPath) -> Vec<u8> {
    let inv = b
        .invoke(id, input, StartRequest::Force(path))
        .unwrap_or_else(|e| panic!("{}: {id} from {path}: {e}", b.kind()));
    assert_eq!(inv.start, path, "{}: {id} forced {path}", b.kind());
    inv.output
}

/// Every example with a reference, on every start path of `b`.
fn same_output(b: &dyn Backend, form: Form) {
    let deploy = |b: &dyn Backend, name: &str| deploy_as(b, name, form);
    let echo = deploy(b, "wasm-echo");
    let hash = deploy(b, "wasm-hash");
    let large = deploy(b, "wasm-large");
    let big: Vec<u8> = (0..(1usize << 20))
        .map(|i| u8::try_from(i * 7 % 251).unwrap())
        .collect();
    for &path in start_paths(b.kind()) {
        for input in [&b""[..], b"hello", &[0xff, 0x00, 0x80], &big] {
            assert_eq!(run(b, &echo, input, path), input, "{}: wasm-echo {path}", b.kind());
        }
        for input in [&b""[..], b"abc", b"interpreted"] {
            assert_eq!(
                run(b, &hash, input, path),
                hash_reference(input),
                "{}: wasm-hash",
                b.kind()
            );
            assert_eq!(
                run(b, &large, input, path),
                large_reference(input),
                "{}: wasm-large",
                b.kind()
            );
        }
    }
    let auto = b.invoke(&echo, b"auto", StartRequest::Auto).unwrap();
    assert_eq!(auto.output, b"auto");

    let noop = deploy(b, "wasm-noop");
    for &path in start_paths(b.kind()) {
        let before = now_ns();
        let out = run(b, &noop, b"", path);
        let after = now_ns();
        let stamp = u64::from_le_bytes(out.as_slice().try_into().expect("8-byte timestamp"));
        assert!(
            before <= stamp && stamp <= after,
            "{}: wasm-noop {path}: {stamp} not within [{before}, {after}]",
            b.kind()
        );
    }

    // Argument snapshots are taken where `checkpoint()` is called (vm):
    // the first run records one, the second resumes from it.
    let cp = deploy(b, "wasm-checkpointed");
    for input in [&b"seed"[..], b"other seed"] {
        let expected = checkpointed_reference(input);
        assert_eq!(b.invoke(&cp, input, StartRequest::Auto).unwrap().output, expected);
        let again = b.invoke(&cp, input, StartRequest::Auto).unwrap();
        assert_eq!(
            again.output,
            expected,
            "{}: wasm-checkpointed from {}",
            b.kind(),
            again.start
        );
        if b.kind() == BackendKind::Vm {
            let resumed = run(b, &cp, input, StartPath::Argument);
            assert_eq!(
                resumed, expected,
                "vm: wasm-checkpointed resumed from its argument snapshot"
            );
        }
    }
}

/// CLOCK_MONOTONIC in ns, the clock the runtimes give functions.
fn now_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock_gettime");
    u64::try_from(ts.tv_sec()).unwrap() * 1_000_000_000 + u64::try_from(ts.tv_nsec()).unwrap()
}

fn expect_error(b: &dyn Backend, id: &FunctionId, kind: ErrorKind) -> microfaas::Error {
    match b.invoke(id, b"abc", StartRequest::Auto) {
        Ok(inv) => panic!(
            "{}: `{id}` should fail with {kind:?}, returned {:?}",
            b.kind(),
            inv.output
        ),
        Err(e) => {
            assert_eq!(e.kind(), kind, "{}: `{id}` gave `{e}`", b.kind());
            e
        }
    }
}

fn assert_serves(b: &dyn Backend) {
    let echo = deploy(b, "wasm-echo");
    let out = b.invoke(&echo, b"still serving", StartRequest::Auto).unwrap();
    assert_eq!(out.output, b"still serving", "{}: after a failure", b.kind());
}

/// Faults inside the interpreter give the native functions' typed errors,
/// twice in a row (nothing is left broken), and the backend keeps serving.
fn bad_cases(b: &dyn Backend, form: Form) {
    let deploy = |b: &dyn Backend, name: &str| deploy_as(b, name, form);
    let trap = deploy(b, "wasm-trap");
    for _ in 0..2 {
        let e = expect_error(b, &trap, ErrorKind::Panicked);
        assert!(e.to_string().contains("wasm trap"), "{e}");
    }
    assert_serves(b);

    let spin = b
        .deploy(&spec("wasm-spin", form).with_budget(Duration::from_millis(300)))
        .unwrap();
    for _ in 0..2 {
        expect_error(b, &spin, ErrorKind::BudgetExceeded);
    }
    assert_serves(b);

    let fail = deploy(b, "wasm-fail");
    for _ in 0..2 {
        let e = expect_error(b, &fail, ErrorKind::FunctionFailed);
        assert!(e.to_string().contains("wasm-fail: request refused"), "{e}");
    }
    assert_serves(b);

    let hog = deploy(b, "wasm-memory-hog");
    for _ in 0..2 {
        expect_error(b, &hog, ErrorKind::OutOfMemory);
    }
    assert_serves(b);

    let e = match b.deploy(&spec("wasm-invalid", form)) {
        Err(e) => e,
        Ok(id) => b
            .invoke(&id, b"", StartRequest::Auto)
            .expect_err("wasm-invalid answered although its module is invalid"),
    };
    assert_eq!(e.kind(), ErrorKind::InitFailed, "{}: {e}", b.kind());
    assert!(e.to_string().contains("invalid wasm module"), "{}: {e}", b.kind());
    assert_serves(b);
    // A trap after all that still is a trap.
    expect_error(b, &trap, ErrorKind::Panicked);
}

macro_rules! backends {
    ($($module:ident => $kind:expr;)*) => {$(
        mod $module {
            use super::*;
            #[test]
            fn same_output() {
                if let Some(b) = open($kind) { super::same_output(b.as_ref(), Form::Embedded) }
            }
            #[test]
            fn bad_cases() {
                if let Some(b) = open($kind) { super::bad_cases(b.as_ref(), Form::Embedded) }
            }
            #[test]
            fn same_output_module_form() {
                if let Some(b) = open($kind) { super::same_output(b.as_ref(), Form::Module) }
            }
            #[test]
            fn bad_cases_module_form() {
                if let Some(b) = open($kind) { super::bad_cases(b.as_ref(), Form::Module) }
            }
            #[test]
            fn a_module_for_a_function_without_load() {
                if let Some(b) = open($kind) { super::module_without_load(b.as_ref()) }
            }
        }
    )*};
}

backends! {
    process => BackendKind::Process;
    language => BackendKind::Language;
    vm => BackendKind::Vm;
}

/// A module given to a function that declares no `load` (native `noop`,
/// and the embedded `wasm-echo`, which has its module built in) is refused
/// with `InitFailed` saying so, at deploy or at its first invocation,
/// twice in a row; the backend keeps serving.
fn module_without_load(b: &dyn Backend) {
    let module = microfaas::builtin_module("echo").expect("example module");
    for (i, name) in ["noop", "wasm-echo", "noop"].into_iter().enumerate() {
        let spec = FunctionSpec::new(
            format!("{name}-given-a-module-{i}"),
            microfaas::builtin(name).expect("example function"),
        )
        .with_module(Arc::clone(&module));
        let e = match b.deploy(&spec) {
            Err(e) => e,
            Ok(id) => b
                .invoke(&id, b"", StartRequest::Force(StartPath::Cold))
                .expect_err("a function without load took a module"),
        };
        assert_eq!(e.kind(), ErrorKind::InitFailed, "{}: {name}: {e}", b.kind());
        assert!(e.to_string().contains("takes no module"), "{}: {name}: {e}", b.kind());
        assert_serves(b);
    }
}

mod vm_module {
    use super::*;

    /// Functions deployed with modules on one runtime share its runtime
    /// base: their function nodes are children of one base node labelled
    /// with the runtime (a guest booted with it loaded and initialised),
    /// not of the kernel's base.
    #[test]
    fn function_nodes_hang_off_one_runtime_base() {
        let Some(b) = open(BackendKind::Vm) else { return };
        deploy(b.as_ref(), "noop");
        deploy_as(b.as_ref(), "wasm-echo", Form::Module);
        deploy_as(b.as_ref(), "wasm-hash", Form::Module);
        let store_dir = conformance_cases::config().vm.store_dir.expect("a test store");
        let store = snapshots::Store::open(store_dir).expect("the test store");
        let function = |name: &str| {
            let nodes = store.nodes();
            let node = nodes
                .iter()
                .find(|n| n.level() == snapshots::Level::Function && n.label().function.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("no function node of {name}"))
                .clone();
            let parent = store.node(node.parent().expect("a parent")).expect("its parent");
            (node, parent)
        };
        let (_, native_base) = function("noop");
        let (echo, echo_base) = function("wasm-echo-module");
        let (hash, hash_base) = function("wasm-hash-module");
        assert_eq!(echo_base.id(), hash_base.id(), "one runtime base for both");
        assert_ne!(echo.id(), hash.id());
        assert_ne!(echo_base.id(), native_base.id(), "the runtime base is not the kernel's");
        assert_eq!(echo_base.level(), snapshots::Level::Base);
        assert_eq!(echo_base.parent(), None);
        assert_eq!(
            echo_base.label().function.as_deref(),
            Some("runtime wasm-runtime"),
            "{:?}",
            echo_base.label()
        );
        assert_eq!(native_base.label().function, None);
    }
}

/// A backend and its `wasm-echo`, `wasm-hash` and `wasm-large`, in both
/// forms (embedded first).
type Deployed = (Arc<dyn Backend>, [FunctionId; 6]);

/// Every backend that can be opened here, each with the generated-input
/// examples deployed, shared by the proptest's cases.
fn all_backends() -> &'static [Deployed] {
    static ALL: OnceLock<Vec<Deployed>> = OnceLock::new();
    ALL.get_or_init(|| {
        BackendKind::ALL
            .into_iter()
            .filter_map(open)
            .map(|b| {
                let b: Arc<dyn Backend> = Arc::from(b);
                let names = ["wasm-echo", "wasm-hash", "wasm-large"];
                let [e, h, l] = names.map(|n| deploy_as(b.as_ref(), n, Form::Embedded));
                let [me, mh, ml] = names.map(|n| deploy_as(b.as_ref(), n, Form::Module));
                (b, [e, h, l, me, mh, ml])
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Generated inputs: every backend, every start path, both forms, the
    /// reference's output (so all of them give the same output).
    #[test]
    fn identical_output_on_every_backend_and_path(input in proptest::collection::vec(any::<u8>(), 0..300)) {
        for (b, ids) in all_backends() {
            for [echo, hash, large] in [[&ids[0], &ids[1], &ids[2]], [&ids[3], &ids[4], &ids[5]]] {
                for &path in start_paths(b.kind()) {
                    prop_assert_eq!(run(b.as_ref(), echo, &input, path), input.clone());
                    prop_assert_eq!(run(b.as_ref(), hash, &input, path), hash_reference(&input));
                    prop_assert_eq!(run(b.as_ref(), large, &input, path), large_reference(&input));
                }
            }
        }
    }
}
