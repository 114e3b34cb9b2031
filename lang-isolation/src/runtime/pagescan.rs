//! Which pages of a copy-on-write file mapping a call wrote: the worker's
//! use of `ipc::pagemap` (one `ioctl(PAGEMAP_SCAN)` on `/proc/self/pagemap`).
//! The pagemap fd is opened before the sandbox; the worker's seccomp policy
//! allows on it this one ioctl and nothing else. See `crate::sandbox::worker`.

pub use ipc::pagemap::{PAGEMAP_SCAN, PageScan, ScanError};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::mmap::page_size;
    use std::os::fd::AsFd;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// A private mapping of a memfd: pages written are found, pages only
    /// read or never touched are not; after `MADV_DONTNEED` of the written
    /// ones nothing is, and the bytes read as the file's again.
    #[test]
    fn finds_exactly_the_written_pages_of_a_private_file_mapping() {
        let page = page_size();
        let pages = 300; // more regions than one ioctl returns
        let len = page * pages;
        // SAFETY: a NUL-terminated name; the fd is owned below.
        let raw = unsafe { libc::memfd_create(c"pagescan-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh fd.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let file: Vec<u8> = (0..len).map(|i| u8::try_from(i / page % 256).unwrap() ^ 0x5a).collect();
        // SAFETY: writing our own buffer to our own memfd.
        let wrote = unsafe { libc::pwrite(fd.as_raw_fd(), file.as_ptr().cast(), len, 0) };
        assert_eq!(usize::try_from(wrote).unwrap(), len);
        let map = super::super::mmap::Mapping::anonymous(len, libc::PROT_NONE).unwrap();
        map.map_file_fixed(0, len, libc::PROT_READ | libc::PROT_WRITE, fd.as_fd(), 0)
            .unwrap();
        let base = map.start();
        // Every third page written, every other one of the rest read.
        let mut want = Vec::new();
        for p in 0..pages {
            // SAFETY: inside the mapping, read-write.
            unsafe {
                if p % 3 == 0 {
                    base.add(p * page + 7).write_volatile(0xff);
                    want.push(p);
                } else if p % 2 == 0 {
                    std::hint::black_box(base.add(p * page).read_volatile());
                }
            }
        }
        let mut scan = PageScan::open().unwrap();
        let mut out = Vec::new();
        scan.written(map.addr()..map.addr() + len, &mut out).unwrap();
        let got: Vec<usize> = out
            .iter()
            .flat_map(|r| (r.start..r.end).step_by(page))
            .map(|a| (a - map.addr()) / page)
            .collect();
        assert_eq!(got, want);
        for r in &out {
            map.discard(r.start - map.addr(), r.len()).unwrap();
        }
        out.clear();
        scan.written(map.addr()..map.addr() + len, &mut out).unwrap();
        assert!(out.is_empty(), "{out:?}");
        // SAFETY: the mapping is readable and `len` long.
        let now = unsafe { std::slice::from_raw_parts(base, len) };
        assert!(now == &file[..], "dropped pages read as the file again");
        // A sub-range, not page 0.
        // SAFETY: inside the mapping.
        unsafe { base.add(5 * page).write_volatile(1) };
        scan.written(map.addr() + page..map.addr() + 10 * page, &mut out)
            .unwrap();
        assert_eq!(out, vec![map.addr() + 5 * page..map.addr() + 6 * page]);
    }

    /// Anonymous memory is not file backed: every page written is found.
    #[test]
    fn anonymous_pages_written_are_found() {
        let page = page_size();
        let map = super::super::mmap::Mapping::anonymous(8 * page, libc::PROT_READ | libc::PROT_WRITE).unwrap();
        // SAFETY: inside the mapping, read-write.
        unsafe { map.start().add(2 * page).write_volatile(3) };
        let mut scan = PageScan::open().unwrap();
        let mut out = Vec::new();
        scan.written(map.addr()..map.addr() + 8 * page, &mut out).unwrap();
        assert_eq!(out, vec![map.addr() + 2 * page..map.addr() + 3 * page]);
    }
}
