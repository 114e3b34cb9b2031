//! A memfd mapped `MAP_SHARED` (read-write, never executable) by a parent
//! and the child it hands the fd to: the one kind of shared memory of the
//! host's children (language workers, process runners, VMM host processes).
//!
//! Trust: both processes map the same object and either may write any byte
//! of it at any time. Whatever the less trusted side wrote is untrusted:
//! read it through atomics or raw copies, bounds-check every offset and
//! length taken from it, and never hand out a `&[u8]` into it that the other
//! side may change while it is borrowed unless a protocol says it will not.
//! The creator seals the memfd's size ([`SIZE_SEALS`]), so a child that kept
//! the fd cannot shrink the object under the parent's mapping (which would
//! turn the parent's next access into a `SIGBUS`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// Seals every region gets at creation: its size is fixed for good.
pub const SIZE_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Why a region could not be created or mapped.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The name holds a NUL byte.
    #[error("region name {0:?} holds a NUL byte")]
    Name(String),
    /// A zero-byte region was asked for.
    #[error("a shared region must not be empty")]
    Empty,
    /// The size does not fit an `off_t` or the address space.
    #[error("a shared region of {0} bytes is too large")]
    TooLarge(u64),
    /// `memfd_create` failed.
    #[error("creating the memfd")]
    Create(#[source] io::Error),
    /// Sizing the memfd failed.
    #[error("sizing the memfd to {bytes} bytes")]
    Size {
        /// The size asked for.
        bytes: usize,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Sealing the memfd failed.
    #[error("sealing the memfd")]
    Seal(#[source] io::Error),
    /// `fstat` on an inherited fd failed.
    #[error("reading the size of the inherited region")]
    Stat(#[source] io::Error),
    /// The inherited object is not the size the protocol says.
    #[error("shared region is {actual} bytes, expected {expected}")]
    WrongSize {
        /// Its size (`fstat`).
        actual: u64,
        /// The size expected.
        expected: usize,
    },
    /// `mmap` failed.
    #[error("mapping the region")]
    Map(#[source] io::Error),
}

impl From<RegionError> for io::Error {
    fn from(e: RegionError) -> Self {
        let kind = match &e {
            RegionError::Name(_) | RegionError::Empty | RegionError::TooLarge(_) => io::ErrorKind::InvalidInput,
            RegionError::WrongSize { .. } => io::ErrorKind::InvalidData,
            RegionError::Create(s) | RegionError::Seal(s) | RegionError::Stat(s) | RegionError::Map(s) => s.kind(),
            RegionError::Size { source, .. } => source.kind(),
        };
        io::Error::new(kind, e)
    }
}

/// One shared mapping of a whole memfd. Dropping it unmaps it (and closes
/// the fd if it still holds one).
#[derive(Debug)]
pub struct SharedRegion {
    base: NonNull<u8>,
    len: usize,
    /// The memfd: kept by the creator (to hand to a child); closed by
    /// [`SharedRegion::from_fd`] once mapped.
    fd: Option<OwnedFd>,
}

// SAFETY: the region is plain shared memory; the value only holds its
// address, length and fd, and hands out raw pointers whose use the callers
// answer for. Moving it between threads changes nothing.
unsafe impl Send for SharedRegion {}
// SAFETY: `&self` methods only read the immutable address, length and fd.
unsafe impl Sync for SharedRegion {}

impl SharedRegion {
    /// Creates a zero-filled region of `bytes` bytes backed by a new
    /// close-on-exec memfd named `name` (visible in `/proc/PID/fd`), its
    /// size sealed ([`SIZE_SEALS`]).
    pub fn create(name: &str, bytes: usize) -> Result<Self, RegionError> {
        if bytes == 0 {
            return Err(RegionError::Empty);
        }
        let too_large = || RegionError::TooLarge(u64::try_from(bytes).unwrap_or(u64::MAX));
        isize::try_from(bytes).map_err(|_| too_large())?;
        let size = libc::off_t::try_from(bytes).map_err(|_| too_large())?;
        let cname = CString::new(name).map_err(|_| RegionError::Name(name.to_owned()))?;
        // SAFETY: a valid NUL-terminated name and valid flags; the fd
        // returned is owned below.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if raw < 0 {
            return Err(RegionError::Create(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: resizing our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(RegionError::Size {
                bytes,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: adding seals to our own memfd (created with
        // MFD_ALLOW_SEALING); no memory is involved.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SIZE_SEALS) } != 0 {
            return Err(RegionError::Seal(io::Error::last_os_error()));
        }
        let base = map(fd.as_fd(), bytes)?;
        Ok(Self {
            base,
            len: bytes,
            fd: Some(fd),
        })
    }

    /// Maps an inherited region (child side) that must be exactly
    /// `expected_bytes` long (checked with `fstat`), then closes `fd`: a
    /// writable memfd a sandboxed child kept could be mapped again, even
    /// executable.
    pub fn from_fd(fd: OwnedFd, expected_bytes: usize) -> Result<Self, RegionError> {
        let mut region = Self::from_fd_keeping(fd, expected_bytes)?;
        region.fd = None;
        Ok(region)
    }

    /// As [`SharedRegion::from_fd`], but keeps the fd (for a side that
    /// hands it on).
    pub fn from_fd_keeping(fd: OwnedFd, expected_bytes: usize) -> Result<Self, RegionError> {
        let actual = fd_size(fd.as_fd())?;
        if expected_bytes == 0 || u64::try_from(expected_bytes).ok() != Some(actual) {
            return Err(RegionError::WrongSize {
                actual,
                expected: expected_bytes,
            });
        }
        let base = map(fd.as_fd(), expected_bytes)?;
        Ok(Self {
            base,
            len: expected_bytes,
            fd: Some(fd),
        })
    }

    /// Maps an inherited region of whatever size it has (at least
    /// `min_bytes`), for protocols whose header says how large the region
    /// is; closes `fd`. The caller checks the header against [`Self::len`].
    pub fn from_fd_any_size(fd: OwnedFd, min_bytes: usize) -> Result<Self, RegionError> {
        let actual = fd_size(fd.as_fd())?;
        let len = usize::try_from(actual).map_err(|_| RegionError::TooLarge(actual))?;
        isize::try_from(len).map_err(|_| RegionError::TooLarge(actual))?;
        if len == 0 || len < min_bytes {
            return Err(RegionError::WrongSize {
                actual,
                expected: min_bytes,
            });
        }
        let base = map(fd.as_fd(), len)?;
        drop(fd);
        Ok(Self { base, len, fd: None })
    }

    /// Start of the mapping (page aligned). Everything behind it may be
    /// written by the other process at any time (see the module doc).
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a region is never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The memfd, while this side holds it (the creator; `None` after
    /// [`SharedRegion::from_fd`]).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(AsFd::as_fd)
    }

    /// Closes this side's fd (the mapping stays).
    pub fn close_fd(&mut self) {
        self.fd = None;
    }

    /// A pointer to `bytes` bytes at `offset`, if they lie inside the
    /// region (checked arithmetic: use for offsets and lengths read from
    /// the region itself).
    pub fn range(&self, offset: usize, bytes: usize) -> Option<*mut u8> {
        let end = offset.checked_add(bytes)?;
        if end > self.len {
            return None;
        }
        // SAFETY: `offset <= end <= len`: inside (or one past) the mapping.
        Some(unsafe { self.base.as_ptr().add(offset) })
    }

    /// Gives the pages of `bytes` bytes at `offset` back to the kernel
    /// (`MADV_REMOVE`: they then read as zero on both sides). Ranges
    /// outside the region are ignored; `offset` must be page aligned for
    /// the call to do anything.
    pub fn discard(&self, offset: usize, bytes: usize) {
        if let Some(p) = self.range(offset, bytes) {
            // SAFETY: the range lies inside the mapping; MADV_REMOVE frees
            // the memfd's pages there and touches no Rust object (the
            // contents are only ever accessed through raw pointers).
            unsafe { libc::madvise(p.cast(), bytes, libc::MADV_REMOVE) };
        }
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this value made; everything
        // derived from it borrows `self` or is a raw pointer whose users
        // answer for its lifetime.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

fn fd_size(fd: BorrowedFd<'_>) -> Result<u64, RegionError> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes only the stat buffer, which is large enough.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(RegionError::Stat(io::Error::last_os_error()));
    }
    // SAFETY: fstat succeeded and filled the buffer.
    let st = unsafe { st.assume_init() };
    u64::try_from(st.st_size).map_err(|_| RegionError::Stat(io::Error::other("negative size")))
}

fn map(fd: BorrowedFd<'_>, len: usize) -> Result<NonNull<u8>, RegionError> {
    // SAFETY: a fresh shared mapping of `len` bytes of a file at least that
    // long (checked or set by the callers) at a kernel-chosen address: it
    // aliases no Rust object; never executable.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(RegionError::Map(io::Error::last_os_error()));
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(|| RegionError::Map(io::Error::other("mmap returned null")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dup(r: &SharedRegion) -> OwnedFd {
        r.fd().unwrap().try_clone_to_owned().unwrap()
    }

    #[test]
    fn both_mappings_see_each_others_writes() {
        let a = SharedRegion::create("ipc-test", 3 * 4096).unwrap();
        let b = SharedRegion::from_fd(dup(&a), 3 * 4096).unwrap();
        assert!(b.fd().is_none());
        assert_eq!(a.as_ptr().addr() % 4096, 0);
        // SAFETY: byte 5000 lies inside both mappings of the same object.
        unsafe { a.as_ptr().add(5000).write(0x5a) };
        // SAFETY: as above.
        assert_eq!(unsafe { b.as_ptr().add(5000).read() }, 0x5a);
        a.discard(4096, 4096);
        // SAFETY: as above; the page was removed and reads as zero.
        assert_eq!(unsafe { b.as_ptr().add(5000).read() }, 0);
    }

    #[test]
    fn wrong_sizes_are_refused() {
        let a = SharedRegion::create("ipc-test", 8192).unwrap();
        for expected in [0, 4096, 8193, 1 << 20] {
            match SharedRegion::from_fd(dup(&a), expected) {
                Err(RegionError::WrongSize { actual: 8192, .. }) => {}
                other => panic!("{expected}: {other:?}"),
            }
        }
        assert!(matches!(
            SharedRegion::from_fd_any_size(dup(&a), 8193),
            Err(RegionError::WrongSize { .. })
        ));
        assert_eq!(SharedRegion::from_fd_any_size(dup(&a), 100).unwrap().len(), 8192);
        let mut kept = SharedRegion::from_fd_keeping(dup(&a), 8192).unwrap();
        assert!(kept.fd().is_some());
        kept.close_fd();
        assert!(kept.fd().is_none());
        assert!(matches!(SharedRegion::create("x", 0), Err(RegionError::Empty)));
        assert!(matches!(SharedRegion::create("x\0y", 1), Err(RegionError::Name(_))));
        assert!(matches!(
            SharedRegion::create("x", usize::MAX),
            Err(RegionError::TooLarge(_))
        ));
    }

    #[test]
    fn the_size_is_sealed() {
        let a = SharedRegion::create("ipc-test", 8192).unwrap();
        let fd = dup(&a);
        for len in [0, 4096, 16384] {
            // SAFETY: resizing a memfd we hold; the seals must refuse it.
            assert_ne!(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }, 0);
        }
        // SAFETY: F_GET_SEALS only reads the fd's seals.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(seals & SIZE_SEALS, SIZE_SEALS);
    }

    #[test]
    fn range_is_bounds_checked() {
        let a = SharedRegion::create("ipc-test", 4096).unwrap();
        assert!(a.range(0, 4096).is_some());
        assert!(a.range(4096, 0).is_some());
        assert!(a.range(1, 4096).is_none());
        assert!(a.range(usize::MAX, 2).is_none());
    }

    #[test]
    fn the_mapping_is_not_executable() {
        let a = SharedRegion::create("ipc-test", 4096).unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let start = format!("{:x}-", a.as_ptr().addr());
        let line = maps.lines().find(|l| l.starts_with(&start)).unwrap();
        assert!(line.contains("rw-s"), "{line}");
        assert!(line.contains("memfd:ipc-test"), "{line}");
    }
}
