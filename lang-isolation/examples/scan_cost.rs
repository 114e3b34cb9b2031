//! What dropping a post-init snapshot's heap costs after a call, by way:
//! `MADV_DONTNEED` of all of it against `PAGEMAP_SCAN` and dropping only
//! the pages written, over an 8 MiB private file mapping (init-heavy's
//! heap) of which a call read `R` pages and wrote `W`.
//!
//! `cargo run --release -p lang-isolation --example scan_cost [-- ROUNDS]`

use lang_isolation::runtime::monotonic_ns;
use lang_isolation::runtime::pagescan::PageScan;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

fn pct(v: &mut [u64], p: usize) -> f64 {
    v.sort_unstable();
    v[(v.len() - 1) * p / 100] as f64 / 1000.0
}

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let page = 4096;
    let len = 8 << 20;
    // SAFETY: a NUL-terminated name; the fd is owned below.
    let raw = unsafe { libc::memfd_create(c"scan-cost".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: a fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let bytes = vec![7u8; len];
    // SAFETY: our own buffer into our own memfd.
    let wrote = unsafe { libc::pwrite(fd.as_raw_fd(), bytes.as_ptr().cast(), len, 0) };
    assert_eq!(usize::try_from(wrote).unwrap(), len);
    // SAFETY: a fresh private mapping at an address the kernel picks,
    // unmapped only when the process ends.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            fd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let base = p.cast::<u8>();
    let mut scan = PageScan::open().expect("PAGEMAP_SCAN");
    let mut out = Vec::with_capacity(64);
    println!("8 MiB private file mapping; us p50 p99: touch (the call's reads and writes) | drop");
    for (reads, writes) in [(0, 0), (3, 0), (3, 1), (16, 4), (256, 16)] {
        for way in ["dontneed all", "scan + drop written"] {
            let (mut touch, mut drop) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                let t0 = monotonic_ns();
                for r in 0..reads {
                    // SAFETY: inside the mapping.
                    std::hint::black_box(unsafe { base.add((r * 97 % 2048) * page).read_volatile() });
                }
                for w in 0..writes {
                    // SAFETY: inside the mapping.
                    unsafe { base.add((w * 131 % 2048) * page).write_volatile(1) };
                }
                let t1 = monotonic_ns();
                if way == "dontneed all" {
                    // SAFETY: our own mapping; nothing borrows it.
                    unsafe { libc::madvise(p, len, libc::MADV_DONTNEED) };
                } else {
                    out.clear();
                    scan.written(base.addr()..base.addr() + len, &mut out).expect("scan");
                    for r in &out {
                        // SAFETY: a range the scan found inside our mapping.
                        unsafe {
                            libc::madvise(
                                std::ptr::with_exposed_provenance_mut(r.start),
                                r.len(),
                                libc::MADV_DONTNEED,
                            )
                        };
                    }
                }
                let t2 = monotonic_ns();
                touch.push(t1 - t0);
                drop.push(t2 - t1);
            }
            println!(
                "reads {reads:>3} writes {writes:>2} {way:<20} {:>8.2} {:>8.2} | {:>8.2} {:>8.2}",
                pct(&mut touch, 50),
                pct(&mut touch, 99),
                pct(&mut drop, 50),
                pct(&mut drop, 99)
            );
        }
    }
}
