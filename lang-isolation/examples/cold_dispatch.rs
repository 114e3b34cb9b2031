//! Cold and warm starts through a real worker, by cold-start path: the
//! worker's own start time (`start_ns`) and the dispatch latency (to the
//! function's first timestamp), p50 / p99 in microseconds.
//!
//! `cargo run --release -p lang-isolation --example cold_dispatch [-- N FUNCTIONS]`

use lang_isolation::language::{ColdStart, Dispatcher, DispatcherConfig, Start};
use lang_isolation::runtime::SealedArtifact;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn pct(v: &mut [u64], p: usize) -> f64 {
    v.sort_unstable();
    v[(v.len() - 1) * p / 100] as f64 / 1000.0
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let k: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let root = std::env::temp_dir().join("microfaas-cold-dispatch");
    let functions = Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions");
    let mut opts = microfaas_builder::BuildOptions::new(root.join("cache"));
    opts.out = Some(root.join("noop.so"));
    let built = microfaas_builder::build(&functions.join("noop"), &opts).expect("building noop");
    let bytes = std::fs::read(built.path).expect("reading noop");
    let worker = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/microfaas-worker");
    for mode in [ColdStart::Snapshot, ColdStart::Prelinked, ColdStart::Load] {
        let mut config = DispatcherConfig::new(&worker);
        config.workers = Some(1);
        config.cold_start = mode;
        let d = Dispatcher::start(config).expect("dispatcher");
        let ids: Vec<_> = (0..k)
            .map(|i| {
                let a = Arc::new(SealedArtifact::create(&format!("noop-{i}"), &bytes).expect("memfd"));
                d.deploy(a, Duration::from_secs(1)).expect("deploy")
            })
            .collect();
        for id in &ids {
            d.invoke(*id, b"", Start::Cold).expect("first cold start");
        }
        for start in [Start::Cold, Start::Warm] {
            let (mut s, mut disp) = (Vec::new(), Vec::new());
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let id = ids[usize::try_from(x % u64::try_from(k).unwrap_or(1)).unwrap_or(0)];
                let c = d.invoke(id, b"", start).expect("invoke");
                s.push(c.start_ns);
                disp.push(c.dispatch_ns);
            }
            println!(
                "{mode:?} {start:?} ({k} functions): worker start {:.2} / {:.2}, dispatch {:.2} / {:.2}",
                pct(&mut s, 50),
                pct(&mut s, 99),
                pct(&mut disp, 50),
                pct(&mut disp, 99)
            );
        }
    }
}
