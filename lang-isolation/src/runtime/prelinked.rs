//! Pre-linked images and post-init snapshots: the language worker's cold
//! start without loading, relocating or (after the first) running `init()`.
//!
//! ```text
//!  deploy        PrelinkedImage::build: the artifact's writable pages (data,
//!                RELRO/GOT, bss) relocated once for the function's own range,
//!                stored in the worker's image arena (one memfd, sparse)
//!  first cold    ImageSpace::enter maps the image copy-on-write into its range:
//!                code and rodata from the sealed artifact memfd, the writable
//!                pages from the arena (MAP_PRIVATE | MAP_FIXED, final protections)
//!                -> init() -> PrelinkedImage::capture: the writable pages and
//!                the persistent heap arena as init left them, plus the
//!                allocator's state, become the image's snapshot
//!  every cold    ImageSpace::enter maps the snapshot (nothing at all if the range
//!                holds it already), no init; handle; after the reply
//!                ImageSpace::leave copies the writable pages back (Restore),
//!                or drops the private pages (MADV_DONTNEED: they read as the
//!                snapshot again) and faults them in again (MADV_POPULATE_WRITE),
//!                or unmaps the image (Teardown::Remap); of the snapshot's heap
//!                it drops only the pages the call wrote (found with
//!                PAGEMAP_SCAN, `super::pagescan`, if the space has one: pages
//!                only read stay mapped to the arena's page cache), once (the
//!                instance's own reset spares them: Instance::into_shell_sparing)
//! ```
//!
//! # One address space, one arena
//! Every image gets its own range (its span and a guard page) in one
//! `PROT_NONE` reservation of the worker ([`ImageSpace`], 256 GiB of
//! address space, no memory), and is relocated for that range's address.
//! A cold start maps the image there copy-on-write (one `mmap` per piece,
//! [`PrelinkedImage::pieces`]: 4 for the builder's artifacts) unless it is
//! mapped there already; teardown drops the written pages and keeps it
//! mapped, so a function's next cold start maps nothing. Unused ranges
//! merge into the reservation's single `PROT_NONE` VMA, and at most
//! [`DEFAULT_MAX_MAPPED`] images stay mapped (least recently used go back
//! to `PROT_NONE`): 5,000 deployed functions stay far from
//! `vm.max_map_count`. The images
//! themselves live in one memfd the worker creates before entering its
//! sandbox ([`ImageArena`]): a sparse file in which each image takes a
//! page-aligned region; all-zero pages are never written, so they cost
//! nothing. The arena is the worker's own (the dispatcher never sees it) and
//! holds only its tenant's functions; it is the one writable, mappable fd a
//! worker holds, and it never holds code: code and rodata are always
//! mapped from the sealed artifact memfd, so nothing is ever mapped
//! executable from memory the worker wrote.
//!
//! # Why a snapshot after `init()` is a fresh instance
//! A fresh instance is: the image's writable pages as built, an empty heap,
//! then `init()`. `init()` can change only (1) the image's own writable
//! pages (safe Rust without `unsafe`: its statics), (2) its heap — every
//! allocation goes through the host's allocator, into the instance's
//! persistent arena — and (3) the host services' context. (1) and (2) are
//! captured byte for byte, the allocator's state with them; the
//! context is re-made (counters zeroed, as for a fresh instance) and the
//! SDK re-reads the host table's address at every entry. Not captured, and
//! why that is sound: the instance's stack (dead after `init` returns: the
//! next entry starts on an empty stack, and safe code cannot read stale
//! stack bytes), TLS (refused by the loader: artifacts have no `PT_TLS`),
//! the invocation arena (empty after `init`). One thing `init()` can
//! observe that a snapshot cannot replay is the clock: an `init()` that
//! called `clock_ns()` is never snapshotted (every cold start runs it).
//! The snapshot is also tied to the memory it was taken in (the heap's and
//! the context's addresses) and used only with that shell.

use super::elf::{LoadPlan, Protection, RelocValue};
use super::heap::{HeapMemory, PersistentState};
use super::instance::{Instance, InstanceShell};
use super::loader::{ArtifactImage, LoadError, LoadedFunction, import_addr, prot_of};
use super::mmap::{Mapping, page_size, round_up_to_page};
use super::pagescan::PageScan;
use super::watch::WriteWatch;
use std::cell::Cell;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Size of the image arena's (sparse) memfd: 1 TiB of offsets.
pub const DEFAULT_ARENA_BYTES: u64 = 1 << 40;

/// Why an image could not be built, mapped or snapshotted.
#[derive(Debug, thiserror::Error)]
pub enum PrelinkError {
    /// Creating the arena memfd failed.
    #[error("cannot create the image arena memfd")]
    Create(#[source] io::Error),
    /// No room left in the arena.
    #[error("the image arena has no room for {want} more bytes")]
    ArenaFull {
        /// Bytes wanted.
        want: u64,
    },
    /// Writing or freeing arena pages failed.
    #[error("cannot write the image arena")]
    Write(#[source] io::Error),
    /// Reading the artifact failed.
    #[error("cannot read the artifact")]
    Artifact(#[source] LoadError),
    /// A relocation lies outside the writable pages (the plan forbids it).
    #[error("relocation at {0:#x} is outside the writable pages")]
    Relocation(usize),
    /// Mapping into the image space failed.
    #[error("cannot map the image into its range")]
    Map(#[source] io::Error),
    /// No room for the image's range.
    #[error("the image spans {span} bytes, more than the image space has free ({window})")]
    TooLarge {
        /// Its span.
        span: usize,
        /// Free bytes of the space.
        window: usize,
    },
    /// The last cold instance is still alive.
    #[error("the last cold instance is still alive")]
    Busy,
    /// The image was built for another image space.
    #[error("the image was pre-linked for another image space")]
    OtherWindow,
}

/// First-fit allocator of page-aligned regions of the arena's offsets,
/// coalescing freed neighbours. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetAllocator {
    /// Free `(start, len)` ranges, sorted, never adjacent.
    free: Vec<(u64, u64)>,
}

impl OffsetAllocator {
    /// All of `[0, len)` free.
    pub fn new(len: u64) -> Self {
        Self {
            free: if len > 0 { vec![(0, len)] } else { Vec::new() },
        }
    }

    /// A region of `len` bytes (non-zero), if one is free.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        if len == 0 {
            return None;
        }
        let i = self.free.iter().position(|&(_, l)| l >= len)?;
        let (start, l) = self.free[i];
        if l == len {
            self.free.remove(i);
        } else {
            self.free[i] = (start + len, l - len);
        }
        Some(start)
    }

    /// Gives `[start, start + len)` back (it must have come from `alloc`).
    pub fn release(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let i = self.free.partition_point(|&(s, _)| s < start);
        self.free.insert(i, (start, len));
        if i + 1 < self.free.len() && self.free[i].0 + self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }

    /// Free bytes in all.
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(|&(_, l)| l).sum()
    }
}

/// A region of the arena: `(offset, bytes)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    offset: u64,
    len: u64,
}

/// The worker's image store: one memfd of [`DEFAULT_ARENA_BYTES`] (sparse),
/// created before the sandbox together with the one writable view the
/// worker ever has of it, then sealed with `F_SEAL_FUTURE_WRITE`: from then
/// on the fd maps only read-only or private (no new writable shared view,
/// no `write`), so like every other fd a worker holds it cannot be made
/// into memory that is both writable and executable. Code is never mapped
/// from it (only the images' writable pages). The view is `PROT_NONE` but
/// while a store writes a region of it.
#[derive(Debug)]
pub struct ImageArena {
    fd: OwnedFd,
    /// The shared read-write view of the whole arena.
    view: SharedView,
    space: OffsetAllocator,
    /// Bytes of regions in use.
    used: u64,
    /// End of the highest region ever handed out: regions from here on are
    /// holes (read as zero); a reused region below may hold old bytes.
    touched_end: u64,
}

/// A shared read-write view of the arena, unmapped on drop.
#[derive(Debug)]
struct SharedView {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain shared memory owned by this value (the arena's view).
unsafe impl Send for SharedView {}

impl SharedView {
    fn new(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping at an address the kernel picks; it
        // aliases no Rust object (only this view reaches it).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { ptr: ptr.cast(), len })
    }
}

impl SharedView {
    fn protect(&self, offset: usize, len: usize, prot: libc::c_int) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(io::Error::other("range outside the view"));
        }
        // SAFETY: a range of this view; no Rust reference into it lives
        // across the change (stores write through raw pointers only).
        if unsafe { libc::mprotect(self.ptr.add(offset).cast(), len, prot) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for SharedView {
    fn drop(&mut self) {
        // SAFETY: the mapping this view made; nothing borrows it past the view.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl ImageArena {
    /// A new arena of `len` bytes (`memfd_create`, `ftruncate`, the view,
    /// `F_ADD_SEALS`: call it before the sandbox, which allows none of them).
    pub fn create(len: u64) -> Result<Self, PrelinkError> {
        let name = c"microfaas-images";
        let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        // SAFETY: a NUL-terminated name and valid flags; the fd is owned below.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), flags) };
        if raw < 0 {
            return Err(PrelinkError::Create(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(len).map_err(|_| PrelinkError::Create(io::Error::other("arena size")))?;
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(PrelinkError::Create(io::Error::last_os_error()));
        }
        let view_len = usize::try_from(len).map_err(|_| PrelinkError::Create(io::Error::other("arena size")))?;
        let view = SharedView::new(fd.as_fd(), view_len).map_err(PrelinkError::Create)?;
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on our own memfd takes an integer argument.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(PrelinkError::Create(io::Error::last_os_error()));
        }
        // Inaccessible but while a store writes it.
        view.protect(0, view_len, libc::PROT_NONE)
            .map_err(PrelinkError::Create)?;
        Ok(Self {
            fd,
            view,
            space: OffsetAllocator::new(len),
            used: 0,
            touched_end: 0,
        })
    }

    /// Bytes of regions in use.
    pub fn used_bytes(&self) -> u64 {
        self.used
    }
}

impl AsFd for ImageArena {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl ImageArena {
    fn alloc(&mut self, len: usize) -> Result<(Region, bool), PrelinkError> {
        let len = round_up_to_page(len).ok_or(PrelinkError::ArenaFull { want: u64::MAX })?;
        let want = u64::try_from(len).unwrap_or(u64::MAX);
        if want == 0 {
            return Ok((Region { offset: 0, len: 0 }, true));
        }
        let offset = self.space.alloc(want).ok_or(PrelinkError::ArenaFull { want })?;
        let fresh = offset >= self.touched_end;
        self.touched_end = self.touched_end.max(offset + want);
        self.used += want;
        Ok((Region { offset, len: want }, fresh))
    }

    /// Writes `parts` (each `(offset in the region, bytes)`, page-aligned
    /// offsets) into a new region of `len` bytes; the rest reads as zero.
    fn store(&mut self, len: usize, parts: &[(usize, &[u8])]) -> Result<Region, PrelinkError> {
        let (region, fresh) = self.alloc(len)?;
        if region.len == 0 {
            return Ok(region);
        }
        let result = self.write(region, fresh, parts);
        if let Err(e) = result {
            self.release(region);
            return Err(e);
        }
        Ok(region)
    }

    fn write(&self, region: Region, fresh: bool, parts: &[(usize, &[u8])]) -> Result<(), PrelinkError> {
        let len = usize::try_from(region.len).map_err(|_| PrelinkError::Write(io::Error::other("region size")))?;
        let start = usize::try_from(region.offset).map_err(|_| PrelinkError::Write(io::Error::other("offset")))?;
        if start.checked_add(len).is_none_or(|end| end > self.view.len) {
            return Err(PrelinkError::Write(io::Error::other("region outside the arena")));
        }
        self.view
            .protect(start, len, libc::PROT_READ | libc::PROT_WRITE)
            .map_err(PrelinkError::Write)?;
        let written = self.write_open(start, len, fresh, parts);
        let closed = self
            .view
            .protect(start, len, libc::PROT_NONE)
            .map_err(PrelinkError::Write);
        written.and(closed)
    }

    /// [`ImageArena::write`] with the region's view open (read-write).
    fn write_open(&self, start: usize, len: usize, fresh: bool, parts: &[(usize, &[u8])]) -> Result<(), PrelinkError> {
        // SAFETY: `[start, start + len)` lies in the view (checked by the
        // caller); the region is this call's alone (just allocated).
        let base = unsafe { self.view.ptr.add(start) };
        if !fresh {
            // A reused region: old bytes must not show through.
            // SAFETY: as above.
            unsafe { std::ptr::write_bytes(base, 0, len) };
        }
        let page = page_size();
        for &(at, bytes) in parts {
            if at.checked_add(bytes.len()).is_none_or(|end| end > len) {
                return Err(PrelinkError::Write(io::Error::other("part outside its region")));
            }
            for (i, chunk) in bytes.chunks(page).enumerate() {
                // Zero pages stay holes (they cost nothing).
                if chunk.iter().all(|&b| b == 0) {
                    continue;
                }
                // SAFETY: `at + i * page + chunk.len()` <= `len` (checked
                // above), inside the region.
                unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), base.add(at + i * page), chunk.len()) };
            }
        }
        Ok(())
    }

    /// Frees a region: its offsets go back to the allocator. (Its pages
    /// stay until reused: the future-write seal refuses to punch holes.)
    fn release(&mut self, region: Region) {
        if region.len == 0 {
            return;
        }
        self.space.release(region.offset, region.len);
        self.used = self.used.saturating_sub(region.len);
    }
}

static NEXT_IMAGE_UID: AtomicU64 = AtomicU64::new(1);

/// Where a piece of a mapped image comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The sealed artifact memfd, from this file offset.
    Artifact(u64),
    /// The arena: this offset into the image's pristine or snapshot region.
    Writable(usize),
    /// Anonymous zero pages (bss of a read-only segment, `PROT_NONE` gaps).
    Zero,
}

/// One mapping a cold start makes: `[start, start + len)` of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Offset in the image.
    pub start: usize,
    /// Bytes (whole pages).
    pub len: usize,
    /// Final protection.
    pub prot: libc::c_int,
    /// What is mapped there.
    pub source: Source,
}

/// The mappings that lay out `plan`'s image over `[0, plan.span)`, each
/// with its final protection, and the writable range the arena holds.
/// Pure.
pub fn pieces(plan: &LoadPlan) -> (Vec<Piece>, Range<usize>) {
    let writable = plan.segments.iter().filter(|s| s.protection == Protection::ReadWrite);
    let lo = writable.clone().map(|s| s.start).min().unwrap_or(0);
    let hi = writable.map(|s| s.end()).max().unwrap_or(0);
    let mut out = Vec::new();
    let mut cursor = 0;
    let mut push = |start: usize, end: usize, prot, source| {
        if end > start {
            out.push(Piece {
                start,
                len: end - start,
                prot,
                source,
            });
        }
    };
    for seg in &plan.segments {
        push(cursor, seg.start, libc::PROT_NONE, Source::Zero);
        let prot = prot_of(seg.protection);
        if seg.protection == Protection::ReadWrite {
            let (start, end) = (seg.start, seg.end());
            let cut = plan.relro.filter(|&(off, len)| off >= start && off + len <= end);
            let parts = match cut {
                Some((off, len)) => vec![
                    (start, off, prot),
                    (off, off + len, libc::PROT_READ),
                    (off + len, end, prot),
                ],
                None => vec![(start, end, prot)],
            };
            for (a, b, p) in parts {
                push(a, b, p, Source::Writable(a - lo));
            }
        } else {
            let file_end = seg.start + seg.file_bytes;
            push(seg.start, file_end, prot, Source::Artifact(seg.file_offset));
            push(file_end, file_end + seg.anon_bytes, prot, Source::Zero);
        }
        cursor = cursor.max(seg.end());
    }
    push(cursor, plan.span, libc::PROT_NONE, Source::Zero);
    (out, lo..hi.max(lo))
}

/// The writable pages of `plan`'s image relocated for an image at `base`:
/// `[writable.start, writable.end)` of the image. Pure (given the import
/// addresses, which are this process's).
pub fn writable_pages(
    plan: &LoadPlan,
    file: &[u8],
    base: usize,
    writable: &Range<usize>,
) -> Result<Vec<u8>, PrelinkError> {
    let mut buf = vec![0u8; writable.len()];
    for seg in plan.segments.iter().filter(|s| s.protection == Protection::ReadWrite) {
        let at = seg.start - writable.start;
        let from = usize::try_from(seg.file_offset).unwrap_or(usize::MAX).min(file.len());
        let to = from.saturating_add(seg.file_bytes).min(file.len());
        buf[at..at + (to - from)].copy_from_slice(&file[from..to]);
        if let Some(z) = seg.zero_from {
            let end = seg.start + seg.file_bytes;
            buf[z - writable.start..end - writable.start].fill(0);
        }
    }
    let lo = usize::try_from(plan.lo).map_err(|_| PrelinkError::Relocation(0))?;
    let base0 = u64::try_from(base.wrapping_sub(lo)).unwrap_or(0);
    for r in &plan.relocations {
        let value = match r.value {
            RelocValue::Relative(addend) => base0.wrapping_add(addend),
            RelocValue::Import(import, addend) => import_addr(import).wrapping_add(addend),
        };
        let at = r
            .offset
            .checked_sub(writable.start)
            .ok_or(PrelinkError::Relocation(r.offset))?;
        buf.get_mut(at..at + 8)
            .ok_or(PrelinkError::Relocation(r.offset))?
            .copy_from_slice(&value.to_le_bytes());
    }
    Ok(buf)
}

/// The read-write pieces' bytes (`(offset in the image, bytes)`, from
/// `bytes(offset in the writable range, len)`), if together at most
/// [`RESTORE_MAX_BYTES`].
fn restorable(pieces: &[Piece], bytes: impl Fn(usize, usize) -> Vec<u8>) -> Option<Vec<(usize, Vec<u8>)>> {
    let rw: Vec<&Piece> = pieces.iter().filter(|p| p.prot & libc::PROT_WRITE != 0).collect();
    if rw.iter().map(|p| p.len).sum::<usize>() > RESTORE_MAX_BYTES {
        return None;
    }
    rw.iter()
        .map(|p| match p.source {
            Source::Writable(at) => Some((p.start, bytes(at, p.len))),
            _ => None,
        })
        .collect()
}

/// A post-init snapshot: the writable pages and the persistent heap arena
/// as `init()` left them, and the allocator state over them.
#[derive(Debug)]
struct Snapshot {
    uid: u64,
    data: Region,
    /// The writable pieces' bytes, if small enough to restore by copy.
    rw: Option<Vec<(usize, Vec<u8>)>>,
    heap: Region,
    heap_len: usize,
    state: PersistentState,
    /// The shell it was taken in: its persistent arena and context.
    heap_addr: usize,
    ctx_addr: usize,
    /// Whether its heap is watched for writes on the next cold start.
    watch: Cell<Backoff>,
}

/// When a snapshot's heap is watched for writes (`super::watch`): always,
/// until a watched call writes; then not for the next `skip` cold starts
/// (scanned after each instead), `skip` doubling with every watched call
/// that writes, up to [`Backoff::MAX_SKIP`], and back to its first value
/// after one that does not. A function whose calls write pays one fault
/// per [`Backoff::MAX_SKIP`] calls at most; one whose calls only read,
/// none, and no scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Backoff {
    skip: u32,
    next: u32,
}

impl Backoff {
    const FIRST_SKIP: u32 = 16;
    const MAX_SKIP: u32 = 4096;
    const NEW: Self = Self {
        skip: 0,
        next: Self::FIRST_SKIP,
    };

    /// Whether the coming cold start is watched.
    fn watched(self) -> bool {
        self.skip == 0
    }

    /// After a cold start: `watched` and whether a write was seen.
    fn after(self, watched: bool, wrote: bool) -> Self {
        match (watched, wrote) {
            (true, true) => Self {
                skip: self.next,
                next: self.next.saturating_mul(2).min(Self::MAX_SKIP),
            },
            (true, false) => Self::NEW,
            (false, _) => Self {
                skip: self.skip.saturating_sub(1),
                ..self
            },
        }
    }
}

/// An artifact pre-linked for its own range of an [`ImageSpace`]: its
/// pieces and its writable pages relocated for the range, in the arena;
/// after its first successful `init()` there, also its post-init snapshot.
#[derive(Debug)]
pub struct PrelinkedImage {
    uid: u64,
    /// The [`ImageSpace`] (its address) and the range in it.
    space: usize,
    range: usize,
    span: usize,
    pieces: Vec<Piece>,
    writable: Range<usize>,
    pristine: Region,
    /// The pristine writable pieces' bytes (offset in the image, bytes), if
    /// small enough to restore by copy.
    pristine_rw: Option<Vec<(usize, Vec<u8>)>>,
    snapshot: Option<Snapshot>,
    /// Why this image is never snapshotted, once known.
    refused: Option<&'static str>,
}

/// Which of an image's versions a cold start runs from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// The writable pages as built: `init()` must run.
    Pristine,
    /// The post-init snapshot: `init()` has run.
    Snapshot,
}

impl PrelinkedImage {
    /// Pre-links `artifact` for a range of its own in `space`, into
    /// `arena` (at deploy).
    pub fn build(
        artifact: &ArtifactImage,
        space: &mut ImageSpace,
        arena: &mut ImageArena,
    ) -> Result<Self, PrelinkError> {
        let plan = artifact.plan();
        let (pieces, writable) = pieces(plan);
        let file = artifact.sealed().read_all().map_err(PrelinkError::Artifact)?;
        let range = space.alloc_range(plan.span)?;
        let built = writable_pages(plan, &file, space.addr() + range, &writable).and_then(|pages| {
            let region = arena.store(pages.len(), &[(0, &pages)])?;
            let rw = restorable(&pieces, |at, len| pages[at..at + len].to_vec());
            Ok((region, rw))
        });
        let (pristine, pristine_rw) = match built {
            Ok(built) => built,
            Err(e) => {
                space.free_range(range, plan.span);
                return Err(e);
            }
        };
        Ok(Self {
            uid: NEXT_IMAGE_UID.fetch_add(1, Ordering::Relaxed),
            space: space.addr(),
            range,
            span: plan.span,
            pieces,
            writable,
            pristine,
            pristine_rw,
            snapshot: None,
            refused: None,
        })
    }

    /// The mappings a cold start makes (when the image is not mapped).
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// Whether a post-init snapshot exists.
    pub fn has_snapshot(&self) -> bool {
        self.snapshot.is_some()
    }

    /// Why it will not be snapshotted, if so.
    pub fn snapshot_refused(&self) -> Option<&'static str> {
        self.refused
    }

    /// Arena bytes it holds (pristine pages, snapshot pages and heap).
    pub fn arena_bytes(&self) -> u64 {
        let snap = self.snapshot.as_ref().map_or(0, |s| s.data.len + s.heap.len);
        self.pristine.len + snap
    }

    /// Whether a cold start in `shell` can start from the snapshot.
    pub fn can_start_from_snapshot(&self, shell: &mut InstanceShell) -> bool {
        self.snapshot.as_ref().is_some_and(|s| {
            s.heap_addr == shell.heap_memory().persistent_range().start && s.ctx_addr == shell.context_addr()
        })
    }

    /// Captures `instance` (started from this image's pristine pages in the
    /// range, right after a successful `init()`, before any `handle`) as
    /// the image's snapshot. `Ok(false)`: not snapshotted (already done, or
    /// refused: see [`PrelinkedImage::snapshot_refused`]).
    pub fn capture(&mut self, instance: &mut Instance, arena: &mut ImageArena) -> Result<bool, PrelinkError> {
        if self.snapshot.is_some() || self.refused.is_some() {
            return Ok(false);
        }
        let base = self.space + self.range;
        if instance.function().base() != base {
            return Ok(false);
        }
        if instance.clock_reads() > 0 {
            self.refused = Some("init() read the clock");
            return Ok(false);
        }
        let Some(state) = instance.persistent_state() else {
            self.refused = Some("the heap's state is not the instance's own");
            return Ok(false);
        };
        let heap_range = instance.heap_memory().persistent_range();
        if state.arena_addr() != heap_range.start {
            self.refused = Some("the heap's state is not the instance's own");
            return Ok(false);
        }
        let heap_len = round_up_to_page(state.high_water())
            .unwrap_or(heap_range.len())
            .min(heap_range.len());
        // The writable pieces, as init left them, read from the range.
        let parts: Vec<(usize, &[u8])> = self
            .pieces
            .iter()
            .filter_map(|p| match p.source {
                // SAFETY: a piece of the image mapped in its range (the
                // instance's own image, alive: `instance` is borrowed), with
                // a readable protection; no Rust reference writes it now.
                Source::Writable(at) => Some((at, unsafe {
                    std::slice::from_raw_parts(std::ptr::with_exposed_provenance::<u8>(base + p.start), p.len)
                })),
                _ => None,
            })
            .collect();
        let data = arena.store(self.writable.len(), &parts)?;
        let rw = restorable(&self.pieces, |at, len| {
            parts
                .iter()
                .find(|(a, _)| *a == at)
                .map_or_else(|| vec![0; len], |(_, b)| b.to_vec())
        });
        // SAFETY: the first `heap_len` bytes of the instance's persistent
        // arena, mapped read-write and owned by the instance; no call runs.
        let heap_bytes =
            unsafe { std::slice::from_raw_parts(std::ptr::with_exposed_provenance::<u8>(heap_range.start), heap_len) };
        let heap = match arena.store(heap_len, &[(0, heap_bytes)]) {
            Ok(heap) => heap,
            Err(e) => {
                arena.release(data);
                return Err(e);
            }
        };
        let ctx_addr = instance.context_addr();
        self.snapshot = Some(Snapshot {
            uid: NEXT_IMAGE_UID.fetch_add(1, Ordering::Relaxed),
            data,
            rw,
            heap,
            heap_len,
            state,
            heap_addr: heap_range.start,
            ctx_addr,
            watch: Cell::new(Backoff::NEW),
        });
        // Cold starts run from the snapshot now; a start from the pristine
        // pages (another shell) maps them copy-on-write from the arena.
        self.pristine_rw = None;
        Ok(true)
    }

    /// The allocator state of the snapshot (for
    /// [`Instance::from_shell_initialised`]).
    pub fn snapshot_state(&self) -> Option<&PersistentState> {
        self.snapshot.as_ref().map(|s| &s.state)
    }

    /// Address of its range.
    pub fn base(&self) -> usize {
        self.space + self.range
    }

    /// Frees its arena regions and its range (unmapping it if mapped).
    pub fn release(self, arena: &mut ImageArena, space: &mut ImageSpace) {
        if space.addr() == self.space {
            space.free_range(self.range, self.span);
        }
        arena.release(self.pristine);
        if let Some(s) = self.snapshot {
            arena.release(s.data);
            arena.release(s.heap);
        }
    }
}

/// How [`ImageSpace::leave`] drops a cold instance's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Teardown {
    /// `MADV_DONTNEED` on the writable pages (they read as the image's
    /// again), then `MADV_POPULATE_WRITE` (their private copies are made
    /// now, after the reply, not by the next cold start's first writes);
    /// the image stays mapped, so its next cold start maps nothing.
    Discard,
    /// Unmap the image (back to `PROT_NONE`): its next cold start maps it
    /// again.
    Remap,
    /// The writable pages are the worker's own anonymous pages (up to
    /// [`RESTORE_MAX_BYTES`] per image; larger ones are copy-on-write as
    /// with `Discard`): after each call the version's bytes are copied back
    /// over them. No system call and no page fault on either side of the
    /// call: the fastest here (cold_bench), since every fault and every
    /// PTE change costs a VM exit under this host's nested paging.
    Restore,
}

/// Largest writable part an image restores by copy ([`Teardown::Restore`]).
pub const RESTORE_MAX_BYTES: usize = 256 << 10;

/// An image version mapped in its range.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    /// The mapping's uid: the version's (pristine or snapshot), or with
    /// [`Teardown::Restore`] the image's (its writable pages are copies).
    uid: u64,
    /// The version whose bytes the writable pages hold (`Restore`).
    version: u64,
    span: usize,
    /// Writable pieces (offset in the image, bytes).
    writable: Vec<(usize, usize)>,
    /// Last use, for the least-recently-used eviction.
    tick: u64,
}

/// Default cap on images kept mapped at once (each takes its pieces' VMAs,
/// 4 for the builder's artifacts, and splits the reservation once more):
/// with 5,000 functions deployed resident (~6 VMAs each) and all of their
/// images mapped a worker holds ~55,000 of `vm.max_map_count`'s 65,530.
/// Beyond the cap the least recently used go back to `PROT_NONE`; a
/// mapping refused for want of VMAs (`ENOMEM`) unmaps a quarter of them
/// and retries.
pub const DEFAULT_MAX_MAPPED: usize = 6144;

/// Default address space reserved for images: 256 GiB (`PROT_NONE`, no
/// memory; one VMA while unused).
pub const DEFAULT_SPACE_BYTES: usize = 256 << 30;

/// The address space a worker's pre-linked images live in: one `PROT_NONE`
/// reservation, in which every image gets its own range (its span plus a
/// guard page) for as long as it is deployed, and is relocated for that
/// range's address. A cold start maps the image there (if it is not mapped
/// already); at most `max_mapped` images stay mapped, the least recently
/// used going back to `PROT_NONE`.
#[derive(Debug)]
pub struct ImageSpace {
    reservation: Mapping,
    ranges: OffsetAllocator,
    token: Arc<()>,
    /// Mapped images by range offset.
    held: std::collections::HashMap<usize, Held>,
    /// Range offsets by last use.
    lru: std::collections::BTreeMap<u64, usize>,
    tick: u64,
    max_mapped: usize,
    /// The range of the last cold instance.
    last: Option<usize>,
    /// The snapshot whose heap is mapped over the cold shell's persistent
    /// arena: (snapshot uid, bytes).
    heap: Option<(u64, usize)>,
    teardown: Teardown,
    /// Finds the snapshot heap's written pages (else all are dropped).
    scan: Option<PageScan>,
    /// The scan's answer (kept: no allocation per call).
    written: Vec<Range<usize>>,
    /// Watches a snapshot's heap for writes (`None`: scanned after every
    /// call). Armed at `leave`: watched from the start and not written;
    /// hit: watched and written (arming clears it).
    watch: Option<WriteWatch>,
    teardowns: HeapTeardowns,
}

/// How the snapshot heaps of cold calls were put back so far
/// ([`ImageSpace::heap_teardowns`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HeapTeardowns {
    /// Watched, and nothing wrote: nothing to do (no system call).
    pub unwritten: u64,
    /// Watched, and written (one write fault): scanned or dropped.
    pub written: u64,
    /// Not watched (backing off, or no watch): scanned or dropped.
    pub unwatched: u64,
}

impl ImageSpace {
    /// Reserves `bytes` of address space (`PROT_NONE`, no memory).
    pub fn new(bytes: usize, max_mapped: usize, teardown: Teardown) -> io::Result<Self> {
        let reservation = Mapping::anonymous(bytes, libc::PROT_NONE)?;
        let len = u64::try_from(reservation.len()).unwrap_or(0);
        Ok(Self {
            reservation,
            ranges: OffsetAllocator::new(len),
            token: Arc::new(()),
            held: std::collections::HashMap::new(),
            lru: std::collections::BTreeMap::new(),
            tick: 0,
            max_mapped: max_mapped.max(1),
            last: None,
            heap: None,
            teardown,
            scan: None,
            written: Vec::new(),
            watch: WriteWatch::new(),
            teardowns: HeapTeardowns::default(),
        })
    }

    /// How cold calls' snapshot heaps were put back so far.
    pub fn heap_teardowns(&self) -> HeapTeardowns {
        self.teardowns
    }

    /// Drops only the pages a call wrote of a snapshot's heap after it
    /// (found with `scan`), instead of the whole heap: pages only read stay
    /// mapped to the arena's page cache, so the next cold start does not
    /// fault them in again.
    pub fn use_page_scan(&mut self, scan: PageScan) {
        self.scan = Some(scan);
    }

    /// The page scan's pagemap fd, if one is in use (for the sandbox).
    pub fn page_scan_fd(&self) -> Option<RawFd> {
        self.scan.as_ref().map(PageScan::fd)
    }

    /// Bytes of a snapshot's heap mapped over the cold shell's persistent
    /// arena now ([`ImageSpace::leave`] drops their written pages; the
    /// instance's own reset can spare them:
    /// [`Instance::into_shell_sparing`]).
    pub fn snapshot_heap_bytes(&self) -> usize {
        self.heap.map_or(0, |(_, len)| len)
    }

    /// Drops the written pages of the first `len` bytes of `memory`'s
    /// persistent arena (a snapshot's heap): only those the scan finds, or
    /// all of them without a scan or if it fails.
    fn drop_heap(&mut self, memory: &HeapMemory, len: usize) -> io::Result<()> {
        let base = memory.persistent_range().start;
        if let Some(scan) = self.scan.as_mut() {
            self.written.clear();
            match scan.written(base..base + len, &mut self.written) {
                Ok(()) => {
                    for r in &self.written {
                        memory.discard_persistent_range(r.start - base, r.len())?;
                    }
                    return Ok(());
                }
                Err(e) => {
                    eprintln!("microfaas: page scan failed, dropping whole heaps from now on: {e}");
                    self.scan = None;
                }
            }
        }
        memory.discard_persistent(len)
    }

    /// Address of the reservation.
    pub fn addr(&self) -> usize {
        self.reservation.addr()
    }

    /// The reserved address range.
    pub fn range(&self) -> Range<usize> {
        self.addr()..self.addr() + self.reservation.len()
    }

    /// Images mapped now.
    pub fn mapped(&self) -> usize {
        self.held.len()
    }

    /// The teardown in use.
    pub fn teardown(&self) -> Teardown {
        self.teardown
    }

    /// A range of `span` bytes and a guard page; its offset.
    fn alloc_range(&mut self, span: usize) -> Result<usize, PrelinkError> {
        let want = span.checked_add(page_size()).ok_or(PrelinkError::TooLarge {
            span,
            window: self.reservation.len(),
        })?;
        let got = self
            .ranges
            .alloc(u64::try_from(want).unwrap_or(u64::MAX))
            .ok_or(PrelinkError::TooLarge {
                span,
                window: usize::try_from(self.ranges.free_bytes()).unwrap_or(0),
            })?;
        usize::try_from(got).map_err(|_| PrelinkError::OtherWindow)
    }

    /// Unmaps the image at `offset` if mapped (back to `PROT_NONE`).
    fn evict(&mut self, offset: usize) -> io::Result<()> {
        if let Some(h) = self.held.remove(&offset) {
            self.lru.remove(&h.tick);
            if self.last == Some(offset) {
                self.last = None;
            }
            self.reservation.map_anonymous_fixed(offset, h.span, libc::PROT_NONE)?;
        }
        Ok(())
    }

    fn free_range(&mut self, offset: usize, span: usize) {
        let _ = self.evict(offset);
        self.ranges.release(
            u64::try_from(offset).unwrap_or(0),
            u64::try_from(span + page_size()).unwrap_or(0),
        );
    }

    /// Maps `image` (from its snapshot if `from` says so and it has one;
    /// see [`PrelinkedImage::can_start_from_snapshot`]) in its range for an
    /// instance in `shell`, and the snapshot's heap over `shell`'s
    /// persistent arena. Makes no system call if the range holds that
    /// version already and the heap is the snapshot's; otherwise one `mmap`
    /// per piece (and one or two per heap change).
    pub fn enter(
        &mut self,
        image: &PrelinkedImage,
        artifact: &ArtifactImage,
        arena: &ImageArena,
        shell: &InstanceShell,
        from: StartFrom,
    ) -> Result<LoadedFunction, PrelinkError> {
        if Arc::strong_count(&self.token) > 1 {
            return Err(PrelinkError::Busy);
        }
        if image.space != self.addr() {
            return Err(PrelinkError::OtherWindow);
        }
        let snapshot = match from {
            StartFrom::Snapshot => image.snapshot.as_ref(),
            StartFrom::Pristine => None,
        };
        let (version, data) = match snapshot {
            Some(s) => (s.uid, s.data),
            None => (image.uid, image.pristine),
        };
        let copies = match (self.teardown, snapshot) {
            (Teardown::Restore, Some(s)) => s.rw.as_deref(),
            (Teardown::Restore, None) => image.pristine_rw.as_deref(),
            _ => None,
        };
        // With copies, the mapping is the image's whatever the version.
        let uid = if copies.is_some() { image.uid } else { version };
        let at = image.range;
        self.tick += 1;
        let tick = self.tick;
        match self.held.get_mut(&at) {
            // (Without copies of the wanted version, pages holding another
            // version's bytes are mapped again.)
            Some(h) if h.uid == uid && (copies.is_some() || h.version == version) => {
                self.lru.remove(&h.tick);
                h.tick = tick;
                if let Some(copies) = copies
                    && h.version != version
                {
                    // SAFETY: the image's read-write pieces, mapped in its
                    // range; no instance is alive (the token is ours).
                    unsafe { Self::copy_in(&self.reservation, at, copies) };
                    h.version = version;
                }
            }
            _ => {
                // Forget first: a failure half-way leaves the range unknown
                // (and mapped over again next time).
                if let Some(h) = self.held.remove(&at) {
                    self.lru.remove(&h.tick);
                }
                let anonymous = copies.is_some();
                let mapped = self.map_pieces(at, image, artifact, arena, data, anonymous);
                let mapped = match mapped {
                    // Out of kernel mappings (`vm.max_map_count`): give back
                    // the least recently used quarter of the images, retry.
                    Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && !self.held.is_empty() => {
                        for _ in 0..self.held.len().div_ceil(4) {
                            if let Some((_, old)) = self.lru.pop_first() {
                                let _ = self.evict(old);
                            }
                        }
                        self.map_pieces(at, image, artifact, arena, data, anonymous)
                    }
                    other => other,
                };
                if let Err(e) = mapped {
                    let _ = self.reservation.map_anonymous_fixed(at, image.span, libc::PROT_NONE);
                    return Err(PrelinkError::Map(e));
                }
                if let Some(copies) = copies {
                    // SAFETY: as above: just mapped read-write, no instance.
                    unsafe { Self::copy_in(&self.reservation, at, copies) };
                }
                let writable = image
                    .pieces
                    .iter()
                    .filter(|p| p.prot & libc::PROT_WRITE != 0)
                    .map(|p| (p.start, p.len))
                    .collect();
                self.held.insert(
                    at,
                    Held {
                        uid,
                        version,
                        span: image.span,
                        writable,
                        tick,
                    },
                );
            }
        }
        self.lru.insert(tick, at);
        self.last = Some(at);
        let heap_want = snapshot.filter(|s| s.heap_len > 0).map(|s| (s.uid, s.heap_len));
        let memory = shell.heap_memory();
        let heap_start = memory.persistent_range().start;
        // Watch the heap for writes (see `Backoff`) if the scan can be
        // skipped at all (with `Remap` the heap is mapped again anyway).
        let watch = snapshot
            .filter(|s| s.heap_len > 0 && self.teardown != Teardown::Remap && self.watch.is_some())
            .is_some_and(|s| s.watch.get().watched());
        if self.heap != heap_want {
            let previous = self.heap.take().map_or(0, |(_, len)| len);
            let now = match snapshot.filter(|s| s.heap_len > 0) {
                Some(s) => {
                    memory
                        .map_persistent_prefix(s.heap_len, arena.fd.as_fd(), s.heap.offset, watch)
                        .map_err(PrelinkError::Map)?;
                    if watch && let Some(w) = &self.watch {
                        // SAFETY: the shell's persistent arena, just mapped
                        // read-only; mapped over again only by this space
                        // (which forgets the watch first) and unmapped by
                        // `HeapMemory`'s drop (which forgets it); the
                        // runtime never has the kernel write into a heap.
                        unsafe { w.adopt(heap_start..heap_start + s.heap_len) };
                    }
                    s.heap_len
                }
                None => 0,
            };
            if previous > now {
                memory
                    .clear_persistent(now, previous - now)
                    .map_err(PrelinkError::Map)?;
            }
            self.heap = heap_want;
        } else if let (Some(w), Some((_, len))) = (&self.watch, self.heap) {
            if watch {
                // SAFETY: as above (the same arena, mapped since). If it
                // fails the heap is not watched (scanned after the call).
                let _ = unsafe { w.arm(heap_start..heap_start + len) };
            } else {
                w.disarm().map_err(PrelinkError::Map)?;
            }
        }
        // SAFETY: the range now holds `image`'s pieces (its artifact's code
        // and its writable pages relocated for this address), and `enter`
        // refuses to map anything while the token handed out lives.
        Ok(unsafe { LoadedFunction::in_window(artifact, self.addr() + at, Arc::clone(&self.token)) })
    }

    /// Copies `copies` (offset in the image, bytes) into the image at `at`.
    ///
    /// # Safety
    /// Every copy must lie in a read-write piece mapped at `at`, and no
    /// instance of the image may be alive.
    unsafe fn copy_in(reservation: &Mapping, at: usize, copies: &[(usize, Vec<u8>)]) {
        for (start, bytes) in copies {
            if at + start + bytes.len() <= reservation.len() {
                // SAFETY: caller contract; inside the reservation (checked).
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), reservation.start().add(at + start), bytes.len())
                };
            }
        }
    }

    fn map_pieces(
        &self,
        at: usize,
        image: &PrelinkedImage,
        artifact: &ArtifactImage,
        arena: &ImageArena,
        data: Region,
        anonymous_rw: bool,
    ) -> io::Result<()> {
        for p in &image.pieces {
            let offset = at + p.start;
            if anonymous_rw && p.prot & libc::PROT_WRITE != 0 {
                self.reservation.map_anonymous_fixed(offset, p.len, p.prot)?;
                // Best effort: the copy then takes no faults.
                let _ = self.reservation.populate_write(offset, p.len);
                continue;
            }
            match p.source {
                Source::Artifact(off) => {
                    self.reservation
                        .map_file_fixed(offset, p.len, p.prot, artifact.sealed().as_fd(), off)?;
                }
                Source::Writable(w) => {
                    let off = data.offset + u64::try_from(w).unwrap_or(u64::MAX);
                    self.reservation
                        .map_file_fixed(offset, p.len, p.prot, arena.fd.as_fd(), off)?;
                }
                Source::Zero => self.reservation.map_anonymous_fixed(offset, p.len, p.prot)?,
            }
        }
        Ok(())
    }

    /// Drops the pages the last cold instance (now gone: `shell` is what
    /// is left of it) wrote, as [`Teardown`] says, and unmaps the least
    /// recently used images beyond the cap. Off the request's path.
    ///
    /// `image` is the image of the last [`ImageSpace::enter`] (for
    /// [`Teardown::Restore`]'s bytes; `None` if it is gone, then its range
    /// is unmapped).
    pub fn leave(&mut self, shell: &InstanceShell, image: Option<&PrelinkedImage>) -> io::Result<()> {
        let mut result = Ok(());
        if let Some(at) = self.last.take() {
            let image = image.filter(|i| i.range == at && i.space == self.addr());
            let copies = self.held.get(&at).and_then(|h| {
                let image = image?;
                if h.uid != image.uid {
                    return None;
                }
                // The snapshot's bytes once there is one (the next start
                // runs from it), else the pristine ones.
                match &image.snapshot {
                    Some(s) => s.rw.as_deref().map(|c| (s.uid, c)),
                    None => image.pristine_rw.as_deref().map(|c| (image.uid, c)),
                }
            });
            let restore_by_copy = self.teardown == Teardown::Restore
                && self
                    .held
                    .get(&at)
                    .is_some_and(|h| image.is_some_and(|i| h.uid == i.uid));
            match self.teardown {
                Teardown::Restore if restore_by_copy => match copies {
                    Some((version, copies)) => {
                        // SAFETY: the image's read-write pieces (held with
                        // copies), mapped; its instance is gone (`shell`).
                        unsafe { Self::copy_in(&self.reservation, at, copies) };
                        if let Some(h) = self.held.get_mut(&at) {
                            h.version = version;
                        }
                    }
                    None => {
                        if let Err(e) = self.evict(at) {
                            result = Err(e);
                        }
                    }
                },
                Teardown::Discard | Teardown::Restore => {
                    let writable = self.held.get(&at).map(|h| h.writable.clone()).unwrap_or_default();
                    for (start, len) in writable {
                        if let Err(e) = self.reservation.discard(at + start, len) {
                            let _ = self.evict(at);
                            result = Err(e);
                            break;
                        }
                        // Best effort: without it the first writes fault.
                        let _ = self.reservation.populate_write(at + start, len);
                    }
                }
                Teardown::Remap => {
                    if let Err(e) = self.evict(at) {
                        result = Err(e);
                    }
                }
            }
        }
        if let Some((uid, len)) = self.heap {
            let snapshot = image.and_then(|i| i.snapshot.as_ref()).filter(|s| s.uid == uid);
            // Still armed: watched from the start, nothing wrote the heap.
            let clean = self.watch.as_ref().is_some_and(|w| w.armed().is_some());
            // Hit: watched from the start, and written.
            let watched = clean || self.watch.as_ref().is_some_and(WriteWatch::take_hit);
            if let Some(s) = snapshot {
                s.watch.set(s.watch.get().after(watched, !clean));
            }
            match (watched, clean) {
                (true, true) => self.teardowns.unwritten += 1,
                (true, false) => self.teardowns.written += 1,
                (false, _) => self.teardowns.unwatched += 1,
            }
            let r = match self.teardown {
                Teardown::Discard | Teardown::Restore if clean => Ok(()),
                Teardown::Discard | Teardown::Restore => self.drop_heap(shell.heap_memory(), len),
                Teardown::Remap => {
                    self.heap = None;
                    shell.heap_memory().clear_persistent(0, len)
                }
            };
            if r.is_err() {
                self.heap = None;
                if let Some(w) = &self.watch {
                    let _ = w.disarm();
                }
            }
            result = result.and(r);
        }
        while self.held.len() > self.max_mapped {
            let Some((_, at)) = self.lru.pop_first() else {
                break;
            };
            if let Some(h) = self.held.remove(&at) {
                result = result.and(self.reservation.map_anonymous_fixed(at, h.span, libc::PROT_NONE));
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn allocator_first_fit_and_coalescing() {
        let mut a = OffsetAllocator::new(40);
        assert_eq!(a.alloc(10), Some(0));
        assert_eq!(a.alloc(10), Some(10));
        assert_eq!(a.alloc(10), Some(20));
        assert_eq!(a.alloc(20), None);
        a.release(10, 10);
        assert_eq!(a.alloc(5), Some(10), "first fit reuses the hole");
        a.release(10, 5);
        a.release(0, 10);
        a.release(20, 10);
        assert_eq!(a, OffsetAllocator::new(40), "all coalesced back");
        assert_eq!(a.alloc(0), None);
    }

    proptest! {
        #[test]
        fn allocator_never_hands_out_overlapping_regions(ops in proptest::collection::vec((1u64..50, any::<bool>(), any::<usize>()), 1..200)) {
            let total = 1000;
            let mut a = OffsetAllocator::new(total);
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (len, free, pick) in ops {
                if free && !live.is_empty() {
                    let (s, l) = live.swap_remove(pick % live.len());
                    a.release(s, l);
                } else if let Some(s) = a.alloc(len) {
                    prop_assert!(s + len <= total);
                    for &(t, m) in &live {
                        prop_assert!(s + len <= t || t + m <= s, "overlap");
                    }
                    live.push((s, len));
                }
                let used: u64 = live.iter().map(|&(_, l)| l).sum();
                prop_assert_eq!(a.free_bytes() + used, total);
            }
        }
    }
}
