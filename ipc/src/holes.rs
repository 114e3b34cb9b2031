//! Which parts of a file hold data: `lseek(SEEK_DATA / SEEK_HOLE)`, which
//! walks the file's page index and skips holes (a memfd's or a sparse
//! snapshot image's), a few system calls where checking every page
//! (`mincore`, reading) costs one lookup per page. A file system that cannot
//! tell reports one run, everything. Only the returned offsets are used,
//! never the file position (which other users of an open file share), so
//! concurrent calls are fine.

use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The runs of `range` (byte offsets of `file`) that hold data, widened to
/// whole pages of `page` bytes and clipped to `range`, ascending and not
/// overlapping. An answer of the kernel that does not advance is an error,
/// never a silently shorter list.
pub fn data_runs(file: BorrowedFd<'_>, range: Range<u64>, page: u64) -> io::Result<Vec<Range<u64>>> {
    let bad = || io::Error::from_raw_os_error(libc::EIO);
    let page = page.max(1);
    let seek = |at: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let at = libc::off_t::try_from(at).map_err(|_| bad())?;
        // SAFETY: lseek on a descriptor the caller lends reads no memory;
        // only the returned offset is used.
        let r = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // No data at or after `at`.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        u64::try_from(r).map(Some).map_err(|_| bad())
    };
    let mut runs: Vec<Range<u64>> = Vec::new();
    let mut at = range.start;
    while at < range.end {
        let Some(data) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        if data >= range.end {
            break;
        }
        // A file's end is a hole: SEEK_HOLE always answers.
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(range.end).min(range.end);
        if hole <= data {
            return Err(bad());
        }
        let start = (data - data % page).max(range.start);
        let end = hole.div_ceil(page).saturating_mul(page).min(range.end);
        match runs.last_mut() {
            Some(last) if last.end >= start => last.end = last.end.max(end),
            _ => runs.push(start..end),
        }
        at = hole;
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    use std::os::unix::fs::FileExt;

    #[test]
    fn the_runs_are_the_pages_written() {
        // SAFETY: a NUL-terminated name; the fd is owned below.
        let raw = unsafe { libc::memfd_create(c"holes-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh fd nothing else owns.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        file.set_len(64 * 4096).unwrap();
        assert_eq!(data_runs(file.as_fd(), 0..64 * 4096, 4096).unwrap(), vec![]);
        file.write_all_at(b"x", 10).unwrap();
        file.write_all_at(&[1u8; 5000], 5 * 4096).unwrap();
        file.write_all_at(b"y", 64 * 4096 - 1).unwrap();
        assert_eq!(
            data_runs(file.as_fd(), 0..64 * 4096, 4096).unwrap(),
            vec![0..4096, 5 * 4096..7 * 4096, 63 * 4096..64 * 4096]
        );
        // Part of the file: clipped to the range asked.
        assert_eq!(
            data_runs(file.as_fd(), 6 * 4096..63 * 4096, 4096).unwrap(),
            vec![6 * 4096..7 * 4096]
        );
    }
}
