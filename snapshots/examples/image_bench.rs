//! Measures the restore path: node creation, merged-image build, cached
//! image open, `mmap` of the image, first-touch reads and copy-on-write
//! writes through a mapping, reset, and private memory per mapping.
//!
//! `cargo run --release -p snapshots --example image_bench -- [STORE_DIR] [GUEST_MIB]`
//! (default: a temp dir under /tmp, 64 MiB). The store is left in place for
//! `microfaas snapshots tree --store STORE_DIR`.

use snapshots::{Label, Level, MapOptions, NodeSpec, PAGE_SIZE, Store};
use std::time::{Duration, Instant};

fn fill(mem: &mut [u8], pages: std::ops::Range<usize>, seed: u8) {
    for p in pages {
        let page = &mut mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
        for (i, b) in page.iter_mut().enumerate() {
            *b = seed ^ i.to_le_bytes()[0] ^ p.to_le_bytes()[0];
        }
    }
}

fn bitmap_of(pages: &[std::ops::Range<usize>], total: usize) -> Vec<u64> {
    let mut bm = vec![0u64; total.div_ceil(64)];
    for r in pages {
        for p in r.clone() {
            bm[p / 64] |= 1 << (p % 64);
        }
    }
    bm
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("snapshots-bench-{}", std::process::id())));
    let mib: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64);
    let bytes = mib << 20;
    let pages = bytes / PAGE_SIZE;
    let store = Store::open(&dir)?;
    println!("store {} ({mib} MiB guest, {pages} pages)", dir.display());

    // Guest memory as the VMM would hold it; 3/4 of it written at boot.
    let mut mem = vec![0u8; bytes];
    let base_pages = 0..pages * 3 / 4;
    fill(&mut mem, base_pages.clone(), 1);
    let t = Instant::now();
    let mut w = store.create_node(NodeSpec {
        level: Level::Base,
        parent: None,
        label: Label::base(Some("bench-guest")),
        guest_mem_bytes: bytes as u64,
    })?;
    w.write_nonzero(&mem)?;
    let base = w.commit(&[0; 4096], [("rip".to_owned(), "0x100000".to_owned())].into())?;
    let base_ms = t.elapsed().as_secs_f64() * 1e3;

    // A function load dirties 2 MiB in scattered runs; an argument 256 KiB.
    let func_runs: Vec<_> = (0..16).map(|i| i * (pages / 16)..i * (pages / 16) + 128).collect();
    for r in &func_runs {
        fill(&mut mem, r.clone(), 2);
    }
    let t = Instant::now();
    let mut w = store.create_node(NodeSpec {
        level: Level::Function,
        parent: Some(base.id()),
        label: Label::function("bench", "digest-1"),
        guest_mem_bytes: bytes as u64,
    })?;
    w.write_dirty(&mem, &bitmap_of(&func_runs, pages))?;
    let func = w.commit(&[0; 4096], Default::default())?;
    let func_ms = t.elapsed().as_secs_f64() * 1e3;
    let arg_run = pages / 2..pages / 2 + 64;
    let arg_runs = std::slice::from_ref(&arg_run);
    fill(&mut mem, arg_runs[0].clone(), 3);
    let mut w = store.create_node(NodeSpec {
        level: Level::Argument,
        parent: Some(func.id()),
        label: Label::argument("bench", "digest-1", "input-1"),
        guest_mem_bytes: bytes as u64,
    })?;
    w.write_dirty(&mem, &bitmap_of(arg_runs, pages))?;
    let arg = w.commit(&[0; 4096], Default::default())?;
    println!(
        "create: base {} pages {base_ms:.1} ms; function {} pages {func_ms:.1} ms",
        base.own_page_count(),
        func.own_page_count()
    );

    // Build (first use), then cached open from a fresh store handle.
    store.remove_image(arg.id())?;
    let t = Instant::now();
    let img = store.image(arg.id())?;
    let build = t.elapsed();
    assert!(img.was_built());
    let fresh = Store::open(&dir)?;
    let t = Instant::now();
    let cached = fresh.image(arg.id())?;
    let open_cached = t.elapsed();
    assert!(!cached.was_built());
    let t = Instant::now();
    let again = fresh.image(arg.id())?;
    let in_process = t.elapsed();
    drop(again);
    println!(
        "image: build {:.1} ms (3 nodes), open cached {:.0} us, in-process hit {:.1} us",
        build.as_secs_f64() * 1e3,
        us(open_cached),
        us(in_process)
    );
    assert_eq!(
        std::fs::read(img.path())?,
        mem,
        "merged image differs from guest memory"
    );

    for huge in [false, true] {
        let opts = MapOptions { huge_page_advice: huge };
        let mut map_times = Vec::new();
        let mut unmap_times = Vec::new();
        for _ in 0..200 {
            let t = Instant::now();
            let m = img.map(opts)?;
            map_times.push(t.elapsed());
            let t = Instant::now();
            drop(m);
            unmap_times.push(t.elapsed());
        }
        let mut m = img.map(opts)?;
        // First touch: read one byte per page.
        let mut byte = [0u8; 1];
        let t = Instant::now();
        for p in 0..pages {
            m.read_at((p * PAGE_SIZE) as u64, std::hint::black_box(&mut byte));
        }
        let read_touch = t.elapsed();
        let t = Instant::now();
        for p in 0..pages {
            m.read_at((p * PAGE_SIZE) as u64, std::hint::black_box(&mut byte));
        }
        let read_again = t.elapsed();
        // Copy-on-write: write 1 byte in 1,024 pages.
        let written = 1024.min(pages);
        let t = Instant::now();
        for p in 0..written {
            m.write_at((p * PAGE_SIZE) as u64, &[0x5a]);
        }
        let cow = t.elapsed();
        let private = m.private_bytes()?;
        let t = Instant::now();
        m.reset()?;
        let reset = t.elapsed();
        println!(
            "map (MADV_HUGEPAGE {huge}): mmap {:.1} us, munmap {:.1} us (medians of 200); first read {:.2} us/page, \
             re-read {:.3} us/page; CoW write {:.2} us/page; private after {written} writes {} KiB; reset {:.0} us",
            us(median(map_times)),
            us(median(unmap_times)),
            us(read_touch) / pages as f64,
            us(read_again) / pages as f64,
            us(cow) / written as f64,
            private / 1024,
            us(reset)
        );
    }
    Ok(())
}
