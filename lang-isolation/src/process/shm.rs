//! A runner's shared-memory region: a memfd mapped `MAP_SHARED` by the host
//! and by the runner, laid out as in [`super::protocol`]. The runner closes
//! its fd as soon as the region is mapped (a writable fd it kept could be
//! mapped executable).

use super::protocol::{HEADER_BYTES, Header, Layout, MAGIC, PROTOCOL_VERSION};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;

/// A mapped region (an `ipc` [`ipc::region::SharedRegion`] with this
/// protocol's layout). Both processes may write it at any time, so it is
/// only accessed through the header's atomics and raw byte copies.
#[derive(Debug)]
pub struct SharedRegion {
    map: ipc::region::SharedRegion,
    layout: Layout,
}

impl SharedRegion {
    /// Creates a region (close-on-exec memfd) for `layout` and fills in the
    /// header's constant fields.
    pub fn create(layout: Layout, heap_limit_bytes: usize, stack_bytes: usize) -> io::Result<Self> {
        let map = ipc::region::SharedRegion::create("microfaas-runner", layout.total)?;
        let region = Self { map, layout };
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
        let map = ipc::region::SharedRegion::from_fd_any_size(fd, HEADER_BYTES)?;
        let header_layout = Layout::new(0, 0).ok_or_else(|| bad("layout"))?;
        let mut region = Self {
            map,
            layout: header_layout,
        };
        let h = region.header();
        if h.magic.load(Ordering::Acquire) != MAGIC || h.version.load(Ordering::Acquire) != PROTOCOL_VERSION {
            return Err(bad("region magic or version mismatch"));
        }
        let cap = |v: u64| usize::try_from(v).map_err(|_| bad("capacity"));
        let layout = Layout::new(
            cap(h.input_capacity.load(Ordering::Relaxed))?,
            cap(h.output_capacity.load(Ordering::Relaxed))?,
        )
        .ok_or_else(|| bad("capacities overflow"))?;
        if layout.total > region.map.len() {
            return Err(bad("region smaller than its layout"));
        }
        region.layout = layout;
        Ok(region)
    }

    /// The layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The memfd (host side, to hand to a runner; `None` in the runner).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.map.fd()
    }

    /// The header.
    pub fn header(&self) -> &Header {
        // SAFETY: the mapping is at least HEADER_BYTES long, page aligned,
        // lives as long as `self`, and the header consists of atomics only,
        // so concurrent writes by the other process are not data races.
        unsafe { &*self.map.as_ptr().cast::<Header>() }
    }

    /// Copies `bytes` into the input buffer. Panics never: the caller checks
    /// the capacity.
    pub fn write_input(&self, bytes: &[u8]) -> Result<(), usize> {
        if bytes.len() > self.layout.input_capacity {
            return Err(self.layout.input_capacity);
        }
        // SAFETY: the input buffer spans `input_capacity` bytes inside the
        // mapping (Layout), which holds `bytes.len()`.
        unsafe { copy_in(self.map.as_ptr().add(self.layout.input_offset), bytes) };
        Ok(())
    }

    /// Copies `bytes` into the output buffer (runner side).
    pub fn write_output(&self, bytes: &[u8]) -> Result<(), usize> {
        if bytes.len() > self.layout.output_capacity {
            return Err(self.layout.output_capacity);
        }
        // SAFETY: as in `write_input`, for the output buffer.
        unsafe { copy_in(self.map.as_ptr().add(self.layout.output_offset), bytes) };
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
        Some(unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(self.layout.input_offset), len) })
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
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(self.layout.output_offset), out.as_mut_ptr(), len);
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
