//! What one `PAGEMAP_SCAN` ([`ipc::pagemap::PageScan::written`]) costs on
//! this host, by range size and by how much of the range is mapped: the
//! figure behind `init-heavy`'s cold start from its post-init snapshot (the
//! language worker scans the snapshot's whole heap after every cold call).
//!
//! `cargo run --release -p microfaas-ipc --example pagescan_cost [-- ROUNDS]`
//! (default 2,000 scans per row). A `MAP_PRIVATE` mapping of a memfd, as the
//! worker maps a snapshot's heap: `read` pages are faulted in by reading
//! (page cache, as a call leaves what it only read), one page is written (a
//! private copy: what the scan must find). The reads are spread over the
//! range (one every `pages / read`, as a call's lookups in a table are),
//! with fault-around as the kernel does it and with it turned off by a
//! userfaultfd registration ([`NoFaultAround`] below: the kernel skips fault-around on a range
//! registered with a userfaultfd in write-protect mode, and nothing else
//! reachable turns it off on this kernel, 6.18; `MADV_RANDOM` does not); `mapped` counts the pages present afterwards (from
//! `/proc/self/pagemap`). Prints min / median / p99 in us.

use ipc::pagemap::PageScan;
use std::os::unix::fs::FileExt;
use std::time::Instant;

mod uffd {
    //! A user-mode-only userfaultfd in async write-protect mode
    //! (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7), which never delivers an event;
    //! hand-written (three ioctls): the `userfaultfd` crate's feature flags
    //! stop before `WP_ASYNC`.

    use std::io;
    use std::ops::Range;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

    /// `UFFD_API`: the protocol version asked in `UFFDIO_API`.
    const UFFD_API: u64 = 0xaa;
    /// `UFFD_USER_MODE_ONLY`: the fd handles user-mode faults only.
    const UFFD_USER_MODE_ONLY: libc::c_int = 1;
    /// `UFFD_FEATURE_WP_ASYNC`: write-protect faults resolved by the kernel.
    const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
    /// `UFFDIO_REGISTER_MODE_WP`.
    const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

    /// `_IOWR(0xaa, nr, size)`.
    const fn uffdio(nr: u64, size: u64) -> u64 {
        (3 << 30) | (size << 16) | (0xaa << 8) | nr
    }

    /// `UFFDIO_API`: `_IOWR(0xaa, 0x3f, struct uffdio_api)` (24 bytes).
    pub const UFFDIO_API: u64 = uffdio(0x3f, 24);
    /// `UFFDIO_REGISTER`: `_IOWR(0xaa, 0x00, struct uffdio_register)` (32
    /// bytes).
    pub const UFFDIO_REGISTER: u64 = uffdio(0x00, 32);
    const _: () = assert!(std::mem::size_of::<Api>() == 24);
    const _: () = assert!(std::mem::size_of::<Register>() == 32);

    /// `struct uffdio_api`.
    #[repr(C)]
    #[derive(Debug, Default)]
    struct Api {
        api: u64,
        features: u64,
        ioctls: u64,
    }

    /// `struct uffdio_register` (its `uffdio_range` inlined).
    #[repr(C)]
    #[derive(Debug, Default)]
    struct Register {
        start: u64,
        len: u64,
        mode: u64,
        ioctls: u64,
    }

    /// Why the fd could not be made or a range registered.
    #[derive(Debug, thiserror::Error)]
    pub enum UffdError {
        /// `userfaultfd(2)` failed (no kernel support, or a seccomp policy).
        #[error("userfaultfd(UFFD_USER_MODE_ONLY) failed")]
        Open(#[source] io::Error),
        /// `UFFDIO_API` refused the version or `WP_ASYNC` (a kernel before 6.7).
        #[error("userfaultfd: UFFDIO_API with WP_ASYNC refused")]
        Api(#[source] io::Error),
        /// `UFFDIO_REGISTER` failed (a mapping of a kind it cannot register).
        #[error("userfaultfd: UFFDIO_REGISTER of {start:#x}+{len:#x} failed")]
        Register {
            /// Start of the range.
            start: usize,
            /// Its length.
            len: usize,
            /// The kernel's answer.
            #[source]
            source: io::Error,
        },
    }

    /// A user-mode-only userfaultfd in async write-protect mode: registering a
    /// range on it turns off fault-around there (see the module's text).
    #[derive(Debug)]
    pub struct NoFaultAround {
        fd: OwnedFd,
    }

    impl NoFaultAround {
        /// Makes the fd and negotiates `WP_ASYNC`.
        pub fn open() -> Result<Self, UffdError> {
            let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
            // SAFETY: integer flags; the fd is owned below.
            let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
            if raw < 0 {
                return Err(UffdError::Open(io::Error::last_os_error()));
            }
            let raw = RawFd::try_from(raw).map_err(|_| UffdError::Open(io::Error::from_raw_os_error(libc::EBADF)))?;
            // SAFETY: a fresh fd nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let mut api = Api {
                api: UFFD_API,
                features: UFFD_FEATURE_WP_ASYNC,
                ioctls: 0,
            };
            // SAFETY: UFFDIO_API reads and writes the 24-byte struct passed.
            let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &raw mut api) };
            if rc != 0 {
                return Err(UffdError::Api(io::Error::last_os_error()));
            }
            if api.features & UFFD_FEATURE_WP_ASYNC == 0 {
                return Err(UffdError::Api(io::Error::from_raw_os_error(libc::EINVAL)));
            }
            Ok(Self { fd })
        }

        /// Registers `range` (page aligned, inside one or more mappings of this
        /// process) in write-protect mode: fault-around is off there until the
        /// mapping is replaced (a new `mmap` over it is not registered).
        pub fn register(&self, range: Range<usize>) -> Result<(), UffdError> {
            let err = |source| UffdError::Register {
                start: range.start,
                len: range.len(),
                source,
            };
            let mut arg = Register {
                start: u64::try_from(range.start).map_err(|_| err(io::Error::from_raw_os_error(libc::EINVAL)))?,
                len: u64::try_from(range.len()).map_err(|_| err(io::Error::from_raw_os_error(libc::EINVAL)))?,
                mode: UFFDIO_REGISTER_MODE_WP,
                ioctls: 0,
            };
            // SAFETY: UFFDIO_REGISTER reads the range and mode and writes the
            // `ioctls` field of the 32-byte struct passed; registering changes
            // no memory contents (no page is write-protected by it).
            let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &raw mut arg) };
            if rc != 0 {
                return Err(err(io::Error::last_os_error()));
            }
            Ok(())
        }
    }
}
use uffd::NoFaultAround;

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

    /// Drops every page (reads as the file again), then reads `read`
    /// pages spread evenly over the range and writes one.
    fn prepare(&self, read: usize) -> std::io::Result<()> {
        // SAFETY: the whole mapping, ours; its pages read as the file after.
        if unsafe { libc::madvise(self.addr.cast(), self.len, libc::MADV_DONTNEED) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let pages = self.len / PAGE;
        let read = read.min(pages);
        for i in 0..read {
            let p = i * pages / read.max(1);
            // SAFETY: `p < pages`: inside the mapping.
            unsafe { self.addr.add(p * PAGE).read_volatile() };
        }
        // SAFETY: inside the mapping (a page in the middle).
        unsafe { self.addr.add(pages / 2 * PAGE).write_volatile(2) };
        Ok(())
    }
}

/// Pages of `[addr, addr + len)` present now (bit 63 of their
/// `/proc/self/pagemap` entries).
fn present(pagemap: &std::fs::File, addr: usize, len: usize) -> std::io::Result<usize> {
    let mut entries = vec![0u8; len / PAGE * 8];
    pagemap.read_exact_at(&mut entries, (addr / PAGE * 8) as u64)?;
    Ok(entries
        .chunks_exact(8)
        .filter(|e| u64::from_le_bytes((*e).try_into().unwrap_or_default()) >> 63 == 1)
        .count())
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
    let uffd = NoFaultAround::open()?;
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let mut found = Vec::new();
    println!("PAGEMAP_SCAN of a MAP_PRIVATE memfd mapping, one page written; {rounds} scans per row");
    println!(
        "{:>9} {:>12} {:>10} {:>7} {:>9} {:>9} {:>9}",
        "range", "fault-around", "pages read", "mapped", "min us", "p50 us", "p99 us"
    );
    for (mib, registered) in [(1usize, false), (8, false), (8, true), (64, false), (64, true)] {
        let len = mib << 20;
        let mapping = Private::new(len)?;
        if registered {
            uffd.register(mapping.addr.addr()..mapping.addr.addr() + len)?;
        }
        for read in [0, 17, len / PAGE] {
            mapping.prepare(read)?;
            let mapped = present(&pagemap, mapping.addr.addr(), len)?;
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
                "{:>6} MiB {:>12} {read:>10} {mapped:>7} {:>9.2} {:>9.2} {:>9.2}",
                mib,
                if registered { "off (uffd)" } else { "on" },
                at(0),
                at(50),
                at(99)
            );
        }
    }
    Ok(())
}
