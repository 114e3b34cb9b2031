//! Tests of the language dispatcher on its own (no `Backend` trait), with
//! example functions built here through `microfaas-builder` (cached in the
//! test target directory). The full suite lives in the root crate's
//! `tests/language_*.rs`.

use lang_isolation::language::{Dispatcher, DispatcherConfig, Start};
use lang_isolation::runtime::SealedArtifact;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The artifact at `path` in a sealed memfd, as the host hands it over.
fn sealed(path: &Path) -> Arc<SealedArtifact> {
    let bytes = std::fs::read(path).unwrap();
    Arc::new(SealedArtifact::create(&path.display().to_string(), &bytes).unwrap())
}

/// Builds the example functions these tests use into one directory (once
/// per test process).
fn functions_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(build_functions).clone()
}

fn build_functions() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("language-smoke");
    let out = root.join("functions");
    let functions = Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions");
    for name in ["echo", "spin", "panics", "alloc-hog", "stack-overflow"] {
        let mut opts = microfaas_builder::BuildOptions::new(root.join("cache"));
        opts.out = Some(out.join(format!("{name}.so")));
        if let Err(e) = microfaas_builder::build(&functions.join(name), &opts) {
            panic!("building {name}: {e}");
        }
    }
    out
}

#[test]
fn echo_warm_and_cold() {
    let dir = functions_dir();
    let echo = dir.join("echo.so");
    let mut config = DispatcherConfig::new(env!("CARGO_BIN_EXE_microfaas-worker"));
    config.workers = Some(1);
    let d = Dispatcher::start(config).unwrap();
    let f = d.deploy(sealed(&echo), Duration::from_millis(100)).unwrap();
    let warm = d.invoke(f, b"hello", Start::Auto).unwrap();
    assert_eq!(warm.output, b"hello");
    assert!(!warm.cold);
    let cold = d.invoke(f, b"cold", Start::Cold).unwrap();
    assert_eq!(cold.output, b"cold");
    assert!(cold.cold);
    let mut lat = Vec::new();
    for i in 0..20_000u32 {
        let c = d.invoke(f, &i.to_le_bytes(), Start::Warm).unwrap();
        assert_eq!(c.output, i.to_le_bytes());
        lat.push(c.dispatch_ns);
    }
    lat.sort_unstable();
    let mut cl = Vec::new();
    for _ in 0..200 {
        let c = d.invoke(f, b"x", Start::Cold).unwrap();
        cl.push(c.total_ns);
    }
    cl.sort_unstable();
    eprintln!(
        "warm dispatch median {} ns p99 {} ns; cold total median {} ns",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100],
        cl[cl.len() / 2]
    );
    d.evict(f).unwrap();
    let after = d.invoke(f, b"e", Start::Auto).unwrap();
    assert!(after.cold);
    assert!(!d.invoke(f, b"e", Start::Auto).unwrap().cold);
}

/// Every failure kind through the dispatcher directly.
#[test]
fn faults_are_typed_and_the_worker_survives() {
    let dir = functions_dir();
    let mut config = DispatcherConfig::new(env!("CARGO_BIN_EXE_microfaas-worker"));
    config.workers = Some(1);
    config.heap_limit_bytes = 32 << 20;
    let d = Dispatcher::start(config).unwrap();
    let f = |name: &str, budget_ms: u64| {
        d.deploy(
            sealed(&dir.join(format!("{name}.so"))),
            Duration::from_millis(budget_ms),
        )
        .unwrap()
    };
    let echo = f("echo", 100);
    let spin = f("spin", 5);
    let panics = f("panics", 100);
    let hog = f("alloc-hog", 1000);
    let deep = f("stack-overflow", 1000);
    use lang_isolation::language::LanguageError as E;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let e = d.invoke(spin, b"", Start::Auto).unwrap_err();
        eprintln!("spin: {e} after {:?}", t.elapsed());
        assert!(matches!(e, E::BudgetExceeded { .. }), "{e}");
        assert_eq!(d.invoke(echo, b"ok", Start::Auto).unwrap().output, b"ok");
        let e = d.invoke(panics, b"abc", Start::Auto).unwrap_err();
        assert!(
            matches!(e, E::Panicked { ref message } if message.contains("deliberate panic on an input of 3 bytes")),
            "{e}"
        );
        let e = d.invoke(hog, b"", Start::Auto).unwrap_err();
        assert!(matches!(e, E::OutOfMemory { .. }), "{e}");
        let e = d.invoke(deep, b"x", Start::Auto).unwrap_err();
        assert!(matches!(e, E::StackOverflow { .. }), "{e}");
        let e = d.invoke(spin, b"", Start::Cold).unwrap_err();
        assert!(matches!(e, E::BudgetExceeded { .. }), "{e}");
        assert_eq!(d.invoke(echo, b"ok", Start::Cold).unwrap().output, b"ok");
    }
    let s = d.stats();
    assert_eq!(s.respawns, 0);
    assert_eq!(s.preemptions, 6);
}
