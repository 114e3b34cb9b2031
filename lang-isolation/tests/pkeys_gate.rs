//! The protection-key gate's control flow on real artifacts: every way a
//! call can end (return, error, panic, out of memory, stack overflow, a
//! fault, a preempting signal) through the gate, and the instance serving
//! correctly afterwards. On a host with PKU the calls write PKRU and the
//! instance's memory carries a key; without PKU (this project's machine)
//! the gate's copy without PKRU writes runs the same path. Also: the
//! runtime's loader refuses an artifact whose code was patched to hold
//! WRPKRU or XRSTOR (one the builder's verifier never saw).
//!
//! No libtest harness (`harness = false`): the keyed calls run on the main
//! thread, the process's only one when it claims the keys (see
//! `pkeys::claim_for_this_thread`).

use lang_isolation::runtime::pkeys;
use lang_isolation::runtime::{
    ArtifactImage, ElfError, Failure, Instance, InstanceConfig, LoadError, LoadedFunction, Protection, SealedArtifact,
    plan, preempt_from_signal,
};
use std::path::{Path, PathBuf};

fn build(dir: &Path, name: &str) -> Vec<u8> {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pkeys-gate");
    let mut opts = microfaas_builder::BuildOptions::new(root.join("cache"));
    opts.out = Some(root.join(format!("{name}.so")));
    let built = microfaas_builder::build(dir, &opts).unwrap_or_else(|e| panic!("building {name}: {e}"));
    std::fs::read(built.path).unwrap()
}

fn fixture(name: &str) -> Vec<u8> {
    build(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name),
        name,
    )
}

fn function(name: &str) -> Vec<u8> {
    build(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions").join(name),
        name,
    )
}

fn image(bytes: &[u8]) -> ArtifactImage {
    ArtifactImage::parse(SealedArtifact::create("test", bytes).unwrap()).unwrap()
}

/// An instance through the gate: keyed where the CPU has PKU, else the
/// gate's copy without PKRU writes.
fn gated(bytes: &[u8], keys: &[u32], config: &InstanceConfig) -> Instance {
    let f = LoadedFunction::load(&image(bytes)).unwrap();
    match keys.first() {
        Some(&key) => Instance::new_keyed(f, config, key).unwrap(),
        None => Instance::new_gated_without_keys(f, config).unwrap(),
    }
}

extern "C" fn on_preempt(_: libc::c_int, _: *mut libc::siginfo_t, ctx: *mut std::ffi::c_void) {
    // Before any call through the GOT (which carries the shared key).
    pkeys::open_all_keys();
    // SAFETY: a SA_SIGINFO handler on the thread running the function.
    unsafe { preempt_from_signal(ctx) };
}

fn every_way_a_call_ends_goes_through_the_gate_and_the_instance_serves_on() {
    let keys = if pkeys::cpu_has_ospke() {
        let keys = pkeys::allocate_keys(2).unwrap();
        // Before any image is loaded: they then import the key-safe mem*.
        pkeys::claim_for_this_thread().unwrap();
        keys
    } else {
        eprintln!("no PKU here: the gate without PKRU writes");
        pkeys::use_key_safe_imports();
        Vec::new()
    };
    let config = InstanceConfig {
        heap_limit_bytes: 4 << 20,
        ..InstanceConfig::default()
    };
    // Return, with the input copied into the function's heap.
    let echo = function("echo");
    let mut e = gated(&echo, &keys, &config);
    assert_eq!(e.key(), keys.first().copied());
    let big: Vec<u8> = (0..100_000u32).map(|i| u8::try_from(i % 251).unwrap()).collect();
    for input in [&b""[..], b"hello", &big] {
        let out = e.handle(input).unwrap();
        assert_eq!(out.bytes(), input);
    }
    // An input the heap cannot hold: out of memory, not a crash.
    assert!(matches!(
        e.handle(&vec![1u8; 5 << 20]),
        Err(Failure::OutOfMemory { .. })
    ));
    assert_eq!(e.handle(b"again").unwrap().bytes(), b"again");
    // The clock service (the SDK's entry timestamps) inside the gate.
    let noop = function("noop");
    let mut n = gated(&noop, &keys, &config);
    let out = n.handle(b"").unwrap();
    assert!(out.entered_ns > 0 && out.returned_ns >= out.entered_ns);
    drop(out);
    // fail(): panic, out of memory, init's error; then the next instance.
    let mut p = gated(&function("panics"), &keys, &config);
    assert!(
        matches!(p.handle(b""), Err(Failure::Panicked { .. })),
        "panic through the bail path"
    );
    assert!(matches!(p.handle(b""), Err(Failure::Panicked { .. })), "and again");
    let mut a = gated(&function("alloc-hog"), &keys, &config);
    assert!(matches!(a.handle(b""), Err(Failure::OutOfMemory { .. })));
    let mut i = gated(&function("init-fails"), &keys, &config);
    match i.init() {
        Err(Failure::FunctionError { message }) => assert!(!message.is_empty()),
        other => panic!("init-fails: {other:?}"),
    }
    // A fault on the function stack: its guard (stack overflow).
    let mut s = gated(&function("stack-overflow"), &keys, &config);
    assert!(matches!(s.handle(b""), Err(Failure::StackOverflow { .. })));
    // A preempting signal while it spins: the handler redirects to the
    // gate's bail path. (Built before the signals start: they would
    // interrupt whatever this thread waits in.)
    let spin_bytes = function("spin");
    // SAFETY: installing a SA_SIGINFO handler with an empty mask.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_preempt as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut()), 0);
    }
    // SAFETY: gettid/getpid have no preconditions.
    let (pid, tid) = unsafe { (libc::getpid(), libc::gettid()) };
    // Loaded before the kicker starts, which then signals until the call
    // ended (a slow host, e.g. under emulation, must not let every signal
    // land before the spin begins).
    let mut spin = gated(&spin_bytes, &keys, &config);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let kicker = std::thread::spawn({
        let done = done.clone();
        move || {
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::sleep(std::time::Duration::from_millis(50));
                // SAFETY: signalling our own test thread.
                unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGUSR2) };
            }
        }
    });
    let spun = spin.handle(b"");
    done.store(true, std::sync::atomic::Ordering::Release);
    kicker.join().unwrap();
    assert!(matches!(spun, Err(Failure::Preempted)), "{spun:?}");
    // Everyone still serves.
    assert_eq!(e.handle(b"after all that").unwrap().bytes(), b"after all that");
    assert!(n.handle(b"").is_ok());
}

/// A gated instance of `bytes` that takes `module`.
fn gated_with_module(bytes: &[u8], module: &[u8], keys: &[u32], config: &InstanceConfig) -> Instance {
    let image = image(bytes)
        .with_module(SealedArtifact::create("module", module).unwrap())
        .unwrap();
    let f = LoadedFunction::load(&image).unwrap();
    match keys.first() {
        Some(&key) => Instance::new_keyed(f, config, key).unwrap(),
        None => Instance::new_gated_without_keys(f, config).unwrap(),
    }
}

/// `init` then `load(module)` through the gate: the module is copied into
/// the function's own heap and reaches `load` intact (here 1 MiB, and
/// empty); a module `load` refuses, or one given to a function that
/// declares no `load`, poisons the instance with a function error; one
/// larger than the heap is out of memory before any function code runs.
fn a_module_goes_through_the_gate_into_load() {
    // As in the first test (and whichever runs first).
    let keys = if pkeys::cpu_has_ospke() {
        let keys = pkeys::allocate_keys(1).unwrap();
        pkeys::claim_for_this_thread().unwrap();
        keys
    } else {
        pkeys::use_key_safe_imports();
        Vec::new()
    };
    let config = InstanceConfig {
        heap_limit_bytes: 8 << 20,
        ..InstanceConfig::default()
    };
    let bytes = fixture("module-echo");
    let module: Vec<u8> = (0..(1u32 << 20)).map(|i| u8::try_from(i * 13 % 251).unwrap()).collect();
    for module in [&module[..], b""] {
        let mut m = gated_with_module(&bytes, module, &keys, &config);
        m.init().unwrap();
        let mut want = module.to_vec();
        want.extend_from_slice(b"input");
        assert_eq!(m.handle(b"input").unwrap().bytes(), want);
        assert_eq!(m.handle(b"").unwrap().bytes(), module, "the module stays after load");
    }
    let mut bad = gated_with_module(&bytes, b"bad module", &keys, &config);
    match bad.init() {
        Err(Failure::FunctionError { message }) => assert!(message.contains("refuses"), "{message}"),
        other => panic!("a refused module: {other:?}"),
    }
    assert!(bad.poisoned());
    assert!(matches!(bad.handle(b""), Err(Failure::Poisoned)));
    let mut no_load = gated_with_module(&function("echo"), b"anything", &keys, &config);
    match no_load.init() {
        Err(Failure::FunctionError { message }) => assert!(message.contains("takes no module"), "{message}"),
        other => panic!("a module for echo: {other:?}"),
    }
    let huge = vec![7u8; 9 << 20];
    let mut too_big = gated_with_module(&bytes, &huge, &keys, &config);
    assert!(
        matches!(too_big.init(), Err(Failure::OutOfMemory { .. })),
        "a module beyond the heap"
    );
}

fn the_loader_refuses_code_patched_to_hold_pkru_writes() {
    let bytes = function("noop");
    let p = plan(&bytes).unwrap();
    let text = p
        .segments
        .iter()
        .find(|s| s.protection == Protection::ReadExec)
        .unwrap();
    let at = usize::try_from(text.file_offset).unwrap() + text.file_bytes / 2;
    for (patch, name) in [
        (&[0x0f, 0x01, 0xef][..], "WRPKRU"),
        (&[0x0f, 0xae, 0x2f], "XRSTOR"),
        (&[0x0f, 0xc7, 0x1f], "XRSTORS"),
    ] {
        let mut bad = bytes.clone();
        bad[at..at + 3].copy_from_slice(patch);
        match ArtifactImage::parse(SealedArtifact::create("patched", &bad).unwrap()) {
            Err(LoadError::Elf(e @ ElfError::ForbiddenInstruction { offset, .. })) => {
                assert_eq!(offset, u64::try_from(at).unwrap());
                assert!(e.to_string().contains(name), "{e}");
            }
            other => panic!("{name} patched in: {other:?}"),
        }
    }
    // The example functions and the SDK hold none (no false positive).
    for name in [
        "noop",
        "echo",
        "sha512",
        "init-heavy",
        "checkpointed",
        "spin",
        "panics",
        "alloc-hog",
        "stack-overflow",
        "init-fails",
    ] {
        assert!(plan(&function(name)).is_ok(), "{name}");
    }
}

fn main() {
    let tests: [(&str, fn()); 3] = [
        (
            "every_way_a_call_ends_goes_through_the_gate_and_the_instance_serves_on",
            every_way_a_call_ends_goes_through_the_gate_and_the_instance_serves_on,
        ),
        (
            "a_module_goes_through_the_gate_into_load",
            a_module_goes_through_the_gate_into_load,
        ),
        (
            "the_loader_refuses_code_patched_to_hold_pkru_writes",
            the_loader_refuses_code_patched_to_hold_pkru_writes,
        ),
    ];
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let mut ran = 0;
    for (name, test) in tests {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        eprint!("test {name} ... ");
        test();
        eprintln!("ok");
        ran += 1;
    }
    eprintln!("test result: ok. {ran} passed");
}
