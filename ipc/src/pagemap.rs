//! Which pages of a copy-on-write file mapping a call wrote, in one system
//! call: `ioctl(PAGEMAP_SCAN)` (Linux 6.7) on `/proc/self/pagemap`.
//!
//! A `MAP_PRIVATE` mapping of a file (a post-init snapshot in the image
//! arena) holds, after a call, three kinds of page: not mapped (never
//! touched, or dropped), mapped to the file's page cache (only read: the
//! snapshot's bytes, still) and anonymous (written: the kernel copied the
//! page on the first write). Only the last kind must be dropped
//! (`MADV_DONTNEED`) for the range to read as the snapshot again; the
//! pages only read stay mapped, so the next cold start does not fault them
//! in again. The scan asks for the present (or swapped) pages that are not
//! `PAGE_IS_FILE` (the category inverted): exactly the anonymous ones. No
//! userfaultfd is needed.
//!
//! Shared by the language workers (a snapshot's heap after a cold start)
//! and the VMM (an instance reset), both of which open the pagemap before
//! their sandbox (which has no `open`); their seccomp policies allow on it
//! this one ioctl and nothing else (no `pread64`: a pagemap opened with
//! `CAP_SYS_ADMIN` reads physical frame numbers).

use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)` (96 bytes).
pub const PAGEMAP_SCAN: u64 = (3 << 30) | (SCAN_ARG_BYTES << 16) | (0x66 << 8) | 16;

/// `sizeof(struct pm_scan_arg)`.
const SCAN_ARG_BYTES: u64 = 96;
const _: () = assert!(std::mem::size_of::<ScanArg>() == 96);

/// The page is file backed (mapped to the page cache, not a private copy).
const PAGE_IS_FILE: u64 = 1 << 2;
/// The page is present.
const PAGE_IS_PRESENT: u64 = 1 << 3;
/// The page is swapped out.
const PAGE_IS_SWAPPED: u64 = 1 << 4;

/// Regions one ioctl returns at most (the scan is resumed from
/// `walk_end` when they are used up).
pub const REGIONS: usize = 64;

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct ScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`: the buffer a scan fills.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// Why a scan failed.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// `/proc/self/pagemap` could not be opened.
    #[error("cannot open /proc/self/pagemap")]
    Open(#[source] io::Error),
    /// The ioctl failed (an older kernel: `ENOTTY`/`EINVAL`).
    #[error("PAGEMAP_SCAN failed")]
    Scan(#[source] io::Error),
    /// The kernel answered with regions outside the range asked, or did not
    /// advance (never expected; the caller then drops the whole range).
    #[error("PAGEMAP_SCAN answered outside the range asked")]
    Answer,
}

/// An open `/proc/self/pagemap` and the scan's buffer.
#[derive(Debug)]
pub struct PageScan {
    fd: OwnedFd,
    regions: Vec<PageRegion>,
}

impl PageScan {
    /// Opens `/proc/self/pagemap` (before the sandbox) and checks that the
    /// kernel has `PAGEMAP_SCAN` (one scan of an empty range).
    pub fn open() -> Result<Self, ScanError> {
        let path = c"/proc/self/pagemap";
        // SAFETY: a NUL-terminated path and valid flags; the fd is owned below.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(ScanError::Open(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut scan = Self {
            fd,
            regions: vec![PageRegion::default(); REGIONS],
        };
        let probe = scan.regions.as_ptr().addr();
        // SAFETY: sysconf has no memory effects.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let start = probe - probe % page;
        let mut out = Vec::new();
        scan.written(start..start + page, &mut out)?;
        Ok(scan)
    }

    /// The pagemap fd (for the seccomp policy).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// [`written_in`] on this scan's pagemap with its buffer.
    pub fn written(&mut self, range: Range<usize>, out: &mut Vec<Range<usize>>) -> Result<(), ScanError> {
        written_in(self.fd.as_fd(), range, &mut self.regions, out)
    }
}

/// Appends to `out` the ranges of `range` (page aligned) holding private
/// anonymous pages (present or swapped, not file backed): in a private file
/// mapping, the pages written since they were last dropped. Sorted, not
/// overlapping, inside `range`; every kernel answer is checked. `pagemap` is
/// an open `/proc/self/pagemap`, `regions` the buffer one ioctl fills.
pub fn written_in(
    pagemap: BorrowedFd<'_>,
    range: Range<usize>,
    regions: &mut [PageRegion],
    out: &mut Vec<Range<usize>>,
) -> Result<(), ScanError> {
    let end = u64::try_from(range.end).map_err(|_| ScanError::Answer)?;
    let mut start = u64::try_from(range.start).map_err(|_| ScanError::Answer)?;
    while start < end {
        let mut arg = ScanArg {
            size: SCAN_ARG_BYTES,
            flags: 0,
            start,
            end,
            walk_end: 0,
            vec: u64::try_from(regions.as_mut_ptr().addr()).map_err(|_| ScanError::Answer)?,
            vec_len: u64::try_from(regions.len()).map_err(|_| ScanError::Answer)?,
            max_pages: 0,
            category_inverted: PAGE_IS_FILE,
            category_mask: PAGE_IS_FILE,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        };
        // SAFETY: PAGEMAP_SCAN reads `arg` and writes `arg.walk_end`
        // and at most `vec_len` regions into `regions` (owned,
        // that long); it changes no memory mapping (flags 0: report only).
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &raw mut arg) };
        if n < 0 {
            return Err(ScanError::Scan(io::Error::last_os_error()));
        }
        let n = usize::try_from(n).map_err(|_| ScanError::Answer)?;
        let found = regions.get(..n).ok_or(ScanError::Answer)?;
        let walked = next_start(start, end, arg.walk_end, found)?;
        for r in found {
            let a = usize::try_from(r.start).map_err(|_| ScanError::Answer)?;
            let b = usize::try_from(r.end).map_err(|_| ScanError::Answer)?;
            match out.last_mut() {
                Some(last) if last.end == a => last.end = b,
                _ => out.push(a..b),
            }
        }
        start = walked;
    }
    Ok(())
}

/// Checks one answer of a scan of `[start, end)` (`walk_end` and the
/// regions found) and says where the next scan starts. Pure.
fn next_start(start: u64, end: u64, walk_end: u64, found: &[PageRegion]) -> Result<u64, ScanError> {
    let mut at = start;
    for r in found {
        if r.start < at || r.end <= r.start || r.end > end {
            return Err(ScanError::Answer);
        }
        at = r.end;
    }
    // The kernel walked to `walk_end`; it must advance, or the loop would
    // not end.
    if walk_end <= start || walk_end > end || walk_end < at {
        return Err(ScanError::Answer);
    }
    Ok(walk_end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(start: u64, end: u64) -> PageRegion {
        PageRegion {
            start,
            end,
            categories: PAGE_IS_PRESENT,
        }
    }

    #[test]
    fn answers_are_checked() {
        assert_eq!(next_start(0, 100, 100, &[]).unwrap(), 100);
        assert_eq!(next_start(0, 100, 40, &[region(10, 20), region(30, 40)]).unwrap(), 40);
        // No progress, past the end, regions out of order or outside.
        assert!(next_start(0, 100, 0, &[]).is_err());
        assert!(next_start(0, 100, 101, &[]).is_err());
        assert!(next_start(0, 100, 50, &[region(30, 40), region(10, 20)]).is_err());
        assert!(next_start(10, 100, 50, &[region(0, 20)]).is_err());
        assert!(next_start(0, 100, 100, &[region(90, 110)]).is_err());
        assert!(
            next_start(0, 100, 30, &[region(10, 40)]).is_err(),
            "walked less than it found"
        );
        assert!(next_start(0, 100, 100, &[region(20, 20)]).is_err());
    }
}
