//! References for the interpreted (`wasm-*`) examples, and the cases the
//! conformance suite runs on them (every backend; every vm start path in
//! `vm_conformance_paths.rs`). `wasm_functions.rs` has the fuller set.

use microfaas::{Backend, ErrorKind, FunctionSpec, StartRequest};

/// Mirrors `functions/wasm/generate.rs`.
pub const LARGE_FUNCS: u32 = 48;
pub const LARGE_GROUPS: u32 = 5000;

/// 64-bit FNV-1a over `input`, `passes` times, the state carried over.
pub fn fnv1a(input: &[u8], passes: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for _ in 0..passes {
        for &b in input {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// `wasm-hash`'s output.
pub fn hash_reference(input: &[u8]) -> Vec<u8> {
    fnv1a(input, 1000).to_le_bytes().to_vec()
}

/// `wasm-checkpointed`'s output.
pub fn checkpointed_reference(input: &[u8]) -> Vec<u8> {
    let mut x = fnv1a(input, 1);
    for _ in 0..3_000_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    let mut out = x.to_le_bytes().to_vec();
    out.extend_from_slice(&(input.len() as u64).to_le_bytes());
    out
}

/// `wasm-large`'s output.
pub fn large_reference(input: &[u8]) -> Vec<u8> {
    let n = u32::try_from(input.len()).unwrap();
    let k = n % LARGE_FUNCS;
    let mut x = n;
    for j in 0..LARGE_GROUPS {
        let c = u32::try_from((u64::from(k * LARGE_GROUPS + j) * 2_654_435_761) % (1 << 31)).unwrap();
        x = (x ^ c).wrapping_mul(16_777_619);
    }
    x.to_le_bytes().to_vec()
}

/// Interpreted examples give the reference outputs.
pub fn same_output(b: &dyn Backend) {
    let deploy = |name: &str| {
        b.deploy(&FunctionSpec::new(
            name,
            microfaas::builtin(name).expect("example function"),
        ))
        .unwrap_or_else(|e| panic!("deploying {name} on {}: {e}", b.kind()))
    };
    let (echo, hash, large) = (deploy("wasm-echo"), deploy("wasm-hash"), deploy("wasm-large"));
    for input in [&b""[..], b"hello", &[0xff, 0xfe, 0x00, 0x80]] {
        let run = |id| {
            b.invoke(id, input, StartRequest::Auto)
                .unwrap_or_else(|e| panic!("{}: {id}: {e}", b.kind()))
                .output
        };
        assert_eq!(run(&echo), input, "{}: wasm-echo", b.kind());
        assert_eq!(run(&hash), hash_reference(input), "{}: wasm-hash", b.kind());
        assert_eq!(run(&large), large_reference(input), "{}: wasm-large", b.kind());
    }
    let cp = deploy("wasm-checkpointed");
    for _ in 0..2 {
        let out = b.invoke(&cp, b"seed", StartRequest::Auto).unwrap();
        assert_eq!(
            out.output,
            checkpointed_reference(b"seed"),
            "{}: wasm-checkpointed from {}",
            b.kind(),
            out.start
        );
    }
}

/// A trap in the interpreter is a panic, linear memory past the heap
/// limit is out of memory, `fail` is a function error.
pub fn bad_cases(b: &dyn Backend) {
    for (name, kind, text) in [
        ("wasm-trap", ErrorKind::Panicked, "wasm trap"),
        ("wasm-memory-hog", ErrorKind::OutOfMemory, ""),
        ("wasm-fail", ErrorKind::FunctionFailed, "wasm-fail: request refused"),
    ] {
        let id = b
            .deploy(&FunctionSpec::new(
                name,
                microfaas::builtin(name).expect("example function"),
            ))
            .unwrap_or_else(|e| panic!("deploying {name} on {}: {e}", b.kind()));
        let e = b
            .invoke(&id, b"abc", StartRequest::Auto)
            .expect_err("an interpreted fault answered");
        assert_eq!(e.kind(), kind, "{}: {name}: {e}", b.kind());
        assert!(e.to_string().contains(text), "{}: {name}: {e}", b.kind());
    }
}
