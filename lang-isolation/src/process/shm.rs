//! A runner's shared-memory region: a memfd mapped `MAP_SHARED` by the host
//! and by the runner, laid out as in [`super::protocol`]. The runner closes
//! its fd as soon as the region is mapped (a writable fd it kept could be
//! mapped executable).

use super::protocol::{HEADER_BYTES, Header, Layout, MAGIC, PROTOCOL_VERSION};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

/// A mapped region. Both processes may write it at any time, so it is only
/// accessed through the header's atomics and raw byte copies.
#[derive(Debug)]
pub struct SharedRegion {
    /// The memfd (host side only; the runner closes its copy once mapped).
    fd: Option<OwnedFd>,
    base: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the region is plain shared memory accessed only through atomics and
// raw copies; the owner may move between threads.
unsafe impl Send for SharedRegion {}
// SAFETY: as above; `&self` methods only use atomics and raw copies.
unsafe impl Sync for SharedRegion {}

impl SharedRegion {
    /// Creates a region (close-on-exec memfd) for `layout` and fills in the
    /// header's constant fields.
    pub fn create(layout: Layout, heap_limit_bytes: usize, stack_bytes: usize) -> io::Result<Self> {
        // SAFETY: a NUL-terminated name and valid flags.
        let raw = unsafe { libc::memfd_create(c"microfaas-runner".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(layout.total)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "region too large"))?;
        // SAFETY: resizing our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let base = Self::map(fd.as_fd(), layout.total)?;
        let region = Self {
            fd: Some(fd),
            base,
            layout,
        };
        let h = region.header();
        let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        h.input_capacity.store(as_u64(layout.input_capacity), Ordering::Relaxed);
        h.output_capacity
            .store(as_u64(layout.output_capacity), Ordering::Relaxed);
        h.heap_limit_bytes.store(as_u64(heap_limit_bytes), Ordering::Relaxed);
        h.stack_bytes.store(as_u64(stack_bytes), Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Relaxed);
        h.version.store(PROTOCOL_VERSION, Ordering::Release);
        Ok(region)
    }

    /// Maps an inherited region (runner side): checks its size, magic and
    /// version, derives the layout from the header, and closes `fd`.
    pub fn open(fd: OwnedFd) -> io::Result<Self> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        // SAFETY: lseek on an fd we own only moves its (unused) offset.
        let end = unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_END) };
        let file_size = usize::try_from(end).map_err(|_| io::Error::last_os_error())?;
        if file_size < HEADER_BYTES {
            return Err(bad("region smaller than its header"));
        }
        let header_layout = Layout::new(0, 0).ok_or_else(|| bad("layout"))?;
        let header_only = Self {
            fd: None,
            base: Self::map(fd.as_fd(), header_layout.total)?,
            layout: header_layout,
        };
        let h = header_only.header();
        if h.magic.load(Ordering::Acquire) != MAGIC || h.version.load(Ordering::Acquire) != PROTOCOL_VERSION {
            return Err(bad("region magic or version mismatch"));
        }
        let cap = |v: u64| usize::try_from(v).map_err(|_| bad("capacity"));
        let layout = Layout::new(
            cap(h.input_capacity.load(Ordering::Relaxed))?,
            cap(h.output_capacity.load(Ordering::Relaxed))?,
        )
        .ok_or_else(|| bad("capacities overflow"))?;
        if layout.total > file_size {
            return Err(bad("region smaller than its layout"));
        }
        drop(header_only);
        let base = Self::map(fd.as_fd(), layout.total)?;
        drop(fd);
        Ok(Self { fd: None, base, layout })
    }

    fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<NonNull<u8>> {
        // SAFETY: mapping `len` bytes of a memfd at least that large at a
        // kernel-chosen address: no existing object is aliased.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))
    }

    /// The layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The memfd (host side, to hand to a runner; `None` in the runner).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(AsFd::as_fd)
    }

    /// The header.
    pub fn header(&self) -> &Header {
        // SAFETY: the mapping is at least HEADER_BYTES long, page aligned,
        // lives as long as `self`, and the header consists of atomics only,
        // so concurrent writes by the other process are not data races.
        unsafe { &*self.base.as_ptr().cast::<Header>() }
    }

    /// Copies `bytes` into the input buffer. Panics never: the caller checks
    /// the capacity.
    pub fn write_input(&self, bytes: &[u8]) -> Result<(), usize> {
        if bytes.len() > self.layout.input_capacity {
            return Err(self.layout.input_capacity);
        }
        // SAFETY: the input buffer spans `input_capacity` bytes inside the
        // mapping (Layout), which holds `bytes.len()`.
        unsafe { copy_in(self.base.as_ptr().add(self.layout.input_offset), bytes) };
        Ok(())
    }

    /// Copies `bytes` into the output buffer (runner side).
    pub fn write_output(&self, bytes: &[u8]) -> Result<(), usize> {
        if bytes.len() > self.layout.output_capacity {
            return Err(self.layout.output_capacity);
        }
        // SAFETY: as in `write_input`, for the output buffer.
        unsafe { copy_in(self.base.as_ptr().add(self.layout.output_offset), bytes) };
        Ok(())
    }

    /// The first `len` bytes of the input buffer (runner side; `len` checked
    /// against the capacity).
    pub fn input(&self, len: usize) -> Option<&[u8]> {
        if len > self.layout.input_capacity {
            return None;
        }
        // SAFETY: in bounds (checked); the host does not write the input
        // buffer while a request is in flight (protocol), and u8 has no
        // invalid values.
        Some(unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(self.layout.input_offset), len) })
    }

    /// Copies the first `len` bytes of the output buffer out (host side;
    /// `len` checked against the capacity).
    pub fn read_output(&self, len: usize) -> Option<Vec<u8>> {
        if len > self.layout.output_capacity {
            return None;
        }
        let mut out = Vec::with_capacity(len);
        // SAFETY: in bounds (checked); `out` has room for `len` bytes. The
        // child could still scribble on the buffer: we copy raw bytes, so a
        // torn copy is only wrong data, never undefined values.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.as_ptr().add(self.layout.output_offset), out.as_mut_ptr(), len);
            out.set_len(len);
        }
        Some(out)
    }
}

/// # Safety
/// `dst` must be valid for `bytes.len()` writes, not overlapping `bytes`.
unsafe fn copy_in(dst: *mut u8, bytes: &[u8]) {
    // SAFETY: caller contract.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped; references handed out
        // borrow `self`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.layout.total);
        }
    }
}
