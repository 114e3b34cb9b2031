//! Resetting an instance that served requests back to the state of the
//! node it was restored from (the `reset` start path): a fresh instance at
//! close to hot cost, with nothing of an earlier request left.
//!
//! What a request can change, and how each is put back (on the runner that
//! runs the vCPU, with the vCPU stopped):
//! - guest memory: every page copy-on-write made private since the restore
//!   (the guest's or the VMM's writes: `/proc/self/pagemap`, read through
//!   an fd opened before any sandbox, see [`crate::Vmm`]) gets the node's
//!   bytes again, read from the node's image ([`Pristine`]). The page stays
//!   private and mapped, in the host's page tables and in KVM's shadow
//!   ones, so the next request takes no fault on it; past
//!   [`COPY_LIMIT_PAGES`] private pages the instance drops them instead
//!   (`MADV_DONTNEED`: the next touch maps the node's page again), so an
//!   instance that once wrote much does not copy it on every reset.
//! - the I/O window (its slot in the channel slab, written by the host and
//!   the guest): every resident page is zeroed, as a fresh slot is.
//! - the mailbox page: the node's, copied from the (now pristine) guest
//!   memory, as a restore does.
//! - the vCPU: the node's registers (general, segment/control, FPU, XCRs,
//!   XSAVE); a pending exit is completed first. The guest runs at CPL3 and
//!   cannot change what a restore does not set (MSRs, LAPIC, debug
//!   registers).
//! - the VMM's guest log is cleared.
//!
//! A node's reset source also carries its first-run working set: the
//! private pages of the first instance restored from it, found with the same
//! pagemap scan when that instance is reset or dropped (capped at
//! [`WORKING_SET_LIMIT_PAGES`]). Every later instance given the source has
//! them pre-copied (`MADV_POPULATE_WRITE`) before its first request: each
//! saves its copy-on-write fault and KVM's shadow paging maps the now
//! writable pages (and prefetches their present neighbours) on the first
//! touch, so the first request takes fewer faults (`noop`: 16 to 10).

use super::Shared;
use crate::channel;
use crate::state::SavedState;
use crate::vcpu::{StartAt, Vcpu};
use guest_abi::MAILBOX_ADDR;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;
use vm_memory::{Bytes, GuestAddress};

/// At most this many private pages are copied back on a reset (4 MiB); an
/// instance with more drops them all instead.
pub const COPY_LIMIT_PAGES: usize = 1024;
/// At most this many pages of a node's first-run working set (the pages
/// its instances' requests wrote) are recorded and pre-copied into every
/// instance restored from it (256 KiB): a function that writes more pays
/// for the rest itself, and no hostile function can make its restores copy
/// much.
pub const WORKING_SET_LIMIT_PAGES: usize = 64;
/// `MADV_POPULATE_WRITE` (Linux 5.14; not in the libc crate).
const MADV_POPULATE_WRITE: libc::c_int = 23;
/// Pagemap entries read per `pread` (32 KiB: below malloc's mmap threshold).
const PAGEMAP_CHUNK: usize = 4096;
const PAGE: usize = 4096;

/// Where a reset reads a node's pristine guest memory (its image).
pub trait Pristine: Send + Sync + std::fmt::Debug {
    /// Fills `buf` with the node's guest memory at guest-physical `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

impl Pristine for File {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

impl Pristine for std::sync::Arc<File> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

/// What an instance is reset to: an idle node's saved state and its memory.
#[derive(Debug)]
pub struct ResetSource {
    state: SavedState,
    pristine: Box<dyn Pristine>,
    /// The pages (runs of first page, pages) the first instance restored
    /// from the node to be reset or dropped had written: recorded once,
    /// then pre-copied into every instance restored from the node
    /// ([`Instance::set_reset_source`](super::Instance::set_reset_source)).
    working_set: OnceLock<Box<[(usize, usize)]>>,
}

impl ResetSource {
    /// The reset source of a node idle after a request (not at a
    /// checkpoint: an instance reset there would have to be resumed).
    pub fn new(state: SavedState, pristine: Box<dyn Pristine>) -> Result<Self, ResetError> {
        if state.at_checkpoint {
            return Err(ResetError::AtCheckpoint);
        }
        Ok(Self {
            state,
            pristine,
            working_set: OnceLock::new(),
        })
    }

    /// The node's recorded first-run working set (runs of first page,
    /// pages; at most [`WORKING_SET_LIMIT_PAGES`] pages), once an instance
    /// restored from it was reset or dropped after writing.
    pub fn working_set(&self) -> Option<&[(usize, usize)]> {
        self.working_set.get().map(|b| &b[..])
    }

    /// Records `runs` (an instance's private pages) as the working set,
    /// capped, unless one is recorded or `runs` is empty (an instance that
    /// served nothing says nothing).
    pub(crate) fn record_working_set(&self, runs: &[(usize, usize)]) {
        if self.working_set.get().is_none() && !runs.is_empty() {
            let _ = self
                .working_set
                .set(cap_runs(runs, WORKING_SET_LIMIT_PAGES).into_boxed_slice());
        }
    }

    /// The state instances are reset to.
    pub fn state(&self) -> &SavedState {
        &self.state
    }
}

/// Why a reset failed (the instance is discarded).
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    /// The node is stopped at a checkpoint.
    #[error("a node stopped at a checkpoint cannot be reset to")]
    AtCheckpoint,
    /// The instance was not given a reset source.
    #[error("the instance has no reset source")]
    NoSource,
    /// `/proc/self/pagemap` could not be opened when the VMM was made.
    #[error("no /proc/self/pagemap fd")]
    NoPagemap,
    /// The instance is dead or killed.
    #[error("the instance is dead")]
    Dead,
    /// A system call failed.
    #[error("{what}")]
    Io {
        /// What failed.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused the node's registers.
    #[error("restoring the vCPU")]
    Vcpu(#[source] Box<crate::VmmError>),
    /// Guest or channel memory.
    #[error("guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// The restored mailbox does not match the node's state.
    #[error("the reset mailbox does not match the node's state")]
    Mismatch(#[source] crate::state::StateMismatch),
}

impl ResetError {
    /// The errno a runner reports the failure with.
    pub(crate) fn errno(&self) -> i32 {
        match self {
            ResetError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            ResetError::Vcpu(_) => libc::EINVAL,
            _ => libc::EIO,
        }
    }
}

/// Puts a used vCPU back to `state`: its general registers and its
/// FPU/SSE/AVX state always; its segment and control registers only if they
/// changed (setting them makes KVM drop its shadow page tables, which the
/// next request would rebuild fault by fault); XCR0 never (the guest runs at
/// CPL3 and cannot change it: `xsetbv` is privileged).
///
/// `synced`: the segment registers as the last `KVM_RUN` copied them out
/// into `kvm_run` (`KVM_CAP_SYNC_REGS`); then the general registers are
/// set there too, for KVM to load at the next `KVM_RUN` (which every later
/// use of the vCPU starts with: a request, or a save's `complete_exit`),
/// instead of by ioctl. `None`: both by ioctl.
fn reset_vcpu(
    vcpu: &mut kvm_ioctls::VcpuFd,
    synced: Option<kvm_bindings::kvm_sregs>,
    state: &crate::state::VcpuState,
) -> Result<bool, crate::VmmError> {
    use super::kvm_err;
    let sregs = match synced {
        Some(sregs) => sregs,
        None => vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
    };
    let changed = !crate::state::sregs_eq(&sregs, &state.sregs);
    if changed {
        vcpu.set_sregs(&state.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    }
    if synced.is_some() {
        vcpu.sync_regs_mut().regs = state.regs;
        vcpu.set_sync_dirty_reg(kvm_ioctls::SyncReg::Register);
    } else {
        vcpu.set_regs(&state.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    }
    match &state.xsave {
        // The XSAVE area holds the x87 and SSE state too.
        Some(words) => {
            let mut xsave = kvm_bindings::kvm_xsave::default();
            if words.len() != xsave.region.len() {
                return Err(crate::VmmError::Save("XSAVE area of the wrong size"));
            }
            xsave.region.copy_from_slice(words);
            // SAFETY: a 4 KiB legacy `kvm_xsave` read by KVM_GET_XSAVE on
            // this host (its size is what that ioctl uses).
            unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        }
        None => vcpu.set_fpu(&state.fpu).map_err(kvm_err("KVM_SET_FPU"))?,
    }
    Ok(changed)
}

/// Whether a `/proc/PID/pagemap` entry of a private file mapping is a page
/// copy-on-write made private: present or swapped, and not a file page.
pub fn entry_is_private(entry: u64) -> bool {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_OR_SHARED_ANON: u64 = 1 << 61;
    entry & (PRESENT | SWAPPED) != 0 && entry & FILE_OR_SHARED_ANON == 0
}

/// Appends the runs (first page, pages) of private entries in `entries`,
/// the first of which is page `first`, merging with a run ending at
/// `first` (pure).
pub fn push_private_runs(runs: &mut Vec<(usize, usize)>, first: usize, entries: &[u64]) {
    for (i, &e) in entries.iter().enumerate() {
        if !entry_is_private(e) {
            continue;
        }
        let page = first + i;
        match runs.last_mut() {
            Some((start, len)) if *start + *len == page => *len += 1,
            _ => runs.push((page, 1)),
        }
    }
}

/// How a reset restores guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryPlan {
    /// Copy the node's bytes into the private pages (they stay mapped).
    Copy,
    /// Drop the private pages (the next touch maps the node's again).
    Drop,
}

/// The plan for `runs` of private pages (pure).
pub fn plan(runs: &[(usize, usize)], copy_limit_pages: usize) -> MemoryPlan {
    let pages: usize = runs.iter().map(|&(_, n)| n).sum();
    if pages <= copy_limit_pages {
        MemoryPlan::Copy
    } else {
        MemoryPlan::Drop
    }
}

/// What one reset did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResetStats {
    /// Guest pages given the node's bytes again.
    pub pages_copied: u64,
    /// Guest pages dropped.
    pub pages_dropped: u64,
    /// I/O window pages zeroed.
    pub window_pages_zeroed: u64,
    /// Time spent finding and restoring the written guest pages, ns.
    pub memory_ns: u64,
    /// Of `memory_ns`, finding them (the pagemap scan), ns.
    pub scan_ns: u64,
    /// Time spent on the I/O window and the mailbox, ns.
    pub channel_ns: u64,
    /// Time spent completing the last exit, ns.
    pub exit_ns: u64,
    /// Time spent setting the registers, ns.
    pub vcpu_ns: u64,
    /// The segment/control registers had changed and were set.
    pub sregs_set: bool,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> ResetError {
    move |source| ResetError::Io { what, source }
}

impl Shared {
    /// Resets the stopped instance to its reset source (see the module
    /// doc); returns the sequence number it is idle at. Runs on the runner
    /// holding `vcpu`.
    pub(crate) fn reset_to(&self, vcpu: &mut Vcpu) -> Result<(u32, ResetStats), ResetError> {
        if vcpu.at == StartAt::Dead || self.is_killed() {
            return Err(ResetError::Dead);
        }
        let source = self
            .reset
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .ok_or(ResetError::NoSource)?;
        let pagemap = self.pagemap.as_deref().ok_or(ResetError::NoPagemap)?;
        let t = std::time::Instant::now();
        // An exit still in progress (the doorbell's) is finished before its
        // registers are replaced; with sync regs, that KVM_RUN also copies
        // the segment registers out into `kvm_run` (read below).
        if self.sync_regs {
            // Cleared first: if KVM did not copy them out after all, they
            // differ from any saved state and are set by ioctl (the safe
            // way), never taken as unchanged.
            vcpu.fd.sync_regs_mut().sregs = kvm_bindings::kvm_sregs::default();
            vcpu.fd.set_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
        }
        let completed = crate::vcpu::complete_exit(&mut vcpu.fd);
        let synced = self.sync_regs.then(|| vcpu.fd.sync_regs().sregs);
        if self.sync_regs {
            vcpu.fd.clear_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
        }
        completed.map_err(|e| ResetError::Vcpu(Box::new(super::kvm_err("completing the last exit")(e))))?;
        let mut stats = ResetStats {
            exit_ns: super::ns_since(t),
            ..ResetStats::default()
        };
        let t = std::time::Instant::now();
        self.reset_memory(pagemap, &source, &mut stats)?;
        stats.memory_ns = super::ns_since(t);
        let t = std::time::Instant::now();
        stats.window_pages_zeroed = self.zero_window()?;
        super::snapshot::copy_channel(self.ram.mem(), self.chan.mem(), &self.layout, false)
            .map_err(ResetError::GuestMemory)?;
        let mut mailbox = [0u8; channel::MAILBOX_BYTES];
        self.chan
            .mem()
            .read_slice(&mut mailbox, GuestAddress(MAILBOX_ADDR))
            .map_err(ResetError::GuestMemory)?;
        source
            .state
            .check_mailbox(&channel::parse(&mailbox))
            .map_err(ResetError::Mismatch)?;
        stats.channel_ns = super::ns_since(t);
        let t = std::time::Instant::now();
        stats.sregs_set =
            reset_vcpu(&mut vcpu.fd, synced, &source.state.vcpu).map_err(|e| ResetError::Vcpu(Box::new(e)))?;
        stats.vcpu_ns = super::ns_since(t);
        if let Ok(mut log) = self.serial.lock() {
            log.clear();
        }
        vcpu.at = StartAt::Idle(source.state.seq);
        Ok((source.state.seq, stats))
    }

    /// Puts the node's bytes back into every private page of guest memory
    /// (or drops them all, past [`COPY_LIMIT_PAGES`]).
    fn reset_memory(&self, pagemap: &File, source: &ResetSource, stats: &mut ResetStats) -> Result<(), ResetError> {
        let base = usize::try_from(self.ram.host_addr()).map_err(|_| ResetError::Dead)?;
        let t = std::time::Instant::now();
        let runs = self.private_runs(pagemap, base)?;
        stats.scan_ns = super::ns_since(t);
        source.record_working_set(&runs);
        self.restore_pages(base, &runs, source.pristine.as_ref(), stats)
    }

    /// Runs of the guest memory's private (written since the restore) pages.
    fn private_runs(&self, pagemap: &File, base: usize) -> Result<Vec<(usize, usize)>, ResetError> {
        let pages = self.ram.bytes() / PAGE;
        if self.pagemap_scan {
            scan_private(pagemap, base, pages)
        } else {
            read_private(pagemap, base, pages)
        }
    }

    /// Records the node's working set from this instance's private pages,
    /// if its reset source has none yet (when it is dropped: off the
    /// request path, once per node and process).
    pub(crate) fn record_working_set(&self) {
        let Some(source) = self.reset.lock().ok().and_then(|s| s.clone()) else {
            return;
        };
        if source.working_set().is_some() {
            return;
        }
        let (Some(pagemap), Ok(base)) = (self.pagemap.as_deref(), usize::try_from(self.ram.host_addr())) else {
            return;
        };
        if let Ok(runs) = self.private_runs(pagemap, base) {
            source.record_working_set(&runs);
        }
    }

    /// Pre-copies the node's working set (`runs`) into this instance's
    /// guest memory (`MADV_POPULATE_WRITE`: private, writable and mapped in
    /// the host's page tables), so that its first request takes no
    /// copy-on-write fault on them and KVM's shadow paging can map them
    /// (and prefetch their neighbours) at once. Advisory: a run that fails
    /// (an older kernel) is left to fault. Returns the pages populated.
    pub(crate) fn prefault(&self, runs: &[(usize, usize)]) -> usize {
        let Ok(base) = usize::try_from(self.ram.host_addr()) else {
            return 0;
        };
        let pages = self.ram.bytes() / PAGE;
        let mut done = 0;
        for &(page, n) in runs {
            if page.checked_add(n).is_none_or(|end| end > pages) || n == 0 {
                continue;
            }
            // SAFETY: `page..page + n` lies inside the guest memory mapping
            // (checked above against its length); MADV_POPULATE_WRITE only
            // faults the pages in for writing (copy-on-write of the node's
            // bytes into private pages): their contents do not change.
            let rc = unsafe { libc::madvise((base + page * PAGE) as *mut libc::c_void, n * PAGE, MADV_POPULATE_WRITE) };
            if rc == 0 {
                done += n;
            }
        }
        done
    }

    fn restore_pages(
        &self,
        base: usize,
        runs: &[(usize, usize)],
        pristine: &dyn Pristine,
        stats: &mut ResetStats,
    ) -> Result<(), ResetError> {
        let count = |runs: &[(usize, usize)]| runs.iter().map(|&(_, n)| u64::try_from(n).unwrap_or(0)).sum::<u64>();
        match plan(runs, COPY_LIMIT_PAGES) {
            MemoryPlan::Copy => {
                for &(page, n) in runs {
                    let offset = page * PAGE;
                    // SAFETY: `offset..offset + n * PAGE` lies inside the
                    // guest memory mapping (pages counted from its base and
                    // below its length); the vCPU is stopped (this runner
                    // holds it), so nothing else touches these bytes while
                    // the slice lives.
                    let dst = unsafe { std::slice::from_raw_parts_mut((base + offset) as *mut u8, n * PAGE) };
                    pristine
                        .read_at(u64::try_from(offset).unwrap_or(u64::MAX), dst)
                        .map_err(io("reading the node's image"))?;
                }
                stats.pages_copied = count(runs);
            }
            MemoryPlan::Drop => {
                for &(page, n) in runs {
                    // SAFETY: inside the guest memory mapping (as above), a
                    // private file mapping: MADV_DONTNEED drops the private
                    // copies and the next access maps the image's page again;
                    // KVM's MMU notifier drops its mappings of them first.
                    let rc = unsafe {
                        libc::madvise((base + page * PAGE) as *mut libc::c_void, n * PAGE, libc::MADV_DONTNEED)
                    };
                    if rc != 0 {
                        return Err(io("madvise(MADV_DONTNEED)")(std::io::Error::last_os_error()));
                    }
                }
                stats.pages_dropped = count(runs);
            }
        }
        Ok(())
    }

    /// Zeroes every page of the instance's I/O window that holds memory
    /// (`SlabSlot::window_data_pages`: written through any mapping, the
    /// caller's input included).
    fn zero_window(&self) -> Result<u64, ResetError> {
        let addr = usize::try_from(self.chan.window_host_addr()).map_err(|_| ResetError::Dead)?;
        let len = usize::try_from(self.layout.io_bytes).map_err(|_| ResetError::Dead)?;
        let runs = self
            .chan
            .window_data_pages()
            .map_err(io("finding the I/O window's data (SEEK_DATA)"))?;
        let mut zeroed = 0;
        for (first, pages) in runs {
            let at = first * PAGE;
            if at >= len {
                continue;
            }
            let n = (pages * PAGE).min(len - at);
            // SAFETY: inside the window mapping (checked against its
            // length); the vCPU is stopped and the caller waits for this
            // reset, so nobody else writes the window meanwhile.
            unsafe { std::ptr::write_bytes((addr + at) as *mut u8, 0, n) };
            zeroed += u64::try_from(n.div_ceil(PAGE)).unwrap_or(0);
        }
        Ok(zeroed)
    }
}

/// The first `limit` pages of `runs`, the run that crosses the limit cut.
pub(crate) fn cap_runs(runs: &[(usize, usize)], limit: usize) -> Vec<(usize, usize)> {
    let mut left = limit;
    let mut out = Vec::new();
    for &(page, n) in runs {
        if left == 0 {
            break;
        }
        let take = n.min(left);
        if take > 0 {
            out.push((page, take));
        }
        left -= take;
    }
    out
}

/// Runs (first page, pages) of private pages among the `pages` guest pages
/// mapped at `base`, read from the pagemap (8 bytes per page).
fn read_private(pagemap: &File, base: usize, pages: usize) -> Result<Vec<(usize, usize)>, ResetError> {
    let first = base / PAGE;
    let mut runs = Vec::new();
    let mut buf = vec![0u8; PAGEMAP_CHUNK * 8];
    let mut entries = vec![0u64; PAGEMAP_CHUNK];
    let mut at = 0;
    while at < pages {
        let n = (pages - at).min(PAGEMAP_CHUNK);
        let offset = u64::try_from(first + at).unwrap_or(u64::MAX).saturating_mul(8);
        pagemap
            .read_exact_at(&mut buf[..n * 8], offset)
            .map_err(io("reading /proc/self/pagemap"))?;
        for (e, b) in entries.iter_mut().zip(buf[..n * 8].chunks_exact(8)) {
            let mut w = [0u8; 8];
            w.copy_from_slice(b);
            *e = u64::from_le_bytes(w);
        }
        push_private_runs(&mut runs, at, &entries[..n]);
        at += n;
    }
    Ok(runs)
}

/// Runs of private pages as [`read_private`] finds them, by `PAGEMAP_SCAN`
/// (`ipc::pagemap`, which checks every kernel answer).
fn scan_private(pagemap: &File, base: usize, pages: usize) -> Result<Vec<(usize, usize)>, ResetError> {
    use std::os::fd::AsFd;
    let mut regions = [ipc::pagemap::PageRegion::default(); ipc::pagemap::REGIONS];
    let mut ranges = Vec::new();
    ipc::pagemap::written_in(pagemap.as_fd(), base..base + pages * PAGE, &mut regions, &mut ranges).map_err(|e| {
        ResetError::Io {
            what: "PAGEMAP_SCAN",
            source: std::io::Error::other(e),
        }
    })?;
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for r in ranges {
        let first = (r.start - base) / PAGE;
        let len = r.len().div_ceil(PAGE);
        match runs.last_mut() {
            Some((p, l)) if *p + *l == first => *l += len,
            _ => runs.push((first, len)),
        }
    }
    Ok(runs)
}

/// Whether `PAGEMAP_SCAN` works on `pagemap` (probed on a page of this
/// process's own memory).
pub(crate) fn pagemap_scan_works(pagemap: &File) -> bool {
    let probe = [0u8; PAGE * 2];
    let at = (probe.as_ptr() as usize).next_multiple_of(PAGE);
    scan_private(pagemap, at, 1).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE: u64 = 1 << 61;

    #[test]
    fn working_sets_are_capped_in_page_order() {
        assert_eq!(cap_runs(&[(3, 2), (10, 5), (40, 1)], 4), vec![(3, 2), (10, 2)]);
        assert_eq!(cap_runs(&[(3, 2), (10, 5)], 100), vec![(3, 2), (10, 5)]);
        assert_eq!(cap_runs(&[(3, 2)], 0), Vec::<(usize, usize)>::new());
        assert_eq!(cap_runs(&[(3, 0), (7, 1)], 1), vec![(7, 1)]);
    }

    #[test]
    fn a_working_set_is_recorded_once_and_never_empty() {
        #[derive(Debug)]
        struct Zeroes;
        impl Pristine for Zeroes {
            fn read_at(&self, _: u64, buf: &mut [u8]) -> std::io::Result<()> {
                buf.fill(0);
                Ok(())
            }
        }
        let source = ResetSource::new(SavedState::default(), Box::new(Zeroes)).unwrap();
        source.record_working_set(&[]);
        assert!(source.working_set().is_none());
        source.record_working_set(&[(5, 2), (100, WORKING_SET_LIMIT_PAGES)]);
        assert_eq!(
            source.working_set(),
            Some(&[(5, 2), (100, WORKING_SET_LIMIT_PAGES - 2)][..])
        );
        source.record_working_set(&[(1, 1)]);
        assert_eq!(
            source.working_set(),
            Some(&[(5, 2), (100, WORKING_SET_LIMIT_PAGES - 2)][..])
        );
    }

    #[test]
    fn private_entries_are_present_or_swapped_anonymous_pages() {
        assert!(entry_is_private(PRESENT));
        assert!(entry_is_private(SWAPPED | 0x1234));
        assert!(!entry_is_private(PRESENT | FILE));
        assert!(!entry_is_private(0));
        assert!(!entry_is_private(FILE));
    }

    #[test]
    fn runs_merge_adjacent_pages_across_chunks() {
        let mut runs = Vec::new();
        push_private_runs(&mut runs, 0, &[0, PRESENT, PRESENT, PRESENT | FILE, PRESENT]);
        assert_eq!(runs, vec![(1, 2), (4, 1)]);
        // The next chunk starts at page 5: page 5 continues the run at 4.
        push_private_runs(&mut runs, 5, &[PRESENT, 0, SWAPPED]);
        assert_eq!(runs, vec![(1, 2), (4, 2), (7, 1)]);
    }

    /// The ioctl and the pagemap read find the same pages of a private
    /// file mapping: the written ones.
    #[test]
    fn pagemap_scan_and_read_agree_on_written_pages() {
        use std::io::Write;
        let Ok(pagemap) = File::open("/proc/self/pagemap") else {
            return;
        };
        // SAFETY: a plain memfd_create call with a NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"reset-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: the fd was just created and is owned by nothing else.
        let mut file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.write_all(&vec![7u8; 16 * PAGE]).unwrap();
        // SAFETY: a fresh private mapping of our own file.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                16 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        assert_ne!(raw, libc::MAP_FAILED);
        let base = raw as usize;
        // SAFETY: inside the mapping just made.
        unsafe {
            let _ = std::ptr::read_volatile((base + 2 * PAGE) as *const u8); // read: stays a file page
            for p in [3, 4, 9] {
                std::ptr::write_volatile((base + p * PAGE) as *mut u8, 1);
            }
        }
        let read = read_private(&pagemap, base, 16).unwrap();
        assert_eq!(read, vec![(3, 2), (9, 1)]);
        if pagemap_scan_works(&pagemap) {
            assert_eq!(scan_private(&pagemap, base, 16).unwrap(), read);
        }
        // SAFETY: our mapping, unused from here.
        unsafe { libc::munmap(raw, 16 * PAGE) };
    }

    #[test]
    fn pagemap_scan_is_the_number_linux_defines() {
        // _IOWR('f', 16, struct pm_scan_arg) with a 96-byte argument: the
        // VMM host sandbox allows exactly this request.
        assert_eq!(ipc::pagemap::PAGEMAP_SCAN, 0xc060_6610);
    }

    #[test]
    fn plan_copies_up_to_the_limit_and_drops_beyond() {
        assert_eq!(plan(&[], 4), MemoryPlan::Copy);
        assert_eq!(plan(&[(0, 2), (9, 2)], 4), MemoryPlan::Copy);
        assert_eq!(plan(&[(0, 2), (9, 3)], 4), MemoryPlan::Drop);
    }

    #[test]
    fn a_checkpoint_node_is_no_reset_source() {
        let state = SavedState {
            seq: 3,
            at_checkpoint: true,
            vcpu: crate::state::VcpuState::default(),
        };
        let file = File::open("/dev/null").expect("/dev/null");
        assert!(matches!(
            ResetSource::new(state, Box::new(file)),
            Err(ResetError::AtCheckpoint)
        ));
    }
}
