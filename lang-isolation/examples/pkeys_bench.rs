//! What memory protection keys cost a language call, measured inside one
//! process (no dispatcher noise):
//!
//! `cargo run --release -p lang-isolation --example pkeys_bench [-- N [FUNCTION]]`
//!
//! * warm: `Instance::handle` of a resident instance (default `noop`), N
//!   calls: unkeyed (corosensei coroutine), `gate-nop` (the gate's copy
//!   without PKRU writes: its control flow and the input copy, runnable
//!   without PKU) and keyed (the PKRU gate: two WRPKRU per call, plus two
//!   per `clock_ns` the SDK makes; only where the CPU has PKU); median and
//!   p99 ns per call, and the median of batches of 1000 calls;
//! * cold: map + instance in recycled memory (+ keying its image) + `init`
//!   + `handle` + unmap, unkeyed vs keyed.
//!
//! Runs unsandboxed; the worker adds nothing per call to this.

use lang_isolation::runtime::pkeys;
use lang_isolation::runtime::{ArtifactImage, Instance, InstanceConfig, LoadedFunction, SealedArtifact};
use std::path::Path;
use std::time::Instant;

fn stats(mut ns: Vec<u64>) -> (u64, u64) {
    ns.sort_unstable();
    let at = |p: usize| ns[(ns.len() - 1) * p / 100];
    (at(50), at(99))
}

fn per_call(n: usize, mut f: impl FnMut()) -> (u64, u64, u64) {
    for _ in 0..n / 10 {
        f();
    }
    let samples = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
        })
        .collect();
    let (p50, p99) = stats(samples);
    let batches = (0..(n / 1000).max(5))
        .map(|_| {
            let t = Instant::now();
            for _ in 0..1000 {
                f();
            }
            u64::try_from(t.elapsed().as_nanos() / 1000).unwrap_or(u64::MAX)
        })
        .collect();
    (p50, p99, stats(batches).0)
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let name = std::env::args().nth(2).unwrap_or_else(|| "noop".to_owned());
    let root = std::env::temp_dir().join("microfaas-pkeys-bench");
    let functions = Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions");
    let mut opts = microfaas_builder::BuildOptions::new(root.join("cache"));
    let so = root.join(format!("{name}.so"));
    opts.out = Some(so.clone());
    microfaas_builder::build(&functions.join(&name), &opts).expect("building the function");
    let bytes = std::fs::read(&so).expect("reading the artifact");
    let image = ArtifactImage::parse(SealedArtifact::create(&name, &bytes).expect("memfd")).expect("parse");
    let config = InstanceConfig::default();
    let state = pkeys::probe();
    println!("{name}: protection keys {state}; {n} calls per configuration (ns)");
    let keys = if pkeys::cpu_has_ospke() {
        let keys = pkeys::allocate_keys(1).expect("pkey_alloc");
        pkeys::claim_for_this_thread().expect("claim");
        keys
    } else {
        Vec::new()
    };
    // Every configuration imports the same (key-safe) mem*.
    pkeys::use_key_safe_imports();
    let input = b"";

    println!("{:<10} {:>9} {:>9} {:>13}", "warm", "p50", "p99", "batch median");
    let mut warm = Vec::new();
    // 0: corosensei, no keys; 1: the gate without PKRU writes (its control
    // flow and the input copy); 2: the gate with keys.
    for mode in 0..3 {
        if mode == 2 && keys.is_empty() {
            println!("keyed      skipped: {state}");
            continue;
        }
        let function = LoadedFunction::load(&image).expect("load");
        let mut instance = match mode {
            0 => Instance::new(function, &config).expect("instance"),
            1 => Instance::new_gated_without_keys(function, &config).expect("gated instance"),
            _ => Instance::new_keyed(function, &config, keys[0]).expect("keyed instance"),
        };
        instance.init().expect("init");
        let (p50, p99, batch) = per_call(n, || {
            let out = instance.handle(input).expect("handle");
            std::hint::black_box(out.bytes());
        });
        let label = ["unkeyed", "gate-nop", "keyed"][mode];
        println!("{label:<10} {p50:>9} {p99:>9} {batch:>13}");
        warm.push(batch);
    }
    for (i, label) in [(1, "the gate without PKRU writes"), (2, "the keyed gate")] {
        if let (Some(a), Some(b)) = (warm.first(), warm.get(i)) {
            println!(
                "{label}: {:+} ns per warm call (batch medians)",
                i128::from(*b) - i128::from(*a)
            );
        }
    }

    println!("{:<10} {:>9} {:>9}", "cold", "p50", "p99");
    let cold_n = (n / 20).max(1000);
    for mode in 0..3 {
        if mode == 2 && keys.is_empty() {
            continue;
        }
        let function = LoadedFunction::load(&image).expect("load");
        let first = match mode {
            0 => Instance::new(function, &config).expect("instance"),
            1 => Instance::new_gated_without_keys(function, &config).expect("gated instance"),
            _ => Instance::new_keyed(function, &config, keys[0]).expect("keyed instance"),
        };
        let mut shell = Some(first.into_shell());
        let (p50, p99, _) = per_call(cold_n, || {
            let function = LoadedFunction::load(&image).expect("load");
            let mut instance = Instance::from_shell(function, shell.take().expect("shell")).expect("shell");
            instance.init().expect("init");
            std::hint::black_box(instance.handle(input).expect("handle").bytes());
            shell = Some(instance.into_shell());
        });
        println!("{:<10} {p50:>9} {p99:>9}", ["unkeyed", "gate-nop", "keyed"][mode]);
    }
}
