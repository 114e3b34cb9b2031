//! The channel slab: every instance's mailbox page and I/O window live in
//! one shared memory file (a memfd) per process and window size, cut into
//! fixed-size slots `[control page | mailbox page | I/O window]`; the
//! mailbox page and the I/O window are each their own KVM
//! memory slot (guest-physical [`MAILBOX_ADDR`] and `layout.io_addr`, as
//! before) pointing into one mapping of the file; the control page
//! ([`Control`]: the runner's report and its futex word, the kill flag) is
//! never guest-mapped. The caller side of an
//! instance (publish a request, wait for its reply, read it) touches only
//! its slot, so it can live in another process that maps the same file;
//! everything the guest can write there is checked by the caller
//! ([`crate::channel`]) before use.
//!
//! A VMM host process's pre-made VM shells register their channel memory
//! slots over a reservation before they know their slot; a restore maps
//! the slot's mailbox page and window there (a second, shared mapping of
//! the same file: [`SlabSlot::map_guest_view`]) instead of changing the
//! memory slots.
//!
//! One mapping serves all the slots (not one per instance), and a freed
//! slot's pages go back to the kernel (`MADV_REMOVE`, which also zeroes
//! them) before the slot is reused.

use guest_abi::{MAILBOX_ADDR, PAGE_BYTES};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion, mmap::MmapRegionBuilder};

/// Virtual address space reserved for one slab (sparse: only touched
/// pages use memory).
const RESERVE_BYTES: u64 = 512 << 30;

/// Creating or cutting the slab failed.
#[derive(Debug, thiserror::Error)]
pub enum SlabError {
    /// `memfd_create`, `ftruncate` or `mmap` failed.
    #[error("{op} for the channel slab")]
    Os {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Every slot is taken.
    #[error("the channel slab is full ({slots} slots of {stride} bytes)")]
    Full {
        /// Slots in the slab.
        slots: usize,
        /// Bytes per slot.
        stride: usize,
    },
    /// The window size gives no slot layout.
    #[error("an I/O window of {0} bytes does not fit a slab slot")]
    BadWindow(u64),
    /// vm-memory refused a region.
    #[error("building a channel region: {0}")]
    Region(String),
}

/// The control block at the start of every slot: written by the caller
/// (`kill`) and by the side running the VM (the report), never by the
/// guest. Each side treats what the other wrote as untrusted.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Control {
    /// Bumped after each report (the caller's futex word).
    pub report_seq: AtomicU32,
    /// The report's kind ([`crate::report`]).
    pub kind: AtomicU32,
    /// Its argument (a sequence number, a code).
    pub arg: AtomicU64,
    /// Its payload (a fault's fields).
    pub words: [AtomicU64; 7],
    /// Non-zero: the caller gave the instance up; the VM side stops it.
    pub kill: AtomicU32,
    /// The report's write generation: odd while a report is being written
    /// (a seqlock, so a caller never takes half of one report and half of
    /// the next; see [`crate::report`]).
    pub writing: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<Control>() as u64 <= PAGE_BYTES);

/// Where slot `index` lies in the slab, in bytes from its start:
/// (control page, mailbox page, I/O window).
pub fn slot_offsets(index: usize, stride: usize) -> Option<(usize, usize, usize)> {
    let base = index.checked_mul(stride)?;
    let page = usize::try_from(PAGE_BYTES).ok()?;
    Some((base, base.checked_add(page)?, base.checked_add(2 * page)?))
}

/// Bytes per slot for an `io_bytes` window (the window page-aligned).
pub fn slot_stride(io_bytes: u64) -> Option<usize> {
    if io_bytes == 0 || !io_bytes.is_multiple_of(PAGE_BYTES) {
        return None;
    }
    usize::try_from(io_bytes.checked_add(2 * PAGE_BYTES)?).ok()
}

#[derive(Debug, Default)]
struct Free {
    free: Vec<usize>,
    next: usize,
}

/// One process's slab for one window size.
#[derive(Debug)]
pub struct Slab {
    /// The memory file (to map a slot's guest view, [`SlabSlot::map_guest_view`]).
    file: File,
    /// Made here (its file may be handed on, [`Slab::fd`]), not received.
    made_here: bool,
    base: NonNull<u8>,
    reserved: usize,
    stride: usize,
    io_bytes: u64,
    slots: usize,
    free: Mutex<Free>,
}

// SAFETY: `base` is the start of a shared mapping this value owns and
// unmaps only on drop; access to slot memory goes through vm-memory's
// volatile, bounds-checked accessors.
unsafe impl Send for Slab {}
// SAFETY: as above.
unsafe impl Sync for Slab {}

impl Slab {
    /// Creates a slab for windows of `io_bytes`, with as many slots as fit
    /// the address space reserved for one.
    pub fn new(io_bytes: u64) -> Result<Arc<Self>, SlabError> {
        let stride = slot_stride(io_bytes).ok_or(SlabError::BadWindow(io_bytes))?;
        Self::with_slots(io_bytes, usize::try_from(RESERVE_BYTES).unwrap_or(usize::MAX) / stride)
    }

    /// Creates a slab of `slots` slots for windows of `io_bytes` (e.g. one
    /// a VMM host process maps: [`Slab::from_fd`]).
    pub fn with_slots(io_bytes: u64, slots: usize) -> Result<Arc<Self>, SlabError> {
        let stride = slot_stride(io_bytes).ok_or(SlabError::BadWindow(io_bytes))?;
        let os = |op| move |source| SlabError::Os { op, source };
        // SAFETY: a NUL-terminated name and valid flags; the fd returned is
        // owned by the `OwnedFd` made right after.
        let fd = unsafe { libc::memfd_create(c"microfaas-channel-slab".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(os("memfd_create")(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh fd nobody else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let reserved = slots.checked_mul(stride).ok_or(SlabError::BadWindow(io_bytes))?;
        file.set_len(u64::try_from(reserved).unwrap_or(u64::MAX))
            .map_err(os("ftruncate"))?;
        Self::map(file, io_bytes, slots, true)
    }

    /// Maps a slab made by another process (its memory file, received on a
    /// socket): `slots` slots for windows of `io_bytes`; the file must be
    /// at least that large.
    pub fn from_fd(file: File, io_bytes: u64, slots: usize) -> Result<Arc<Self>, SlabError> {
        let stride = slot_stride(io_bytes).ok_or(SlabError::BadWindow(io_bytes))?;
        let reserved = slots.checked_mul(stride).ok_or(SlabError::BadWindow(io_bytes))?;
        // Its size by seeking to its end (a sandboxed VMM host process has
        // no stat calls).
        let size = {
            use std::io::Seek;
            let mut f = &file;
            f.seek(std::io::SeekFrom::End(0))
                .map_err(|source| SlabError::Os { op: "lseek", source })?
        };
        if size < u64::try_from(reserved).unwrap_or(u64::MAX) {
            return Err(SlabError::BadWindow(io_bytes));
        }
        // Kept open: a slot's guest view is a second mapping of it
        // (`SlabSlot::map_guest_view`).
        Self::map(file, io_bytes, slots, false)
    }

    fn map(file: File, io_bytes: u64, slots: usize, keep: bool) -> Result<Arc<Self>, SlabError> {
        use std::os::fd::AsRawFd;
        let stride = slot_stride(io_bytes).ok_or(SlabError::BadWindow(io_bytes))?;
        let os = |op| move |source| SlabError::Os { op, source };
        let reserved = slots.checked_mul(stride).ok_or(SlabError::BadWindow(io_bytes))?;
        let fd = file.as_raw_fd();
        // SAFETY: a fresh shared mapping of our own file; no existing memory
        // is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserved,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(os("mmap")(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(raw.cast::<u8>()).ok_or_else(|| os("mmap")(std::io::Error::other("null")))?;
        Ok(Arc::new(Self {
            file,
            made_here: keep,
            base,
            reserved,
            stride,
            io_bytes,
            slots,
            free: Mutex::new(Free::default()),
        }))
    }

    /// The slab's memory file (to map it in another process; `None` in a
    /// process that mapped one it was given).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.made_here.then(|| self.file.as_fd())
    }

    /// Bytes per slot.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.free.lock().map_or(0, |f| f.next - f.free.len())
    }

    /// Slots in the slab.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The slot at `index`, for the process that maps a slab another made
    /// and is told which slot to use (it must not hold two views of one
    /// slot; dropping this one clears the slot's pages).
    pub fn slot_at(self: &Arc<Self>, index: usize) -> Result<SlabSlot, SlabError> {
        if index >= self.slots {
            return Err(SlabError::Full {
                slots: self.slots,
                stride: self.stride,
            });
        }
        let mut slot = SlabSlot::new(Arc::clone(self), index)?;
        slot.listed = false;
        Ok(slot)
    }

    /// Takes a free (zeroed) slot.
    pub fn take(self: &Arc<Self>) -> Result<SlabSlot, SlabError> {
        let index = {
            let mut f = self.free.lock().map_err(|_| SlabError::Region("poisoned".into()))?;
            match f.free.pop() {
                Some(i) => i,
                None if f.next < self.slots => {
                    f.next += 1;
                    f.next - 1
                }
                None => {
                    return Err(SlabError::Full {
                        slots: self.slots,
                        stride: self.stride,
                    });
                }
            }
        };
        let slot = SlabSlot::new(Arc::clone(self), index);
        if slot.is_err()
            && let Ok(mut f) = self.free.lock()
        {
            f.free.push(index);
        }
        slot
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        // SAFETY: our mapping; every slot (and every memory slot pointing
        // into it) holds an `Arc` of the slab, so none is left.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.reserved) };
    }
}

/// One instance's slot: its mailbox page and I/O window.
#[derive(Debug)]
pub struct SlabSlot {
    // `mem` (which never unmaps) before the slab it points into.
    mem: GuestMemoryMmap,
    index: usize,
    control: *mut u8,
    mailbox: *mut u8,
    window: *mut u8,
    slab: Arc<Slab>,
    /// Taken from the free list (given back on drop).
    listed: bool,
    /// A second mapping of the mailbox page and the I/O window, where a
    /// pre-made VM shell's memory slots point ([`SlabSlot::map_guest_view`]);
    /// unmapped when the slot drops (after the VM).
    guest_view: Option<crate::memory::Reserved>,
}

// SAFETY: the raw pointers are into the slab's mapping, kept alive by the
// `Arc`; all access goes through `GuestMemoryMmap` (volatile, bounds-checked).
unsafe impl Send for SlabSlot {}
// SAFETY: as above.
unsafe impl Sync for SlabSlot {}

fn raw_region(ptr: *mut u8, len: usize) -> Result<MmapRegion, SlabError> {
    // SAFETY: `ptr..ptr + len` lies inside the slab's live shared mapping,
    // which outlives the region (the slot holds the slab); the region does
    // not own (or unmap) it.
    unsafe { MmapRegionBuilder::<()>::new(len).with_raw_mmap_pointer(ptr) }
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .build()
        .map_err(|e| SlabError::Region(e.to_string()))
}

impl SlabSlot {
    fn new(slab: Arc<Slab>, index: usize) -> Result<Self, SlabError> {
        let bad = || SlabError::Region("slot out of the slab".into());
        let (ctl_off, mb_off, win_off) = slot_offsets(index, slab.stride).ok_or_else(bad)?;
        if win_off.checked_add(usize::try_from(slab.io_bytes).map_err(|_| bad())?) > Some(slab.reserved) {
            return Err(bad());
        }
        // SAFETY: all three offsets are inside the reservation (checked
        // above: the window, the last part, ends inside it).
        let (control, mailbox, window) = unsafe {
            let base = slab.base.as_ptr();
            (base.add(ctl_off), base.add(mb_off), base.add(win_off))
        };
        let page = usize::try_from(PAGE_BYTES).map_err(|_| bad())?;
        // The I/O window joins at its guest address in `bind` (a shell's
        // slot is made before its layout is used).
        let mailbox_region =
            GuestRegionMmap::new(raw_region(mailbox, page)?, GuestAddress(MAILBOX_ADDR)).ok_or_else(bad)?;
        let mem = GuestMemoryMmap::from_regions(vec![mailbox_region]).map_err(|e| SlabError::Region(e.to_string()))?;
        Ok(Self {
            mem,
            index,
            control,
            mailbox,
            window,
            slab,
            listed: true,
            guest_view: None,
        })
    }

    /// Bytes of a slot's guest view: the mailbox page and the I/O window,
    /// adjacent in the slab (the layout [`slot_offsets`] gives).
    pub(crate) fn guest_view_bytes(io_bytes: u64) -> Option<usize> {
        usize::try_from(io_bytes.checked_add(PAGE_BYTES)?).ok()
    }

    /// Maps this slot's mailbox page and I/O window (shared, from the slab's
    /// file) over `range`, a reservation of [`SlabSlot::guest_view_bytes`]
    /// where a VM shell's channel memory slots already point, so that the
    /// guest reaches the slot without a memory slot change on the restore
    /// path. The slot keeps the mapping until it drops. On failure `range`
    /// is unmapped.
    pub(crate) fn map_guest_view(&mut self, range: crate::memory::Reserved) -> Result<(), SlabError> {
        use std::os::fd::AsRawFd;
        let os = |op| move |source| SlabError::Os { op, source };
        let len = Self::guest_view_bytes(self.slab.io_bytes).ok_or(SlabError::BadWindow(self.slab.io_bytes))?;
        if range.len() != len || self.guest_view.is_some() {
            return Err(SlabError::Region(
                "a guest view of the wrong size, or a second one".into(),
            ));
        }
        let (_, mb_off, _) = slot_offsets(self.index, self.slab.stride)
            .ok_or_else(|| SlabError::Region("slot out of the slab".into()))?;
        let offset = libc::off_t::try_from(mb_off).map_err(|_| SlabError::Region("slot out of the slab".into()))?;
        // SAFETY: `range` is a reservation this function owns (moved in),
        // so replacing its pages in place (MAP_FIXED) affects no other
        // mapping; the file range is this slot's mailbox page and window
        // (inside the file: the slab's size covers every slot), page
        // aligned (the stride is a page multiple); never executable.
        let raw = unsafe {
            libc::mmap(
                range.addr().as_ptr().cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
                self.slab.file.as_raw_fd(),
                offset,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(os("mmap (a slot's guest view)")(std::io::Error::last_os_error()));
        }
        self.guest_view = Some(range);
        Ok(())
    }

    /// Sets the guest address of the I/O window (the layout's `io_addr`),
    /// so [`SlabSlot::mem`] answers at the guest addresses.
    pub fn bind(&mut self, io_addr: u64) -> Result<(), SlabError> {
        let page = usize::try_from(PAGE_BYTES).map_err(|_| SlabError::BadWindow(self.slab.io_bytes))?;
        let io = usize::try_from(self.slab.io_bytes).map_err(|_| SlabError::BadWindow(self.slab.io_bytes))?;
        let bad = || SlabError::Region("overlapping channel regions".into());
        self.mem = GuestMemoryMmap::from_regions(vec![
            GuestRegionMmap::new(raw_region(self.mailbox, page)?, GuestAddress(MAILBOX_ADDR)).ok_or_else(bad)?,
            GuestRegionMmap::new(raw_region(self.window, io)?, GuestAddress(io_addr)).ok_or_else(bad)?,
        ])
        .map_err(|e| SlabError::Region(e.to_string()))?;
        Ok(())
    }

    /// The mailbox page and (once bound) the I/O window at their guest
    /// addresses.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The slot's control block.
    pub fn control(&self) -> &Control {
        // SAFETY: `control` is the page-aligned start of this slot's control
        // page inside the slab's live mapping (kept by `self.slab`); every
        // field of `Control` is an atomic, valid for any bytes, and all
        // access to the page goes through these atomics.
        unsafe { &*self.control.cast::<Control>() }
    }

    /// Host address of the mailbox page (a memory slot's `userspace_addr`).
    pub fn mailbox_host_addr(&self) -> u64 {
        self.mailbox as u64
    }

    /// Host address of the I/O window.
    pub fn window_host_addr(&self) -> u64 {
        self.window as u64
    }

    /// The runs (first page, pages) of the I/O window that hold memory in
    /// the slab's file (resident or swapped: every page anyone wrote through
    /// any mapping of it since the slot was cleared), by `ipc::holes`: a few
    /// system calls where `mincore` over the window's mapping looks every
    /// page up (54 us for a 4 MiB window here).
    pub fn window_data_pages(&self) -> std::io::Result<Vec<(usize, usize)>> {
        let bad = || std::io::Error::from_raw_os_error(libc::EINVAL);
        let (_, _, win_off) = slot_offsets(self.index, self.slab.stride).ok_or_else(bad)?;
        let start = u64::try_from(win_off).map_err(|_| bad())?;
        let end = start.checked_add(self.slab.io_bytes).ok_or_else(bad)?;
        let runs = ipc::holes::data_runs(self.slab.file.as_fd(), start..end, PAGE_BYTES)?;
        runs.into_iter()
            .map(|r| {
                let first = usize::try_from((r.start - start) / PAGE_BYTES).map_err(|_| bad())?;
                let pages = usize::try_from((r.end - r.start).div_ceil(PAGE_BYTES)).map_err(|_| bad())?;
                Ok((first, pages))
            })
            .collect()
    }

    /// The slot's index in its slab.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for SlabSlot {
    fn drop(&mut self) {
        // Frees (and zeroes) the slot's pages before it can be reused. The
        // VM whose memory slots pointed here is gone: instances and shells
        // drop their VM before their slot.
        // SAFETY: the slot's own range inside the slab's shared mapping.
        unsafe { libc::madvise(self.control.cast(), self.slab.stride, libc::MADV_REMOVE) };
        if self.listed
            && let Ok(mut f) = self.slab.free.lock()
        {
            f.free.push(self.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn strides_and_offsets() {
        assert_eq!(slot_stride(4 << 20), Some((4 << 20) + 8192));
        assert_eq!(slot_stride(0), None);
        assert_eq!(slot_stride(100), None);
        assert_eq!(slot_offsets(0, 12288), Some((0, 4096, 8192)));
        assert_eq!(
            slot_offsets(3, 12288),
            Some((3 * 12288, 3 * 12288 + 4096, 3 * 12288 + 8192))
        );
        assert_eq!(slot_offsets(usize::MAX, 8192), None);
    }

    #[test]
    fn slots_are_separate_zeroed_and_reused_cleared() {
        let slab = Slab::new(1 << 16).unwrap();
        let io = 0x80_0000u64;
        let mut a = slab.take().unwrap();
        let mut b = slab.take().unwrap();
        a.bind(io).unwrap();
        b.bind(io).unwrap();
        assert_ne!(a.index(), b.index());
        a.mem().write_slice(b"mailbox-a", GuestAddress(MAILBOX_ADDR)).unwrap();
        a.mem().write_slice(b"window-a", GuestAddress(io + 100)).unwrap();
        let mut buf = [0u8; 9];
        b.mem().read_slice(&mut buf, GuestAddress(MAILBOX_ADDR)).unwrap();
        assert_eq!(buf, [0; 9], "another slot's mailbox");
        // Outside the regions: refused.
        assert!(a.mem().write_slice(b"x", GuestAddress(io + (1 << 16))).is_err());
        assert!(a.mem().write_slice(b"x", GuestAddress(MAILBOX_ADDR + 4096)).is_err());
        a.control().report_seq.store(9, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(b.control().report_seq.load(std::sync::atomic::Ordering::Relaxed), 0);
        let index = a.index();
        drop(a);
        assert_eq!(slab.in_use(), 1);
        let mut c = slab.take().unwrap();
        c.bind(io).unwrap();
        assert_eq!(c.index(), index, "a freed slot is reused");
        let mut buf = [1u8; 9];
        c.mem().read_slice(&mut buf, GuestAddress(MAILBOX_ADDR)).unwrap();
        assert_eq!(buf, [0; 9], "a reused slot starts cleared");
        let mut buf = [1u8; 8];
        c.mem().read_slice(&mut buf, GuestAddress(io + 100)).unwrap();
        assert_eq!(buf, [0; 8]);
        assert_eq!(c.control().report_seq.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn a_windows_data_pages_are_the_ones_written() {
        let slab = Slab::new(1 << 20).unwrap();
        let io = 0x80_0000u64;
        let mut a = slab.take().unwrap();
        let mut b = slab.take().unwrap();
        a.bind(io).unwrap();
        b.bind(io).unwrap();
        assert_eq!(a.window_data_pages().unwrap(), vec![]);
        // Pages 0, 5-6 and the last one of a's window; b's page 3; both
        // mailboxes (not in a window).
        a.mem().write_slice(b"x", GuestAddress(io + 10)).unwrap();
        a.mem().write_slice(&[1u8; 5000], GuestAddress(io + 5 * 4096)).unwrap();
        a.mem().write_slice(b"y", GuestAddress(io + (1 << 20) - 1)).unwrap();
        b.mem().write_slice(b"z", GuestAddress(io + 3 * 4096)).unwrap();
        a.mem().write_slice(b"m", GuestAddress(MAILBOX_ADDR)).unwrap();
        b.mem().write_slice(b"m", GuestAddress(MAILBOX_ADDR)).unwrap();
        assert_eq!(a.window_data_pages().unwrap(), vec![(0, 1), (5, 2), (255, 1)]);
        assert_eq!(b.window_data_pages().unwrap(), vec![(3, 1)]);
        // The same pages mincore finds resident in the window's mapping.
        let mut resident = vec![0u8; 256];
        // SAFETY: the window is a live shared mapping of 1 MiB (256 pages).
        let rc = unsafe { libc::mincore(a.window.cast(), 1 << 20, resident.as_mut_ptr()) };
        assert_eq!(rc, 0);
        let pages: Vec<usize> = (0..256).filter(|&i| resident[i] & 1 != 0).collect();
        assert_eq!(pages, vec![0, 5, 6, 255]);
    }
}
