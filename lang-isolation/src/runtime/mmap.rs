//! Private memory mappings owned by the runtime (heaps, stacks, and the
//! reservations function images are mapped into).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// The system page size in bytes.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// Rounds `len` up to a whole number of pages; `None` on overflow.
pub fn round_up_to_page(len: usize) -> Option<usize> {
    let page = page_size();
    len.checked_add(page - 1).map(|l| l & !(page - 1))
}

/// An owned anonymous mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned exclusively by this value; moving
// the owner to another thread moves the only handle to it.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Reserves `len` bytes (rounded up to pages) of private anonymous memory
    /// with `prot`, without reserving swap (`MAP_NORESERVE`): pages cost
    /// nothing until first touched.
    pub fn anonymous(len: usize, prot: libc::c_int) -> io::Result<Self> {
        let len = round_up_to_page(len.max(1))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "mapping size overflows"))?;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks
        // aliases no existing Rust object.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len })
    }

    /// First byte of the mapping.
    pub fn start(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Address of the first byte.
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr().addr()
    }

    /// Length in bytes (whole pages, never zero).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Changes the protection of `[offset, offset + len)`, page aligned.
    pub fn protect(&self, offset: usize, len: usize, prot: libc::c_int) -> io::Result<()> {
        self.check_range(offset, len)?;
        // SAFETY: the range lies inside this mapping (checked above), which
        // this value owns; no Rust reference into it is live across the call
        // that the new protection could invalidate (callers protect only
        // memory they have not handed out).
        let rc = unsafe { libc::mprotect(self.start().add(offset).cast(), len, prot) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Maps `len` bytes of `fd` from `file_offset` over `[offset, offset +
    /// len)` of this mapping (`MAP_PRIVATE | MAP_FIXED`, page aligned), with
    /// `prot`. Writes stay private to this process.
    pub fn map_file_fixed(
        &self,
        offset: usize,
        len: usize,
        prot: libc::c_int,
        fd: BorrowedFd<'_>,
        file_offset: u64,
    ) -> io::Result<()> {
        self.check_range(offset, len)?;
        let file_offset = libc::off_t::try_from(file_offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset too large"))?;
        // SAFETY: the range lies inside this mapping (checked above), which
        // this value owns; the pages replaced there are not referenced by any
        // Rust object (callers map into a fresh reservation).
        let p = unsafe {
            libc::mmap(
                self.start().add(offset).cast(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                fd.as_raw_fd(),
                file_offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Replaces `[offset, offset + len)` (page aligned) with fresh private
    /// anonymous zero pages with `prot`.
    pub fn map_anonymous_fixed(&self, offset: usize, len: usize, prot: libc::c_int) -> io::Result<()> {
        self.check_range(offset, len)?;
        // SAFETY: as in `map_file_fixed`.
        let p = unsafe {
            libc::mmap(
                self.start().add(offset).cast(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Gives the pages of `[offset, offset + len)` back to the kernel; they
    /// read as zero afterwards (anonymous pages) or as the file's again
    /// (private file mappings).
    pub fn discard(&self, offset: usize, len: usize) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check_range(offset, len)?;
        // SAFETY: the range lies inside this private anonymous mapping; the
        // caller guarantees nothing live is stored there (the heap was reset).
        let rc = unsafe { libc::madvise(self.start().add(offset).cast(), len, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Faults in `[offset, offset + len)` for writing (`MADV_POPULATE_WRITE`:
    /// a private file mapping's pages become private copies now, not at
    /// the first write).
    pub fn populate_write(&self, offset: usize, len: usize) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check_range(offset, len)?;
        // SAFETY: the range lies inside this mapping; populating changes no
        // byte a Rust object could observe (only when pages are allocated).
        let rc = unsafe { libc::madvise(self.start().add(offset).cast(), len, libc::MADV_POPULATE_WRITE) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn check_range(&self, offset: usize, len: usize) -> io::Result<()> {
        let page = page_size();
        let end = offset.checked_add(len);
        if !offset.is_multiple_of(page) || !len.is_multiple_of(page) || end.is_none_or(|e| e > self.len) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "range outside the mapping"));
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region this value mapped; it owns it
        // and nothing borrows from it past the owner's lifetime.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}
