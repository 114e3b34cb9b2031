//! What one `PAGEMAP_SCAN` ([`ipc::pagemap::PageScan::written`]) costs on
//! this host, by range size and by how much of the range is mapped: the
//! figure behind `init-heavy`'s cold start from its post-init snapshot (the
//! language worker scans the snapshot's whole heap after every cold call).
//!
//! `cargo run --release -p microfaas-ipc --example pagescan_cost [-- ROUNDS]`
//! (default 2,000 scans per row). A `MAP_PRIVATE` mapping of a memfd, as the
//! worker maps a snapshot's heap: `read` pages are faulted in by reading
//! (page cache, as a call leaves what it only read), one page is written (a
//! private copy: what the scan must find). Prints min / median / p99 in us.

use ipc::pagemap::PageScan;
use std::time::Instant;

const PAGE: usize = 4096;

/// A `len`-byte `MAP_PRIVATE` mapping of a memfd whose pages all hold data.
struct Private {
    addr: *mut u8,
    len: usize,
}

impl Private {
    fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: a NUL-terminated name and valid flags; the fd is closed
        // below once mapped.
        let fd = unsafe { libc::memfd_create(c"pagescan-cost".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let size = libc::off_t::try_from(len).map_err(std::io::Error::other)?;
        // SAFETY: `fd` is the memfd just made; mapping a fresh shared view
        // of it and a private one touches no memory of ours.
        let (shared, private) = unsafe {
            if libc::ftruncate(fd, size) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let rw = libc::PROT_READ | libc::PROT_WRITE;
            let shared = libc::mmap(std::ptr::null_mut(), len, rw, libc::MAP_SHARED, fd, 0);
            let private = libc::mmap(std::ptr::null_mut(), len, rw, libc::MAP_PRIVATE, fd, 0);
            libc::close(fd);
            (shared, private)
        };
        if shared == libc::MAP_FAILED || private == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        for off in (0..len).step_by(PAGE) {
            // SAFETY: `off < len`: inside the shared mapping, ours alone.
            unsafe { shared.cast::<u8>().add(off).write_volatile(1) };
        }
        // SAFETY: the shared view is ours and no longer used.
        unsafe { libc::munmap(shared, len) };
        Ok(Self {
            addr: private.cast(),
            len,
        })
    }

    /// Drops every page (reads as the file again), then reads the first
    /// `read` pages and writes one.
    fn prepare(&self, read: usize) -> std::io::Result<()> {
        // SAFETY: the whole mapping, ours; its pages read as the file after.
        if unsafe { libc::madvise(self.addr.cast(), self.len, libc::MADV_DONTNEED) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let pages = self.len / PAGE;
        for p in 0..read.min(pages) {
            // SAFETY: inside the mapping.
            unsafe { self.addr.add(p * PAGE).read_volatile() };
        }
        // SAFETY: inside the mapping (a page in the middle).
        unsafe { self.addr.add(pages / 2 * PAGE).write_volatile(2) };
        Ok(())
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unused after this.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = std::env::args().nth(1).map_or(Ok(2000), |a| a.parse())?;
    let mut scan = PageScan::open()?;
    let mut found = Vec::new();
    println!("PAGEMAP_SCAN of a MAP_PRIVATE memfd mapping, one page written; {rounds} scans per row");
    println!(
        "{:>9} {:>10} {:>9} {:>9} {:>9}",
        "range", "pages read", "min us", "p50 us", "p99 us"
    );
    for mib in [1usize, 8, 64] {
        let len = mib << 20;
        let mapping = Private::new(len)?;
        for read in [0, 16, len / PAGE] {
            mapping.prepare(read)?;
            let mut ns = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                found.clear();
                let start = mapping.addr.addr();
                let t = Instant::now();
                scan.written(start..start + len, &mut found)?;
                ns.push(t.elapsed().as_nanos());
            }
            if found.len() != 1 {
                return Err(format!("the scan found {found:?}, not the one written page").into());
            }
            ns.sort_unstable();
            let at = |q: usize| ns[(ns.len() - 1) * q / 100] as f64 / 1000.0;
            println!(
                "{:>6} MiB {read:>10} {:>9.2} {:>9.2} {:>9.2}",
                mib,
                at(0),
                at(50),
                at(99)
            );
        }
    }
    Ok(())
}
