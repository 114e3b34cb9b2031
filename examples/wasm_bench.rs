//! Interpreted (WebAssembly) against native functions, every backend and
//! start path: end-to-end latency medians of `noop`, `wasm-noop` and
//! `wasm-large` (4 MiB of WebAssembly, whose compile the `function` level
//! and the language backend's post-init state skip), and the ratios the
//! interpreted-functions issue asks for. A benchmark, not a test:
//!
//! ```text
//! cargo run --release --example wasm_bench [-- STARTS]
//! ```
//!
//! STARTS (default 10) starts per slow path, 10x that per warm/hot path.
//! The vm backend uses a fresh store in a temporary directory.

use microfaas::{
    Backend, BackendKind, Config, FunctionId, FunctionSpec, LanguageColdStart, StartPath, StartRequest, VmConfig,
};
use std::collections::HashMap;

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn paths(kind: BackendKind) -> &'static [StartPath] {
    match kind {
        BackendKind::Process | BackendKind::Language => &[StartPath::Cold, StartPath::Warm],
        BackendKind::Vm => &[StartPath::Cold, StartPath::Base, StartPath::Function, StartPath::Hot],
    }
}

/// Median end-to-end latency of `n` invocations forced onto `path`, µs.
fn measure(b: &dyn Backend, id: &FunctionId, path: StartPath, n: usize) -> f64 {
    // One unmeasured start (creates what the path needs).
    b.invoke(id, b"", StartRequest::Force(path))
        .unwrap_or_else(|e| panic!("{id} {path}: {e}"));
    let samples: Vec<u64> = (0..n)
        .map(|_| {
            let r = b
                .invoke(id, b"", StartRequest::Force(path))
                .unwrap_or_else(|e| panic!("{id} {path}: {e}"));
            assert_eq!(r.start, path);
            r.timings.total_ns
        })
        .collect();
    median(samples) as f64 / 1e3
}

fn main() {
    let starts: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let store = tempfile::Builder::new()
        .prefix("microfaas-wasm-bench")
        .tempdir()
        .unwrap();
    let config = Config {
        vm: VmConfig {
            store_dir: Some(store.path().to_owned()),
            ..VmConfig::default()
        },
        ..Config::default()
    };
    println!(
        "end-to-end latency medians, us ({starts} starts per slow path, {} per warm/hot)",
        starts * 10
    );
    println!(
        "{:<9} {:<9} {:>12} {:>12} {:>12}",
        "backend", "start", "noop", "wasm-noop", "wasm-large"
    );
    // The language backend twice: its default cold start (from the
    // function's post-init snapshot) and its own full cold start (load,
    // relocate, init: the runtime initialised and the module compiled).
    let mut load = config.clone();
    load.language.cold_start = LanguageColdStart::Load;
    let runs = [
        (BackendKind::Process, "process", config.clone()),
        (BackendKind::Language, "language", config.clone()),
        (BackendKind::Language, "lang-load", load),
        (BackendKind::Vm, "vm", config.clone()),
    ];
    let mut language_snapshot_cold = 0.0;
    for (kind, label, config) in runs {
        let b = match microfaas::open(kind, config) {
            Ok(b) => b,
            Err(e) => {
                println!("{label:<9} skipped: {e}");
                continue;
            }
        };
        let mut by: HashMap<(&str, StartPath), f64> = HashMap::new();
        for name in ["noop", "wasm-noop", "wasm-large"] {
            let id = b
                .deploy(&FunctionSpec::new(name, microfaas::builtin(name).unwrap()))
                .unwrap_or_else(|e| panic!("deploying {name} on {kind}: {e}"));
            for &path in paths(kind) {
                let n = if matches!(path, StartPath::Warm | StartPath::Hot) {
                    starts * 10
                } else {
                    starts
                };
                by.insert((name, path), measure(b.as_ref(), &id, path, n));
            }
        }
        for &path in paths(kind) {
            println!(
                "{:<9} {:<9} {:>12.1} {:>12.1} {:>12.1}",
                label,
                path.as_str(),
                by[&("noop", path)],
                by[&("wasm-noop", path)],
                by[&("wasm-large", path)]
            );
        }
        match label {
            "vm" => println!(
                "vm: wasm-large function / noop function = {:.2}x; wasm-large cold / function = {:.1}x",
                by[&("wasm-large", StartPath::Function)] / by[&("noop", StartPath::Function)],
                by[&("wasm-large", StartPath::Cold)] / by[&("wasm-large", StartPath::Function)]
            ),
            "language" => {
                language_snapshot_cold = by[&("wasm-large", StartPath::Cold)];
                println!(
                    "language: wasm-large cold (post-init snapshot) / noop cold = {:.2}x",
                    language_snapshot_cold / by[&("noop", StartPath::Cold)]
                );
            }
            "lang-load" => println!(
                "language: wasm-large cold (load + init) / cold (post-init snapshot) = {:.1}x",
                by[&("wasm-large", StartPath::Cold)] / language_snapshot_cold
            ),
            _ => {}
        }
    }
}
