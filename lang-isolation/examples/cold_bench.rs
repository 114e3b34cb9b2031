//! What a language cold start costs inside the worker, by strategy, on the
//! runtime alone (no dispatcher, no rings): the loader's fresh private copy
//! against the pre-linked image and its post-init snapshot, each with both
//! teardowns, for the same image every time and for `K` images in turn.
//!
//! `cargo run --release -p lang-isolation --example cold_bench [-- N FUNCTION K]`
//!
//! Columns: `start` = from the start of the cold path to just before
//! `handle` (map [+ relocate] [+ init]), `entry` = to the function's first
//! timestamp (what table1 reports as the cold start), `total` = the whole
//! cold request including teardown, `teardown` = after the reply
//! (`into_shell` + `leave`), all in microseconds, p50 / p99.

use lang_isolation::runtime::monotonic_ns;
use lang_isolation::runtime::pagescan::PageScan;
use lang_isolation::runtime::prelinked::{self, ImageArena, ImageSpace, PrelinkedImage, StartFrom, Teardown};
use lang_isolation::runtime::{ArtifactImage, Instance, InstanceConfig, InstanceShell, LoadedFunction, SealedArtifact};
use std::path::Path;

fn pct(v: &mut [u64], p: usize) -> f64 {
    v.sort_unstable();
    v[(v.len() - 1) * p / 100] as f64 / 1000.0
}

struct Samples {
    start: Vec<u64>,
    entry: Vec<u64>,
    total: Vec<u64>,
    teardown: Vec<u64>,
}

impl Samples {
    fn new() -> Self {
        Self {
            start: Vec::new(),
            entry: Vec::new(),
            total: Vec::new(),
            teardown: Vec::new(),
        }
    }

    fn print(mut self, what: &str) {
        println!(
            "{what:<56} {:>7.2} {:>7.2}  {:>7.2} {:>7.2}  {:>7.2} {:>7.2}  {:>7.2} {:>7.2}",
            pct(&mut self.start, 50),
            pct(&mut self.start, 99),
            pct(&mut self.entry, 50),
            pct(&mut self.entry, 99),
            pct(&mut self.total, 50),
            pct(&mut self.total, 99),
            pct(&mut self.teardown, 50),
            pct(&mut self.teardown, 99),
        );
    }
}

/// How a snapshot's heap is dropped after a call (each step of #14's fix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeapDrop {
    /// The instance's reset drops it beyond 256 KiB, then `leave` all of it.
    Twice,
    /// `leave` alone drops all of it.
    Once,
    /// `leave` alone drops the pages the call wrote (`PAGEMAP_SCAN`).
    Scan,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let name = args.next().unwrap_or_else(|| "noop".to_owned());
    let k: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let root = std::env::temp_dir().join("microfaas-cold-bench");
    let functions = Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions");
    let mut opts = microfaas_builder::BuildOptions::new(root.join("cache"));
    let so = root.join(format!("{name}.so"));
    opts.out = Some(so.clone());
    microfaas_builder::build(&functions.join(&name), &opts).expect("building the function");
    let bytes = std::fs::read(&so).expect("reading the artifact");
    let images: Vec<ArtifactImage> = (0..k)
        .map(|_| ArtifactImage::parse(SealedArtifact::create(&name, &bytes).expect("memfd")).expect("parse"))
        .collect();
    let input = b"0123456789abcdef";
    let config = InstanceConfig::default();
    println!(
        "{name}: {} rounds, {k} images; us: start p50 p99 | to first timestamp p50 p99 | whole request p50 p99 | teardown p50 p99",
        n
    );

    // The loader's path (what the worker did before pre-linked images).
    let mut shell = Some(InstanceShell::new(&config).expect("shell"));
    let mut s = Samples::new();
    for i in 0..n + n / 10 {
        let t0 = monotonic_ns();
        let function = LoadedFunction::load(&images[i % k]).expect("load");
        let mut instance = Instance::from_shell(function, shell.take().expect("shell")).expect("instance");
        instance.init().expect("init");
        let t1 = monotonic_ns();
        let entered = instance.handle(input).expect("handle").entered_ns;
        let t_handled = monotonic_ns();
        shell = Some(instance.into_shell());
        let t2 = monotonic_ns();
        if i >= n / 10 {
            s.start.push(t1 - t0);
            s.entry.push(entered.saturating_sub(t0));
            s.total.push(t2 - t0);
            s.teardown.push(t2 - t_handled);
        }
    }
    s.print("load: map + relocate + init (K images)");

    for teardown in [Teardown::Restore, Teardown::Discard, Teardown::Remap] {
        for (label, snapshots, images_used, heap) in [
            ("prelinked + init, 1 image", false, 1, HeapDrop::Scan),
            ("prelinked + init, K images", false, k, HeapDrop::Scan),
            ("snapshot, 1 image, heap dropped twice", true, 1, HeapDrop::Twice),
            ("snapshot, 1 image, heap dropped once", true, 1, HeapDrop::Once),
            ("snapshot, 1 image", true, 1, HeapDrop::Scan),
            ("snapshot, K images, heap dropped twice", true, k, HeapDrop::Twice),
            ("snapshot, K images", true, k, HeapDrop::Scan),
        ] {
            let mut arena = ImageArena::create(prelinked::DEFAULT_ARENA_BYTES).expect("arena");
            let mut window = ImageSpace::new(prelinked::DEFAULT_SPACE_BYTES, prelinked::DEFAULT_MAX_MAPPED, teardown)
                .expect("space");
            if heap == HeapDrop::Scan {
                window.use_page_scan(PageScan::open().expect("PAGEMAP_SCAN"));
            }
            let mut pre: Vec<PrelinkedImage> = images[..images_used]
                .iter()
                .map(|a| PrelinkedImage::build(a, &mut window, &mut arena).expect("prelink"))
                .collect();
            let mut shell = Some(InstanceShell::new(&config).expect("shell"));
            let mut s = Samples::new();
            for i in 0..n + n / 10 {
                let j = i % images_used;
                let mut sh = shell.take().expect("shell");
                let t0 = monotonic_ns();
                let from = if snapshots && pre[j].can_start_from_snapshot(&mut sh) {
                    StartFrom::Snapshot
                } else {
                    StartFrom::Pristine
                };
                let function = window.enter(&pre[j], &images[j], &arena, &sh, from).expect("enter");
                let mut instance = match (from, pre[j].snapshot_state()) {
                    // SAFETY: `enter` mapped the snapshot, taken in this shell.
                    (StartFrom::Snapshot, Some(state)) => unsafe {
                        Instance::from_shell_initialised(function, sh, state)
                            .expect("instance")
                            .expect("same heap")
                    },
                    _ => {
                        let mut instance = Instance::from_shell(function, sh).expect("instance");
                        instance.init().expect("init");
                        if snapshots {
                            pre[j].capture(&mut instance, &mut arena).expect("capture");
                        }
                        instance
                    }
                };
                let t1 = monotonic_ns();
                let entered = instance.handle(input).expect("handle").entered_ns;
                let t_handled = monotonic_ns();
                let sh = match heap {
                    HeapDrop::Twice => instance.into_shell(),
                    _ => instance.into_shell_sparing(window.snapshot_heap_bytes()),
                };
                window.leave(&sh, Some(&pre[j])).expect("leave");
                shell = Some(sh);
                let t2 = monotonic_ns();
                if i >= n / 10 {
                    s.start.push(t1 - t0);
                    s.entry.push(entered.saturating_sub(t0));
                    s.total.push(t2 - t0);
                    s.teardown.push(t2 - t_handled);
                }
            }
            s.print(&format!("{label} ({teardown:?})"));
            let arena_kib = arena.used_bytes() / 1024;
            let per =
                pre.iter().map(PrelinkedImage::arena_bytes).sum::<u64>() / u64::try_from(images_used).unwrap_or(1);
            if teardown == Teardown::Discard {
                println!(
                    "    arena regions {arena_kib} KiB, {} KiB per image; {} pieces",
                    per / 1024,
                    pre[0].pieces().len()
                );
            }
            for p in pre {
                p.release(&mut arena, &mut window);
            }
        }
    }
}
