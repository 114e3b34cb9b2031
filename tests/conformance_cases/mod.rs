// The conformance cases, written once over the `Backend` trait (shared by
// `conformance.rs`, which runs them on every backend, and
// `vm_conformance_paths.rs`, which runs them on the `vm` backend from every
// start path).
#![allow(dead_code)]

#[path = "../test_store/mod.rs"]
mod test_store;
pub mod wasm;

use microfaas::{Backend, BackendKind, Config, ErrorKind, FunctionId, FunctionSpec, StartPath, StartRequest};
use sha2::{Digest, Sha512};
use std::time::{Duration, Instant};

/// Budget given to `spin` (and everything else) in these tests.
const BUDGET: Duration = Duration::from_millis(300);

pub fn config() -> Config {
    // The vm backend's snapshots go to a store private to this test process.
    let store = test_store::process_store("microfaas-conformance");
    Config {
        default_budget: Duration::from_secs(5),
        heap_limit_bytes: 32 << 20,
        vm: microfaas::VmConfig {
            store_dir: Some(store),
            ..microfaas::VmConfig::default()
        },
        ..Config::default()
    }
}

/// Opens `kind`, or returns `None` (printing why) when it needs KVM that
/// this machine cannot give and KVM is not required.
pub fn open(kind: BackendKind) -> Option<Box<dyn Backend>> {
    match microfaas::open(kind, config()) {
        Ok(b) => Some(b),
        Err(e)
            if e.kind() == ErrorKind::KvmUnavailable
                && std::env::var("MICROFAAS_REQUIRE_KVM").as_deref() != Ok("1") =>
        {
            eprintln!("SKIPPED: {kind} backend: {e} (set MICROFAAS_REQUIRE_KVM=1 to make this a failure)");
            None
        }
        Err(e) => panic!("opening the {kind} backend failed: {e}"),
    }
}

fn deploy(b: &dyn Backend, name: &str) -> FunctionId {
    let spec = FunctionSpec::new(name, microfaas::builtin(name).expect("example function"));
    b.deploy(&spec)
        .unwrap_or_else(|e| panic!("deploying {name} on {}: {e}", b.kind()))
}

fn deploy_with_budget(b: &dyn Backend, name: &str, budget: Duration) -> FunctionId {
    let spec = FunctionSpec::new(name, microfaas::builtin(name).expect("example function")).with_budget(budget);
    b.deploy(&spec)
        .unwrap_or_else(|e| panic!("deploying {name} on {}: {e}", b.kind()))
}

fn sha512_rounds(rounds: u64) -> Vec<u8> {
    let mut block = [0u8; 64];
    for _ in 0..rounds {
        let d = Sha512::digest(block);
        block.copy_from_slice(&d);
    }
    block.to_vec()
}

fn checkpointed_reference(input: &[u8]) -> Vec<u8> {
    let mut block = [0u8; 64];
    block.copy_from_slice(&Sha512::digest(input));
    for _ in 0..200_000 {
        let d = Sha512::digest(block);
        block.copy_from_slice(&d);
    }
    let mut out = block[..16].to_vec();
    out.extend_from_slice(&(input.len() as u64).to_le_bytes());
    out
}

fn init_heavy_reference(input: &[u8]) -> Vec<u8> {
    const ENTRIES: usize = 1 << 20;
    let mut table = Vec::with_capacity(ENTRIES);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..ENTRIES {
        for _ in 0..8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        table.push(x);
    }
    let mut acc = 0u64;
    let mut index = 0usize;
    for &b in input {
        index = (index.wrapping_mul(31).wrapping_add(usize::from(b))) % ENTRIES;
        acc ^= table[index];
    }
    acc ^= table[input.len() % ENTRIES];
    acc.to_le_bytes().to_vec()
}

/// The next request after a failure must be served correctly.
fn assert_serves(b: &dyn Backend) {
    let echo = deploy(b, "echo");
    let out = b
        .invoke(&echo, b"still serving", StartRequest::Auto)
        .unwrap_or_else(|e| panic!("{}: echo after a failure: {e}", b.kind()));
    assert_eq!(out.output, b"still serving");
}

fn expect_error(b: &dyn Backend, id: &FunctionId, input: &[u8], kind: ErrorKind) -> microfaas::Error {
    match b.invoke(id, input, StartRequest::Auto) {
        Ok(inv) => panic!(
            "{}: `{id}` should fail with {kind:?}, returned {} bytes",
            b.kind(),
            inv.output.len()
        ),
        Err(e) => {
            assert_eq!(e.kind(), kind, "{}: `{id}` gave `{e}`", b.kind());
            e
        }
    }
}

pub fn same_output(b: &dyn Backend) {
    let echo = deploy(b, "echo");
    let big: Vec<u8> = (0..(1usize << 20))
        .map(|i| u8::try_from(i * 7 % 251).unwrap())
        .collect();
    let inputs: [&[u8]; 4] = [b"", b"hello", &[0xff, 0xfe, 0x00, 0x80], &big];
    for input in inputs {
        for start in [StartRequest::Auto, StartRequest::Force(StartPath::Cold)] {
            let out = b
                .invoke(&echo, input, start)
                .unwrap_or_else(|e| panic!("{}: echo {start:?}: {e}", b.kind()));
            assert_eq!(out.output, input, "{}: echo {start:?}", b.kind());
            assert!(out.timings.total_ns >= out.timings.exec_ns);
            assert!(out.timings.total_ns >= out.timings.dispatch_ns);
        }
    }
    let cold = b.invoke(&echo, b"x", StartRequest::Force(StartPath::Cold)).unwrap();
    assert_eq!(cold.start, StartPath::Cold);
    let warm = b.invoke(&echo, b"x", StartRequest::Auto).unwrap();
    assert_ne!(
        warm.start,
        StartPath::Cold,
        "{}: a deployed, used function should start warm/hot",
        b.kind()
    );

    let sha = deploy(b, "sha512");
    let out = b.invoke(&sha, b"1000", StartRequest::Auto).unwrap();
    assert_eq!(out.output, sha512_rounds(1000));
    let err = expect_error(b, &sha, b"not a number", ErrorKind::FunctionFailed);
    assert!(err.to_string().contains("decimal round count"), "{err}");

    let noop = deploy(b, "noop");
    let before = now_ns();
    let out = b.invoke(&noop, b"", StartRequest::Auto).unwrap();
    let after = now_ns();
    let stamp = u64::from_le_bytes(out.output.as_slice().try_into().expect("8-byte timestamp"));
    assert!(
        before <= stamp && stamp <= after,
        "{}: noop's timestamp {stamp} not within [{before}, {after}]",
        b.kind()
    );

    let heavy = deploy(b, "init-heavy");
    for input in [&b"abc"[..], b"", b"init-heavy"] {
        assert_eq!(
            b.invoke(&heavy, input, StartRequest::Auto).unwrap().output,
            init_heavy_reference(input)
        );
    }
    let cp = deploy(b, "checkpointed");
    assert_eq!(
        b.invoke(&cp, b"seed", StartRequest::Auto).unwrap().output,
        checkpointed_reference(b"seed")
    );
    wasm::same_output(b);
}

/// CLOCK_MONOTONIC in ns, the clock the runtimes give functions.
fn now_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock_gettime");
    u64::try_from(ts.tv_sec()).unwrap() * 1_000_000_000 + u64::try_from(ts.tv_nsec()).unwrap()
}

pub fn bad_cases(b: &dyn Backend) {
    let missing = FunctionId::new("no-such-function");
    let e = expect_error(b, &missing, b"", ErrorKind::UnknownFunction);
    assert!(e.to_string().contains("no-such-function"));
    assert_serves(b);

    let echo = deploy(b, "echo");
    let too_big = vec![7u8; microfaas::DEFAULT_IO_LIMIT_BYTES + 1];
    expect_error(b, &echo, &too_big, ErrorKind::InputTooLarge);
    let at_limit = vec![7u8; microfaas::DEFAULT_IO_LIMIT_BYTES];
    assert_eq!(
        b.invoke(&echo, &at_limit, StartRequest::Auto).unwrap().output.len(),
        at_limit.len()
    );

    let spin = deploy_with_budget(b, "spin", BUDGET);
    let started = Instant::now();
    let e = expect_error(b, &spin, b"", ErrorKind::BudgetExceeded);
    assert!(
        started.elapsed() < BUDGET + Duration::from_secs(2),
        "{}: spin stopped only after {:?}",
        b.kind(),
        started.elapsed()
    );
    assert!(e.to_string().contains("budget"), "{e}");
    assert_serves(b);

    let panics = deploy(b, "panics");
    for _ in 0..2 {
        let e = expect_error(b, &panics, b"abc", ErrorKind::Panicked);
        assert!(e.to_string().contains("deliberate panic on an input of 3 bytes"), "{e}");
    }
    assert_serves(b);

    let hog = deploy(b, "alloc-hog");
    expect_error(b, &hog, b"", ErrorKind::OutOfMemory);
    assert_serves(b);

    let deep = deploy(b, "stack-overflow");
    expect_error(b, &deep, b"x", ErrorKind::StackOverflow);
    assert_serves(b);
    // init() returning an error: the deploy (or, where init runs at the
    // first start, that invocation) fails as InitFailed with init's message.
    let spec = FunctionSpec::new(
        "init-fails",
        microfaas::builtin("init-fails").expect("example function"),
    );
    let e = match b.deploy(&spec) {
        Err(e) => e,
        Ok(id) => b
            .invoke(&id, b"", StartRequest::Auto)
            .expect_err("init-fails answered although its init failed"),
    };
    assert_eq!(e.kind(), ErrorKind::InitFailed, "{}: {e}", b.kind());
    assert!(
        e.to_string().contains("init-fails: configuration [1, 2, 3] not found"),
        "{}: {e}",
        b.kind()
    );
    assert_serves(b);

    // The failing functions keep failing the same way; nothing was left broken.
    expect_error(b, &panics, b"abc", ErrorKind::Panicked);
    assert_serves(b);
    wasm::bad_cases(b);
    assert_serves(b);
}

pub fn concurrent_callers(b: &dyn Backend) {
    let echo = deploy(b, "echo");
    let sha = deploy(b, "sha512");
    let expected_sha = sha512_rounds(100);
    std::thread::scope(|s| {
        for t in 0..8u32 {
            let (echo, sha, expected_sha) = (&echo, &sha, &expected_sha);
            s.spawn(move || {
                for i in 0..40u32 {
                    let input = format!("thread {t} request {i}");
                    let out = b.invoke(echo, input.as_bytes(), StartRequest::Auto).unwrap();
                    assert_eq!(out.output, input.as_bytes());
                    if i % 8 == 0 {
                        assert_eq!(&b.invoke(sha, b"100", StartRequest::Auto).unwrap().output, expected_sha);
                    }
                }
            });
        }
    });
}

pub fn evict_and_stats(b: &dyn Backend) {
    let echo = deploy(b, "echo");
    b.invoke(&echo, b"warm me", StartRequest::Auto).unwrap();
    assert!(b.stats().functions >= 1);
    b.evict(&echo).unwrap();
    let out = b.invoke(&echo, b"after evict", StartRequest::Auto).unwrap();
    assert_eq!(out.output, b"after evict");
    let missing = FunctionId::new("no-such-function");
    assert_eq!(b.evict(&missing).unwrap_err().kind(), ErrorKind::UnknownFunction);
}
